"""The Python parts: the four gRPC services (N replicas each) and the reference worker.

Each is `<python> -m <module>`, configured through the environment (see services/common/config.py).
`SOMA_MESH_MODULES` (or MeshOptions.modules) swaps modules, e.g. for tests:
`SOMA_MESH_MODULES="*=tests.fake_server"` runs a stand-in for every part, `keys=` (empty) leaves
the keys service out.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from services.mesh.health import grpc_health
from services.mesh.process import ProcessSpec

REPO_ROOT = Path(__file__).resolve().parents[2]

# part name -> module; "worker" is the reference agent worker (one instance).
DEFAULT_MODULES: dict[str, str] = {
    "gateway": "services.gateway",
    "keys": "services.keys",
    "audit": "services.audit",
    "capsule": "services.capsule",
    "worker": "services.gateway.worker",
}
SERVICE_PARTS = ("gateway", "keys", "audit", "capsule")


def parse_modules(text: str | None) -> dict[str, str]:
    """`"*=mod,keys=,worker=other"` -> overrides; "*" applies to every part, empty = leave out."""
    out: dict[str, str] = {}
    if not text:
        return out
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, module = item.partition("=")
        if not sep:
            raise ValueError(f"SOMA_MESH_MODULES entry {item!r} is not part=module")
        name = name.strip()
        if name != "*" and name not in DEFAULT_MODULES:
            raise ValueError(f"SOMA_MESH_MODULES: unknown part {name!r}")
        out[name] = module.strip()
    return out


def resolve_modules(overrides: Mapping[str, str]) -> dict[str, str]:
    """Part -> module for every part that runs (parts mapped to "" are left out)."""
    modules = dict(DEFAULT_MODULES)
    if "*" in overrides:
        modules = dict.fromkeys(modules, overrides["*"])
    modules.update({k: v for k, v in overrides.items() if k != "*"})
    return {k: v for k, v in modules.items() if v}


def python_path(environ: Mapping[str, str]) -> str:
    extra = [str(REPO_ROOT), str(REPO_ROOT / "gen" / "python")]
    current = environ.get("PYTHONPATH", "")
    return os.pathsep.join([*extra, *([current] if current else [])])


def spec(
    *,
    name: str,
    kind: str,
    module: str,
    host: str,
    port: int,
    env: Mapping[str, str],
    log_path: Path,
    grace_seconds: float,
    startup_timeout: float,
    python: str = sys.executable,
) -> ProcessSpec:
    child_env = dict(env)
    child_env.update(
        {
            "SOMA_HOST": host,
            "SOMA_PORT": str(port),
            "SOMA_REPLICA": name,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": python_path(env),
        }
    )
    address = f"{host}:{port}"
    return ProcessSpec(
        name=name,
        kind=kind,
        argv=(python, "-m", module),
        env=child_env,
        log_path=log_path,
        probe=lambda: grpc_health(address),
        host=host,
        port=port,
        stop_timeout=grace_seconds + 5.0,  # the server drains for its grace period first
        startup_timeout=startup_timeout,
    )
