"""The incoming call's deadline, carried to every outgoing wait it causes.

The telemetry interceptor calls `begin(context)` for each call: when the caller set a deadline
(`grpc-timeout`, forwarded by Envoy), it is kept in a context variable, and `budget(default)`
then bounds a wait on PostgreSQL, NATS or OpenBao by whichever comes first — the dependency's
own timeout or the caller's deadline (minus a small margin, so that the replica, not the
caller's timer, ends the call and frees what it held).

Tasks a call starts inherit the context. `end` clears the deadline in place when the call
finishes, so a task that outlives its call (an install, a lazily started batcher) is not bound
by a deadline that no longer means anything.
"""

from __future__ import annotations

import time
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Protocol

from services.common.errors import DeadlineExceeded

# Time kept back from the caller's deadline: enough to stop waiting, release a connection
# and send the answer before the caller's own timer fires.
MARGIN = 0.1


class _CallDeadline:
    __slots__ = ("at",)

    def __init__(self, at: float | None) -> None:
        self.at = at  # time.monotonic() value; None once the call has finished


_current: ContextVar[_CallDeadline | None] = ContextVar("soma_call_deadline", default=None)


class HasTimeRemaining(Protocol):
    def time_remaining(self) -> float | None: ...


def begin(context: HasTimeRemaining) -> Token[_CallDeadline | None] | None:
    """Records the call's deadline (if it has one); pass the result to `end`."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return _current.set(_CallDeadline(time.monotonic() + remaining))


def end(token: Token[_CallDeadline | None] | None) -> None:
    if token is None:
        return
    call = _current.get()
    if call is not None:
        call.at = None  # tasks started by the call see no deadline from now on
    _current.reset(token)


def remaining() -> float | None:
    """Seconds left before the current call's deadline; None outside a call or without one."""
    call = _current.get()
    if call is None or call.at is None:
        return None
    return call.at - time.monotonic()


@dataclass(frozen=True, slots=True)
class Budget:
    seconds: float
    caller_bound: bool  # True: the caller's deadline, not the dependency's timeout, set it


def budget(default: float, dependency: str = "a dependency") -> Budget:
    """How long the next wait on `dependency` may take. Raises DeadlineExceeded when the
    caller's deadline has (nearly) passed: no point in starting work nobody waits for."""
    left = remaining()
    if left is None or left - MARGIN >= default:
        return Budget(default, False)
    if left - MARGIN <= 0:
        raise DeadlineExceeded(
            f"the call's deadline expired before {dependency} was asked; "
            "retry with a longer deadline"
        )
    return Budget(left - MARGIN, True)


__all__ = ["MARGIN", "Budget", "begin", "budget", "end", "remaining"]
