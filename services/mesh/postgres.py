"""Embedded PostgreSQL from the `pgserver` wheel, supervised like every other part.

pgserver's own `get_server()` daemonizes postgres with `pg_ctl` and ref-counts users in
`.handle_pids.json`; we reuse its binaries, its `initdb` call and its permission set-up, but run
`postgres` in the foreground as our child so that it can be health-checked, restarted and logged
like the rest. We still take part in the ref count (our pid in `.handle_pids.json`, stale pids of
kill -9'd holders pruned) so that a tool attaching with `pgserver.get_server()` on the same
directory does not stop our server when it exits.

As root, pgserver runs postgres as the system user `pgserver`, chowns the data directory to it and
makes every parent directory group/other readable: keep the data directory out of /root itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import signal
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from services.mesh.health import postgres_connect
from services.mesh.process import ProcessSpec

logger = logging.getLogger(__name__)

SYSTEM_USER = "pgserver"
_SOCKET_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin


@dataclass(frozen=True)
class PostgresPlan:
    spec: ProcessSpec
    database_url: str
    pgdata: Path


def _quiet_import_pgserver() -> None:
    # pgserver asks platformdirs for a runtime dir at import time, which warns when
    # XDG_RUNTIME_DIR is unset (normal for root shells and containers).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver  # noqa: F401


def _bin_dir() -> Path:
    _quiet_import_pgserver()
    from pgserver._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _system_user() -> str | None:
    return SYSTEM_USER if platform.system() != "Windows" and os.geteuid() == 0 else None


def _socket_dir(pgdata: Path) -> Path:
    if len(str(pgdata / ".s.PGSQL.5432")) <= _SOCKET_MAX:
        return pgdata
    digest = hashlib.sha256(str(pgdata).encode()).hexdigest()[:12]
    path = Path(tempfile.gettempdir()) / f"soma-pg-{digest}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def prepare_pgdata(pgdata: Path) -> Path:
    """initdb on first use, fix ownership/permissions, clear what a crash left. Returns socket dir.

    Blocking (initdb takes ~0.6 s): call it in a thread.
    """
    _quiet_import_pgserver()
    from pgserver._commands import initdb  # type: ignore[attr-defined]  # made at import

    pgdata.mkdir(parents=True, exist_ok=True)
    user = _system_user()
    if user is not None:
        import pwd
        import stat

        from pgserver.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        ensure_user_exists(user)
        ensure_prefix_permissions(pgdata)
        bin_dir = _bin_dir()
        ensure_prefix_permissions(bin_dir)
        read = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(bin_dir, stat.S_IXGRP | stat.S_IXOTH | read)
        ensure_folder_permissions(bin_dir.parent / "lib", read)
        entry = pwd.getpwnam(user)
        os.chown(pgdata, entry.pw_uid, entry.pw_gid)
    if not (pgdata / "PG_VERSION").exists():
        logger.info("postgres: initdb %s", pgdata)
        initdb(
            ["--auth=trust", "--auth-local=trust", "--encoding=utf8", "-U", "postgres"],
            pgdata=pgdata,
            user=user,
        )
    stop_stale_postmaster(pgdata)
    sock = _socket_dir(pgdata)
    if user is not None and sock != pgdata:
        import pwd

        entry = pwd.getpwnam(user)
        os.chown(sock, entry.pw_uid, entry.pw_gid)
    return sock


def stop_stale_postmaster(pgdata: Path) -> None:
    """A postmaster left running on this directory (e.g. by a kill -9'd supervisor or by
    pgserver.get_server) would make ours fail with "lock file already exists": stop it."""
    pid_file = pgdata / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        import psutil

        proc = psutil.Process(pid)
        is_postgres = proc.name() == "postgres" and str(pgdata) in " ".join(proc.cmdline())
    except Exception:
        is_postgres = False
    if not is_postgres:
        # Stale file; postgres would trip over it only if the pid now belongs to someone else.
        with contextlib.suppress(OSError):
            pid_file.unlink()
        return
    logger.warning("postgres: stopping a postmaster (pid %d) left running on %s", pid, pgdata)
    try:
        subprocess.run(
            [str(_bin_dir() / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "-t", "20", "stop"],
            check=True,
            capture_output=True,
            user=_system_user(),
            timeout=30,
        )
    except (subprocess.SubprocessError, OSError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _handles(pgdata: Path) -> Path:
    return pgdata / ".handle_pids.json"


def register_handle(pgdata: Path, pid: int) -> None:
    """Add our pid to pgserver's ref count, dropping pids that are no longer alive."""
    import psutil

    path = _handles(pgdata)
    try:
        pids = [int(p) for p in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        pids = []
    alive = [p for p in pids if psutil.pid_exists(p) and p != pid]
    if len(alive) != len(pids):
        logger.info("postgres: dropped stale holder pids %s", sorted(set(pids) - set(alive)))
    path.write_text(json.dumps([*alive, pid]))


def unregister_handle(pgdata: Path, pid: int) -> None:
    path = _handles(pgdata)
    try:
        pids = [int(p) for p in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        return
    path.write_text(json.dumps([p for p in pids if p != pid]))


def fix_permissions(pgdata: Path) -> None:
    """Let the `pgserver` user reach its data directory again before every (re)start: something
    may have tightened a parent meanwhile (pytest resets /tmp/pytest-of-<user> to 0700)."""
    if _system_user() is None:
        return
    from pgserver.utils import ensure_prefix_permissions

    ensure_prefix_permissions(pgdata)


def plan(pgdata: Path, socket_dir: Path, log_path: Path) -> PostgresPlan:
    url = f"postgresql://postgres:@/postgres?host={socket_dir}"
    argv = (
        str(_bin_dir() / "postgres"),
        "-D",
        str(pgdata),
        "-h",
        "",  # no TCP listener: the unix socket (trust auth) only, as pgserver does
        "-k",
        str(socket_dir),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    spec = ProcessSpec(
        name="postgres",
        kind="postgres",
        argv=argv,
        env=env,
        log_path=log_path,
        probe=lambda: postgres_connect(url),
        address=str(socket_dir),
        cwd=pgdata,
        user=_system_user(),
        stop_signal=signal.SIGINT,  # "fast" shutdown; SIGTERM would wait for clients to leave
        stop_timeout=20.0,
        startup_timeout=60.0,
        before_spawn=lambda: fix_permissions(pgdata),
    )
    return PostgresPlan(spec=spec, database_url=url, pgdata=pgdata)
