"""A small async circuit breaker for calls to a dependency (PostgreSQL, NATS, OpenBao).

When a dependency fails, every call waiting on it piles up until its own timeout: requests
hang, pools and queues fill. The breaker notices `failure_threshold` dependency failures within
`window` seconds and then, for `open_seconds`, refuses calls at once with UNAVAILABLE (reason
CIRCUIT_OPEN, naming the dependency and when it is tried again). After that one trial call is
let through (half-open): its success closes the breaker, its failure opens it again.

    postgres = CircuitBreaker("postgres", is_failure=postgres_failure)

    async with postgres:
        row = await pool.fetchrow(...)
    # or
    row = await postgres.call(pool.fetchrow, query, key_id)

Only exceptions `is_failure` classifies as the dependency failing count (connection refused,
timeouts, ...). Anything else — a domain error, a unique violation, a bug — means the dependency
answered, so it counts as a success. A cancelled call counts as neither.

Outcomes only count for the state the call was admitted in: a slow call admitted while closed
that fails after the breaker opened, or succeeds while a half-open trial runs, changes nothing.
The state is exported as soma_circuit_breaker_state (read at scrape time), refusals as
soma_circuit_breaker_rejections_total.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Literal, TypeVar

from services.common import metrics
from services.common.errors import SomaError, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
State = Literal["closed", "open", "half_open"]
FailureTest = Callable[[BaseException], bool]

REASON = "CIRCUIT_OPEN"


def transport_failure(error: BaseException) -> bool:
    """The default test: the network or a timeout failed, never a domain error."""
    return isinstance(error, OSError | TimeoutError) and not isinstance(error, SomaError)


def postgres_failure(error: BaseException) -> bool:
    """PostgreSQL unreachable, restarting, or out of connections; not SQL errors."""
    import asyncpg

    return transport_failure(error) or isinstance(
        error,
        asyncpg.PostgresConnectionError
        | asyncpg.ConnectionDoesNotExistError  # the server closed it mid-query
        | asyncpg.CannotConnectNowError
        | asyncpg.TooManyConnectionsError,
    )


def nats_failure(error: BaseException) -> bool:
    """NATS disconnected, not answering, or JetStream unavailable; not a rejected message."""
    import nats.errors
    import nats.js.errors

    return transport_failure(error) or isinstance(
        error,
        nats.errors.ConnectionClosedError
        | nats.errors.NoServersError
        | nats.errors.NoRespondersError
        | nats.errors.TimeoutError
        | nats.errors.StaleConnectionError
        | nats.js.errors.ServiceUnavailableError,
    )


def openbao_failure(error: BaseException) -> bool:
    """OpenBao unreachable, sealed or failing; not a permission or missing-path answer."""
    import hvac.exceptions

    from services.common.vault import VaultUnavailable

    return transport_failure(error) or isinstance(
        error,
        VaultUnavailable
        | hvac.exceptions.VaultDown
        | hvac.exceptions.InternalServerError
        | hvac.exceptions.BadGateway,
    )


class _Admission:
    """One admitted call: the breaker generation it belongs to, and whether it is the trial."""

    __slots__ = ("generation", "trial")

    def __init__(self, generation: int, trial: bool) -> None:
        self.generation = generation
        self.trial = trial


class CircuitBreaker:
    def __init__(
        self,
        dependency: str,
        *,
        failure_threshold: int = 5,
        window: float = 10.0,
        open_seconds: float = 5.0,
        is_failure: FailureTest = transport_failure,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or window <= 0 or open_seconds <= 0:
            raise ValueError(
                "breaker needs failure_threshold >= 1 and a positive window and open_seconds"
            )
        self.dependency = dependency
        self.failure_threshold = failure_threshold
        self.window = window
        self.open_seconds = open_seconds
        self.is_failure = is_failure
        self._clock = clock
        self._state: State = "closed"
        self._failures: deque[float] = deque()  # times of recent failures (closed state)
        self._opened_at = 0.0
        self._trial_running = False
        self._generation = 0  # bumped on every state change
        # The admissions of `async with` blocks in the current task (innermost last).
        self._entered: ContextVar[tuple[_Admission, ...]] = ContextVar(
            f"breaker_{dependency}", default=()
        )
        metrics.watch_breaker(self)

    # -- state ------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The state a call made now would see (open turns half-open once its time is up)."""
        if self._state == "open" and self._clock() >= self._opened_at + self.open_seconds:
            return "half_open"
        return self._state

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a trial call through (0 if it would now)."""
        if self._state != "open":
            return 0.0
        return max(0.0, self._opened_at + self.open_seconds - self._clock())

    def _set(self, state: State) -> None:
        if state == self._state:
            return
        previous, self._state = self._state, state
        self._generation += 1
        if state == "open":
            self._opened_at = self._clock()
            self._failures.clear()
        elif state == "closed":
            self._failures.clear()
        if state != "half_open":
            self._trial_running = False
        log.log(
            logging.WARNING if state == "open" else logging.INFO,
            "circuit breaker %s: %s -> %s",
            self.dependency,
            previous,
            state,
        )

    # -- admission and outcome ----------------------------------------------------------------

    def _admit(self) -> _Admission:
        """Lets a call through or raises Unavailable (CIRCUIT_OPEN)."""
        if self._state == "closed":
            return _Admission(self._generation, False)
        if self._state == "open" and self.retry_in() == 0.0:
            self._set("half_open")
        if self._state == "half_open" and not self._trial_running:
            self._trial_running = True
            return _Admission(self._generation, True)
        metrics.breaker_rejected(self.dependency)
        raise self._refusal()

    def _refusal(self) -> Unavailable:
        if self._state == "half_open":
            when = "a trial call is checking it now; retry in a moment"
        else:
            when = f"it is tried again in {self.retry_in():.1f}s"
        return Unavailable(
            f"{self.dependency} is unavailable (circuit breaker open after repeated failures); "
            f"{when}",
            reason=REASON,
            metadata={"dependency": self.dependency, "retry_after": f"{self.retry_in():.1f}s"},
        )

    def _record(self, admission: _Admission, error: BaseException | None) -> None:
        if admission.generation != self._generation:
            return  # admitted in an earlier state: its outcome is stale
        if error is not None and not isinstance(error, Exception):
            # Cancelled (or exiting): the dependency's health is unknown; free the trial slot.
            if admission.trial:
                self._trial_running = False
            return
        failed = error is not None and self.is_failure(error)
        if admission.trial:
            self._set("open" if failed else "closed")
            return
        if failed:
            now = self._clock()
            self._failures.append(now)
            while self._failures and self._failures[0] <= now - self.window:
                self._failures.popleft()
            if len(self._failures) >= self.failure_threshold:
                self._set("open")

    # -- the two ways to use it ---------------------------------------------------------------

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        admission = self._admit()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as error:
            self._record(admission, error)
            raise
        self._record(admission, None)
        return result

    async def __aenter__(self) -> CircuitBreaker:
        admission = self._admit()
        self._entered.set((*self._entered.get(), admission))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entered = self._entered.get()
        self._entered.set(entered[:-1])
        self._record(entered[-1], exc)


__all__ = [
    "REASON",
    "CircuitBreaker",
    "nats_failure",
    "openbao_failure",
    "postgres_failure",
    "transport_failure",
]
