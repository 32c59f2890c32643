"""Audit ingest, end to end: JetStream `AUDIT` -> Audit service -> PostgreSQL, chained.

    python bench/audit_ingest.py [-n 100000] [--tenants 8] [--batch 1000] [--json]

Starts real PostgreSQL, NATS and OpenBao (the mesh supervisor's Python API, under a temporary
directory in /tmp, no other Python parts) and one `python -m services.audit` process, waits
until its writer consumer exists, then publishes N events with `publish_async` (Nats-Msg-Id =
event id, spread over `--tenants` chains) and times until every event is stored and chained
(the chain heads add up to N). Reports publish and end-to-end events/s, and checks that no
event was stored twice.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen" / "python")]

import asyncpg  # noqa: E402
import nats  # noqa: E402

from services.audit.ingest import CONSUMER  # noqa: E402
from services.common.audit.event import STREAM, CallInfo, build_event, subject_for  # noqa: E402
from services.common.auth.principal import Principal  # noqa: E402


def sample_events(n: int, tenants: int) -> list[tuple[str, bytes, str]]:
    """(subject, payload, msg id) for n realistic events."""
    out = []
    now = datetime.now(UTC)
    for i in range(n):
        tenant = f"bench{i % tenants}"
        principal = Principal(
            subject="key:k" + str(i % 50),
            tenant=tenant,
            roles=frozenset({"member"}),
            scopes=frozenset({"*"}),
            credential="api_key",
            key_id="k" + str(i % 50),
        )
        event = build_event(
            method="/soma.gateway.v1.GatewayService/SendMessage",
            principal=principal,
            allow=True,
            reason="role member may call SendMessage",
            status_code=0,
            call=CallInfo("127.0.0.1:50000", "grpc-python/1.70", str(uuid.uuid4()), ""),
            resource=f"sessions/{uuid.uuid4()}",
            detail={"parent": "sessions/x", "message.content": "hello"},
            event_time=now,
        )
        out.append((subject_for(event), event.SerializeToString(), event.name.split("/")[1]))
    return out


async def wait_consumer(js: object, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            await js.consumer_info(STREAM, CONSUMER)  # type: ignore[attr-defined]
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def infra_pids(base: Path) -> dict[str, list[int]]:
    """PostgreSQL and NATS processes of this run: those whose command line names its directory,
    and their children (PostgreSQL's backends)."""
    found: dict[str, list[int]] = {"postgres": [], "nats": []}
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            status = (entry / "status").read_text()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(status.split("PPid:")[1].split()[0])
        if str(base) in cmdline:
            if "nats-server" in cmdline:
                names[pid] = "nats"
            elif "postgres" in cmdline:
                names[pid] = "postgres"
    for pid, parent in parents.items():
        name = names.get(pid) or names.get(parent)
        if name:
            found[name].append(pid)
    return found


def total_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


async def stored(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT coalesce(sum(sequence), 0) FROM audit_chain_heads"))


def launch(env: dict[str, str], log: Path, profile: Path | None) -> subprocess.Popen[bytes]:
    """`python -m services.audit` (under cProfile when `profile` names a file)."""
    prefix = ["-m", "cProfile", "-o", str(profile)] if profile else []
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, *prefix, "-m", "services.audit"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=out,
        )


async def run(args: argparse.Namespace) -> dict[str, object]:
    from services.mesh import Mesh, MeshOptions

    base = Path(tempfile.mkdtemp(prefix="soma-audit-bench-", dir="/tmp"))
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "NATS_URL", "VAULT_ADDR", "VAULT_TOKEN"}
    }
    environ["SOMA_MESH_BOOTSTRAP"] = "0"
    mesh = Mesh(
        MeshOptions(
            data_dir=base / "data",
            port=0,
            admin_port=0,
            modules={"*": ""},
            with_envoy=False,
            environ=environ,
        )
    )
    await mesh.start()
    service: subprocess.Popen[bytes] | None = None
    try:
        env = {
            **environ,
            "DATABASE_URL": mesh.state.database_url,
            "NATS_URL": mesh.state.nats_url,
            "VAULT_ADDR": mesh.state.vault_addr,
            "VAULT_TOKEN": mesh.vault_token,
            "SOMA_PORT": "0",
            "SOMA_AUDIT_BATCH": str(args.batch),
            "PYTHONPATH": f"{ROOT}:{ROOT / 'gen' / 'python'}",
        }
        service = launch(env, base / "audit.log", args.profile)
        nc = await nats.connect(mesh.state.nats_url)
        js = nc.jetstream(publish_async_max_pending=args.window)
        pool = await asyncpg.create_pool(mesh.state.database_url, min_size=1, max_size=2)
        await wait_consumer(js, 60)
        events = sample_events(args.n, args.tenants)
        cpu_before = cpu_seconds(service.pid)
        infra = infra_pids(base)
        infra_before = {name: total_cpu(pids) for name, pids in infra.items()}
        own_before = time.process_time()
        started = time.perf_counter()
        for subject, payload, msg_id in events:
            await js.publish_async(subject, payload, headers={"Nats-Msg-Id": msg_id})
        await js.publish_async_completed()
        published = time.perf_counter() - started
        while (count := await stored(pool)) < args.n:
            if time.perf_counter() - started > args.timeout:
                raise TimeoutError(f"only {count} of {args.n} events stored")
            await asyncio.sleep(0.05)
        total = time.perf_counter() - started
        service_cpu = cpu_seconds(service.pid) - cpu_before
        own_cpu = time.process_time() - own_before
        infra_cpu = {name: total_cpu(pids) - infra_before[name] for name, pids in infra.items()}
        rows = await pool.fetchval("SELECT count(*) FROM audit_events")
        distinct = await pool.fetchval("SELECT count(DISTINCT id) FROM audit_events")
        await pool.close()
        await nc.close()
        return {
            "events": args.n,
            "tenants": args.tenants,
            "batch": args.batch,
            "publish_seconds": round(published, 3),
            "publish_events_per_second": round(args.n / published),
            "end_to_end_seconds": round(total, 3),
            "end_to_end_events_per_second": round(args.n / total),
            "service_cpu_seconds": round(service_cpu, 2),
            "service_cpu_us_per_event": round(service_cpu / args.n * 1e6, 1),
            "publisher_cpu_seconds": round(own_cpu, 2),
            "postgres_cpu_seconds": round(infra_cpu["postgres"], 2),
            "nats_cpu_seconds": round(infra_cpu["nats"], 2),
            "rows": rows,
            "duplicates": rows - distinct,
        }
    finally:
        if service is not None:
            service.terminate()
            try:
                service.wait(15)
            except subprocess.TimeoutExpired:
                service.kill()
        await mesh.stop()
        if not os.environ.get("SOMA_KEEP_TEST_DATA"):
            shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=100_000, help="events to publish")
    parser.add_argument("--tenants", type=int, default=8, help="chains to spread them over")
    parser.add_argument("--batch", type=int, default=1000, help="SOMA_AUDIT_BATCH")
    parser.add_argument("--window", type=int, default=4000, help="async publishes in flight")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--profile", type=Path, help="cProfile the Audit service into FILE")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>30}: {value}")
    ok = result["rows"] == args.n and result["duplicates"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
