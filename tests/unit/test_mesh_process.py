"""ManagedProcess against real (tiny) child processes: health wait, restart, stop, failure."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from services.mesh.backoff import BackoffPolicy
from services.mesh.errors import PartFailedError
from services.mesh.health import ProbeResult, tcp_connect
from services.mesh.ports import PortAllocator
from services.mesh.process import ManagedProcess, ProcessSpec

# A child that listens on a port and starts a grandchild in its own process group.
SERVER = """
import os, socket, subprocess, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
open(sys.argv[2], "w").write(str(child.pid))
print("listening", flush=True)
time.sleep(300)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); look at its state
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _spec(tmp_path: Path, port: int, **kw: object) -> ProcessSpec:
    return ProcessSpec(
        name="fake",
        kind="service",
        argv=(sys.executable, "-c", SERVER, str(port), str(tmp_path / "grandchild.pid")),
        env=dict(os.environ),
        log_path=tmp_path / "logs" / "fake.log",
        probe=lambda: tcp_connect("127.0.0.1", port),
        port=port,
        stop_timeout=1.0,  # SIGTERM kills the python child; the group kill gets the grandchild
        startup_timeout=10.0,
        backoff=BackoffPolicy(initial=0.1, maximum=0.2),
        **kw,  # type: ignore[arg-type]
    )


async def _wait(cond: Callable[[], bool], wait_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while not cond():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_start_restart_and_stop_leave_no_process(tmp_path: Path) -> None:
    port = PortAllocator().take()
    changes: list[str] = []
    proc = ManagedProcess(_spec(tmp_path, port), on_change=lambda: changes.append("x"))
    await proc.start()
    try:
        assert proc.state.status == "healthy"
        first = proc.pid
        assert first is not None
        pid_file = tmp_path / "grandchild.pid"
        await _wait(lambda: pid_file.exists() and pid_file.read_text() != "")
        first_grandchild = pid_file.read_text()
        os.kill(first, signal.SIGKILL)
        await _wait(lambda: proc.state.restarts == 1 and proc.state.status == "healthy")
        assert proc.pid not in (None, first)
        assert proc.state.last_exit_code == -signal.SIGKILL
        # The probe can pass before the new child wrote its grandchild's pid: wait for it.
        await _wait(lambda: pid_file.read_text() not in ("", first_grandchild))
        grandchild = int(pid_file.read_text())
        assert _alive(grandchild)
    finally:
        await proc.stop()
    assert proc.state.status == "stopped"
    await _wait(lambda: not _alive(grandchild), 5)  # the process group was killed too
    assert "listening" in (tmp_path / "logs" / "fake.log").read_text()
    assert changes


async def test_failure_to_start_reports_the_log_tail(tmp_path: Path) -> None:
    spec = ProcessSpec(
        name="broken",
        kind="service",
        argv=(
            sys.executable,
            "-c",
            "import sys; print('boom: bad config', flush=True); sys.exit(3)",
        ),
        env=dict(os.environ),
        log_path=tmp_path / "broken.log",
        probe=lambda: tcp_connect("127.0.0.1", 1),
        startup_timeout=10.0,
    )
    with pytest.raises(PartFailedError) as info:
        await ManagedProcess(spec).start()
    assert info.value.part == "broken"
    assert "code 3" in str(info.value)
    assert "boom: bad config" in str(info.value)


async def test_unhealthy_in_time_is_killed(tmp_path: Path) -> None:
    async def never() -> ProbeResult:
        return ProbeResult(False, "still warming up")

    spec = ProcessSpec(
        name="slow",
        kind="service",
        argv=(sys.executable, "-c", "import time; time.sleep(60)"),
        env=dict(os.environ),
        log_path=tmp_path / "slow.log",
        probe=never,
        startup_timeout=0.5,
    )
    proc = ManagedProcess(spec)
    with pytest.raises(PartFailedError) as info:
        await proc.start()
    assert "still warming up" in str(info.value)
    assert proc.pid is None
