"""Capsule archives: reproducible pack, inspect, and extract of good archives (internal links,
progress, cancellation). The malicious corpus is in test_capsule_malicious.py."""

from __future__ import annotations

import gzip
import io
import itertools
import os
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from services.capsule.archive import (
    ExtractCancelled,
    Limits,
    Progress,
    UnsafeArchive,
    extract,
    inspect,
    pack,
)
from services.common.errors import InvalidArgument
from tests.unit.capsule_tar import MANIFEST, RUN_SH, base, dir_, hard, reg, sym, targz, write

MANIFEST_TEXT = MANIFEST.decode()
Event = tuple[int, int, int, int]  # a progress report


def _source(root: Path) -> Path:
    src = root / "src"
    (src / "bin").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "docs" / "deep").mkdir(parents=True)
    (src / "capsule.yaml").write_text(MANIFEST_TEXT.replace("run.sh", "bin/run.sh"))
    (src / "bin" / "run.sh").write_bytes(RUN_SH)
    (src / "bin" / "run.sh").chmod(0o755)
    (src / "docs" / "deep" / "notes.md").write_text("notes\n")
    (src / "caf\u00e9.txt").write_text("unicode name\n")
    (src / "big.bin").write_bytes(os.urandom(300_000))
    return src


def _scramble(src: Path) -> None:
    """Changes what must not matter: mtimes, permission bits other than exec, creation order."""
    for path in sorted(src.rglob("*")):
        os.utime(path, (1_000_000_000, 1_234_567_890))
    (src / "docs" / "deep" / "notes.md").chmod(0o600)
    (src / "empty").rmdir()
    (src / "empty").mkdir(mode=0o700)


def test_pack_is_reproducible(tmp_path: Path) -> None:
    src = _source(tmp_path)
    first = pack(src, tmp_path / "a.tar.gz")
    pack(src, tmp_path / "b.tar.gz")
    _scramble(src)
    pack(src, tmp_path / "c.tar.gz")
    data = (tmp_path / "a.tar.gz").read_bytes()
    assert data == (tmp_path / "b.tar.gz").read_bytes()
    assert data == (tmp_path / "c.tar.gz").read_bytes()
    assert first.manifest.entrypoint == "bin/run.sh"
    assert first.entry_count == 9
    assert first.unpacked_bytes == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())

    (src / "docs" / "deep" / "notes.md").write_text("other notes\n")
    pack(src, tmp_path / "d.tar.gz")
    assert data != (tmp_path / "d.tar.gz").read_bytes()


def test_pack_writes_normalized_entries(tmp_path: Path) -> None:
    src = _source(tmp_path)
    _scramble(src)
    out = tmp_path / "hello.tar.gz"
    pack(src, out)
    raw = out.read_bytes()
    assert raw[:4] == b"\x1f\x8b\x08\x00"  # gzip, no FNAME flag
    assert raw[4:8] == bytes(4)  # gzip mtime 0
    with tarfile.open(out, "r:gz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == [
        "big.bin",
        "bin",
        "bin/run.sh",
        "caf\u00e9.txt",
        "capsule.yaml",
        "docs",
        "docs/deep",
        "docs/deep/notes.md",
        "empty",
    ]
    for member in members:
        assert (member.mtime, member.uid, member.gid, member.uname, member.gname) == (
            0,
            0,
            0,
            "",
            "",
        )
        expected = 0o755 if member.isdir() or member.name == "bin/run.sh" else 0o644
        assert member.mode == expected, member.name


def test_pack_skips_its_own_output(tmp_path: Path) -> None:
    src = _source(tmp_path)
    pack(src, src / "out.tar.gz")
    info = pack(src, src / "out.tar.gz")  # the first output is inside src now
    assert info.entry_count == 9


@pytest.mark.parametrize(
    ("setup", "field", "reason"),
    [
        (lambda src: (src / "capsule.yaml").unlink(), "capsule.yaml", "MANIFEST_MISSING"),
        (lambda src: (src / "bin" / "run.sh").unlink(), "capsule.yaml: entrypoint", None),
        (
            lambda src: (src / "capsule.yaml").write_text(
                MANIFEST_TEXT.replace("1.0.0", "1.0.0+build")
            ),
            "capsule.yaml: version",
            "MANIFEST_INVALID",
        ),
        (lambda src: (src / "link").symlink_to("bin/run.sh"), "link", "PACK_UNSUPPORTED_FILE"),
        (lambda src: os.mkfifo(src / "bin" / "pipe"), "bin/pipe", "PACK_UNSUPPORTED_FILE"),
    ],
    ids=["no manifest", "no entrypoint", "bad manifest", "symlink", "fifo"],
)
def test_pack_refuses(
    tmp_path: Path, setup: Callable[[Path], object], field: str, reason: str | None
) -> None:
    src = _source(tmp_path)
    setup(src)
    out = tmp_path / "out.tar.gz"
    with pytest.raises(InvalidArgument) as caught:
        pack(src, out)
    assert caught.value.violations[0][0] == field
    assert caught.value.reason == (reason or "ENTRYPOINT_MISSING")
    assert not out.exists()
    assert list(tmp_path.glob(".out.tar.gz.*")) == []


def test_pack_refuses_what_inspect_would(tmp_path: Path) -> None:
    src = _source(tmp_path)
    (src / "README").write_text("a")
    (src / "readme").write_text("b")
    with pytest.raises(UnsafeArchive) as caught:
        pack(src, tmp_path / "out.tar.gz")
    assert caught.value.reason == "ARCHIVE_CASE_COLLISION"
    assert not (tmp_path / "out.tar.gz").exists()


