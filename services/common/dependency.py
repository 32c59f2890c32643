"""A dependency a call waits on (PostgreSQL, NATS, OpenBao): its circuit breaker, how long one
wait on it may take, and the one wording of "it is not answering" a caller sees.

    async with NATS.guard("publish to SESSIONS") as budget:
        await js.publish(..., timeout=budget.seconds)

`guard` refuses at once while the breaker is open (UNAVAILABLE, reason CIRCUIT_OPEN), bounds
the block by `deadline.budget` (the dependency's timeout or the caller's deadline, whichever
is first), and turns a dependency failure — a timeout, a refused connection — into
UNAVAILABLE naming the dependency (reason DEPENDENCY_UNAVAILABLE, metadata `dependency`), so
that callers get an answer they can act on instead of INTERNAL, and get it in seconds.

A wait cut short by the caller's own deadline answers DEADLINE_EXCEEDED. It still counts as
the dependency failing when the caller gave it at least COUNTED_WAIT seconds: clients that
always set short deadlines must not keep a hung dependency's breaker closed forever.

The default timeout of every dependency is SOMA_DEPENDENCY_TIMEOUT_MS (3000): well below
Envoy's per-try timeout (5 s, gateway-config/limits.yaml), so a replica answers a precise
UNAVAILABLE before Envoy gives up on it, and Envoy may still retry a read elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

from services.common import deadline
from services.common.breaker import CircuitBreaker, FailureTest
from services.common.config import ConfigError
from services.common.deadline import Budget
from services.common.errors import DeadlineExceeded, SomaError, Unavailable

REASON = "DEPENDENCY_UNAVAILABLE"
DEFAULT_TIMEOUT = 3.0  # seconds; SOMA_DEPENDENCY_TIMEOUT_MS
# A timeout after at least this long counts as the dependency failing, even when the caller's
# deadline set the bound (PostgreSQL, NATS and OpenBao answer in milliseconds when healthy).
COUNTED_WAIT = 0.5
# The breakers: open after FAILURES failures within WINDOW seconds, for OPEN_SECONDS. The window
# holds FAILURES timeouts of one caller retrying in a loop (3 x 3 s), so a hung dependency
# opens the breaker even at low traffic; OPEN_SECONDS is how long a recovered dependency may
# go unused (then one trial call closes the breaker again).
FAILURES = 3
WINDOW = 30.0
OPEN_SECONDS = 5.0


class DependencyTimeout(TimeoutError):
    """A wait on a dependency ran out of its budget (raised inside the breaker, so it counts)."""

    def __init__(self, dependency: str, budget: Budget, what: str | None) -> None:
        super().__init__(f"{dependency} did not answer within {budget.seconds:.1f}s")
        self.budget = budget
        self.what = what


class Dependency:
    def __init__(
        self,
        name: str,
        label: str,
        is_failure: FailureTest,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        error: type[Unavailable] = Unavailable,
    ) -> None:
        self.name = name  # metric label and ErrorInfo metadata: postgres, nats, openbao
        self.label = label  # for people: PostgreSQL, NATS, OpenBao
        self.breaker = CircuitBreaker(
            name,
            failure_threshold=FAILURES,
            window=WINDOW,
            open_seconds=OPEN_SECONDS,
            is_failure=is_failure,
        )
        self.timeout = timeout
        self._error = error
        _ALL.append(self)

    def budget(self, timeout: float | None = None) -> Budget:
        return deadline.budget(self.timeout if timeout is None else timeout, self.label)

    def timed_out(self, budget: Budget, what: str | None = None) -> Exception:
        """What a wait that used up `budget` raises inside the breaker."""
        if budget.caller_bound and budget.seconds < COUNTED_WAIT:
            return DeadlineExceeded(
                f"the call's deadline expired while waiting for {self.label}{_about(what)}"
            )
        return DependencyTimeout(self.name, budget, what)

    def unavailable(self, error: BaseException, what: str | None = None) -> SomaError:
        """The answer for a failure `is_failure` recognised (or a DependencyTimeout)."""
        metadata = {"dependency": self.name}
        if isinstance(error, DependencyTimeout):
            if error.budget.caller_bound:
                return DeadlineExceeded(
                    f"the call's deadline expired after {error.budget.seconds:.1f}s waiting "
                    f"for {self.label}{_about(error.what or what)}",
                    metadata=metadata,
                )
            return self._error(
                f"{self.label} did not answer{_about(error.what or what)} within "
                f"{error.budget.seconds:.1f}s; retry shortly",
                reason=REASON,
                metadata=metadata,
            )
        detail = str(error).splitlines()[0][:200] if str(error) else ""
        return self._error(
            f"{self.label} is unavailable{_about(what)}: {type(error).__name__}"
            f"{': ' + detail if detail else ''}; retry shortly",
            reason=REASON,
            metadata=metadata,
        )

    def convert(self, error: BaseException, what: str | None = None) -> BaseException | None:
        """The error to raise instead of `error`, or None to let `error` through."""
        if isinstance(error, SomaError) or not isinstance(error, Exception):
            return None  # already an answer (CIRCUIT_OPEN, a domain error), or cancellation
        if isinstance(error, DependencyTimeout) or self.breaker.is_failure(error):
            return self.unavailable(error, what)
        return None

    @contextlib.asynccontextmanager
    async def guard(self, what: str, within: float | None = None) -> AsyncIterator[Budget]:
        """Breaker + bounded wait + one wording of failure, around one use of the dependency
        whose waits can be cancelled (a NATS request, a future). `within` replaces the
        dependency's timeout (the caller's deadline still applies)."""
        budget = self.budget(within)
        try:
            async with self.breaker:
                try:
                    async with asyncio.timeout(budget.seconds):
                        yield budget
                except TimeoutError as error:
                    raise self.timed_out(budget, what) from error
        except Exception as error:
            replacement = self.convert(error, what)
            if replacement is None:
                raise
            raise replacement from error


def _about(what: str | None) -> str:
    return f" ({what})" if what else ""


_ALL: list[Dependency] = []
TIMEOUT_VARIABLE = "SOMA_DEPENDENCY_TIMEOUT_MS"


def configure(env: Mapping[str, str]) -> float:
    """Sets every dependency's timeout from SOMA_DEPENDENCY_TIMEOUT_MS; returns it (seconds)."""
    raw = env.get(TIMEOUT_VARIABLE, "").strip()
    seconds = DEFAULT_TIMEOUT
    if raw:
        try:
            seconds = float(raw) / 1000.0
        except ValueError:
            raise ConfigError(f"{TIMEOUT_VARIABLE}={raw!r} is not a number") from None
        if not 0.05 <= seconds <= 600:
            raise ConfigError(f"{TIMEOUT_VARIABLE}={raw} must be between 50 and 600000")
    for dependency in _ALL:
        dependency.timeout = seconds
    return seconds


__all__ = [
    "COUNTED_WAIT",
    "DEFAULT_TIMEOUT",
    "REASON",
    "TIMEOUT_VARIABLE",
    "Dependency",
    "DependencyTimeout",
    "configure",
]
