"""Capsule archives (`.tar.gz`): reproducible packing, and streaming inspection and extraction
that refuse anything unsafe.

`inspect` and `extract` run the very same checks (`_Scan.check_member`, `_Scan.finish`) over
the same stream; `extract` only adds the writing. The archive is never loaded whole and never
seeked: the gzip layer (`_GuardedGunzip`) decompresses at most `CHUNK` bytes per step and
counts bytes in and out, so a bomb stops at the limit with bounded memory; tarfile reads the
tar stream from it (`mode="r|"`), and every tar header passes `_HeaderGuard` before tarfile
buffers an extended header. Each member then gets our checks and tarfile's own data filter
(PEP 706) as a second opinion.
"""

from __future__ import annotations

import errno
import gzip
import os
import shutil
import stat
import tarfile
import threading
import unicodedata
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Self

import grpc

from services.capsule.manifest import (
    MANIFEST_NAME,
    Manifest,
    check_manifest_size,
    parse_manifest,
)
from services.common.errors import InvalidArgument, ResourceExhausted, SomaError

CHUNK = 64 << 10
# Extended headers (pax, GNU long names) are read by tarfile into memory whole: keep them small.
MAX_META_HEADER_BYTES = 64 << 10
# tarfile follows chains of extended headers recursively; a long chain is never legitimate.
MAX_CONSECUTIVE_META_HEADERS = 8
MAX_GLOBAL_HEADERS = 16
MAX_NAME_BYTES = 4096
MAX_COMPONENT_BYTES = 255
MAX_SYMLINK_HOPS = 40
# Room for tar headers and padding on top of the file bytes in the decompressed stream.
_OVERHEAD_PER_ENTRY = 8 << 10

_META_TYPES = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)

# Entry kinds in the scanned tree.
_DIR, _IMPLICIT_DIR, _FILE, _SYMLINK, _HARDLINK = "dir", "implicit dir", "file", "symlink", "link"
_DIRS = (_DIR, _IMPLICIT_DIR)
_FILES = (_FILE, _HARDLINK)


@dataclass(frozen=True)
class Limits:
    max_entries: int = 10_000
    max_unpacked_bytes: int = 1 << 30
    max_ratio: float = 200.0  # unpacked / compressed, checked once past ratio_floor_bytes
    max_manifest_bytes: int = 64 << 10
    ratio_floor_bytes: int = 1 << 20

    def too_expanded(self, unpacked: int, compressed: int) -> bool:
        """Past `ratio_floor_bytes`, more than `max_ratio` times the compressed size: the mark
        of a compression bomb."""
        return unpacked > self.ratio_floor_bytes and unpacked > self.max_ratio * compressed


@dataclass(frozen=True)
class ArchiveInfo:
    manifest: Manifest
    entry_count: int  # files, directories and links (the root `./` entry is not counted)
    unpacked_bytes: int  # total size of the regular files


class UnsafeArchive(InvalidArgument):
    """An archive refused by the checks; `reason` says which (ARCHIVE_*), the message names
    the entry."""

    def __init__(self, message: str, *, reason: str, entry: str | None = None) -> None:
        super().__init__(message, field="archive", reason=reason)
        self.entry = entry
        if entry is not None:
            self.metadata["entry"] = _show(entry)


class ExtractCancelled(SomaError):
    """`extract` stopped because its `cancel` event was set; nothing was left behind."""

    code = grpc.StatusCode.CANCELLED
    default_reason = "EXTRACT_CANCELLED"


Progress = Callable[[int, int, int, int], None]  # files_done, files_total, bytes_done, bytes_total


def _show(name: str, limit: int = 200) -> str:
    """An entry name safe to put in a message: control characters escaped, length bounded."""
    shown = repr(name)[1:-1]
    return shown if len(shown) <= limit else shown[:limit] + "..."


def _require_data_filter() -> None:
    if not hasattr(tarfile, "data_filter"):
        raise RuntimeError(
            "this Python has no tarfile.data_filter (PEP 706); capsule extraction needs "
            "Python 3.11.4 or newer"
        )


# --------------------------------------------------------------------------- stream guards


