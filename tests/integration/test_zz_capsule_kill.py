"""A capsule replica killed (SIGKILL) in the middle of extracting a large install leaves no
partial directory behind: nothing under `installed/`, its temporary area swept when the
supervisor restarts it, the installation marked FAILED, and the capsule installs cleanly
afterwards.

Runs late (test_zz_*): it kills a capsule replica of the shared mesh. It finds the replica doing
the extraction from the disk (`<capsules dir>/tmp/<replica>/<installation id>`), so it does not
matter which replica Envoy picked.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import grpc
import pytest

from soma.capsule.v1 import capsule_pb2 as c
from soma.capsule.v1 import resources_pb2 as pb
from tests.integration.capsules import (
    Running,
    Tenant,
    capsule_dir,
    install,
    tenant_fixture,
    tenant_root,
    unique,
)
from tests.integration.harness import MeshRunner

pytestmark = pytest.mark.integration

# Incompressible data in many files: extracting it takes seconds on this machine, so there is
# a wide window to kill the replica in.
FILES = 8000
BYTES = 80 << 20


wayne = tenant_fixture("kill-wayne")


def extracting(mesh: MeshRunner, installation_id: str) -> tuple[str, str, int] | None:
    """(replica, temporary dir, files written so far) of the extraction under way: the dir
    named after the installation (the layout the service documents), else the only busy dir
    in a replica's temporary area (nothing else runs meanwhile)."""
    tmp = capsule_dir(mesh) / "tmp"
    if not tmp.exists():
        return None
    busy: list[tuple[str, str, int]] = []
    for replica_dir in tmp.iterdir():
        for work in replica_dir.iterdir() if replica_dir.is_dir() else ():
            if work.is_dir():
                files = sum(len(f) for _, _, f in os.walk(work))
                if work.name == installation_id:
                    return replica_dir.name, work.name, files
                busy.append((replica_dir.name, work.name, files))
    return busy[0] if len(busy) == 1 else None


def entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


@pytest.mark.timeout(300)
async def test_killed_install_leaves_no_partial_directory(mesh: MeshRunner, wayne: Tenant) -> None:
    name = unique("huge")
    built, version = await wayne.publish(name, "1.0.0", random_files=FILES, random_bytes=BYTES)
    assert version.entry_count > FILES
    target = tenant_root(mesh, wayne.id) / "installed" / name

    running = Running(wayne.cap, name, "1.0.0", seconds=240)
    first = await running.next()
    assert first is not None, running.run.describe()
    installation = first.installation
    installation_id = installation.split("/", 1)[1]

    # Keep reading the stream in the background while watching the disk.
    reader = asyncio.ensure_future(running.finish())
    victim: tuple[str, str, int] | None = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not reader.done():
        found = extracting(mesh, installation_id)
        if found is not None and found[2] >= 50:  # well into the extraction
            victim = found
            break
        await asyncio.sleep(0.01)
    assert victim is not None, f"never saw the extraction: {running.run.describe()}"
    replica, work_dir, files_written = victim
    part = mesh.part(replica)
    os.kill(part["pid"], signal.SIGKILL)
    # Caught mid-extraction: not everything was written, and nothing is in place.
    assert files_written < FILES
    assert not (target / "1.0.0").exists()

    run = await asyncio.wait_for(reader, 60)
    assert run.code != grpc.StatusCode.OK, run.describe()  # the stream broke with its replica
    assert pb.INSTALL_PHASE_DONE not in run.phases

    await mesh.wait_restarted(replica, part["restarts"], within=90)
    # The restarted replica swept its temporary area, and the installation says what happened.
    leftover = capsule_dir(mesh) / "tmp" / replica
    assert work_dir not in entries(leftover) and entries(leftover) == [], entries(leftover)
    assert not (target / "1.0.0").exists() and entries(target) == []
    got = await wait_failed(wayne, installation)
    assert got.state == pb.INSTALLATION_STATE_FAILED, got
    assert got.error.message and got.HasField("complete_time")

    # The capsule installs cleanly afterwards (on whichever replica), complete.
    again = await install(wayne.cap, name, "1.0.0", seconds=240)
    assert again.code == grpc.StatusCode.OK, again.describe()
    assert again.result.name != installation and again.result.file_count >= FILES
    assert count_files(target / "1.0.0") >= FILES + 2  # + capsule.yaml and the entrypoint
    assert entries(target) == ["1.0.0"] and entries(leftover) == []
    assert built.size == version.size_bytes


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


async def wait_failed(t: Tenant, installation: str, within: float = 60) -> pb.Installation:
    deadline = time.monotonic() + within
    while True:
        try:
            got = await t.cap.GetInstallation(c.GetInstallationRequest(name=installation))
        except grpc.aio.AioRpcError as error:
            # Envoy may not have seen the restarted replica healthy yet.
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
        else:
            if got.state == pb.INSTALLATION_STATE_FAILED or time.monotonic() > deadline:
                return got
        await asyncio.sleep(0.5)
