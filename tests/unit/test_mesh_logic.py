"""Unit tests for soma-mesh's pure logic: backoff, lock, state file, module overrides, URLs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.mesh import pyparts
from services.mesh.backoff import Backoff, BackoffPolicy
from services.mesh.errors import LockHeldError, NotRunningError
from services.mesh.lock import MeshLock, is_locked
from services.mesh.ports import PortAllocator, port_is_free
from services.mesh.postgres import register_handle, unregister_handle
from services.mesh.state import MeshState, PartState, read_state, write_state
from services.mesh.status import load_running
from services.mesh.supervisor import redact_url


def test_backoff_doubles_to_the_cap() -> None:
    b = Backoff(BackoffPolicy(initial=0.5, factor=2, maximum=30, reset_after=30))
    delays = [b.next_delay(uptime=1) for _ in range(9)]
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_backoff_resets_after_a_healthy_while() -> None:
    b = Backoff(BackoffPolicy(initial=0.5, reset_after=10))
    assert [b.next_delay(1), b.next_delay(1), b.next_delay(1)] == [0.5, 1, 2]
    assert b.next_delay(uptime=11) == 0.5  # it had been up long enough: start over
    assert b.next_delay(uptime=1) == 1


def test_lock_is_exclusive_and_names_the_owner(tmp_path: Path) -> None:
    path = tmp_path / "run" / "mesh.lock"
    with MeshLock(path) as lock:
        assert lock.held
        assert is_locked(path)
        assert path.read_text().strip() == str(os.getpid())
        with pytest.raises(LockHeldError) as info:
            MeshLock(path).acquire()  # flock is per open file: conflicts even in-process
        assert info.value.owner_pid == os.getpid()
        assert str(os.getpid()) in str(info.value)
        assert str(tmp_path) in str(info.value)
    assert not is_locked(path)
    MeshLock(path).acquire()  # free again


def test_lock_held_by_another_process(tmp_path: Path) -> None:
    path = tmp_path / "mesh.lock"
    code = (
        "import sys, time; from pathlib import Path; from services.mesh.lock import MeshLock;"
        f"MeshLock(Path({str(path)!r})).acquire(); print('locked', flush=True); time.sleep(30)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(LockHeldError) as info:
            MeshLock(path).acquire()
        assert info.value.owner_pid == child.pid
    finally:
        child.kill()
        child.wait()
    MeshLock(path).acquire()  # the kernel released it with the process


def test_state_round_trip_is_atomic_json(tmp_path: Path) -> None:
    path = tmp_path / "run" / "state.json"
    state = MeshState(data_dir=str(tmp_path), status="ready", listener="127.0.0.1:1")
    state.parts.append(PartState(name="gateway-0", kind="service", address="127.0.0.1:2", pid=7))
    write_state(path, state)
    data = read_state(path)
    assert data is not None
    assert data["status"] == "ready"
    assert data["parts"][0] == {**data["parts"][0], "name": "gateway-0", "pid": 7, "restarts": 0}
    assert not list(path.parent.glob(".*.tmp"))
    path.write_text("{not json")
    assert read_state(path) is None


def test_status_refuses_a_stale_state_file(tmp_path: Path) -> None:
    with pytest.raises(NotRunningError):
        load_running(tmp_path)
    state = MeshState(data_dir=str(tmp_path), status="ready", pid=os.getpid())
    write_state(tmp_path / "run" / "state.json", state)
    with pytest.raises(NotRunningError):  # pid alive but nobody holds the lock
        load_running(tmp_path)
    with MeshLock(tmp_path / "run" / "mesh.lock"):
        assert load_running(tmp_path)["status"] == "ready"


def test_module_overrides() -> None:
    assert pyparts.resolve_modules({})["worker"] == "services.gateway.worker"
    over = pyparts.parse_modules("*=tests.fake, keys=, worker=other.worker")
    modules = pyparts.resolve_modules(over)
    assert "keys" not in modules
    assert modules["gateway"] == "tests.fake"
    assert modules["worker"] == "other.worker"
    with pytest.raises(ValueError):
        pyparts.parse_modules("nonsense=x")
    with pytest.raises(ValueError):
        pyparts.parse_modules("gateway")


def test_redact_url() -> None:
    assert redact_url("postgresql://u:secret@db:5432/x") == "postgresql://u:***@db:5432/x"
    sock = "postgresql://postgres:@/postgres?host=/tmp/x"
    assert redact_url(sock) == sock


def test_port_allocator_never_repeats() -> None:
    ports = PortAllocator()
    taken = [ports.take() for _ in range(20)]
    assert len(set(taken)) == 20
    assert all(port_is_free("127.0.0.1", p) for p in taken)


def test_pgserver_handle_list_drops_stale_pids(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    handles = tmp_path / ".handle_pids.json"
    handles.write_text(json.dumps([dead.pid, os.getppid()]))
    register_handle(tmp_path, os.getpid())
    assert json.loads(handles.read_text()) == [os.getppid(), os.getpid()]
    unregister_handle(tmp_path, os.getpid())
    assert json.loads(handles.read_text()) == [os.getppid()]


def test_reap_previous_stops_only_recorded_leftovers(tmp_path: Path) -> None:
    import psutil

    from services.mesh.supervisor import reap_previous

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    leftover = subprocess.Popen(sleeper, start_new_session=True)
    stranger = subprocess.Popen(sleeper, start_new_session=True)
    try:
        state = MeshState(data_dir=str(tmp_path), status="ready", pid=999999)
        state.parts = [
            PartState(
                name="nats",
                kind="nats",
                address="x",
                pid=leftover.pid,
                pgid=leftover.pid,
                create_time=psutil.Process(leftover.pid).create_time(),
            ),
            # same pid number but another start time: a reused pid, to be left alone
            PartState(
                name="envoy",
                kind="envoy",
                address="x",
                pid=stranger.pid,
                pgid=stranger.pid,
                create_time=psutil.Process(stranger.pid).create_time() - 100,
            ),
        ]
        write_state(tmp_path / "run" / "state.json", state)
        reap_previous(tmp_path)
        leftover.wait(10)  # gone (psutil may have reaped it already: no exit code to check)
        assert stranger.poll() is None
    finally:
        for proc in (leftover, stranger):
            proc.kill()
            proc.wait()
