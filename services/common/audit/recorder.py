"""AuditRecorder: gets each audit event into JetStream, or into the local outbox, never hanging.

* `record(event)` publishes to `audit.<tenant>.<service>` with `Nats-Msg-Id` = event id and
  waits for the ack at most `publish_timeout`; on any failure (or while NATS is known to be
  down, or while older events wait in the outbox, so that order holds) the event is appended
  to the outbox (fsynced). It returns once the event is durable in one of the two.
* A background task replays the outbox in order as soon as JetStream answers again; replay is
  idempotent (same msg id; the stream's duplicate window drops a repeat).
* `ensure_durable()` is the fail-closed gate run before a mutating handler: it refuses
  (UNAVAILABLE, reason AUDIT_UNAVAILABLE) when NATS is disconnected; when NATS does not answer
  a ping within the bound (a hung server keeps its TCP connection: only a round trip tells);
  or, once a publish failed, until a probe of the AUDIT stream answers. Concurrent gates share
  one ping, so under load it costs far less than one round trip per call. Reads never call it.

Every wait is bounded by `publish_timeout` (a hung NATS — SIGSTOP — costs a call at most the
gate's probe plus one publish timeout, then the outbox's fsync): a hung audit channel must not
block requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Protocol

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig

from services.common import metrics, tracing
from services.common.audit.event import (
    STREAM,
    SUBJECTS,
    decode,
    encode,
    event_id,
    subject_for,
)
from services.common.audit.outbox import AsyncOutbox, Outbox
from services.common.audit.settings import AuditConfig
from services.common.errors import Unavailable
from services.common.events import Bus, ensure_stream
from soma.audit.v1 import resources_pb2 as pb

log = logging.getLogger(__name__)

STREAM_CONFIG = StreamConfig(
    name=STREAM,
    subjects=list(SUBJECTS),
    retention=RetentionPolicy.LIMITS,
    storage=StorageType.FILE,
    max_age=7 * 24 * 3600,  # the Audit service's database is the record; this is the buffer
    duplicate_window=120,  # Nats-Msg-Id dedupe of retried and replayed publishes (seconds)
)
REPLAY_WINDOW = 64  # outbox events in flight at once during replay
MAX_BACKOFF = 1.0


class Transport(Protocol):
    """What the recorder needs from NATS (a fake in unit tests)."""

    def connected(self) -> bool: ...

    async def publish(self, subject: str, payload: bytes, msg_id: str, bound: float) -> None:
        """Returns once JetStream acked; raises on anything else."""

    async def probe(self, bound: float) -> None:
        """Returns if the AUDIT stream answers within `bound` seconds; raises otherwise."""

    async def ping(self, bound: float) -> None:
        """Returns if the server answers a ping within `bound` seconds; raises otherwise."""


class JetStreamTransport:
    def __init__(self, nc: Client, js: JetStreamContext) -> None:
        self.nc = nc
        self.js = js

    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    async def publish(self, subject: str, payload: bytes, msg_id: str, bound: float) -> None:
        headers = {"Nats-Msg-Id": msg_id}
        with tracing.publish_span(subject, STREAM, headers):  # Audit's writer continues it
            await self.js.publish(subject, payload, timeout=bound, stream=STREAM, headers=headers)

    async def probe(self, bound: float) -> None:
        reply = await self.nc.request(f"$JS.API.STREAM.INFO.{STREAM}", b"", timeout=bound)
        answer = json.loads(reply.data)
        if "error" in answer:
            raise RuntimeError(f"stream {STREAM}: {answer['error']}")

    async def ping(self, bound: float) -> None:
        # Not nc.flush(): on a timeout it cancels its PONG future, and the late PONG then kills
        # nats-py's read loop (InvalidStateError), leaving the connection deaf. Our future is
        # left pending instead; the late PONG completes it harmlessly.
        send_ping = getattr(self.nc, "_send_ping", None)
        if send_ping is None:  # another nats-py: the (dearer) JetStream probe does the job
            await self.probe(bound)
            return
        pong: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        await send_ping(pong)
        done, _ = await asyncio.wait({pong}, timeout=bound)
        if not done:
            raise TimeoutError("nats: no PONG within the bound")


class AuditRecorder:
    def __init__(
        self,
        transport: Transport,
        outbox: AsyncOutbox,
        config: AuditConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transport = transport
        self.outbox = outbox
        self.config = config
        self._clock = clock
        self._timeout = config.publish_timeout
        self._healthy = True  # the last JetStream exchange succeeded
        self._probe_task: asyncio.Task[bool] | None = None
        self._ping_task: asyncio.Task[bool] | None = None
        self._probe_failed_at = -1e9
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[bool]] = set()
        self._replayer: asyncio.Task[None] | None = None
        self._closing = False
        self.published = 0  # counters, for tests and logs
        self.outboxed = 0
        self.replayed = 0

    @classmethod
    async def open(cls, bus: Bus, config: AuditConfig, replica: str) -> AuditRecorder:
        """Declares the AUDIT stream (idempotent), opens `<outbox_dir>/<replica>.log` and starts
        replaying whatever a previous run left there."""
        await ensure_stream(bus.js, STREAM_CONFIG)
        outbox = AsyncOutbox(Outbox(config.outbox_dir / f"{replica}.log"))
        recorder = cls(JetStreamTransport(bus.nc, bus.js), outbox, config)
        if outbox.pending:
            log.info("audit outbox holds %d events from a previous run", outbox.pending)
        metrics.watch_audit_outbox(lambda: outbox.pending)
        recorder.start()
        return recorder

    def start(self) -> None:
        if self._replayer is None:
            self._replayer = asyncio.get_running_loop().create_task(self._replay_loop())
            self._wake.set()

    @property
    def healthy(self) -> bool:
        return self._healthy and self.transport.connected()

    # -- recording ------------------------------------------------------------------------

    async def record(self, event: pb.AuditEvent) -> bool:
        """Durable when it returns: True if JetStream acked, False if it went to the outbox.
        The caller being cancelled does not stop it."""
        task = self._spawn(event)
        return await asyncio.shield(task)

    def record_nowait(self, event: pb.AuditEvent) -> None:
        """Records in the background (reads, where the caller must not wait)."""
        self._spawn(event)

    def _spawn(self, event: pb.AuditEvent) -> asyncio.Task[bool]:
        task = asyncio.get_running_loop().create_task(self._record(event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _record(self, event: pb.AuditEvent) -> bool:
        payload = encode(event)
        if self.outbox.pending == 0 and self.healthy and not self._closing:
            try:
                await self._publish(subject_for(event), payload, event_id(event))
                self.published += 1
                return True
            except Exception as error:  # timeouts, disconnects, JetStream errors alike
                self._unhealthy(error)
        await self.outbox.append(payload)
        self.outboxed += 1
        self._wake.set()
        return False

    async def _publish(self, subject: str, payload: bytes, msg_id: str) -> None:
        # The transport is given the bound too; wait_for is the backstop if it ignores it.
        try:
            await asyncio.wait_for(
                self.transport.publish(subject, payload, msg_id, self._timeout),
                self._timeout + 0.05,
            )
        except Exception:
            metrics.publish_failed(STREAM)
            raise
        metrics.published(STREAM)

    def _unhealthy(self, error: BaseException) -> None:
        if self._healthy:
            log.warning(
                "audit publish failed (%s); events go to the outbox",
                str(error) or type(error).__name__,
            )
        self._healthy = False

    # -- the fail-closed gate -----------------------------------------------------------------

    async def ensure_durable(self) -> None:
        """Raises Unavailable unless an event can be made durable in JetStream right now."""
        if not self.config.fail_closed:
            return
        if self.transport.connected():
            if self._healthy:
                if self._ping_task is None:
                    self._ping_task = asyncio.get_running_loop().create_task(self._ping())
                if await asyncio.shield(self._ping_task):
                    return
            # A probe that failed a moment ago is not repeated for every queued call.
            if self._clock() - self._probe_failed_at >= min(0.25, self._timeout):
                if self._probe_task is None:
                    self._probe_task = asyncio.get_running_loop().create_task(self._probe())
                if await asyncio.shield(self._probe_task):
                    return
        metrics.audit_refused()
        raise Unavailable(
            "the audit channel is unavailable, so changes are refused for now; retry shortly",
            reason="AUDIT_UNAVAILABLE",
        )

    async def _ping(self) -> bool:
        try:
            await asyncio.wait_for(self.transport.ping(self._timeout), self._timeout + 0.05)
        except Exception as error:
            self._unhealthy(error)
            self._probe_failed_at = self._clock()
            return False
        else:
            return True
        finally:
            self._ping_task = None

    async def _probe(self) -> bool:
        try:
            await asyncio.wait_for(self.transport.probe(self._timeout), self._timeout + 0.05)
        except Exception as error:
            log.debug("audit probe failed: %s", error)
            self._probe_failed_at = self._clock()
            return False
        else:
            self._healthy = True
            self._wake.set()
            return True
        finally:
            self._probe_task = None

    # -- replay -------------------------------------------------------------------------------

    async def _replay_loop(self) -> None:
        backoff = 0.1
        while not self._closing:
            if self.outbox.outbox.pending == 0:
                self._wake.clear()
                if self.outbox.outbox.pending == 0:
                    await self._wake.wait()
                    continue
            if not self.transport.connected():
                await self._sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            try:
                sent = await self._replay_batch()
            except Exception as error:
                log.warning("audit outbox replay failed: %s", error)
                sent = 0
            if sent:
                backoff = 0.1
            else:
                await self._sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _replay_batch(self) -> int:
        """Publishes the next frames in order; commits those JetStream acked, up to the first
        failure. Returns how many were committed."""
        frames = await self.outbox.read(REPLAY_WINDOW)
        if not frames:
            return 0

        async def send(payload: bytes) -> None:
            event = decode(payload)
            await self._publish(subject_for(event), payload, event_id(event))

        results = await asyncio.gather(*(send(p) for _, p in frames), return_exceptions=True)
        done = 0
        for result in results:
            if isinstance(result, BaseException):
                self._unhealthy(result)
                break
            done += 1
        if done:
            await self.outbox.commit(frames[done - 1][0], done)
            self.replayed += done
            if not self._healthy:
                log.info("audit channel is back; replaying the outbox")
            self._healthy = done == len(frames) or self._healthy
        if self.outbox.outbox.pending == 0:
            log.info("audit outbox drained (%d events replayed so far)", self.replayed)
        return done

    # -- shutdown -------------------------------------------------------------------------------

    async def close(self) -> None:
        """Waits (bounded) for in-flight records, stops replay; the outbox keeps the rest."""
        self._closing = True
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2 * self._timeout + 2.0)
        if self._replayer is not None:
            self._replayer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replayer
        self.outbox.close()
