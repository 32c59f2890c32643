"""The outbox (append, ordered replay, torn tails) and the recorder with a fake JetStream: publish,
fall back to the outbox, replay in order exactly once, never wait beyond the bound, fail closed."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import grpc
import pytest

from services.common.audit import event as ev
from services.common.audit.outbox import AsyncOutbox, Outbox
from services.common.audit.recorder import AuditRecorder
from services.common.audit.settings import AuditConfig
from services.common.errors import Unavailable

BOUND = 0.1


class FakeJetStream:
    """Stores each msg id once (like the stream's duplicate window), in arrival order."""

    def __init__(self) -> None:
        self.up = True
        self.hung = False
        self.broken = False  # connected, but JetStream answers with errors
        self.ids: list[str] = []
        self.subjects: list[str] = []
        self.payloads: list[bytes] = []
        self.publishes = 0
        self.probes = 0
        self.pings = 0

    def connected(self) -> bool:
        return self.up

    async def _wait(self) -> None:
        if self.hung:
            await asyncio.sleep(3600)  # the recorder's own bound must cut this
        if not self.up:
            raise ConnectionError("nats: connection closed")
        if self.broken:
            raise RuntimeError("nats: no response from stream")

    async def publish(self, subject: str, payload: bytes, msg_id: str, bound: float) -> None:
        self.publishes += 1
        await self._wait()
        assert ev.event_id(ev.decode(payload)) == msg_id
        if msg_id not in self.ids:
            self.ids.append(msg_id)
            self.subjects.append(subject)
            self.payloads.append(payload)

    async def probe(self, bound: float) -> None:
        self.probes += 1
        await self._wait()

    async def ping(self, bound: float) -> None:
        self.pings += 1
        if self.hung:
            await asyncio.sleep(3600)


def _event(n: int, tenant: str = "acme") -> ev.pb.AuditEvent:
    return ev.build_event(
        method="/soma.keys.v1.KeysService/CreateApiKey",
        principal=None,
        allow=True,
        reason=f"n={n}",
        status_code=grpc.StatusCode.OK,
        call=ev.CallInfo(),
        tenant=tenant,
    )


def _recorder(tmp_path: Path, js: FakeJetStream, fail_closed: bool = True) -> AuditRecorder:
    config = AuditConfig(fail_closed=fail_closed, publish_timeout=BOUND, outbox_dir=tmp_path)
    return AuditRecorder(js, AsyncOutbox(Outbox(tmp_path / "r-0.log")), config)


async def _until(predicate, within: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


# -- outbox --------------------------------------------------------------------------------------


def test_outbox_append_read_commit_in_order(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "a.log")
    box.append([b"one", b"two"])
    box.append([b"three"])
    assert box.pending == 3
    frames = box.read(10)
    assert [p for _, p in frames] == [b"one", b"two", b"three"]
    box.commit(frames[0][0], 1)
    assert box.pending == 2 and [p for _, p in box.read(10)] == [b"two", b"three"]
    box.close()

    again = Outbox(tmp_path / "a.log")  # a restart resumes after the committed frame
    assert again.pending == 2
    frames = again.read(1)
    assert [p for _, p in frames] == [b"two"]
    rest = again.read(10)
    again.commit(rest[-1][0], 2)
    assert again.pending == 0 and again.read(10) == []
    assert os.path.getsize(tmp_path / "a.log") == 0  # drained: started afresh
    again.append([b"four"])
    assert [p for _, p in again.read(10)] == [b"four"]
    again.close()


def test_outbox_cuts_a_torn_tail(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "t.log")
    box.append([b"whole"])
    box.close()
    with open(tmp_path / "t.log", "ab") as handle:
        handle.write(b"\x00\x00\x00\x10\x00\x00")  # a crash mid-append
    again = Outbox(tmp_path / "t.log")
    assert again.pending == 1 and [p for _, p in again.read(5)] == [b"whole"]
    again.close()
    with open(tmp_path / "t.log", "r+b") as handle:  # a flipped bit fails the checksum
        handle.seek(9)
        handle.write(b"W")
    assert Outbox(tmp_path / "t.log").pending == 0


async def test_async_outbox_group_commits(tmp_path: Path) -> None:
    box = AsyncOutbox(Outbox(tmp_path / "g.log"))
    await asyncio.gather(*(box.append(str(i).encode()) for i in range(200)))
    assert box.pending == 200
    assert [p for _, p in await box.read(500)] == [str(i).encode() for i in range(200)]
    box.close()


# -- recorder ------------------------------------------------------------------------------------


async def test_publishes_with_the_event_id(tmp_path: Path) -> None:
    js = FakeJetStream()
    recorder = _recorder(tmp_path, js)
    recorder.start()
    event = _event(1)
    assert await recorder.record(event) is True
    assert js.ids == [ev.event_id(event)] and js.subjects == ["audit.acme.keys"]
    await recorder.ensure_durable()  # healthy: no probe needed
    assert js.probes == 0
    await recorder.close()


async def test_outage_goes_to_the_outbox_and_replays_in_order_once(tmp_path: Path) -> None:
    js = FakeJetStream()
    recorder = _recorder(tmp_path, js, fail_closed=False)
    recorder.start()
    events = [_event(i) for i in range(300)]
    await asyncio.gather(*(recorder.record(e) for e in events[:10]))
    js.up = False
    for e in events[10:200]:  # sequential: their order is defined
        assert await recorder.record(e) is False
    await recorder.ensure_durable()  # fail-closed off: never refuses
    js.up = True
    for e in events[200:]:  # while the outbox drains, new events queue behind it
        await recorder.record(e)
    await _until(lambda: recorder.outbox.pending == 0 and len(js.ids) == 300)
    assert js.ids[10:] == [ev.event_id(e) for e in events[10:]]
    assert sorted(js.ids) == sorted(ev.event_id(e) for e in events)
    assert recorder.outboxed >= 190 and recorder.healthy
    await recorder.close()


async def test_replay_after_a_crash_is_idempotent(tmp_path: Path) -> None:
    js = FakeJetStream()
    js.up = False
    first = _recorder(tmp_path, js)
    events = [_event(i) for i in range(5)]
    for e in events:
        await first.record(e)
    await first.close()  # "crash": nothing replayed, outbox on disk
    js.up = True
    # Pretend two of them reached JetStream before the crash (ack lost): same msg ids.
    js.ids.extend(ev.event_id(e) for e in events[:2])
    second = _recorder(tmp_path, js)
    assert second.outbox.pending == 5
    second.start()
    await _until(lambda: second.outbox.pending == 0)
    assert js.ids == [ev.event_id(e) for e in events]
    await second.close()


async def test_a_hung_nats_never_holds_a_call_beyond_the_bound(tmp_path: Path) -> None:
    js = FakeJetStream()
    recorder = _recorder(tmp_path, js)
    recorder.start()
    js.hung = True
    started = time.monotonic()
    assert await recorder.record(_event(1)) is False  # timed out -> outbox
    assert time.monotonic() - started < BOUND + 0.5
    started = time.monotonic()
    with pytest.raises(Unavailable) as refused:
        await recorder.ensure_durable()
    assert refused.value.reason == "AUDIT_UNAVAILABLE"
    assert time.monotonic() - started < BOUND + 0.3
    # Many calls at once share one probe, and each is answered within the bound.
    await asyncio.sleep(0.3)
    started = time.monotonic()
    results = await asyncio.gather(
        *(recorder.ensure_durable() for _ in range(50)), return_exceptions=True
    )
    assert all(isinstance(r, Unavailable) for r in results)
    assert time.monotonic() - started < BOUND + 0.3
    js.hung = False
    await asyncio.sleep(BOUND)
    await recorder.ensure_durable()  # a successful probe re-opens the gate
    await _until(lambda: recorder.outbox.pending == 0)
    assert len(js.ids) == 1
    await recorder.close()


async def test_gate_refuses_at_once_when_disconnected(tmp_path: Path) -> None:
    js = FakeJetStream()
    recorder = _recorder(tmp_path, js)
    js.up = False
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await recorder.ensure_durable()
    assert time.monotonic() - started < 0.05 and js.probes == 0
    js.up = True
    await recorder.ensure_durable()
    await recorder.close()


async def test_gate_probes_after_a_failed_publish(tmp_path: Path) -> None:
    js = FakeJetStream()
    recorder = _recorder(tmp_path, js)
    js.broken = True
    await recorder.record(_event(1))  # marks the channel unhealthy
    assert not recorder._healthy
    with pytest.raises(Unavailable):
        await recorder.ensure_durable()
    assert js.probes == 1
    js.broken = False
    await asyncio.sleep(BOUND)  # a failed probe is not repeated at once
    await recorder.ensure_durable()  # probe answers -> allowed
    assert js.probes == 2 and recorder._healthy
    await recorder.close()


async def test_cancelled_caller_does_not_lose_the_event(tmp_path: Path) -> None:
    js = FakeJetStream()
    recorder = _recorder(tmp_path, js)
    recorder.start()
    js.hung = True
    task = asyncio.create_task(recorder.record(_event(1)))
    await asyncio.sleep(0.01)
    task.cancel()
    await _until(lambda: recorder.outbox.pending == 1)
    js.hung = False
    await _until(lambda: len(js.ids) == 1)
    await recorder.close()


async def test_gate_pings_so_a_hung_server_refuses_the_first_mutation(tmp_path: Path) -> None:
    js = FakeJetStream()
    recorder = _recorder(tmp_path, js)
    await asyncio.gather(*(recorder.ensure_durable() for _ in range(20)))
    assert js.pings == 1  # concurrent gates share one ping
    js.hung = True
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await recorder.ensure_durable()
    assert time.monotonic() - started < BOUND + 0.1
    assert not recorder._healthy  # later events go straight to the outbox
    await recorder.close()