def test_inspect_reads_manifest_and_totals(tmp_path: Path) -> None:
    archive = write(tmp_path / "a.tar.gz", targz([*base(), dir_("lib"), reg("lib/x", b"12345")]))
    info = inspect(archive, Limits())
    assert info.manifest.name == "hello"
    assert info.entry_count == 4
    assert info.unpacked_bytes == len(MANIFEST) + len(RUN_SH) + 5


def test_extract_with_internal_links_and_progress(tmp_path: Path) -> None:
    members = [
        reg("./capsule.yaml", MANIFEST),  # `./` prefixes, as `tar -C dir .` writes them
        dir_("./bin"),
        reg("./bin/tool", RUN_SH, mode=0o775),
        sym("run.sh", "bin/tool"),  # the entrypoint through an internal link
        sym("bin/self", "."),
        sym("docs-link", "docs"),  # to a directory that comes later
        hard("bin/tool-copy", "bin/tool"),
        reg("docs/big.bin", os.urandom(200_000), mode=0o600),
        dir_("empty"),
    ]
    archive = write(tmp_path / "a.tar.gz", targz(members))
    events: list[Event] = []
    dest = tmp_path / "installed"

    info = extract(archive, dest, Limits(), progress=lambda *e: events.append(e))

    assert info == inspect(archive, Limits())
    assert info.entry_count == 9
    assert (dest / "run.sh").read_bytes() == RUN_SH
    assert os.readlink(dest / "run.sh") == "bin/tool"
    assert os.readlink(dest / "docs-link") == "docs"
    assert (dest / "bin" / "tool-copy").stat().st_ino == (dest / "bin" / "tool").stat().st_ino
    assert (dest / "bin" / "tool").stat().st_mode & 0o7777 == 0o755  # group write dropped
    assert (dest / "docs" / "big.bin").stat().st_mode & 0o7777 == 0o600
    assert (dest / "empty").is_dir()
    assert dest.stat().st_mode & 0o777 == 0o755

    assert events[0] == (0, 9, 0, info.unpacked_bytes)
    assert events[-1] == (9, 9, info.unpacked_bytes, info.unpacked_bytes)
    assert all(e[1] == 9 and e[3] == info.unpacked_bytes for e in events)
    for before, after in itertools.pairwise(events):
        assert after[0] >= before[0] and after[2] >= before[2]
    assert len(events) >= 9 + 3  # per entry, and per 64 KiB chunk of big.bin


def test_extract_refuses_existing_destination(tmp_path: Path) -> None:
    archive = write(tmp_path / "a.tar.gz", targz(base()))
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        extract(archive, dest, Limits())
    assert (dest / "keep.txt").read_text() == "mine"


def test_extract_refuses_archive_that_differs_from_expected(tmp_path: Path) -> None:
    published = inspect(write(tmp_path / "a.tar.gz", targz(base())), Limits())
    swapped = write(tmp_path / "b.tar.gz", targz([*base(), reg("extra", b"x" * 10)]))
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeArchive) as caught:
        extract(swapped, dest, Limits(), expected=published)
    assert caught.value.reason == "ARCHIVE_CORRUPT"
    assert "differs from what was inspected" in caught.value.message
    assert not dest.exists()


def _cancel_when(
    predicate: Callable[[Event], bool],
) -> tuple[threading.Event, list[Event], Progress]:
    cancel = threading.Event()
    events: list[Event] = []

    def progress(files_done: int, files_total: int, bytes_done: int, bytes_total: int) -> None:
        event = (files_done, files_total, bytes_done, bytes_total)
        events.append(event)
        if predicate(event):
            cancel.set()

    return cancel, events, progress


def test_cancel_mid_file_leaves_nothing(tmp_path: Path) -> None:
    members = [*base(), reg("a.bin", os.urandom(1 << 20)), reg("b.bin", os.urandom(1 << 20))]
    archive = write(tmp_path / "a.tar.gz", targz(members))
    expected = inspect(archive, Limits())
    cancel, events, progress = _cancel_when(lambda e: e[2] > 100_000)
    dest = tmp_path / "dest"
    with pytest.raises(ExtractCancelled) as caught:
        extract(archive, dest, Limits(), expected=expected, progress=progress, cancel=cancel)
    assert caught.value.reason == "EXTRACT_CANCELLED"
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == [archive]
    assert events[-1][2] < expected.unpacked_bytes  # it stopped early: a.bin was mid-way
    assert events[-1][2] <= 100_000 + (64 << 10)


def test_cancel_before_start(tmp_path: Path) -> None:
    archive = write(tmp_path / "a.tar.gz", targz(base()))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(ExtractCancelled):
        extract(archive, tmp_path / "dest", Limits(), cancel=cancel)
    assert not (tmp_path / "dest").exists()


def test_missing_data_filter_fails_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = write(tmp_path / "a.tar.gz", targz(base()))
    monkeypatch.delattr(tarfile, "data_filter")
    with pytest.raises(RuntimeError, match="PEP 706"):
        inspect(archive, Limits())


def test_global_pax_header_is_accepted(tmp_path: Path) -> None:
    """`git archive` starts with a global pax header (the commit id)."""
    tar_path = tmp_path / "a.tar"
    with tarfile.open(
        tar_path, "w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "commit abc"}
    ) as tar:
        for info, data in base():
            tar.addfile(info, io.BytesIO(data or b""))
    archive = write(tmp_path / "a.tar.gz", gzip.compress(tar_path.read_bytes()))
    assert inspect(archive, Limits()).entry_count == 2