class _GuardedGunzip:
    """A gzip decompressor for tarfile that stops a bomb: each read inflates at most CHUNK
    bytes (zlib's max_length), and the running totals are checked against the limits."""

    def __init__(self, raw: BinaryIO, limits: Limits) -> None:
        self._raw = raw
        self._limits = limits
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip wrapper, checks CRC + size
        self._max_out = limits.max_unpacked_bytes + _OVERHEAD_PER_ENTRY * (limits.max_entries + 128)
        self._raw_eof = False
        self._trailer_checked = False
        self.compressed = 0
        self.unpacked = 0

    def read(self, size: int = -1) -> bytes:
        want = CHUNK if size is None or size < 0 else min(size, CHUNK)
        while want and not self._z.eof:
            data = self._z.unconsumed_tail
            if not data and not self._raw_eof:
                data = self._raw.read(CHUNK)
                self.compressed += len(data)
                self._raw_eof = not data
            try:
                out = self._z.decompress(data, want)
            except zlib.error as exc:
                raise UnsafeArchive(
                    f"the archive is not a valid gzip file ({exc})", reason="ARCHIVE_CORRUPT"
                ) from None
            if out:
                self.unpacked += len(out)
                self._check()
                return out
            if self._raw_eof and not self._z.unconsumed_tail and not self._z.eof:
                raise UnsafeArchive(
                    "the archive ends early: the gzip stream is truncated",
                    reason="ARCHIVE_CORRUPT",
                )
        if self._z.eof and not self._trailer_checked:
            self._trailer_checked = True
            if self._z.unused_data or self._raw.read(1):
                raise UnsafeArchive(
                    "the archive has data after the end of its gzip stream",
                    reason="ARCHIVE_CORRUPT",
                )
        return b""

    def drain(self) -> None:
        """Reads to the end: verifies the gzip checksum and that nothing hides after the tar."""
        while self.read(CHUNK):
            pass

    def _check(self) -> None:
        limits = self._limits
        if self.unpacked > self._max_out:
            raise UnsafeArchive(
                f"the archive unpacks to more than {self._max_out} bytes "
                f"(limit {limits.max_unpacked_bytes} bytes of files)",
                reason="ARCHIVE_TOO_LARGE",
            )
        if limits.too_expanded(self.unpacked, self.compressed):
            raise UnsafeArchive(
                f"the archive expands more than {limits.max_ratio:g} times "
                f"({self.unpacked} bytes from {self.compressed} compressed bytes so far): "
                "refusing a likely compression bomb",
                reason="ARCHIVE_RATIO",
            )


class _HeaderGuard:
    """Sees every raw tar header (also pax and GNU long-name headers, which tarfile reads
    into memory whole and follows recursively) before tarfile acts on it."""

    def __init__(self, limits: Limits) -> None:
        self._max_headers = 4 * limits.max_entries + 16
        self._headers = 0
        self._meta_run = 0
        self._globals = 0

    def check(self, info: tarfile.TarInfo) -> None:
        self._headers += 1
        if self._headers > self._max_headers:
            raise UnsafeArchive(
                f"the archive has more than {self._max_headers} tar headers",
                reason="ARCHIVE_TOO_MANY_ENTRIES",
            )
        if info.type in _META_TYPES:
            self._meta_run += 1
            self._globals += info.type == tarfile.XGLTYPE
            if info.size > MAX_META_HEADER_BYTES:
                raise UnsafeArchive(
                    f"the archive has an extended tar header of {info.size} bytes "
                    f"(limit {MAX_META_HEADER_BYTES})",
                    reason="ARCHIVE_TOO_LARGE",
                )
            if self._meta_run > MAX_CONSECUTIVE_META_HEADERS or self._globals > MAX_GLOBAL_HEADERS:
                raise UnsafeArchive(
                    "the archive has too many extended tar headers in a row",
                    reason="ARCHIVE_CORRUPT",
                )
        else:
            self._meta_run = 0
            if info.type == tarfile.GNUTYPE_SPARSE:
                raise UnsafeArchive(
                    f"entry '{_show(info.name)}' is a sparse file, which capsules do not support",
                    reason="ARCHIVE_UNSUPPORTED_TYPE",
                    entry=info.name,
                )


def _guarded_tarinfo(guard: _HeaderGuard) -> type[tarfile.TarInfo]:
    # TarFile(tarinfo=...) is tarfile's documented hook; frombuf parses each raw header.
    class GuardedTarInfo(tarfile.TarInfo):
        @classmethod
        def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
            info = super().frombuf(buf, encoding, errors)
            guard.check(info)
            return info

    return GuardedTarInfo


# --------------------------------------------------------------------------- member checks


