"""Restart backoff: 0.5 s doubling to 30 s, forgotten once a part has been healthy for a while."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackoffPolicy:
    initial: float = 0.5
    factor: float = 2.0
    maximum: float = 30.0
    reset_after: float = 30.0  # seconds of uptime after which a crash counts as the first again


class Backoff:
    def __init__(self, policy: BackoffPolicy | None = None) -> None:
        self.policy = policy or BackoffPolicy()
        self._failures = 0

    @property
    def failures(self) -> int:
        return self._failures

    def next_delay(self, uptime: float) -> float:
        """Delay before the next restart, given how long the process ran before it died."""
        if uptime >= self.policy.reset_after:
            self._failures = 0
        delay = min(self.policy.maximum, self.policy.initial * self.policy.factor**self._failures)
        self._failures += 1
        return delay

    def reset(self) -> None:
        self._failures = 0
