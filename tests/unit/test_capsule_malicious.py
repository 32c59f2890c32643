"""A corpus of malicious capsule archives, built here with tarfile/gzip: each is refused by
`inspect` and by `extract` with the same precise reason, and extraction writes zero bytes
outside its destination (a sandbox of sentinel files around it is snapshotted before and
after) and leaves no destination behind."""

from __future__ import annotations

import gzip
import tarfile
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.capsule.archive import ArchiveInfo, Limits, UnsafeArchive, extract, inspect
from services.capsule.manifest import parse_manifest
from tests.unit.capsule_tar import (
    MANIFEST,
    Member,
    base,
    dir_,
    gzip_bomb,
    hard,
    reg,
    snapshot,
    special,
    sym,
    tar_bytes,
    targz,
    with_pax,
)

MiB = 1 << 20
GiB = 1 << 30


@dataclass
class Sandbox:
    root: Path  # holds sentinels and, under work/, the destination
    dest: Path
    archive: Path  # outside the sandbox

    def snapshot(self) -> dict[str, tuple[object, ...]]:
        return snapshot(self.root, skip_dir_mtime=self.dest.parent)


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    root = tmp_path / "sandbox"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0\n")
    (root / "outside.txt").write_text("sentinel\n")
    (root / "work").mkdir()
    (root / "work" / "neighbour.txt").write_text("neighbour\n")
    return Sandbox(root=root, dest=root / "work" / "dest", archive=tmp_path / "evil.tar.gz")


@dataclass(frozen=True)
class Case:
    reason: str
    members: Callable[[Path], list[Member]]  # gets the sandbox root (for absolute paths)
    fragment: str = ""  # a part of the message (usually the entry's name)
    limits: Limits = field(default_factory=Limits)
    with_base: bool = True