@dataclass(frozen=True)
class _Entry:
    name: str  # as in the archive (for messages)
    parts: tuple[str, ...]  # normalized path components
    kind: str
    size: int
    mode: int  # after tarfile's data filter
    linkname: str  # symlink target as stored, or hard link target normalized
    is_manifest: bool


def _fold(path: str) -> str:
    """Canonical caseless form (Unicode 3.13, D145): equal for names a case- or
    normalization-insensitive file system (macOS, Windows) would treat as the same."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", path).casefold())


def _check_text(text: str, what: str, entry: str) -> None:
    """Characters no capsule path may contain (names and link targets alike)."""
    if "\x00" in text:
        raise UnsafeArchive(
            f"{what} '{_show(text)}' contains a NUL character", reason="ARCHIVE_NUL", entry=entry
        )
    if "\\" in text:
        raise UnsafeArchive(
            f"{what} '{_show(text)}' contains a backslash; capsule paths use '/' only",
            reason="ARCHIVE_BACKSLASH",
            entry=entry,
        )
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeArchive(
            f"{what} '{_show(text)}' is not valid UTF-8", reason="ARCHIVE_BAD_NAME", entry=entry
        ) from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise UnsafeArchive(
            f"{what} '{_show(text)}' contains control characters",
            reason="ARCHIVE_BAD_NAME",
            entry=entry,
        )
    if len(encoded) > MAX_NAME_BYTES:
        raise UnsafeArchive(
            f"{what} '{_show(text)}' is longer than {MAX_NAME_BYTES} bytes",
            reason="ARCHIVE_BAD_NAME",
            entry=entry,
        )


def _split(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p not in ("", "."))


class _Scan:
    """The checks, and what they remember about the entries seen so far. One instance per
    pass; `inspect` and `extract` both feed it every member in archive order."""

    def __init__(self, limits: Limits, compressed_size: int, filter_root: str) -> None:
        self.limits = limits
        self.compressed_size = compressed_size
        self.filter_root = filter_root  # the directory tarfile's data filter checks against
        self.nodes: dict[str, str] = {}  # normalized path -> kind
        self.folded: dict[str, str] = {}  # _fold(path) -> path
        self.symlinks: dict[str, str] = {}  # path -> target as stored
        self.entry_count = 0
        self.unpacked_bytes = 0
        self.manifest: Manifest | None = None

    # ---- per member

    def check_member(self, member: tarfile.TarInfo) -> _Entry | None:
        name = member.name
        _check_text(name, "entry", name)
        if name.startswith("/"):
            raise UnsafeArchive(
                f"entry '{_show(name)}' is an absolute path; capsule paths are relative",
                reason="ARCHIVE_ABSOLUTE_PATH",
                entry=name,
            )
        parts = _split(name)
        if ".." in parts:
            raise UnsafeArchive(
                f"entry '{_show(name)}' uses '..' and could leave the capsule directory",
                reason="ARCHIVE_PATH_TRAVERSAL",
                entry=name,
            )
        if any(len(p.encode("utf-8")) > MAX_COMPONENT_BYTES for p in parts):
            raise UnsafeArchive(
                f"entry '{_show(name)}' has a path component longer than "
                f"{MAX_COMPONENT_BYTES} bytes",
                reason="ARCHIVE_BAD_NAME",
                entry=name,
            )
        kind = self._kind(member)
        if not parts:
            if kind == _DIR:
                return None  # `./`: the capsule root itself
            raise UnsafeArchive(
                f"entry '{_show(name)}' has an empty name", reason="ARCHIVE_CORRUPT", entry=name
            )
        special = member.mode & 0o7000
        if special:
            bits = [
                label
                for bit, label in ((0o4000, "setuid"), (0o2000, "setgid"), (0o1000, "sticky"))
                if special & bit
            ]
            raise UnsafeArchive(
                f"entry '{_show(name)}' has the {'/'.join(bits)} bit set "
                f"(mode {member.mode:o}); capsules may not carry it",
                reason="ARCHIVE_SETUID",
                entry=name,
            )
        self.entry_count += 1
        if self.entry_count > self.limits.max_entries:
            raise UnsafeArchive(
                f"the archive has more than {self.limits.max_entries} entries "
                f"(entry '{_show(name)}' is one too many)",
                reason="ARCHIVE_TOO_MANY_ENTRIES",
                entry=name,
            )
        self._check_parents(parts, name)
        path = "/".join(parts)
        self._claim(path, kind, name)
        linkname = ""
        if kind == _SYMLINK:
            linkname = self._check_symlink(parts, member.linkname, name)
        elif kind == _HARDLINK:
            linkname = self._check_hardlink(member.linkname, name)
        elif kind == _FILE:
            self._count_bytes(member.size, name)
        is_manifest = path == MANIFEST_NAME
        if is_manifest:
            if kind != _FILE:
                raise UnsafeArchive(
                    f"{MANIFEST_NAME} must be a regular file, not a {kind}",
                    reason="MANIFEST_MISSING",
                    entry=name,
                )
            check_manifest_size(member.size, self.limits.max_manifest_bytes)
        filtered = self._data_filter(member)
        return _Entry(
            name=name,
            parts=parts,
            kind=kind,
            size=member.size if kind == _FILE else 0,
            mode=(filtered.mode if filtered.mode is not None else 0o644)
            if kind in _FILES
            else 0o755,
            linkname=linkname,
            is_manifest=is_manifest,
        )

    def set_manifest(self, raw: bytes) -> None:
        self.manifest = parse_manifest(raw, max_bytes=self.limits.max_manifest_bytes)

    def _kind(self, member: tarfile.TarInfo) -> str:
        name = member.name
        if member.isreg():
            if member.sparse is not None:  # GNU sparse via pax headers
                raise UnsafeArchive(
                    f"entry '{_show(name)}' is a sparse file, which capsules do not support",
                    reason="ARCHIVE_UNSUPPORTED_TYPE",
                    entry=name,
                )
            return _FILE
        if member.isdir():
            return _DIR
        if member.issym():
            return _SYMLINK
        if member.islnk():
            return _HARDLINK
        if member.ischr() or member.isblk() or member.isfifo():
            what = "a FIFO" if member.isfifo() else "a device file"
            raise UnsafeArchive(
                f"entry '{_show(name)}' is {what}; capsules hold only files, directories and links",
                reason="ARCHIVE_DEVICE",
                entry=name,
            )
        raise UnsafeArchive(
            f"entry '{_show(name)}' has the unsupported tar type {member.type!r}",
            reason="ARCHIVE_UNSUPPORTED_TYPE",
            entry=name,
        )

    def _check_parents(self, parts: tuple[str, ...], name: str) -> None:
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            kind = self.nodes.get(prefix)
            if kind is None:
                self._claim(prefix, _IMPLICIT_DIR, name)
            elif kind == _SYMLINK:
                raise UnsafeArchive(
                    f"entry '{_show(name)}' goes through the symbolic link '{_show(prefix)}'; "
                    "writing through links is refused",
                    reason="ARCHIVE_THROUGH_SYMLINK",
                    entry=name,
                )
            elif kind not in _DIRS:
                raise UnsafeArchive(
                    f"entry '{_show(name)}' uses '{_show(prefix)}' as a directory, "
                    f"but it is a {kind}",
                    reason="ARCHIVE_PATH_CONFLICT",
                    entry=name,
                )

    def _claim(self, path: str, kind: str, name: str) -> None:
        existing = self.nodes.get(path)
        if existing is not None:
            if existing == _IMPLICIT_DIR and kind == _DIR:
                self.nodes[path] = _DIR
                return
            if existing == _IMPLICIT_DIR:
                raise UnsafeArchive(
                    f"entry '{_show(name)}' is a {kind}, but earlier entries use it as a directory",
                    reason="ARCHIVE_PATH_CONFLICT",
                    entry=name,
                )
            raise UnsafeArchive(
                f"entry '{_show(name)}' appears more than once in the archive",
                reason="ARCHIVE_DUPLICATE_NAME",
                entry=name,
            )
        key = _fold(path)
        other = self.folded.get(key)
        if other is not None:
            if unicodedata.normalize("NFC", other) == unicodedata.normalize("NFC", path):
                raise UnsafeArchive(
                    f"entries '{_show(other)}' and '{_show(path)}' are the same name in "
                    "different Unicode normalization forms (NFC/NFD)",
                    reason="ARCHIVE_UNICODE_COLLISION",
                    entry=name,
                )
            raise UnsafeArchive(
                f"entries '{_show(other)}' and '{_show(path)}' differ only in letter case; "
                "they would collide on case-insensitive file systems",
                reason="ARCHIVE_CASE_COLLISION",
                entry=name,
            )
        self.folded[key] = path
        self.nodes[path] = kind

    def _check_symlink(self, parts: tuple[str, ...], target: str, name: str) -> str:
        if not target:
            raise UnsafeArchive(
                f"symbolic link '{_show(name)}' has an empty target",
                reason="ARCHIVE_CORRUPT",
                entry=name,
            )
        _check_text(target, f"the target of symbolic link '{_show(name)}',", name)
        if target.startswith("/"):
            raise UnsafeArchive(
                f"symbolic link '{_show(name)}' points to the absolute path '{_show(target)}'",
                reason="ARCHIVE_LINK_ESCAPE",
                entry=name,
            )
        # Resolved through the links known so far (so extraction never creates an escaping
        # link); `finish` resolves every link again once all entries are known.
        path = "/".join(parts)
        self.symlinks[path] = target
        self._resolve(path, target)
        return target

    def _check_hardlink(self, target: str, name: str) -> str:
        _check_text(target, f"the target of hard link '{_show(name)}',", name)
        target_parts = _split(target)
        if target.startswith("/") or ".." in target_parts:
            raise UnsafeArchive(
                f"hard link '{_show(name)}' points to '{_show(target)}', outside the "
                "capsule's entries",
                reason="ARCHIVE_LINK_ESCAPE",
                entry=name,
            )
        target_path = "/".join(target_parts)
        if self.nodes.get(target_path) not in _FILES:
            raise UnsafeArchive(
                f"hard link '{_show(name)}' points to '{_show(target)}', which is not a "
                "regular file earlier in the archive",
                reason="ARCHIVE_LINK_TARGET_MISSING",
                entry=name,
            )
        return target_path

    def _count_bytes(self, size: int, name: str) -> None:
        limits = self.limits
        if size > limits.max_unpacked_bytes - self.unpacked_bytes:
            raise UnsafeArchive(
                f"entry '{_show(name)}' declares {size} bytes; the capsule would unpack to "
                f"more than the limit of {limits.max_unpacked_bytes} bytes",
                reason="ARCHIVE_TOO_LARGE",
                entry=name,
            )
        self.unpacked_bytes += size
        # The declared sizes alone already tell a bomb from the archive's size on disk.
        if limits.too_expanded(self.unpacked_bytes, self.compressed_size):
            raise UnsafeArchive(
                f"entry '{_show(name)}' brings the declared size to {self.unpacked_bytes} "
                f"bytes from a {self.compressed_size}-byte archive (more than "
                f"{limits.max_ratio:g}:1): refusing a likely compression bomb",
                reason="ARCHIVE_RATIO",
                entry=name,
            )

    def _data_filter(self, member: tarfile.TarInfo) -> tarfile.TarInfo:
        """tarfile's own PEP 706 data filter, as a second opinion after our checks."""
        reasons: tuple[tuple[type[tarfile.FilterError], str], ...] = (
            (tarfile.AbsolutePathError, "ARCHIVE_ABSOLUTE_PATH"),
            (tarfile.OutsideDestinationError, "ARCHIVE_PATH_TRAVERSAL"),
            (tarfile.SpecialFileError, "ARCHIVE_DEVICE"),
            (tarfile.AbsoluteLinkError, "ARCHIVE_LINK_ESCAPE"),
            (tarfile.LinkOutsideDestinationError, "ARCHIVE_LINK_ESCAPE"),
        )
        try:
            return tarfile.data_filter(member, self.filter_root)
        except tarfile.FilterError as exc:
            reason = next((r for cls, r in reasons if isinstance(exc, cls)), "ARCHIVE_UNSAFE")
            # Not str(exc): it holds absolute paths of this host.
            raise UnsafeArchive(
                f"entry '{_show(member.name)}' is refused by tarfile's data filter "
                f"({type(exc).__name__})",
                reason=reason,
                entry=member.name,
            ) from None

    # ---- after the last member

    def finish(self) -> ArchiveInfo:
        if self.manifest is None:
            raise UnsafeArchive(
                f"the archive has no {MANIFEST_NAME} at its root", reason="MANIFEST_MISSING"
            )
        for path, target in self.symlinks.items():
            resolved = self._resolve(path, target)
            if resolved and self.nodes.get(resolved) is None:
                raise UnsafeArchive(
                    f"symbolic link '{_show(path)}' -> '{_show(target)}' points to "
                    f"'{_show(resolved)}', which is not in the capsule",
                    reason="ARCHIVE_LINK_TARGET_MISSING",
                    entry=path,
                )
        entrypoint = self.manifest.entrypoint
        kind = self.nodes.get(entrypoint)
        if kind == _SYMLINK:
            kind = self.nodes.get(self._resolve(entrypoint, self.symlinks[entrypoint]))
        if kind not in _FILES:
            raise UnsafeArchive(
                f"the entrypoint '{_show(entrypoint)}' named in {MANIFEST_NAME} is not a file "
                "in the archive",
                reason="ENTRYPOINT_MISSING",
                entry=entrypoint,
            )
        return ArchiveInfo(
            manifest=self.manifest,
            entry_count=self.entry_count,
            unpacked_bytes=self.unpacked_bytes,
        )

    def _resolve(self, path: str, target: str) -> str:
        """Where the link at `path` ends up, following the archive's other links like the
        kernel would (a `..` after a link goes up from the link's target)."""
        current = list(_split(path)[:-1])
        pending = deque(target.split("/"))
        hops = 0
        while pending:
            part = pending.popleft()
            if part in ("", "."):
                continue
            if part == "..":
                if not current:
                    raise UnsafeArchive(
                        f"symbolic link '{_show(path)}' -> '{_show(target)}' points outside "
                        "the capsule directory",
                        reason="ARCHIVE_LINK_ESCAPE",
                        entry=path,
                    )
                current.pop()
                continue
            current.append(part)
            next_target = self.symlinks.get("/".join(current))
            if next_target is not None:
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise UnsafeArchive(
                        f"symbolic link '{_show(path)}' is part of a loop of links",
                        reason="ARCHIVE_LINK_LOOP",
                        entry=path,
                    )
                current.pop()
                pending.extendleft(reversed(next_target.split("/")))
        return "/".join(current)


