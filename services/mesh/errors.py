"""Errors raised by the supervisor.

MeshError                 base class; the CLI prints its message and exits non-zero
├── LockHeldError         the data directory is in use by another `soma-mesh up`
├── PartFailedError       a part did not become healthy (carries the tail of its log)
└── NotRunningError       `soma-mesh status/down` found no running mesh
"""

from __future__ import annotations

from pathlib import Path


class MeshError(Exception):
    """Base class of every supervisor error."""


class LockHeldError(MeshError):
    def __init__(self, lock_path: str, owner_pid: int | None) -> None:
        owner = f"pid {owner_pid}" if owner_pid else "another process"
        data_dir = str(Path(lock_path).parent.parent)
        super().__init__(
            f"the data directory {data_dir} is already in use by soma-mesh ({owner}); "
            f"lock file {lock_path}. "
            "Stop that mesh first (soma-mesh down --data-dir ...) or use another --data-dir."
        )
        self.lock_path = lock_path
        self.owner_pid = owner_pid


class PartFailedError(MeshError):
    def __init__(self, part: str, reason: str, log_path: str | None, log_tail: str) -> None:
        msg = f"part {part!r} failed to start: {reason}"
        if log_path:
            msg += f"\n--- last lines of {log_path} ---\n{log_tail.rstrip()}\n---"
        super().__init__(msg)
        self.part = part
        self.reason = reason
        self.log_path = log_path
        self.log_tail = log_tail


class NotRunningError(MeshError):
    """No mesh is running on this data directory."""
