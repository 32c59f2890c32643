"""`soma-mesh`: up | status | down | admin.

    soma-mesh up [--replicas N] [--port 8080] [--admin-port 9901] [--host 127.0.0.1]
                 [--data-dir ./.soma] [--partitions 4]
    soma-mesh status [--data-dir ./.soma] [--json]
    soma-mesh down [--data-dir ./.soma]
    soma-mesh admin create-key|rotate-signing-key [--data-dir ./.soma] ...   (see admin.py)

Environment: DATABASE_URL / NATS_URL / VAULT_ADDR (+VAULT_TOKEN) use an existing server instead
of starting one; SOMA_MESH_MODULES swaps the Python modules run for the parts (tests);
SOMA_MESH_BOOTSTRAP=0 skips creating the first admin key on a new database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

from services.mesh import admin
from services.mesh.errors import LockHeldError, MeshError, NotRunningError
from services.mesh.supervisor import Mesh, MeshOptions

logger = logging.getLogger("soma-mesh")

EXIT_UNHEALTHY = 1
EXIT_USAGE_OR_START = 2
EXIT_NOT_RUNNING = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soma-mesh", description="Run Soma Mesh on this machine.")
    sub = parser.add_subparsers(dest="command", required=True)

    def data_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--data-dir",
            type=Path,
            default=Path(os.environ.get("SOMA_DATA_DIR", ".soma")),
            help="data directory (default ./.soma)",
        )

    up = sub.add_parser("up", help="start and supervise the whole mesh (Ctrl-C stops it)")
    data_dir(up)
    up.add_argument(
        "--replicas", type=_positive, default=1, help="replicas per service (default 1)"
    )
    up.add_argument(
        "--port", type=_port, default=8080, help="Envoy public listener (0 = free port)"
    )
    up.add_argument("--admin-port", type=_port, default=9901, help="Envoy admin (0 = free port)")
    up.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    up.add_argument(
        "--partitions", type=_positive, default=4, help="session partitions (default 4)"
    )
    up.add_argument(
        "--startup-timeout",
        type=float,
        default=60.0,
        help="seconds each part may take to be healthy",
    )
    up.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    status = sub.add_parser("status", help="show every part and probe its health")
    data_dir(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")

    down = sub.add_parser("down", help="stop the mesh running on a data directory")
    data_dir(down)
    down.add_argument("--timeout", type=float, default=90.0)

    admin.add_parser(sub, data_dir)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be a port number (0 = pick a free one)")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "up":
        return cmd_up(args)
    if args.command == "status":
        return cmd_status(args)
    if args.command == "admin":
        return admin.main(args)
    return cmd_down(args)


def _setup_logging(verbose: bool) -> None:
    # pgserver asks platformdirs for a runtime dir at import time and warns when XDG_RUNTIME_DIR
    # is unset (normal for root shells and containers).
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    logging.basicConfig(
        stream=sys.stdout,
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s soma-mesh %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("pgserver", "asyncio", "urllib3", "hvac"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_up(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose)
    options = MeshOptions(
        data_dir=args.data_dir,
        host=args.host,
        port=args.port,
        admin_port=args.admin_port,
        replicas=args.replicas,
        partitions=args.partitions,
        startup_timeout=args.startup_timeout,
    )
    try:
        return asyncio.run(run_up(options))
    except LockHeldError as exc:
        print(f"soma-mesh: {exc}", file=sys.stderr)
        return EXIT_USAGE_OR_START
    except MeshError as exc:
        print(f"soma-mesh: {exc}", file=sys.stderr)
        return EXIT_USAGE_OR_START
    except KeyboardInterrupt:
        return 130


async def run_up(options: MeshOptions) -> int:
    mesh = Mesh(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(mesh.start())
    waiting = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        logger.info("signal received during start-up: stopping")
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, MeshError):
            await starting
        return 130
    waiting.cancel()
    starting.result()  # raises the start-up error (everything already stopped)
    print_ready(mesh)
    await stop.wait()
    logger.info("stopping (signal received)")
    await mesh.stop()
    return 0


def print_ready(mesh: Mesh) -> None:
    s = mesh.state
    lines = ["", f"Soma Mesh is up (pid {s.pid}, data {s.data_dir})"]
    labels = {
        "grpc": "gRPC (h2c)",
        "rest": "REST/JSON",
        "grpc_web": "gRPC-Web",
        "openapi": "OpenAPI",
        "envoy_admin": "Envoy admin",
        "metrics": "Metrics",
        "prometheus_config": "Prometheus",
        "postgres": "PostgreSQL",
        "nats": "NATS",
        "nats_monitor": "NATS monitor",
        "openbao": "OpenBao",
        "openbao_token_file": "OpenBao init",
    }
    for key, url in s.urls.items():
        note = "  (unseal key + root token: local development only)" if key.endswith("file") else ""
        lines.append(f"  {labels.get(key, key):14} {url}{note}")
    lines.append(f"  {'Parts':14} " + ", ".join(p.name for p in s.parts))
    lines.append(f"  {'Logs':14} {mesh.log_dir}/<part>.log")
    lines.append(f"  {'State':14} {mesh.state_file}   (soma-mesh status --data-dir {s.data_dir})")
    admin_key, mesh.bootstrap_key = mesh.bootstrap_key, None  # printed once, then forgotten
    if admin_key is not None:
        lines.append(f"  {'Admin API key':14} {admin_key.secret}")
        roles = ", ".join(admin_key.roles)
        lines.append(f"  {'':14} tenant {admin_key.tenant}, roles {roles}, scopes *")
        lines.append(f"  {'':14} {admin.STORE_IT_NOW}")
    lines.append("Press Ctrl-C to stop.")
    print("\n".join(lines), flush=True)


def cmd_status(args: argparse.Namespace) -> int:
    from services.mesh.status import collect, format_table

    try:
        state = asyncio.run(collect(args.data_dir.expanduser().resolve()))
    except NotRunningError as exc:
        if args.json:
            print(json.dumps({"running": False, "error": str(exc)}))
        else:
            print(f"soma-mesh: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    state["running"] = True
    if args.json:
        print(json.dumps(state, indent=2))
    else:
        print(format_table(state))
    return 0 if state["healthy"] else EXIT_UNHEALTHY


def cmd_down(args: argparse.Namespace) -> int:
    from services.mesh.status import request_stop

    try:
        pid = request_stop(args.data_dir.expanduser().resolve(), timeout=args.timeout)
    except NotRunningError as exc:
        print(f"soma-mesh: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except TimeoutError as exc:
        print(f"soma-mesh: {exc}", file=sys.stderr)
        return EXIT_UNHEALTHY
    print(f"soma-mesh: stopped (pid {pid})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