# --------------------------------------------------------------------------- the one pass


class _Sink:
    """What a pass does with the entries that passed the checks: `inspect` only reads."""

    def begin(self, entry: _Entry) -> None:
        pass

    def write(self, chunk: bytes) -> None:
        pass

    def end(self, entry: _Entry) -> None:
        pass


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise ExtractCancelled("the extraction was cancelled")


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    while (member := tar.next()) is not None:
        yield member


def _run(
    path: Path,
    limits: Limits,
    filter_root: str,
    sink: _Sink,
    cancel: threading.Event | None,
) -> ArchiveInfo:
    _require_data_filter()
    with open(path, "rb") as raw:
        scan = _Scan(limits, os.fstat(raw.fileno()).st_size, filter_root)
        gunzip = _GuardedGunzip(raw, limits)
        try:
            with tarfile.open(
                fileobj=gunzip,  # type: ignore[call-overload]
                mode="r|",
                tarinfo=_guarded_tarinfo(_HeaderGuard(limits)),
                encoding="utf-8",
                errors="surrogateescape",
            ) as tar:
                for member in _members(tar):
                    _check_cancel(cancel)
                    entry = scan.check_member(member)
                    if entry is None:
                        continue
                    sink.begin(entry)
                    if entry.kind == _FILE:
                        data = _read_data(tar, member, entry, sink, cancel)
                        if entry.is_manifest:
                            scan.set_manifest(data)
                    sink.end(entry)
            gunzip.drain()
        except (tarfile.TarError, EOFError) as exc:
            raise UnsafeArchive(
                f"the archive is not a valid .tar.gz: {exc}", reason="ARCHIVE_CORRUPT"
            ) from None
        return scan.finish()


