"""`soma-mesh status` and `soma-mesh down`: read state.json, probe every part for real.

Besides our own probe of each replica, `status` shows Envoy's view of it — what decides whether
calls reach it — read from Envoy's admin `/clusters?format=json` (loopback only): `healthy`,
`failed health check` (active gRPC health checks), `ejected` (outlier detection: it kept
failing calls), or `not in Envoy`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
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


# -- Envoy's view of the replicas ------------------------------------------------------------

# HostHealthStatus flags of Envoy's admin /clusters?format=json, in the words `status` shows.
_ENVOY_FLAGS = {
    "failed_active_health_check": "failed health check",
    "failed_outlier_check": "ejected",
    "failed_active_degraded_check": "degraded",
    "pending_active_hc": "awaiting first health check",
    "pending_dynamic_removal": "being removed",
    "excluded_via_immediate_hc_fail": "excluded",
    "active_hc_timeout": "health check timed out",
}
NOT_IN_ENVOY = "not in Envoy"


@dataclass(frozen=True)
class EnvoyHost:
    """One upstream host as Envoy sees it."""

    cluster: str
    state: str  # "healthy", or the flags joined: "failed health check, ejected"
    flags: tuple[str, ...] = ()
    stats: dict[str, int] = field(default_factory=dict)  # rq_active, rq_error, cx_connect_fail...

    @property
    def healthy(self) -> bool:
        return not self.flags


def parse_clusters(document: Mapping[str, Any]) -> dict[str, EnvoyHost]:
    """`host:port` -> EnvoyHost, from the JSON of Envoy's admin `/clusters?format=json`."""
    hosts: dict[str, EnvoyHost] = {}
    for cluster in document.get("cluster_statuses") or ():
        for host in cluster.get("host_statuses") or ():
            socket = (host.get("address") or {}).get("socket_address") or {}
            if "address" not in socket:
                continue  # a pipe or an internal address: not one of our replicas
            health = host.get("health_status") or {}
            flags = [word for key, word in _ENVOY_FLAGS.items() if health.get(key)]
            eds = str(health.get("eds_health_status") or "HEALTHY")
            if eds != "HEALTHY":
                flags.append(eds.lower())
            stats = {
                str(s["name"]): int(s["value"])
                for s in host.get("stats") or ()
                if "name" in s and str(s.get("value", "")).isdigit()
            }
            hosts[f"{socket['address']}:{socket.get('port_value', 0)}"] = EnvoyHost(
                cluster=str(cluster.get("name", "")),
                state=", ".join(flags) or "healthy",
                flags=tuple(flags),
                stats=stats,
            )
    return hosts


def _get_json(url: str, wait_s: float) -> Any:
    with urllib.request.urlopen(url, timeout=wait_s) as resp:  # HTTPError is an OSError
        return json.loads(resp.read())


async def envoy_hosts(admin: str, wait_s: float = 2.0) -> dict[str, EnvoyHost]:
    """Envoy's view of every upstream host; raises OSError/ValueError if admin cannot tell."""
    document = await asyncio.to_thread(_get_json, f"http://{admin}/clusters?format=json", wait_s)
    if not isinstance(document, dict):
        raise ValueError("Envoy admin /clusters did not answer a JSON object")
    return parse_clusters(document)


def attach_envoy_view(parts: list[dict[str, Any]], hosts: Mapping[str, EnvoyHost]) -> None:
    """Sets `envoy` {state, healthy, cluster, stats} on every service replica part."""
    for part in parts:
        if part.get("kind") != "service":
            continue  # only the service replicas sit behind Envoy
        host = hosts.get(str(part.get("address")))
        if host is None:
            part["envoy"] = {"state": NOT_IN_ENVOY, "healthy": False}
        else:
            part["envoy"] = {"healthy": host.healthy, **asdict(host)}


async def collect(data_dir: Path, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """State plus a live `health` {healthy, detail} for every part, and Envoy's view
    (`envoy`) of every service replica."""
    env = os.environ if environ is None else environ
    state = load_running(data_dir)
    parts = list(state.get("parts", []))
    admin = state.get("admin")
    with_envoy = bool(admin) and any(p.get("kind") == "envoy" for p in parts)

    async def envoy_view() -> dict[str, EnvoyHost] | None:
        if not with_envoy:
            return None
        try:
            return await envoy_hosts(str(admin))
        except (OSError, ValueError) as error:
            state["envoy_view_error"] = f"Envoy admin {admin}: {error}"
            return None

    view = asyncio.create_task(envoy_view())  # alongside the probes
    results = await asyncio.gather(*(probe_part(p, state, env) for p in parts))
    hosts = await view
    for part, result in zip(parts, results, strict=True):
        part["health"] = {"healthy": result.healthy, "detail": result.detail}
    if hosts is not None:
        attach_envoy_view(parts, hosts)
    state["healthy"] = bool(parts) and all(r.healthy for r in results)
    return state


def format_table(state: Mapping[str, Any]) -> str:
    lines = [
        f"mesh pid {state.get('pid')}  status {state.get('status')}  data {state.get('data_dir')}",
        "",
    ]
    header = ("PART", "PID", "ADDRESS", "STATE", "HEALTH", "ENVOY", "RESTARTS", "LOG")
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
                str((p.get("envoy") or {}).get("state", "-")),
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
    if state.get("envoy_view_error"):
        lines.append(f"ENVOY: {state['envoy_view_error']}")
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
