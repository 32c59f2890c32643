"""`<data>/run/state.json`: what `soma-mesh up` is running, read by `soma-mesh status`.

Written atomically (temp file + rename) on every change, so a reader never sees half a file.
`status` is "starting" until every part is healthy, then "ready"; "degraded" while a part is
being restarted; "stopping", "stopped" or "failed" at the end. Secrets (the OpenBao token) are
never written here.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_VERSION = 1


@dataclass
class PartState:
    name: str  # e.g. "postgres", "gateway-0", "envoy"
    kind: str  # "postgres" | "nats" | "openbao" | "envoy" | "service" | "worker"
    address: str  # host:port (or a URL / socket dir for postgres)
    host: str = ""
    port: int = 0
    pid: int | None = None
    pgid: int | None = None
    create_time: float | None = None  # of the pid, to tell it from a reused pid
    # starting | healthy | unhealthy | restarting | stopped | failed | external
    status: str = "starting"
    restarts: int = 0
    last_exit_code: int | None = None
    log: str | None = None
    external: bool = False  # given by the environment (DATABASE_URL, ...), not started by us
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class MeshState:
    data_dir: str
    pid: int = field(default_factory=os.getpid)
    status: str = "starting"
    error: str | None = None
    host: str = "127.0.0.1"
    listener: str = ""
    admin: str = ""
    database_url: str = ""
    nats_url: str = ""
    vault_addr: str = ""
    urls: dict[str, str] = field(default_factory=dict)
    parts: list[PartState] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    version: int = STATE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def part(self, name: str) -> PartState | None:
        return next((p for p in self.parts if p.name == name), None)


def state_path(data_dir: Path) -> Path:
    return data_dir / "run" / "state.json"


def write_state(path: Path, state: MeshState) -> None:
    state.updated_at = time.time()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state.to_dict(), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_state(path: Path) -> dict[str, Any] | None:
    """The raw state dict, or None if there is no (readable) state file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