def _read_data(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    entry: _Entry,
    sink: _Sink,
    cancel: threading.Event | None,
) -> bytes:
    """Streams a file's bytes to the sink in CHUNKs; returns them only for the manifest."""
    source = tar.extractfile(member)
    assert source is not None  # a regular file always has data
    kept = bytearray()
    remaining = entry.size
    while remaining:
        _check_cancel(cancel)
        try:
            chunk = source.read(min(CHUNK, remaining))
        except tarfile.ReadError:
            chunk = b""
        if not chunk:
            raise UnsafeArchive(
                f"entry '{_show(entry.name)}' ends early: the archive is truncated",
                reason="ARCHIVE_CORRUPT",
                entry=entry.name,
            )
        remaining -= len(chunk)
        if entry.is_manifest:
            kept += chunk
        sink.write(chunk)
    return bytes(kept)


def inspect(path: Path, limits: Limits, *, cancel: threading.Event | None = None) -> ArchiveInfo:
    """Reads the whole archive as a stream with every check `extract` makes, writing nothing;
    returns its manifest and totals."""
    # The data filter resolves paths against a root; a fresh empty name keeps that lexical.
    root = os.path.join(os.path.realpath(Path(path).parent), f".inspect-{uuid.uuid4().hex}")
    return _run(Path(path), limits, root, _Sink(), cancel)


