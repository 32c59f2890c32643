"""services.common.breaker: closed -> open -> half-open -> closed/open, on an injected clock."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from prometheus_client import REGISTRY

from services.common import metrics
from services.common.breaker import (
    REASON,
    CircuitBreaker,
    nats_failure,
    openbao_failure,
    postgres_failure,
    transport_failure,
)
from services.common.errors import NotFound, Unavailable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def breaker(clock: Clock, name: str = "postgres", **kw: float) -> CircuitBreaker:
    options = {"failure_threshold": 3, "window": 10.0, "open_seconds": 5.0, **kw}
    return CircuitBreaker(name, clock=clock, **options)  # type: ignore[arg-type]


async def ok() -> str:
    return "ok"


async def down() -> str:
    raise ConnectionRefusedError("connection refused")


async def fail(b: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        with pytest.raises(ConnectionRefusedError):
            await b.call(down)


def rejections(dependency: str) -> float:
    value = REGISTRY.get_sample_value(
        "soma_circuit_breaker_rejections_total",
        {"service": metrics.service(), "dependency": dependency},
    )
    return value or 0.0


async def test_opens_after_threshold_failures_within_the_window(clock: Clock) -> None:
    b = breaker(clock)
    await fail(b, 2)
    assert b.state == "closed"
    assert await b.call(ok) == "ok"  # a success in between does not hide the failures
    await fail(b, 1)
    assert b.state == "open"


async def test_failures_outside_the_window_are_forgotten(clock: Clock) -> None:
    b = breaker(clock)
    await fail(b, 2)
    clock.advance(10.5)
    await fail(b, 2)
    assert b.state == "closed"
    await fail(b, 1)
    assert b.state == "open"


async def test_open_refuses_fast_naming_dependency_and_retry_time(clock: Clock) -> None:
    b = breaker(clock, "openbao-test")
    await fail(b, 3)
    called = False

    async def never() -> None:
        nonlocal called
        called = True

    before = rejections("openbao-test")
    clock.advance(2.0)
    with pytest.raises(Unavailable) as raised:
        await b.call(never)
    assert not called
    error = raised.value
    assert error.reason == REASON == "CIRCUIT_OPEN"
    assert "openbao-test" in error.message
    assert "3.0s" in error.message  # 5 s open, 2 s gone
    assert error.metadata == {"dependency": "openbao-test", "retry_after": "3.0s"}
    assert rejections("openbao-test") == before + 1


async def test_half_open_admits_one_trial_and_its_success_closes(clock: Clock) -> None:
    b = breaker(clock)
    await fail(b, 3)
    clock.advance(5.0)
    assert b.state == "half_open"
    trial_started, release = asyncio.Event(), asyncio.Event()

    async def slow_trial() -> str:
        trial_started.set()
        await release.wait()
        return "recovered"

    trial = asyncio.create_task(b.call(slow_trial))
    await trial_started.wait()
    with pytest.raises(Unavailable, match="trial call"):  # only one trial at a time
        await b.call(ok)
    release.set()
    assert await trial == "recovered"
    assert b.state == "closed"
    assert await b.call(ok) == "ok"


async def test_failed_trial_opens_again_for_a_full_period(clock: Clock) -> None:
    b = breaker(clock)
    await fail(b, 3)
    clock.advance(6.0)
    await fail(b, 1)  # the trial
    assert b.state == "open"
    assert b.retry_in() == pytest.approx(5.0)
    clock.advance(4.9)
    with pytest.raises(Unavailable):
        await b.call(ok)
    clock.advance(0.1)
    assert await b.call(ok) == "ok"
    assert b.state == "closed"


async def test_domain_errors_are_not_failures(clock: Clock) -> None:
    b = breaker(clock)

    async def missing() -> None:
        raise NotFound("session x does not exist")

    for _ in range(10):
        with pytest.raises(NotFound):
            await b.call(missing)
    assert b.state == "closed"
    # ...and in half-open, a domain error proves the dependency answered.
    await fail(b, 3)
    clock.advance(5.0)
    with pytest.raises(NotFound):
        await b.call(missing)
    assert b.state == "closed"


async def test_cancelled_trial_frees_the_slot(clock: Clock) -> None:
    b = breaker(clock)
    await fail(b, 3)
    clock.advance(5.0)
    started = asyncio.Event()

    async def hang() -> None:
        started.set()
        await asyncio.sleep(3600)

    trial = asyncio.create_task(b.call(hang))
    await started.wait()
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert b.state == "half_open"
    assert await b.call(ok) == "ok"  # the next caller is the trial
    assert b.state == "closed"


async def test_stale_outcomes_do_not_count(clock: Clock) -> None:
    """Slow calls admitted while closed must not decide while a half-open trial runs."""
    b = breaker(clock)
    release = asyncio.Event()

    async def slow_failure() -> None:
        await release.wait()
        raise ConnectionResetError("reset")

    stragglers = [asyncio.create_task(b.call(slow_failure)) for _ in range(3)]
    await asyncio.sleep(0)
    await fail(b, 3)
    clock.advance(5.0)
    trial_release = asyncio.Event()

    async def slow_trial() -> str:
        await trial_release.wait()
        return "recovered"

    trial = asyncio.create_task(b.call(slow_trial))
    await asyncio.sleep(0)
    release.set()
    for straggler in stragglers:
        with pytest.raises(ConnectionResetError):
            await straggler
    assert b.state == "half_open"  # three stale failures did not reopen it
    trial_release.set()
    assert await trial == "recovered"
    assert b.state == "closed"


async def test_async_with_form(clock: Clock) -> None:
    b = breaker(clock)
    for _ in range(3):
        with pytest.raises(TimeoutError):
            async with b:
                raise TimeoutError("no answer within 2s")
    assert b.state == "open"
    with pytest.raises(Unavailable):
        async with b:
            pytest.fail("an open breaker must not run the block")
    clock.advance(5.0)
    async with b:  # the trial
        pass
    assert b.state == "closed"

    # Nested blocks of two breakers in one task keep their own admissions.
    other = breaker(clock, "nats")
    async with b:
        with pytest.raises(OSError):
            async with other:
                raise OSError("nats down")
    assert b.state == other.state == "closed"


async def test_custom_classifier(clock: Clock) -> None:
    b = breaker(clock, failure_threshold=1, is_failure=lambda e: isinstance(e, KeyError))  # type: ignore[arg-type]

    async def timeout() -> None:
        raise TimeoutError

    with pytest.raises(TimeoutError):
        await b.call(timeout)
    assert b.state == "closed"

    async def key_error() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        await b.call(key_error)
    assert b.state == "open"


async def test_state_is_exported(clock: Clock) -> None:
    b = breaker(clock, "exported")
    assert metrics.breaker_state("exported") == 0
    await fail(b, 3)
    assert metrics.breaker_state("exported") == 2
    labels = {"service": metrics.service(), "dependency": "exported"}
    assert REGISTRY.get_sample_value("soma_circuit_breaker_state", labels) == 2
    clock.advance(5.0)
    assert metrics.breaker_state("exported") == 1
    await b.call(ok)
    assert REGISTRY.get_sample_value("soma_circuit_breaker_state", labels) == 0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="failure_threshold"):
        CircuitBreaker("x", failure_threshold=0)


def test_classifiers() -> None:
    import hvac.exceptions
    import nats.errors

    assert transport_failure(ConnectionResetError()) and transport_failure(TimeoutError())
    assert not transport_failure(ValueError()) and not transport_failure(NotFound("x"))
    assert postgres_failure(asyncpg.CannotConnectNowError("starting up"))
    assert postgres_failure(asyncpg.ConnectionDoesNotExistError("closed"))
    assert not postgres_failure(asyncpg.UniqueViolationError("dup"))
    assert nats_failure(nats.errors.NoServersError())
    assert nats_failure(nats.errors.TimeoutError())
    assert not nats_failure(nats.errors.BadSubjectError())
    assert openbao_failure(hvac.exceptions.VaultDown())
    assert not openbao_failure(hvac.exceptions.Forbidden())
