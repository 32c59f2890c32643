"""The durable local outbox: audit events JetStream could not take (yet), in order.

File `<dir>/<replica>.log`: frames of `u32 length | u32 crc32 | payload` (payload = the event's
protobuf bytes), appended and fsynced before `append` returns. `<replica>.offset` holds the end
of the last frame known to be in JetStream; replay reads from there, and once everything is
replayed both are reset to empty. A crash between a publish and the offset write replays a few
events again: harmless, since each carries its `Nats-Msg-Id` (and the Audit service dedupes by
event id). A torn last frame (crash mid-append) is cut off at open.

`Outbox` is synchronous (plain file I/O); `AsyncOutbox` runs it off the event loop, one
operation at a time, and group-commits concurrent appends into one write + fsync.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">II")
MAX_FRAME = 1 << 20  # an event is < 8 KiB; anything bigger is a torn or foreign file


class Outbox:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset_path = path.with_suffix(".offset")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self._committed = min(self._read_offset(), os.fstat(self._fd).st_size)
        self._size, self.pending = self._scan()

    def _read_offset(self) -> int:
        try:
            raw = self.offset_path.read_bytes()
        except FileNotFoundError:
            return 0
        return int(raw.decode() or 0) if raw.strip().isdigit() else 0

    def _scan(self) -> tuple[int, int]:
        """(end of the last whole frame, frames after the committed offset); cuts a torn tail."""
        size = os.fstat(self._fd).st_size
        position, count = self._committed, 0
        while position + _HEADER.size <= size:
            length, crc = _HEADER.unpack(os.pread(self._fd, _HEADER.size, position))
            end = position + _HEADER.size + length
            if length > MAX_FRAME or end > size:
                break
            if zlib.crc32(os.pread(self._fd, length, position + _HEADER.size)) != crc:
                break
            position, count = end, count + 1
        if position < size:
            log.warning("audit outbox %s: cutting %d torn bytes", self.path, size - position)
            os.ftruncate(self._fd, position)
            os.fsync(self._fd)
        return position, count

    def append(self, payloads: Sequence[bytes]) -> None:
        """Durable when it returns (written and fsynced)."""
        if not payloads:
            return
        data = b"".join(_HEADER.pack(len(p), zlib.crc32(p)) + p for p in payloads)
        written = 0
        while written < len(data):
            written += os.write(self._fd, data[written:])
        os.fsync(self._fd)
        self._size += len(data)
        self.pending += len(payloads)

    def read(self, limit: int) -> list[tuple[int, bytes]]:
        """Up to `limit` frames after the committed offset, as (end offset, payload)."""
        frames: list[tuple[int, bytes]] = []
        position = self._committed
        while len(frames) < limit and position + _HEADER.size <= self._size:
            length, _ = _HEADER.unpack(os.pread(self._fd, _HEADER.size, position))
            payload = os.pread(self._fd, length, position + _HEADER.size)
            position += _HEADER.size + length
            frames.append((position, payload))
        return frames

    def commit(self, offset: int, count: int) -> None:
        """Frames up to `offset` (`count` of them) are in JetStream."""
        self.pending = max(0, self.pending - count)
        if offset >= self._size:  # all replayed: start the files afresh
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)
            self._size = self._committed = self.pending = 0
        else:
            self._committed = offset
        tmp = self.offset_path.with_suffix(".offset.tmp")
        with open(tmp, "w") as handle:
            handle.write(str(self._committed))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.offset_path)

    def close(self) -> None:
        os.close(self._fd)


class AsyncOutbox:
    """`Outbox` off the event loop; concurrent appends share one write + fsync."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self._lock = asyncio.Lock()
        self._queue: list[tuple[bytes, asyncio.Future[None]]] = []
        self._flushing = False

    @property
    def pending(self) -> int:
        return self.outbox.pending + len(self._queue)

    async def append(self, payload: bytes) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((payload, future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        await asyncio.shield(future)  # a cancelled caller must not cancel the others' write

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    async with self._lock:
                        await asyncio.to_thread(self.outbox.append, [p for p, _ in batch])
                except BaseException as error:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    if not isinstance(error, Exception):
                        raise
                    continue
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
        finally:
            self._flushing = False

    async def read(self, limit: int) -> list[tuple[int, bytes]]:
        async with self._lock:
            return await asyncio.to_thread(self.outbox.read, limit)

    async def commit(self, offset: int, count: int) -> None:
        async with self._lock:
            await asyncio.to_thread(self.outbox.commit, offset, count)

    def close(self) -> None:
        self.outbox.close()