CASES: dict[str, Case] = {
    "absolute path": Case(
        "ARCHIVE_ABSOLUTE_PATH",
        lambda sb: [reg(str(sb / "abs-written.txt"), b"pwned")],
        fragment="abs-written.txt",
    ),
    "dotdot": Case(
        "ARCHIVE_PATH_TRAVERSAL", lambda sb: [reg("../escaped.txt", b"pwned")], "../escaped.txt"
    ),
    "dotdot nested": Case(
        "ARCHIVE_PATH_TRAVERSAL",
        lambda sb: [reg("sub/../../../outside.txt", b"pwned")],
        fragment="sub/../../../outside.txt",
    ),
    "backslash": Case(
        "ARCHIVE_BACKSLASH", lambda sb: [reg("..\\..\\outside.txt", b"pwned")], "outside.txt"
    ),
    "nul in name": Case(
        "ARCHIVE_NUL",
        # A ustar name field ends at NUL; a pax `path` record carries it through.
        lambda sb: [with_pax(reg("innocent.txt"), {"path": "innocent.txt\x00../../outside.txt"})],
        fragment="\\x00",
    ),
    "control character": Case("ARCHIVE_BAD_NAME", lambda sb: [reg("bell\x07.txt")], "\\x07"),
    "symlink escape absolute": Case(
        "ARCHIVE_LINK_ESCAPE", lambda sb: [sym("etc", str(sb / "etc"))], fragment="etc"
    ),
    "symlink escape relative": Case(
        "ARCHIVE_LINK_ESCAPE", lambda sb: [sym("up", "../../etc")], fragment="../../etc"
    ),
    "symlink escape nested": Case(
        "ARCHIVE_LINK_ESCAPE", lambda sb: [dir_("a"), sym("a/up", "../../x")], fragment="a/up"
    ),
    "symlink escape then write through it": Case(
        "ARCHIVE_LINK_ESCAPE",
        lambda sb: [sym("up", "../.."), reg("up/outside.txt", b"pwned")],
        fragment="up",
    ),
    "symlink chain escape": Case(
        # d/s -> .. is the root, inside; e -> d/s/.. reads as `d` lexically but really is
        # the root's parent.
        "ARCHIVE_LINK_ESCAPE",
        lambda sb: [dir_("d"), sym("d/s", ".."), sym("e", "d/s/..")],
        fragment="'e'",
    ),
    "symlink loop": Case("ARCHIVE_LINK_LOOP", lambda sb: [sym("a", "b"), sym("b", "a")], "'b'"),
    "symlink dangling": Case(
        "ARCHIVE_LINK_TARGET_MISSING", lambda sb: [sym("nowhere", "missing.txt")], "nowhere"
    ),
    "write through symlink dir": Case(
        "ARCHIVE_THROUGH_SYMLINK",
        lambda sb: [dir_("inner"), sym("link", "inner"), reg("link/file.txt", b"pwned")],
        fragment="link/file.txt",
    ),
    "hardlink escape": Case(
        "ARCHIVE_LINK_ESCAPE", lambda sb: [hard("h", "../../outside.txt")], "../../outside.txt"
    ),
    "hardlink absolute": Case(
        "ARCHIVE_LINK_ESCAPE", lambda sb: [hard("h", str(sb / "outside.txt"))], "outside.txt"
    ),
    "hardlink to missing": Case(
        "ARCHIVE_LINK_TARGET_MISSING", lambda sb: [hard("h", "etc/passwd")], "etc/passwd"
    ),
    "hardlink through symlink": Case(
        "ARCHIVE_LINK_TARGET_MISSING",
        lambda sb: [dir_("inner"), reg("inner/f"), sym("l", "inner"), hard("h", "l/f")],
        fragment="l/f",
    ),
    "character device": Case("ARCHIVE_DEVICE", lambda sb: [special("tty", tarfile.CHRTYPE)]),
    "block device": Case("ARCHIVE_DEVICE", lambda sb: [special("sda", tarfile.BLKTYPE)], "sda"),
    "fifo": Case("ARCHIVE_DEVICE", lambda sb: [special("pipe", tarfile.FIFOTYPE)], "FIFO"),
    "unknown type": Case(
        "ARCHIVE_UNSUPPORTED_TYPE", lambda sb: [special("odd", b"Z")], fragment="odd"
    ),
    "setuid": Case("ARCHIVE_SETUID", lambda sb: [reg("su", mode=0o4755)], "setuid"),
    "setgid": Case("ARCHIVE_SETUID", lambda sb: [reg("sg", mode=0o2755)], "setgid"),
    "sticky dir": Case("ARCHIVE_SETUID", lambda sb: [dir_("tmp", mode=0o1777)], "sticky"),
    "duplicate name": Case(
        "ARCHIVE_DUPLICATE_NAME", lambda sb: [reg("run.sh", b"evil")], fragment="run.sh"
    ),
    "duplicate dir": Case("ARCHIVE_DUPLICATE_NAME", lambda sb: [dir_("d"), dir_("d")], "'d'"),
    "case collision": Case(
        "ARCHIVE_CASE_COLLISION", lambda sb: [reg("README"), reg("readme")], "readme"
    ),
    "case collision of directories": Case(
        "ARCHIVE_CASE_COLLISION", lambda sb: [reg("Docs/a"), reg("docs/b")], "docs"
    ),
    "unicode nfc/nfd collision": Case(
        "ARCHIVE_UNICODE_COLLISION",
        lambda sb: [reg("caf\u00e9.txt"), reg("cafe\u0301.txt")],
        fragment="NFC/NFD",
    ),
    "file used as directory": Case(
        "ARCHIVE_PATH_CONFLICT", lambda sb: [reg("f"), reg("f/x")], fragment="f/x"
    ),
    "directory replaced by file": Case(
        "ARCHIVE_PATH_CONFLICT", lambda sb: [reg("d/x"), reg("d")], fragment="'d'"
    ),
    "too many entries": Case(
        "ARCHIVE_TOO_MANY_ENTRIES",
        lambda sb: [reg(f"f{i:02}") for i in range(20)],
        limits=Limits(max_entries=10),
        fragment="more than 10 entries",
    ),
    "declared huge size": Case(
        "ARCHIVE_TOO_LARGE", lambda sb: [reg("huge.bin", size=5 * GiB)], fragment="huge.bin"
    ),
    "total size over limit": Case(
        "ARCHIVE_TOO_LARGE",
        lambda sb: [reg("a", bytes(600)), reg("b", bytes(600))],
        limits=Limits(max_unpacked_bytes=1000),
        fragment="'b'",
    ),
    "huge pax header": Case(
        "ARCHIVE_TOO_LARGE",
        lambda sb: [with_pax(reg("f"), {"comment": "x" * (2 * MiB)})],
        fragment="extended tar header",
    ),
    "chain of pax headers": Case(
        "ARCHIVE_CORRUPT",
        lambda sb: [special("g", tarfile.XGLTYPE, pax={"comment": "x"}) for _ in range(40)],
        fragment="extended tar headers",
    ),
    "sparse file": Case(
        "ARCHIVE_UNSUPPORTED_TYPE", lambda sb: [special("holes", tarfile.GNUTYPE_SPARSE)], "sparse"
    ),
    "manifest missing": Case(
        "MANIFEST_MISSING", lambda sb: [reg("run.sh")], fragment="capsule.yaml", with_base=False
    ),
    "manifest is a symlink": Case(
        "MANIFEST_MISSING",
        lambda sb: [reg("real.yaml", MANIFEST), sym("capsule.yaml", "real.yaml"), reg("run.sh")],
        fragment="regular file",
        with_base=False,
    ),
    "entrypoint missing": Case(
        "ENTRYPOINT_MISSING",
        lambda sb: [reg("capsule.yaml", MANIFEST)],
        fragment="run.sh",
        with_base=False,
    ),
    "entrypoint is a directory": Case(
        "ENTRYPOINT_MISSING",
        lambda sb: [reg("capsule.yaml", MANIFEST), dir_("run.sh")],
        fragment="run.sh",
        with_base=False,
    ),
}


