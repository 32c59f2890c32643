"""`soma-mesh status` and `soma-mesh down`: read state.json, probe every part for real."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.mesh.errors import NotRunningError
from services.mesh.health import (
    ProbeResult,
    grpc_health,
    http_ok,
    openbao_health,
    postgres_connect,
)
from services.mesh.lock import is_locked
from services.mesh.state import read_state, state_path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_running(data_dir: Path) -> dict[str, Any]:
    """The state of the mesh running on data_dir, or NotRunningError."""
    path = state_path(data_dir)
    state = read_state(path)
    if state is None:
        raise NotRunningError(f"no mesh is running on {data_dir} (no {path})")
    pid = int(state.get("pid") or 0)
    if not (pid and _pid_alive(pid) and is_locked(data_dir / "run" / "mesh.lock")):
        raise NotRunningError(
            f"no mesh is running on {data_dir} (state file left by pid {pid}, "
            f"last status {state.get('status')!r})"
        )
    return state


async def probe_part(
    part: Mapping[str, Any], state: Mapping[str, Any], environ: Mapping[str, str]
) -> ProbeResult:
    kind = part.get("kind")
    if kind in ("service", "worker"):
        return await grpc_health(str(part.get("address")))
    if kind == "envoy":
        return await http_ok(f"http://{state.get('admin')}/ready")
    if kind == "nats":
        monitor = (part.get("extra") or {}).get("monitor_url")
        if monitor:
            return await http_ok(f"{monitor}/healthz?js-enabled-only=true")
        return await _nats_connect(environ.get("NATS_URL") or str(state.get("nats_url")))
    if kind == "postgres":
        return await postgres_connect(environ.get("DATABASE_URL") or str(state.get("database_url")))
    if kind == "openbao":
        return await openbao_health(str(state.get("vault_addr")))
    return ProbeResult(False, f"unknown kind {kind!r}")


async def _nats_connect(url: str) -> ProbeResult:
    import nats

    try:
        nc = await nats.connect(
            url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False
        )
    except Exception as exc:
        return ProbeResult(False, f"connect: {exc}")
    await nc.close()
    return ProbeResult(True, "connected")


async def collect(data_dir: Path, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """State plus a live `health` {healthy, detail} for every part."""
    env = os.environ if environ is None else environ
    state = load_running(data_dir)
    parts = list(state.get("parts", []))
    results = await asyncio.gather(*(probe_part(p, state, env) for p in parts))
    for part, result in zip(parts, results, strict=True):
        part["health"] = {"healthy": result.healthy, "detail": result.detail}
    state["healthy"] = bool(parts) and all(r.healthy for r in results)
    return state


def format_table(state: Mapping[str, Any]) -> str:
    lines = [
        f"mesh pid {state.get('pid')}  status {state.get('status')}  data {state.get('data_dir')}",
        "",
    ]
    header = ("PART", "PID", "ADDRESS", "STATE", "HEALTH", "RESTARTS", "LOG")
    rows = [header]
    for p in state.get("parts", []):
        health = p.get("health", {})
        rows.append(
            (
                str(p.get("name")),
                str(p.get("pid") or "-"),
                str(p.get("address") or "-"),
                str(p.get("status")),
                ("ok " if health.get("healthy") else "BAD ") + str(health.get("detail", ""))[:40],
                str(p.get("restarts", 0))
                + (
                    f" (last exit {p['last_exit_code']})"
                    if p.get("last_exit_code") is not None
                    else ""
                ),
                str(p.get("log") or "-"),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    urls = state.get("urls") or {}
    if urls:
        lines.append("")
        lines.extend(f"{k:20} {v}" for k, v in urls.items())
    return "\n".join(lines)


def request_stop(data_dir: Path, timeout: float = 90.0) -> int:
    """SIGTERM the supervisor and wait until it has released the lock. Returns its pid."""
    state = load_running(data_dir)
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid) or not is_locked(data_dir / "run" / "mesh.lock"):
            return pid
        time.sleep(0.2)
    raise TimeoutError(f"soma-mesh pid {pid} did not stop within {timeout:.0f}s")
