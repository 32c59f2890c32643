"""Deadlines carried from the incoming call, and the dependency guards that use them:
services.common.deadline, services.common.dependency, the PostgreSQL pool (a real PostgreSQL,
frozen with SIGSTOP), OpenBao calls, NATS publishes and the JWKS served while OpenBao is away."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import psutil
import pytest

from services.common import db, deadline, dependency, events, vault
from services.common.breaker import REASON as CIRCUIT_OPEN
from services.common.breaker import CircuitBreaker, transport_failure
from services.common.config import ConfigError, DatabaseConfig, VaultConfig, load_config
from services.common.dependency import COUNTED_WAIT, Dependency
from services.common.errors import DeadlineExceeded, NotFound, Unavailable
from services.common.server import create_server
from services.keys import tokens
from soma.gateway.v1 import gateway_pb2, gateway_pb2_grpc


class Context:
    """The part of grpc's ServicerContext that deadline.begin reads."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


@contextlib.contextmanager
def call_with(remaining: float | None) -> Iterator[None]:
    token = deadline.begin(Context(remaining))
    try:
        yield
    finally:
        deadline.end(token)


# -- deadline --------------------------------------------------------------------------------


def test_budget_is_the_dependency_timeout_outside_a_call_or_without_deadline() -> None:
    assert deadline.remaining() is None
    assert deadline.budget(3.0) == deadline.Budget(3.0, False)
    with call_with(None):
        assert deadline.budget(3.0) == deadline.Budget(3.0, False)
    with call_with(60.0):  # the caller's deadline is far: the dependency's timeout binds
        assert deadline.budget(3.0) == deadline.Budget(3.0, False)


def test_budget_is_the_callers_deadline_minus_the_margin_when_sooner() -> None:
    with call_with(1.0):
        left = deadline.remaining()
        assert left is not None and 0.95 < left <= 1.0
        budget = deadline.budget(3.0)
        assert budget.caller_bound
        assert 0.85 < budget.seconds <= 1.0 - deadline.MARGIN
    assert deadline.remaining() is None  # reset when the call ends


def test_budget_refuses_when_the_deadline_has_passed() -> None:
    with call_with(deadline.MARGIN / 2), pytest.raises(DeadlineExceeded, match="PostgreSQL"):
        deadline.budget(3.0, "PostgreSQL")


async def test_tasks_outliving_their_call_lose_its_deadline() -> None:
    seen: list[float | None] = []
    release = asyncio.Event()

    async def background() -> None:
        seen.append(deadline.remaining())  # started during the call: bound by it
        await release.wait()
        seen.append(deadline.remaining())  # the call is over: no deadline any more

    with call_with(5.0):
        task = asyncio.create_task(background())
        await asyncio.sleep(0)
    release.set()
    await task
    assert seen[0] is not None and 4.0 < seen[0] <= 5.0
    assert seen[1] is None


class DeadlineEcho(gateway_pb2_grpc.GatewayServiceServicer):
    async def GetSession(self, request, context):  # type: ignore[no-untyped-def]
        budget = deadline.budget(3.0)
        raise NotFound(f"{budget.seconds:.3f} {budget.caller_bound}")


