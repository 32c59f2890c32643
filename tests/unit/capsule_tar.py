"""Builders for capsule test archives, malicious ones included (used by test_capsule_*)."""

from __future__ import annotations

import gzip
import io
import os
import struct
import tarfile
import zlib
from pathlib import Path

MANIFEST = (
    b"name: hello\n"
    b"version: 1.0.0\n"
    b"description: Says hello\n"
    b"publisher: acme\n"
    b"entrypoint: run.sh\n"
    b"permissions: [network]\n"
)
RUN_SH = b"#!/bin/sh\necho hello\n"

Member = tuple[tarfile.TarInfo, bytes | None]


def reg(name: str, data: bytes = b"x", *, mode: int = 0o644, size: int | None = None) -> Member:
    """A regular file; `size` declares a size without writing data (a lying header)."""
    info = tarfile.TarInfo(name)
    info.mode = mode
    info.size = len(data) if size is None else size
    return info, (data if size is None else None)


def dir_(name: str, *, mode: int = 0o755) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    return info, None


def sym(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mode = 0o777
    return info, None


def hard(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE
    info.linkname = target
    return info, None


def special(name: str, type_: bytes, *, pax: dict[str, str] | None = None) -> Member:
    info = tarfile.TarInfo(name)
    info.type = type_
    if pax:
        info.pax_headers = pax
    return info, None


def with_pax(member: Member, pax: dict[str, str]) -> Member:
    member[0].pax_headers = pax
    return member


def base() -> list[Member]:
    """A valid capsule: manifest and entrypoint."""
    return [reg("capsule.yaml", MANIFEST), reg("run.sh", RUN_SH, mode=0o755)]


def tar_bytes(members: list[Member], *, fmt: int = tarfile.PAX_FORMAT, end: bool = True) -> bytes:
    """The tar stream; `end=False` leaves off the end-of-archive blocks."""
    buf = io.BytesIO()
    tar = tarfile.open(fileobj=buf, mode="w", format=fmt)
    for info, data in members:
        tar.addfile(info, io.BytesIO(data) if data is not None else None)
    if end:
        tar.close()
    return buf.getvalue()


def targz(members: list[Member], *, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    return gzip.compress(tar_bytes(members, fmt=fmt), mtime=0)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def gzip_bomb(path: Path, prefix: bytes, zeros_mib: int) -> int:
    """Writes gzip(prefix + zeros_mib MiB of zeros) without ever holding it: after a full
    flush deflate starts afresh, so every MiB of zeros compresses to the same ~1 KiB block.
    Returns the uncompressed size."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    mib = bytes(1 << 20)
    crc = zlib.crc32(prefix)
    with open(path, "wb") as fh:
        fh.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")  # gzip header, mtime 0
        fh.write(comp.compress(prefix) + comp.flush(zlib.Z_FULL_FLUSH))
        block = comp.compress(mib) + comp.flush(zlib.Z_FULL_FLUSH)
        for _ in range(zeros_mib):
            fh.write(block)
            crc = zlib.crc32(mib, crc)
        fh.write(comp.flush(zlib.Z_FINISH))
        total = len(prefix) + (zeros_mib << 20)
        fh.write(struct.pack("<II", crc, total & 0xFFFFFFFF))
    return total


def snapshot(root: Path, *, skip_dir_mtime: Path | None = None) -> dict[str, tuple[object, ...]]:
    """Every path under `root` with its type, size and mtime (no symlinks followed). A
    directory's mtime is left out for `skip_dir_mtime` (the destination's parent, whose
    mtime changes when the destination is created and removed)."""
    found: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [".", *dirnames, *filenames]:
            path = os.path.normpath(os.path.join(dirpath, name))
            if name == "." and path != str(root):
                continue  # each directory is listed by its parent
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            kind = st.st_mode & 0o170000
            if os.path.isdir(path) and not os.path.islink(path):
                mtime = None if Path(path) == skip_dir_mtime else st.st_mtime_ns
                found[rel] = ("dir", st.st_mode, mtime)
            else:
                found[rel] = (kind, st.st_mode, st.st_size, st.st_mtime_ns)
    return found