# --------------------------------------------------------------------------- extraction


class _Extractor(_Sink):
    def __init__(
        self,
        root: str,
        totals: ArchiveInfo,
        progress: Progress | None,
        cancel: threading.Event | None,
    ) -> None:
        self.root = root
        self.totals = totals
        self.progress = progress
        self.cancel = cancel
        self.files_done = 0
        self.bytes_done = 0
        self._dirs: set[str] = {root}
        self._fd: int | None = None

    def report(self) -> None:
        if self.progress is not None:
            self.progress(
                self.files_done,
                self.totals.entry_count,
                self.bytes_done,
                self.totals.unpacked_bytes,
            )

    def begin(self, entry: _Entry) -> None:
        parent = self._make_dirs(entry.parts[:-1])
        target = os.path.join(parent, entry.parts[-1])
        if entry.kind in _DIRS:
            self._make_dirs(entry.parts)
        elif entry.kind == _FILE:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            self._fd = os.open(target, flags, 0o600)
        elif entry.kind == _SYMLINK:
            os.symlink(entry.linkname, target)
        else:
            source = os.path.join(self.root, *entry.linkname.split("/"))
            self._contained(os.path.dirname(source), entry)
            if not stat.S_ISREG(os.lstat(source).st_mode):
                raise UnsafeArchive(
                    f"hard link '{_show(entry.name)}' does not point to a regular file",
                    reason="ARCHIVE_LINK_TARGET_MISSING",
                    entry=entry.name,
                )
            os.link(source, target, follow_symlinks=False)

    def write(self, chunk: bytes) -> None:
        assert self._fd is not None
        view = memoryview(chunk)
        while view:
            view = view[os.write(self._fd, view) :]
        self.bytes_done += len(chunk)
        self._check_totals()
        self.report()
        _check_cancel(self.cancel)

    def end(self, entry: _Entry) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fchmod(fd, entry.mode)
            finally:
                os.close(fd)
        self.files_done += 1
        self._check_totals()
        self.report()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _make_dirs(self, parts: tuple[str, ...]) -> str:
        """Creates the directories down to `parts` (never through a link) and returns the
        last one, checked to resolve inside the root."""
        current = self.root
        for part in parts:
            current = os.path.join(current, part)
            if current in self._dirs:
                continue
            try:
                os.mkdir(current, 0o755)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(current).st_mode):
                    raise UnsafeArchive(
                        f"'{_show(part)}' in the capsule is not a directory",
                        reason="ARCHIVE_PATH_CONFLICT",
                        entry=part,
                    ) from None
            self._dirs.add(current)
        return self._contained(current, None)

    def _contained(self, directory: str, entry: _Entry | None) -> str:
        """Containment by resolved paths (symlinks followed), not by string prefixes."""
        real = os.path.realpath(directory)
        if os.path.commonpath([self.root, real]) != self.root:
            name = entry.name if entry else directory
            raise UnsafeArchive(
                f"entry '{_show(name)}' would be written outside the capsule directory",
                reason="ARCHIVE_PATH_TRAVERSAL",
                entry=name,
            )
        return directory

    def _check_totals(self) -> None:
        if (
            self.files_done > self.totals.entry_count
            or self.bytes_done > self.totals.unpacked_bytes
        ):
            raise _changed()