# What the service passes as `expected` (recorded at publish); generous, so that the checks
# and not the totals comparison refuse.
_PUBLISHED = ArchiveInfo(
    manifest=parse_manifest(MANIFEST), entry_count=10**6, unpacked_bytes=1 << 40
)


def _refusals(sandbox: Sandbox, limits: Limits) -> tuple[UnsafeArchive, UnsafeArchive]:
    """Runs inspect and extract (with and without `expected`, i.e. with and without the
    inspecting pre-pass); all must refuse alike, and nothing may change around dest."""
    before = sandbox.snapshot()
    with pytest.raises(UnsafeArchive) as inspected:
        inspect(sandbox.archive, limits)
    with pytest.raises(UnsafeArchive) as extracted:
        extract(sandbox.archive, sandbox.dest, limits)
    assert not sandbox.dest.exists()
    with pytest.raises(UnsafeArchive) as streamed:
        extract(sandbox.archive, sandbox.dest, limits, expected=_PUBLISHED)
    assert not sandbox.dest.exists()
    assert sandbox.snapshot() == before
    assert streamed.value.reason == extracted.value.reason
    assert streamed.value.message == extracted.value.message
    return inspected.value, extracted.value


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_malicious_archive_is_refused(sandbox: Sandbox, case: Case) -> None:
    members = case.members(sandbox.root)
    sandbox.archive.write_bytes(targz((base() if case.with_base else []) + members))

    inspected, extracted = _refusals(sandbox, case.limits)

    assert inspected.reason == case.reason, inspected.message
    assert extracted.reason == case.reason, extracted.message
    assert inspected.message == extracted.message  # one checker, one verdict
    assert case.fragment in extracted.message
    assert (sandbox.root / "etc" / "passwd").read_text() == "root:x:0:0\n"
    assert not (sandbox.root / "abs-written.txt").exists()


def test_refusal_after_files_were_written_removes_everything(sandbox: Sandbox) -> None:
    """The unsafe entry comes last, after real files and directories were extracted."""
    members = [*base(), dir_("lib"), reg("lib/a.py", b"a" * 100_000), reg("lib/../../x")]
    sandbox.archive.write_bytes(targz(members))
    _, extracted = _refusals(sandbox, Limits())
    assert extracted.reason == "ARCHIVE_PATH_TRAVERSAL"


