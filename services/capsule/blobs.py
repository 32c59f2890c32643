"""Capsule archives on disk, content-addressed, and the replica's temporary area.

    <root>/blobs/sha256/<hex>      archives, named by the SHA-256 of their bytes; never change
    <root>/tmp/<replica>/<id>      uploads in progress, extractions, trees being removed
    <root>/tenants/<tenant>/installed/<name>/<version>    installed capsules (installer.py)

An upload streams into the replica's temporary directory while it is hashed (never whole in
memory), is fsynced, and is renamed into `blobs/` only once it is complete and accepted: a
reader never sees a partial blob. Everything under `tmp/<replica>/` belongs to one replica,
which empties it when it starts (what a killed process left behind), so replicas sharing the
directory never remove each other's work. Temporary files live under the same root as their
destinations, so the final rename is atomic (same filesystem).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from services.common.errors import InvalidArgument, ResourceExhausted

DIGEST_PREFIX = "sha256:"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_UNSAFE_COMPONENT = re.compile(r"[^A-Za-z0-9_.-]")
READ_CHUNK = 1 << 20

# progress(bytes_done, bytes_total), called from the hashing thread
HashProgress = Callable[[int, int], None]


def format_digest(raw: bytes) -> str:
    return DIGEST_PREFIX + raw.hex()


def check_digest(text: str, field: str) -> str:
    """A `sha256:<64 lowercase hex>` digest (INVALID_ARGUMENT otherwise)."""
    if not _DIGEST.match(text):
        raise InvalidArgument(
            f"{field} {text[:80]!r} is not a digest; expected sha256:<64 lowercase hex digits>",
            field=field,
        )
    return text


def safe_component(text: str) -> str:
    """A single path component made of safe characters (replica names, tenant ids)."""
    cleaned = _UNSAFE_COMPONENT.sub("_", text)
    if cleaned in ("", ".", ".."):
        raise ValueError(f"{text!r} cannot name a directory")
    return cleaned


def fsync_dir(path: Path) -> None:
    """Makes a rename or creation inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_file(path: Path, progress: HashProgress | None = None) -> tuple[bytes, int]:
    """SHA-256 and size of a file, read in 1 MiB chunks (blocking: run it in a thread)."""
    digest = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as f:
        while chunk := f.read(READ_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    return digest.digest(), done


def remove_tree(path: Path) -> None:
    """Removes a file or directory tree; a missing one is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class BlobStore:
    def __init__(self, root: Path, replica: str) -> None:
        self.root = root
        self.blob_dir = root / "blobs" / "sha256"
        self.tmp_root = root / "tmp"
        self.tmp_dir = self.tmp_root / safe_component(replica)

    def prepare(self) -> list[str]:
        """Creates the directories and empties this replica's temporary directory; returns
        the names it removed (leftovers of a process that was killed)."""
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        removed = []
        for entry in sorted(self.tmp_dir.iterdir()):
            remove_tree(entry)
            removed.append(entry.name)
        return removed

    def path(self, digest: str) -> Path:
        check_digest(digest, "digest")
        return self.blob_dir / digest.removeprefix(DIGEST_PREFIX)

    def temp_path(self, name: str) -> Path:
        return self.tmp_dir / safe_component(name)

    def new_upload(self, declared_size: int, limit: int) -> Upload:
        return Upload(self, declared_size, limit)

    def discard_tree(self, path: Path) -> None:
        """Removes a tree by first renaming it into the temporary directory (atomic: it is
        gone from its place at once, and a crash midway leaves only temporary files)."""
        if not path.exists() and not path.is_symlink():
            return
        trash = self.temp_path(f"trash-{uuid.uuid4()}")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        remove_tree(trash)


class Upload:
    """One archive being received: written to a temporary file while hashed.

    Bytes past the declared size are counted but not written, so a client that lies about
    the size costs no disk; past the service's limit the upload is refused at once."""

    def __init__(self, store: BlobStore, declared_size: int, limit: int) -> None:
        self.store = store
        self.declared_size = declared_size
        self.limit = limit
        self.path = store.temp_path(f"upload-{uuid.uuid4()}")
        self.size = 0
        self._hash = hashlib.sha256()
        self._file: BinaryIO | None = open(self.path, "xb")  # closed in finish()

    def write(self, chunk: bytes) -> None:
        """Blocking (disk and hashing): run it in a thread."""
        if self.size + len(chunk) > self.limit:
            raise ResourceExhausted(
                f"the archive is larger than this registry's limit of {self.limit} bytes; "
                "make the capsule smaller",
                reason="CAPSULE_TOO_LARGE",
            )
        room = max(self.declared_size - self.size, 0)
        if room and self._file is not None:
            self._file.write(chunk[:room])
        self._hash.update(chunk)
        self.size += len(chunk)

    def finish(self) -> str:
        """Flushes and fsyncs the file; returns the digest of every byte received."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        return format_digest(self._hash.digest())

    def commit(self, digest: str) -> Path:
        """Moves the finished upload to its content address (a blob that exists already is
        the same bytes: the upload is dropped)."""
        target = self.store.path(digest)
        if target.exists():
            self.discard()
            return target
        os.replace(self.path, target)
        fsync_dir(target.parent)
        return target

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