def _changed() -> UnsafeArchive:
    return UnsafeArchive(
        "the archive differs from what was inspected when it was published",
        reason="ARCHIVE_CORRUPT",
    )


def extract(
    path: Path,
    dest: Path,
    limits: Limits,
    *,
    expected: ArchiveInfo | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> ArchiveInfo:
    """Extracts the archive into `dest`, which must not exist yet (its parent must). On any
    refusal, error or cancellation `dest` is removed entirely and nothing is left behind.
    `expected` (from `inspect` at publish) gives the progress totals; without it the archive
    is inspected first."""
    path = Path(path)
    totals = expected if expected is not None else inspect(path, limits, cancel=cancel)
    _require_data_filter()
    os.mkdir(dest, 0o700)  # FileExistsError when it exists: never touch someone else's tree
    root = os.path.realpath(dest)
    extractor = _Extractor(root, totals, progress, cancel)
    try:
        extractor.report()
        info = _run(path, limits, root, extractor, cancel)
        if info != totals:
            raise _changed()
        os.chmod(root, 0o755)
        return info
    except BaseException as exc:
        extractor.close()
        _remove_tree(root)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceExhausted(
                "no space left on the capsule volume while extracting; free space and "
                "install again",
                reason="CAPSULE_DISK_FULL",
            ) from exc
        raise


def _remove_tree(root: str) -> None:
    # rmtree never follows symlinks (it works with directory fds on Linux).
    shutil.rmtree(root, ignore_errors=True)
    if os.path.lexists(root):  # pragma: no cover - e.g. a file made read-only by a filesystem
        shutil.rmtree(root)


# --------------------------------------------------------------------------- packing


@dataclass(frozen=True)
class _Source:
    rel: str
    abs: str
    is_dir: bool
    mode: int


def _collect(src: str, skip: set[str]) -> list[_Source]:
    """The tree under `src` in a fixed order (depth first, names sorted)."""
    found: list[_Source] = []

    def walk(directory: str, rel: str) -> None:
        with os.scandir(directory) as it:
            children = sorted(it, key=lambda e: e.name)
        for child in children:
            child_rel = f"{rel}{child.name}"
            if os.path.realpath(child.path) in skip:
                continue
            st = child.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                found.append(_Source(child_rel, child.path, True, 0o755))
                walk(child.path, child_rel + "/")
            elif stat.S_ISREG(st.st_mode):
                mode = 0o755 if st.st_mode & 0o100 else 0o644
                found.append(_Source(child_rel, child.path, False, mode))
            else:
                what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                raise InvalidArgument(
                    f"{child_rel} is {what}; a capsule holds only regular files and "
                    "directories (replace it with a copy)",
                    field=child_rel,
                    reason="PACK_UNSUPPORTED_FILE",
                )

    walk(src, "")
    return found


def pack(src_dir: Path, out: Path, *, limits: Limits | None = None) -> ArchiveInfo:
    """Packs `src_dir` into a reproducible `.tar.gz` at `out`: entries sorted, mtime 0,
    uid/gid 0 without names, modes 0644/0755, gzip header without mtime or file name. The
    same tree always gives the same bytes. The result is inspected like an upload."""
    limits = limits or Limits()
    src = os.path.realpath(src_dir)
    if not os.path.isdir(src):
        raise InvalidArgument(f"{src_dir} is not a directory", field="dir", reason="PACK_INVALID")
    manifest_path = os.path.join(src, MANIFEST_NAME)
    if not os.path.isfile(manifest_path) or os.path.islink(manifest_path):
        raise InvalidArgument(
            f"{src_dir} has no {MANIFEST_NAME} file at its top",
            field=MANIFEST_NAME,
            reason="MANIFEST_MISSING",
        )
    check_manifest_size(os.path.getsize(manifest_path), limits.max_manifest_bytes)
    with open(manifest_path, "rb") as fh:
        manifest = parse_manifest(fh.read(), max_bytes=limits.max_manifest_bytes)

    out = Path(out)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    sources = _collect(src, {os.path.realpath(out), os.path.realpath(tmp)})
    if not any(s.rel == manifest.entrypoint and not s.is_dir for s in sources):
        raise InvalidArgument(
            f"{MANIFEST_NAME}: the entrypoint {manifest.entrypoint!r} is not a file in {src_dir}",
            field=f"{MANIFEST_NAME}: entrypoint",
            reason="ENTRYPOINT_MISSING",
        )
    try:
        _write_archive(sources, tmp)
        info = inspect(tmp, limits)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return info


def _write_archive(sources: list[_Source], tmp: Path) -> None:
    with (
        open(tmp, "xb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for source in sources:
            info = tarfile.TarInfo(source.rel)
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = source.mode
            if source.is_dir:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            with open(source.abs, "rb") as fh:
                info.size = os.fstat(fh.fileno()).st_size
                tar.addfile(info, fh)
        tar.close()
        gz.close()
        raw.flush()
        os.fsync(raw.fileno())