@pytest.mark.parametrize(
    ("mangle", "fragment"),
    [
        (lambda data: data[: len(data) // 2], "truncated"),
        (lambda data: data + b"trailing garbage", "after the end"),
        (lambda data: b"PK\x03\x04 not a gzip file at all", "not a valid gzip"),
        (lambda data: data[:-8] + bytes(8), "not a valid gzip"),  # CRC/size trailer zeroed
    ],
    ids=["truncated", "trailing data", "not gzip", "bad checksum"],
)
def test_corrupt_archive_is_refused(
    sandbox: Sandbox, mangle: Callable[[bytes], bytes], fragment: str
) -> None:
    good = targz([*base(), reg("data.bin", bytes(range(256)) * 200)])
    sandbox.archive.write_bytes(mangle(good))
    inspected, extracted = _refusals(sandbox, Limits())
    assert inspected.reason == extracted.reason == "ARCHIVE_CORRUPT"
    assert fragment in extracted.message


def test_truncated_tar_inside_valid_gzip_is_refused(sandbox: Sandbox) -> None:
    tar = tar_bytes([*base(), reg("data.bin", b"d" * 5000)])
    # capsule.yaml and run.sh take 2048 bytes; then data.bin's header and 100 of its bytes.
    sandbox.archive.write_bytes(gzip.compress(tar[: 2048 + 512 + 100], mtime=0))
    inspected, extracted = _refusals(sandbox, Limits())
    assert inspected.reason == extracted.reason == "ARCHIVE_CORRUPT"
    assert "data.bin" in extracted.message


def _peak_memory(run: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(UnsafeArchive) as refused:
            run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused.value.reason == "ARCHIVE_RATIO", refused.value.message
    return peak


@pytest.mark.parametrize("where", ["in a member", "after the tar end"])
def test_gzip_bomb_is_stopped_with_bounded_memory(sandbox: Sandbox, where: str) -> None:
    """2 GiB of zeros in a ~2 MiB gzip. "in a member": a member declares the 2 GiB (the
    declared sizes give it away before any byte is inflated). "after the tar end": the zeros
    hide behind a valid tar, so only the streaming gzip guard sees them."""
    if where == "in a member":
        prefix = tar_bytes([*base(), reg("zeros.bin", size=2 * GiB)], end=False)
        limits = Limits(max_unpacked_bytes=8 * GiB)  # let the ratio, not the size, stop it
    else:
        prefix = tar_bytes(base())
        limits = Limits()
    unpacked = gzip_bomb(sandbox.archive, prefix, zeros_mib=2048)
    assert unpacked > GiB
    assert sandbox.archive.stat().st_size < 4 * MiB
    before = sandbox.snapshot()

    assert _peak_memory(lambda: inspect(sandbox.archive, limits)) < 64 * MiB
    assert _peak_memory(lambda: extract(sandbox.archive, sandbox.dest, limits)) < 64 * MiB
    assert not sandbox.dest.exists()
    assert sandbox.snapshot() == before


def test_declared_bomb_with_default_limits_is_too_large(sandbox: Sandbox) -> None:
    prefix = tar_bytes([*base(), reg("zeros.bin", size=2 * GiB)], end=False)
    gzip_bomb(sandbox.archive, prefix, zeros_mib=64)
    inspected, extracted = _refusals(sandbox, Limits())
    assert inspected.reason == extracted.reason == "ARCHIVE_TOO_LARGE"
    assert "zeros.bin" in extracted.message


def test_hidden_bomb_is_stopped_by_the_size_cap_too(sandbox: Sandbox) -> None:
    """With the ratio check off, the streaming guard still stops at the unpacked-size cap."""
    gzip_bomb(sandbox.archive, tar_bytes(base()), zeros_mib=2048)
    limits = Limits(max_entries=10, max_unpacked_bytes=16 * MiB, max_ratio=1e12)
    inspected, extracted = _refusals(sandbox, limits)
    assert inspected.reason == extracted.reason == "ARCHIVE_TOO_LARGE"
    assert "unpacks to more than" in extracted.message


def test_name_that_is_not_utf8_is_refused(sandbox: Sandbox) -> None:
    """GNU tar stores names as raw bytes; tarfile hands undecodable ones over escaped."""
    members = [*base(), reg("caf\udce9.txt")]  # b"caf\xe9.txt", Latin-1
    sandbox.archive.write_bytes(targz(members, fmt=tarfile.GNU_FORMAT))
    inspected, extracted = _refusals(sandbox, Limits())
    assert inspected.reason == extracted.reason == "ARCHIVE_BAD_NAME"
    assert "not valid UTF-8" in extracted.message
