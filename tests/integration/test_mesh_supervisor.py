"""`soma-mesh up` for real: Postgres, NATS, OpenBao and Envoy from their wheels, and a stand-in
gRPC server (mesh_fake_service) for every Python part via SOMA_MESH_MODULES.

One mesh runs for the module; the tests run in file order (status, lock, restart, stop, restart
with persisted data, kill -9 of the supervisor). Only processes started here are signalled.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
FAKE = "tests.integration.mesh_fake_service"
READY_TIMEOUT = 90.0
# found without importing pgserver (its import warns about XDG_RUNTIME_DIR)
_PGSERVER = importlib.util.find_spec("pgserver")
assert _PGSERVER is not None and _PGSERVER.origin is not None
PSQL = Path(_PGSERVER.origin).parent / "pginstall" / "bin" / "psql"


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "NATS_URL", "VAULT_ADDR", "VAULT_TOKEN", "SOMA_DATA_DIR")
    }
    env.update(
        {
            "SOMA_MESH_MODULES": f"*={FAKE}",
            "SOMA_GRACE_SECONDS": "1",
            "SOMA_MESH_ENVOY_CONFIG": "minimal",  # the real routes are tested by the lead's suite
            "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        }
    )
    return env


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.mesh", *args],
        env=_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class RunningMesh:
    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.data_dir = data_dir
        self.log = (data_dir.parent / f"{data_dir.name}-up.log").open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.mesh",
                "up",
                "--data-dir",
                str(data_dir),
                "--port",
                "0",
                "--admin-port",
                "0",
                "--replicas",
                "2",
                *extra,
            ],
            env=_env(),
            cwd=REPO,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    @property
    def state_file(self) -> Path:
        return self.data_dir / "run" / "state.json"

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text())

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"soma-mesh up exited {self.proc.returncode}: {self.output()}")
            try:
                state = self.state()
                if state.get("status") == "ready" and state.get("pid") == self.proc.pid:
                    return state
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        raise AssertionError(f"mesh not ready in {timeout}s: {self.output()}")

    def output(self) -> str:
        return (self.data_dir.parent / f"{self.data_dir.name}-up.log").read_text()[-4000:]

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _processes_using(data_dir: Path) -> list[int]:
    """Pids whose command line mentions data_dir (postgres backends included)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(data_dir) in cmd and "pytest" not in cmd and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _vault(state: dict[str, Any], data_dir: Path) -> Any:
    import hvac

    token = json.loads((data_dir / "openbao" / "init.json").read_text())["root_token"]
    return hvac.Client(url=state["vault_addr"], token=token, timeout=10)


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    # Under /tmp, never /root: pgserver makes every parent of its data dir world-readable.
    # Not under pytest's basetemp either: other pytest sessions reset it to 0700.
    base = Path(tempfile.mkdtemp(prefix="soma-mesh-test-"))
    try:
        yield base / "data"
    finally:
        if not _processes_using(base):
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def own_mesh(data_dir: Path) -> Iterator[RunningMesh]:
    running = RunningMesh(data_dir)
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def test_status_reports_every_part_healthy(own_mesh: RunningMesh) -> None:
    state = own_mesh.state()
    names = {p["name"] for p in state["parts"]}
    assert {"postgres", "nats", "openbao", "envoy", "worker"} <= names
    assert {"gateway-0", "gateway-1", "keys-1", "audit-0", "capsule-1"} <= names
    assert state["database_url"].startswith("postgresql://")
    assert state["nats_url"].startswith("nats://")
    assert state["listener"] and state["admin"]
    assert "VAULT_TOKEN" not in json.dumps(state)
    for part in state["parts"]:
        assert part["status"] == "healthy" and part["pid"] and Path(part["log"]).exists()

    result = _cli("status", "--data-dir", str(own_mesh.data_dir), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    live = json.loads(result.stdout)
    assert live["healthy"] is True
    assert all(p["health"]["healthy"] for p in live["parts"]), live["parts"]

    table = _cli("status", "--data-dir", str(own_mesh.data_dir))
    assert table.returncode == 0 and "gateway-1" in table.stdout and "SERVING" in table.stdout

    # the stand-in services got the mesh's addresses
    gw_log = Path(next(p["log"] for p in state["parts"] if p["name"] == "gateway-0")).read_text()
    assert state["nats_url"] in gw_log and state["vault_addr"] in gw_log
    assert "partitions=4" in gw_log


def test_second_up_on_the_same_data_dir_fails_at_once(own_mesh: RunningMesh) -> None:
    t0 = time.monotonic()
    result = _cli("up", "--data-dir", str(own_mesh.data_dir), "--port", "0", "--admin-port", "0")
    assert result.returncode == 2
    assert time.monotonic() - t0 < 15
    assert "already in use" in result.stderr
    assert f"pid {own_mesh.proc.pid}" in result.stderr
    assert own_mesh.state()["status"] == "ready"  # the running mesh's state was not touched


def test_killed_part_is_restarted(own_mesh: RunningMesh) -> None:
    victims = ("keys-1", "worker", "envoy", "nats", "openbao", "postgres")
    before = {p["name"]: p for p in own_mesh.state()["parts"]}
    for name in victims:
        os.kill(before[name]["pid"], signal.SIGKILL)

    def restarted() -> bool:
        parts = {p["name"]: p for p in own_mesh.state()["parts"]}
        return (
            all(parts[n]["restarts"] == 1 and parts[n]["status"] == "healthy" for n in victims)
            and own_mesh.state()["status"] == "ready"
        )

    _wait_for(restarted, 60, f"{victims} to be restarted")
    after = {p["name"]: p for p in own_mesh.state()["parts"]}
    for name in victims:
        assert after[name]["pid"] != before[name]["pid"]
        assert after[name]["last_exit_code"] == -signal.SIGKILL
    assert "restarting in" in own_mesh.output()
    assert _cli("status", "--data-dir", str(own_mesh.data_dir)).returncode == 0
    assert not _vault(own_mesh.state(), own_mesh.data_dir).sys.is_sealed()  # unsealed again


def test_openbao_is_usable_and_postgres_takes_writes(own_mesh: RunningMesh) -> None:
    state = own_mesh.state()
    client = _vault(state, own_mesh.data_dir)
    assert not client.sys.is_sealed()
    mounts = client.sys.list_mounted_secrets_engines()["data"]
    assert "transit/" in mounts and "secret/" in mounts
    assert oct((own_mesh.data_dir / "openbao" / "init.json").stat().st_mode & 0o777) == "0o600"
    client.secrets.transit.create_key(name="mesh-test", key_type="ed25519")
    client.secrets.kv.v2.create_or_update_secret(path="mesh-test", secret={"k": "v"})

    psql = PSQL
    out = subprocess.run(
        [
            str(psql),
            state["database_url"],
            "-c",
            "CREATE TABLE mesh_test (x int); INSERT INTO mesh_test VALUES (42);",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr


def test_sigterm_stops_every_part(own_mesh: RunningMesh) -> None:
    pids = [p["pid"] for p in own_mesh.state()["parts"] if p["pid"]]
    assert own_mesh.stop() == 0
    _wait_for(lambda: not any(_alive(p) for p in pids), 10, "every part to exit")
    assert _processes_using(own_mesh.data_dir) == []
    assert own_mesh.state()["status"] == "stopped"
    result = _cli("status", "--data-dir", str(own_mesh.data_dir))
    assert result.returncode == 3 and "no mesh is running" in result.stderr
    assert "stopping gateway-0" in own_mesh.output()


def test_restart_keeps_data_and_unseals(own_mesh: RunningMesh, data_dir: Path) -> None:
    again = RunningMesh(data_dir)
    try:
        state = again.wait_ready()
        client = _vault(state, data_dir)
        assert not client.sys.is_sealed()
        key = client.secrets.transit.read_key(name="mesh-test")
        assert key["data"]["type"] == "ed25519"
        secret = client.secrets.kv.v2.read_secret_version(
            path="mesh-test", raise_on_deleted_version=True
        )
        assert secret["data"]["data"] == {"k": "v"}
        psql = PSQL
        out = subprocess.run(
            [str(psql), state["database_url"], "-tAc", "SELECT x FROM mesh_test"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.stdout.strip() == "42", out.stderr

        # kill -9 of the supervisor: the children follow it (PR_SET_PDEATHSIG)
        pids = [p["pid"] for p in state["parts"] if p["pid"]]
        again.proc.send_signal(signal.SIGKILL)
        again.proc.wait(10)
        _wait_for(lambda: not any(_alive(p) for p in pids), 30, "orphans to exit")
        _wait_for(lambda: _processes_using(data_dir) == [], 30, "postgres backends to exit")
    finally:
        again.stop()


async def test_python_api_starts_and_stops_a_mesh() -> None:
    from services.mesh import Mesh, MeshOptions

    base = Path(tempfile.mkdtemp(prefix="soma-mesh-api-"))
    options = MeshOptions(
        data_dir=base / "data",
        port=0,
        admin_port=0,
        grace_seconds=1,
        modules={"*": FAKE, "keys": "", "audit": "", "capsule": ""},
        environ=_env(),
        minimal_envoy_config=True,
    )
    try:
        async with Mesh(options) as mesh:
            assert mesh.state.status == "ready"
            names = [p.name for p in mesh.parts]
            assert names[-3:] == ["gateway-0", "worker", "envoy"]
            assert mesh.state.urls["openapi"].endswith("/openapi.json")
            pids = [p.pid for p in mesh.parts if p.pid]
        assert mesh.state.status == "stopped"
        assert not any(_alive(p) for p in pids)
        assert _processes_using(base) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)
