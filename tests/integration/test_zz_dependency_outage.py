"""Dependency outages and a killed replica, through Envoy: the mesh answers fast, never hangs,
and recovers by itself.

Each dependency is frozen with SIGSTOP (PostgreSQL with all its backends): a hung server keeps
its connections open and answers nothing, the harder case for a client than a dead one, whose
connections fail at once. While it is frozen, calls that need it must come back with
UNAVAILABLE within a few seconds, and within a second once the replicas' circuit breakers are
open; after SIGCONT the same calls must succeed again within a bound, with nobody restarting
anything.

Runs late (test_zz_*, after test_zz_audit_faults and test_zz_capsule_kill): it freezes parts
of the shared mesh and kills a Gateway replica (the supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest

from services.common.dependency import FAILURES
from services.common.metrics import BREAKER_STATE, BREAKER_STATES
from services.mesh.status import EnvoyHost, envoy_hosts
from soma.gateway.v1 import gateway_pb2 as g
from soma.gateway.v1 import gateway_pb2_grpc
from soma.gateway.v1 import resources_pb2 as gpb
from soma.keys.v1 import keys_pb2 as k
from soma.keys.v1 import keys_pb2_grpc
from tests.integration.harness import MeshRunner, authed_channel, wait_stopped
from tests.integration.scraping import scrape_all

pytestmark = pytest.mark.integration

# What the mesh promises while a dependency hangs (SOMA_DEPENDENCY_TIMEOUT_MS = 3 s):
# a mutation waits at most one dependency timeout; a read at most three, because Envoy retries
# an UNAVAILABLE read on the other replica (gateway-config/limits.yaml); plus slack for a
# loaded 2-core test machine. Once the breakers are open, answers come at once.
FIRST_ANSWER_WITHIN = 11.0
FAST_ANSWER_WITHIN = 1.5
RECOVERY_WITHIN = 30.0
ENVOY_SETTLES = 1.0
CALL_DEADLINE = (
    15.0  # the client's own deadline, above every bound: it must never be what ends a call
)


@dataclass
class Outcome:
    code: grpc.StatusCode
    seconds: float
    details: str = ""


async def timed(call: Callable[[], Awaitable[object]]) -> Outcome:
    started = time.monotonic()
    try:
        await call()
    except grpc.aio.AioRpcError as error:
        return Outcome(error.code(), time.monotonic() - started, error.details() or "")
    return Outcome(grpc.StatusCode.OK, time.monotonic() - started)


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


@contextlib.contextmanager
def frozen(mesh: MeshRunner, part: str) -> Iterator[None]:
    """SIGSTOP the part and all its children; SIGCONT them whatever happens."""
    processes = process_tree(int(mesh.part(part)["pid"]))
    for process in processes:
        process.send_signal(signal.SIGSTOP)
    try:
        for process in processes:
            wait_stopped(process.pid)
        yield
    finally:
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGCONT)


async def first_wave(call: Callable[[], Awaitable[object]], concurrency: int) -> list[Outcome]:
    """`concurrency` calls at once right after the freeze: they find the breakers closed and
    each waits out a dependency timeout — the slowest answers the outage can cause."""
    return list(await asyncio.gather(*(timed(call) for _ in range(concurrency))))


async def breaker_states(mesh: MeshRunner, service: str, dependency: str) -> dict[str, str]:
    """part -> the state of its `dependency` breaker, for every replica of `service`."""
    names = {value: name for name, value in BREAKER_STATES.items()}
    states = {
        part: names[int(result.total(BREAKER_STATE, dependency=dependency))]
        for part, result in (await scrape_all(mesh, service)).items()
    }
    assert len(states) == mesh.replicas, states
    return states


async def all_in_envoy(mesh: MeshRunner, within: float = 30.0) -> None:
    """Waits until Envoy has seen every replica healthy for a second, so that its round robin
    spreads the next calls over all of them (an earlier outage may have left one ejected).
    A wave started the instant admin first showed both healthy went wholly to one replica in
    some runs (the host set reaches Envoy's workers after admin shows it, we believe)."""
    admin = str((mesh.state() or {})["admin"])
    started = time.monotonic()
    healthy_since: float | None = None
    while healthy_since is None or time.monotonic() - healthy_since < ENVOY_SETTLES:
        hosts = await envoy_hosts(admin)
        if not all(host.healthy for host in hosts.values()):
            healthy_since = None
            assert time.monotonic() - started < within, hosts
        elif healthy_since is None:
            healthy_since = time.monotonic()
        await asyncio.sleep(0.25)


async def recovered(
    call: Callable[[], Awaitable[object]], replicas_closed: Callable[[], Awaitable[bool]]
) -> float:
    """Seconds until `call` succeeds and every replica's breaker has closed again, calling
    every 0.25 s: a replica's open breaker closes only on a successful trial call, which needs
    a call routed to it."""
    started = time.monotonic()
    while True:
        outcome = await timed(call)
        if outcome.code == grpc.StatusCode.OK and await replicas_closed():
            return time.monotonic() - started
        assert time.monotonic() - started < RECOVERY_WITHIN, (
            f"not recovered after {RECOVERY_WITHIN}s: {outcome}"
        )
        await asyncio.sleep(0.25)


async def check_outage(
    mesh: MeshRunner,
    part: str,
    affected: Callable[[], Awaitable[object]],
    *,
    service: str,
    mentions: str,
    unaffected: Callable[[], Awaitable[object]] | None = None,
    opens_breakers: bool = True,
) -> dict[str, float]:
    """Freeze `part`; `affected` (served by `service`) must fail fast with UNAVAILABLE (its
    message mentioning `mentions`), `unaffected` must keep working; after the thaw `affected`
    works again on every replica. `opens_breakers`: the replicas' `part` breakers are what
    answers the later calls at once (not so where another guard answers first)."""

    async def states() -> dict[str, str]:
        return await breaker_states(mesh, service, part)

    async def replicas_closed() -> bool:
        return set((await states()).values()) == {"closed"}

    # The start: every replica's breaker closed (an earlier outage may have left one open with
    # no call since to close it), then every replica in Envoy (the calls that closed them may
    # have had a replica ejected meanwhile, and an ejected replica gets none of the wave).
    await recovered(affected, replicas_closed)
    await all_in_envoy(mesh)
    with frozen(mesh, part):
        # Round robin gives each replica `FAILURES` of the wave: enough to open its breaker.
        wave = await first_wave(affected, concurrency=FAILURES * mesh.replicas)
        opened = await states()
        later = [await timed(affected) for _ in range(5)]
        still_open = await states()
        if unaffected is not None:
            still = await timed(unaffected)
            assert still.code == grpc.StatusCode.OK, still
        envoy_view = await envoy_hosts(str((mesh.state() or {})["admin"]))
    for outcome in wave + later:
        assert outcome.code == grpc.StatusCode.UNAVAILABLE, outcome
        assert mentions in outcome.details.lower(), outcome
    assert max(o.seconds for o in wave) < FIRST_ANSWER_WITHIN, wave
    # Every breaker opened on the wave and stayed open through the later calls (none reached
    # its half-open trial, which would wait on the dependency again, by design); the later
    # calls were all answered at once.
    if opens_breakers:
        assert set(opened.values()) == set(still_open.values()) == {"open"}, (opened, still_open)
    assert max(o.seconds for o in later) < FAST_ANSWER_WITHIN, later
    recovery = await recovered(affected, replicas_closed)
    numbers = {
        "first_wave_max_s": max(o.seconds for o in wave),
        "later_max_s": max(o.seconds for o in later),
        "recovery_s": recovery,
    }
    ejected = sorted(a for a, h in envoy_view.items() if not h.healthy)
    # the numbers of the report (pytest -s shows them)
    print(f"{part} frozen: {numbers}; not healthy in Envoy during the outage: {ejected}")
    return numbers


async def test_postgres_frozen_answers_unavailable_fast_and_recovers(mesh: MeshRunner) -> None:
    async with authed_channel(mesh.grpc_target, mesh.admin_key) as channel:
        gateway = gateway_pb2_grpc.GatewayServiceStub(channel)

        async def list_sessions() -> object:
            return await gateway.ListSessions(
                g.ListSessionsRequest(page_size=1), timeout=CALL_DEADLINE
            )

        async def create_session() -> object:
            return await gateway.CreateSession(
                g.CreateSessionRequest(session=gpb.Session(display_name="outage")),
                timeout=CALL_DEADLINE,
            )

        for _ in range(4):  # both replicas have the key cached: authn needs no database
            await list_sessions()
        await check_outage(mesh, "postgres", list_sessions, service="gateway", mentions="postgres")
        # A mutation is not retried by Envoy: one dependency timeout at most, then breakers.
        await check_outage(mesh, "postgres", create_session, service="gateway", mentions="postgres")


async def test_nats_frozen_refuses_audited_mutations_fast_and_recovers(mesh: MeshRunner) -> None:
    async with authed_channel(mesh.grpc_target, mesh.admin_key) as channel:
        gateway = gateway_pb2_grpc.GatewayServiceStub(channel)

        async def create_session() -> object:
            return await gateway.CreateSession(
                g.CreateSessionRequest(session=gpb.Session(display_name="outage")),
                timeout=CALL_DEADLINE,
            )

        async def list_sessions() -> object:
            return await gateway.ListSessions(
                g.ListSessionsRequest(page_size=1), timeout=CALL_DEADLINE
            )

        # SOMA_AUDIT fail-closed: a mutation whose audit event cannot be made durable is
        # refused by design; reads go on. The audit gate answers before any NATS breaker is
        # involved: its one shared ping bounds every waiting call at 0.5 s.
        numbers = await check_outage(
            mesh,
            "nats",
            create_session,
            service="gateway",
            mentions="audit",
            unaffected=list_sessions,
            opens_breakers=False,
        )
        assert numbers["first_wave_max_s"] < 3.0  # the audit gate's own bound (0.5 s ping)


async def test_openbao_frozen_fails_token_issuing_fast_and_keeps_jwks(mesh: MeshRunner) -> None:
    async with authed_channel(mesh.grpc_target, mesh.admin_key) as channel:
        keys = keys_pb2_grpc.KeysServiceStub(channel)

        async def issue_token() -> object:
            return await keys.IssueToken(k.IssueTokenRequest(), timeout=CALL_DEADLINE)

        async def get_jwks() -> object:
            return await keys.GetJwks(k.GetJwksRequest(), timeout=CALL_DEADLINE)

        for _ in range(4):  # both Keys replicas hold a JWKS read from OpenBao
            await get_jwks()
        # The JWKS changes only on rotation: the last set read keeps being served.
        await check_outage(
            mesh, "openbao", issue_token, service="keys", mentions="openbao", unaffected=get_jwks
        )


@dataclass
class Stream:
    """A steady stream of Gateway calls from a few concurrent clients."""

    ok: int = 0
    in_flight: int = 0
    failures: list[tuple[float, str, grpc.StatusCode]] = field(default_factory=list)


async def run_stream(
    mesh: MeshRunner, stream: Stream, stop: asyncio.Event, clients: int = 6
) -> None:
    async with authed_channel(mesh.grpc_target, mesh.admin_key) as channel:
        gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
        created = await gateway.CreateSession(g.CreateSessionRequest(session=gpb.Session()))

        async def client(number: int) -> None:
            turn = 0
            while not stop.is_set():
                turn += 1
                kind = ("create", "get", "list")[(number + turn) % 3]
                stream.in_flight += 1
                try:
                    if kind == "create":
                        await gateway.CreateSession(
                            g.CreateSessionRequest(session=gpb.Session()), timeout=CALL_DEADLINE
                        )
                    elif kind == "get":
                        await gateway.GetSession(
                            g.GetSessionRequest(name=created.name), timeout=CALL_DEADLINE
                        )
                    else:
                        await gateway.ListSessions(
                            g.ListSessionsRequest(page_size=5), timeout=CALL_DEADLINE
                        )
                    stream.ok += 1
                except grpc.aio.AioRpcError as error:
                    stream.failures.append((time.monotonic(), kind, error.code()))
                finally:
                    stream.in_flight -= 1

        await asyncio.gather(*(client(n) for n in range(clients)))


async def watch_envoy(admin: str, address: str, seen: list[str], stop: asyncio.Event) -> None:
    """Records every state Envoy reports for the replica at `address` (admin /clusters)."""
    while not stop.is_set():
        with contextlib.suppress(OSError, ValueError):
            hosts: dict[str, EnvoyHost] = await envoy_hosts(admin, wait_s=1.0)
            host = hosts.get(address)
            state = host.state if host is not None else "absent"
            if not seen or seen[-1] != state:
                seen.append(state)
        await asyncio.sleep(0.1)


async def test_replica_killed_behind_envoy_fails_no_call_beyond_in_flight(
    mesh: MeshRunner,
) -> None:
    victim = mesh.part("gateway-1")
    restarts, address = victim["restarts"], str(victim["address"])
    admin = str((mesh.state() or {})["admin"])
    stream, stop, envoy_states = Stream(), asyncio.Event(), []
    calls = asyncio.create_task(run_stream(mesh, stream, stop))
    watcher = asyncio.create_task(watch_envoy(admin, address, envoy_states, stop))
    try:
        await asyncio.sleep(3.0)  # steady state: both replicas take calls
        assert stream.ok > 20 and not stream.failures, (stream.ok, stream.failures)
        in_flight_at_kill = stream.in_flight
        killed_at = time.monotonic()
        os.kill(int(victim["pid"]), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:  # the supervisor restarts it; Envoy's health checks take it back
            part = mesh.part("gateway-1")
            if part["restarts"] > restarts and part["status"] == "healthy":
                break
            assert time.monotonic() < deadline, part
            await asyncio.sleep(0.25)
        back = time.monotonic()
        while envoy_states[-1:] != ["healthy"]:
            assert time.monotonic() < back + 15, envoy_states
            await asyncio.sleep(0.1)
        ok_before = stream.ok
        await asyncio.sleep(2.0)  # and it keeps working with the restarted replica in
        assert stream.ok > ok_before
    finally:
        stop.set()
        await asyncio.gather(calls, watcher)
    print(
        f"replica kill: {stream.ok} ok, {len(stream.failures)} failed "
        f"({in_flight_at_kill} in flight at the kill), restarted and back in Envoy after "
        f"{back - killed_at:.1f}s; Envoy saw {envoy_states}"
    )
    # Only calls already on their way to the killed replica may fail (mutations Envoy must
    # not repeat); everything later went to the other replica.
    assert len(stream.failures) <= in_flight_at_kill, (in_flight_at_kill, stream.failures)
    for at, kind, code in stream.failures:
        assert code == grpc.StatusCode.UNAVAILABLE, stream.failures
        assert at - killed_at < 2.0, stream.failures
        assert kind == "create", stream.failures  # reads were retried on the other replica
    assert any(s != "healthy" for s in envoy_states), envoy_states  # `status` showed it


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on `port` (Linux /proc/net/tcp{,6})."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found


def test_envoy_admin_listens_on_loopback_only(mesh: MeshRunner) -> None:
    admin_port = int(str((mesh.state() or {})["admin"]).rsplit(":", 1)[1])
    addresses = _listening_addresses(admin_port)
    assert addresses == {"0100007F"}, addresses  # 127.0.0.1, nothing else (not 0.0.0.0 / ::)