async def test_the_servers_interceptors_carry_the_callers_deadline() -> None:
    config = load_config("gateway", {"SOMA_PORT": "0"})
    running = await create_server(
        config,
        ["soma.gateway.v1.GatewayService"],
        lambda s: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(DeadlineEcho(), s),
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            answers = []
            for timeout in (2.0, None):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stub.GetSession(gateway_pb2.GetSessionRequest(name="x"), timeout=timeout)
                seconds, caller_bound = raised.value.details().split()
                answers.append((float(seconds), caller_bound))
    finally:
        await running.server.stop(0)
    # The budget comes from the 2 s deadline (not the 3 s default), minus MARGIN. Bounds are
    # loose on both sides: a busy machine eats into the 2 s before the handler runs, and
    # grpc-core rounds the timeout it sends up (the server can see a little over 2 s).
    assert 1.0 < answers[0][0] < 2.0 and answers[0][1] == "True"
    assert answers[1] == (3.0, "False")


# -- dependency guards ------------------------------------------------------------------------


def toy(name: str = "toy", timeout: float = 0.1) -> Dependency:
    return Dependency(name, name.capitalize(), transport_failure, timeout=timeout)


async def hang() -> None:
    await asyncio.sleep(3600)


async def test_a_hung_dependency_answers_unavailable_within_its_timeout_then_fast() -> None:
    dep = toy("hung-dep")
    durations = []
    for _ in range(dependency.FAILURES):
        started = time.monotonic()
        with pytest.raises(Unavailable) as raised:
            async with dep.guard("read a row"):
                await hang()
        durations.append(time.monotonic() - started)
        assert raised.value.reason == dependency.REASON
        assert raised.value.metadata == {"dependency": "hung-dep"}
        assert (
            raised.value.message
            == "Hung-dep did not answer (read a row) within 0.1s; retry shortly"
        )
    assert all(0.09 < d < 0.5 for d in durations), durations
    assert dep.breaker.state == "open"
    started = time.monotonic()
    with pytest.raises(Unavailable) as raised:
        async with dep.guard("read a row"):
            pytest.fail("an open breaker must not run the block")
    assert raised.value.reason == CIRCUIT_OPEN
    assert time.monotonic() - started < 0.05


async def test_failures_are_named_and_domain_errors_pass_unchanged() -> None:
    dep = toy("refusing-dep")
    with pytest.raises(Unavailable) as raised:
        async with dep.guard("connect"):
            raise ConnectionRefusedError(111, "Connection refused")
    assert raised.value.message.startswith("Refusing-dep is unavailable (connect): ")
    assert "ConnectionRefusedError" in raised.value.message
    assert isinstance(raised.value.__cause__, ConnectionRefusedError)
    with pytest.raises(NotFound):
        async with dep.guard("look up"):
            raise NotFound("no such row")
    with pytest.raises(KeyError):  # a bug is not the dependency's failure
        async with dep.guard("look up"):
            raise KeyError("x")
    assert dep.breaker.state == "closed"


async def test_a_short_caller_deadline_answers_deadline_exceeded_and_does_not_count() -> None:
    dep = toy("patient-dep", timeout=5.0)
    for _ in range(dependency.FAILURES + 1):
        with call_with(0.2), pytest.raises(DeadlineExceeded, match="Patient-dep"):
            async with dep.guard("query") as budget:
                assert budget.caller_bound and budget.seconds < 0.2
                await hang()
    assert dep.breaker.state == "closed"  # 0.1 s says nothing about the dependency


async def test_a_long_caller_deadline_that_runs_out_counts_as_failure() -> None:
    dep = toy("slow-dep", timeout=5.0)
    with call_with(COUNTED_WAIT + 0.15), pytest.raises(DeadlineExceeded, match=r"after 0\.[56]s"):
        async with dep.guard("query"):
            await hang()
    assert len(dep.breaker._failures) == 1


def test_configure_sets_every_timeout_and_refuses_nonsense() -> None:
    dep = toy("configured")
    try:
        assert dependency.configure({"SOMA_DEPENDENCY_TIMEOUT_MS": "1500"}) == 1.5
        assert dep.timeout == db.POSTGRES.timeout == events.NATS.timeout == 1.5
        with pytest.raises(ConfigError, match="SOMA_DEPENDENCY_TIMEOUT_MS"):
            dependency.configure({"SOMA_DEPENDENCY_TIMEOUT_MS": "soon"})
        with pytest.raises(ConfigError, match="between"):
            dependency.configure({"SOMA_DEPENDENCY_TIMEOUT_MS": "0"})
    finally:
        assert dependency.configure({}) == dependency.DEFAULT_TIMEOUT


@pytest.fixture
def fresh_breakers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short timeouts and fresh breakers (short open time) for the process-wide guards."""
    for dep in (db.POSTGRES, events.NATS, vault.OPENBAO):
        monkeypatch.setattr(dep, "timeout", 0.5)
        monkeypatch.setattr(
            dep,
            "breaker",
            CircuitBreaker(
                dep.name,
                failure_threshold=dependency.FAILURES,
                window=dependency.WINDOW,
                open_seconds=0.5,
                is_failure=dep.breaker.is_failure,
            ),
        )


# -- OpenBao: own threads, bounded ----------------------------------------------------------


async def test_openbao_calls_are_bounded_and_run_on_their_own_threads(fresh_breakers: None) -> None:
    threads = []

    def blocking(seconds: float) -> str:
        threads.append((threading.current_thread().name, seconds))
        return "signed"

    assert await vault.call(blocking, "sign") == "signed"
    assert threads[0][0].startswith("openbao") and threads[0][1] == 0.5

    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(vault.VaultUnavailable) as raised:
        await vault.call(lambda _s: release.wait(5), "sign with soma-jwt")
    release.set()
    assert time.monotonic() - started < 1.0
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE
    assert raised.value.message == (
        "OpenBao did not answer (sign with soma-jwt) within 0.5s; retry shortly"
    )
    assert raised.value.metadata == {"dependency": "openbao"}


def test_vault_unavailable_is_an_unavailable_answer_naming_openbao() -> None:
    error = vault.VaultUnavailable("OpenBao unavailable (load pepper): refused")
    assert isinstance(error, Unavailable) and error.metadata == {"dependency": "openbao"}
    assert error.reason == dependency.REASON


async def test_jwks_is_served_stale_while_openbao_is_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    signer = tokens.TransitSigner(VaultConfig("http://127.0.0.1:1", "token"))
    answers: list[Any] = [vault.VaultUnavailable("OpenBao is unavailable")]

    async def source(config: VaultConfig, key_name: str) -> dict[str, dict[str, Any]]:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return dict(answer)

    monkeypatch.setattr(vault, "transit_public_keys_async", source)
    with pytest.raises(Unavailable):  # nothing read yet: nothing to fall back on
        await signer.jwks()
    keys = {"soma-jwt-v1": {"kid": "soma-jwt-v1"}}
    answers.append(keys)
    assert await signer.jwks() == keys
    assert signer._jwks is not None
    signer._jwks.at -= tokens.JWKS_CACHE_SECONDS  # expired: the next call asks OpenBao
    answers.append(vault.VaultUnavailable("OpenBao is unavailable"))
    assert await signer.jwks() == keys  # the last set read
    assert not answers
    assert await signer.jwks() == keys  # and OpenBao is not asked on every call meanwhile


# -- NATS publishes --------------------------------------------------------------------------


class HungJetStream:
    async def publish(self, *args: Any, **kwargs: Any) -> Any:
        self.timeout = kwargs["timeout"]
        await hang()


async def test_a_publish_to_a_hung_nats_answers_unavailable_naming_nats(
    fresh_breakers: None,
) -> None:
    js = HungJetStream()
    bus = events.Bus(nc=None, js=js)  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(Unavailable, match=r"^NATS did not answer \(publish to SESSIONS\)"):
        await bus.publish("sessions.0.x.in", b"", stream="SESSIONS", msg_id="m1", ack_timeout=0.2)
    assert time.monotonic() - started < 0.5 and js.timeout == 0.2
    for _ in range(dependency.FAILURES - 1):
        with pytest.raises(Unavailable):
            await bus.publish("sessions.0.x.in", b"", stream="SESSIONS", msg_id="m1")
    with pytest.raises(Unavailable) as raised:
        await bus.publish("sessions.0.x.in", b"", stream="SESSIONS", msg_id="m1")
    assert raised.value.reason == CIRCUIT_OPEN


# -- the PostgreSQL pool, against a real PostgreSQL -----------------------------------------


@pytest.fixture(scope="module")
def postgres() -> Iterator[tuple[str, int]]:
    """(database URL, postmaster pid) of a throw-away pgserver under /tmp."""
    with warnings.catch_warnings():  # pgserver warns about XDG_RUNTIME_DIR at import
        warnings.simplefilter("ignore")
        import pgserver
    root = Path(tempfile.mkdtemp(prefix="soma-deadline-", dir="/tmp"))
    server = pgserver.get_server(root / "pg", cleanup_mode="stop")
    try:
        pid = int((root / "pg" / "postmaster.pid").read_text().split()[0])
        yield server.get_uri(), pid
    finally:
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def pool(postgres: tuple[str, int], fresh_breakers: None) -> AsyncIterator[db.GuardedPool]:
    pool = await db.create_pool(DatabaseConfig(postgres[0], 4))
    await pool.execute("CREATE TABLE IF NOT EXISTS deadline_t (id int PRIMARY KEY)")
    await pool.execute("TRUNCATE deadline_t")
    pool.bound()
    yield pool
    await asyncio.wait_for(pool.close(), 10)


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for process in processes:
        process.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGCONT)


async def test_pool_works_and_sql_errors_are_not_failures(pool: db.GuardedPool) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO deadline_t VALUES (1)")
    for _ in range(dependency.FAILURES + 1):
        with pytest.raises(asyncpg.UniqueViolationError):
            await pool.execute("INSERT INTO deadline_t VALUES (1)")
    assert await pool.fetchval("SELECT count(*) FROM deadline_t") == 1
    assert db.POSTGRES.breaker.state == "closed"


async def test_a_unit_of_work_over_its_budget_is_cut_and_the_pool_stays_usable(
    pool: db.GuardedPool,
) -> None:
    started = time.monotonic()
    with pytest.raises(Unavailable, match=r"^PostgreSQL did not answer within 0.5s"):
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("INSERT INTO deadline_t VALUES (2)")
            await conn.execute("SELECT pg_sleep(5)")
    assert time.monotonic() - started < 1.5
    assert await pool.fetchval("SELECT count(*) FROM deadline_t WHERE id = 2") == 0  # rolled back
    assert pool.get_size() <= 4


async def test_a_unit_of_work_may_ask_for_a_longer_bound(pool: db.GuardedPool) -> None:
    async with pool.acquire(timeout=5.0) as conn:  # e.g. a retention purge: budget 0.5 s
        assert await conn.fetchval("SELECT 1 FROM pg_sleep(0.7)") == 1
    with call_with(0.35), pytest.raises(DeadlineExceeded):  # the caller's deadline still wins
        async with pool.acquire(timeout=5.0) as conn:
            await conn.fetchval("SELECT 1 FROM pg_sleep(0.7)")


async def test_the_callers_deadline_bounds_the_unit_of_work(pool: db.GuardedPool) -> None:
    started = time.monotonic()
    with call_with(0.35), pytest.raises(DeadlineExceeded, match="PostgreSQL"):
        await pool.fetchval("SELECT pg_sleep(5)")
    assert time.monotonic() - started < 1.0
    assert db.POSTGRES.breaker.state == "closed" and not db.POSTGRES.breaker._failures


async def test_before_bound_start_up_work_may_take_its_time(
    postgres: tuple[str, int], fresh_breakers: None
) -> None:
    pool = await db.create_pool(DatabaseConfig(postgres[0], 2))
    try:  # migrations wait on an advisory lock while another replica migrates
        assert await pool.fetchval("SELECT 1 FROM pg_sleep(0.7)", timeout=5) == 1  # budget 0.5
    finally:
        await pool.close()


async def test_a_frozen_postgres_answers_fast_and_recovers_by_itself(
    pool: db.GuardedPool, postgres: tuple[str, int]
) -> None:
    await pool.fetchval("SELECT 1")
    outcomes: list[tuple[str, float]] = []
    with frozen(postgres[1]):
        for _ in range(dependency.FAILURES + 2):
            started = time.monotonic()
            try:
                async with pool.acquire() as conn, conn.transaction():
                    await conn.fetchval("SELECT 1")
                outcomes.append(("ok", time.monotonic() - started))
            except Unavailable as error:
                outcomes.append((error.reason, time.monotonic() - started))
    assert [reason for reason, _ in outcomes] == [dependency.REASON] * dependency.FAILURES + [
        CIRCUIT_OPEN
    ] * 2, outcomes
    assert all(seconds < 1.5 for _, seconds in outcomes), outcomes  # budget 0.5 s: never hangs
    assert all(seconds < 0.05 for _, seconds in outcomes[-2:]), outcomes
    started = time.monotonic()
    while True:  # no restart, no reconnect by hand: the half-open trial closes the breaker
        try:
            assert await pool.fetchval("SELECT 42") == 42
            break
        except Unavailable:
            assert time.monotonic() - started < 5.0
            await asyncio.sleep(0.1)
    assert db.POSTGRES.breaker.state == "closed"
