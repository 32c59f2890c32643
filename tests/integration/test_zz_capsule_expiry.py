"""An approval nobody decides expires: the waiting install stream ends FAILED with
FAILED_PRECONDITION, the installation is REJECTED, the approval EXPIRED and can no longer be
decided, and the expiry is audited.

A mesh of its own (one replica per service) with SOMA_CAPSULE_APPROVAL_TTL=4s, since the shared
mesh waits a day; runs late (test_zz_*) so that it does not sit beside the shared one for long.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from soma.capsule.v1 import capsule_pb2 as c
from soma.capsule.v1 import resources_pb2 as pb
from tests.integration.capsules import (
    Running,
    Tenant,
    audit_events,
    channel_for,
    fails,
    key_subject,
    make_key,
    open_tenant,
    stub,
    unique,
)
from tests.integration.harness import MeshRunner

pytestmark = pytest.mark.integration

TTL = 4.0


@pytest.fixture(scope="module")
def short_mesh() -> Iterator[MeshRunner]:
    base = Path(tempfile.mkdtemp(prefix="soma-it-expiry-", dir="/tmp"))
    runner = MeshRunner(base / "data", replicas=1, env={"SOMA_CAPSULE_APPROVAL_TTL": f"{TTL:g}s"})
    try:
        runner.start()
        yield runner
    finally:
        runner.stop()
        if not os.environ.get("SOMA_KEEP_TEST_DATA"):
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
async def lumon(
    short_mesh: MeshRunner, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Tenant]:
    async with open_tenant(short_mesh, "expiry-lumon", tmp_path_factory.mktemp("lumon")) as tenant:
        yield tenant


@pytest.mark.timeout(240)
async def test_an_undecided_approval_expires_and_ends_the_stream(
    short_mesh: MeshRunner, lumon: Tenant
) -> None:
    name = unique("secrets")
    await lumon.publish(name, "1.0.0", permissions=["secrets.read"])
    member = make_key(short_mesh, lumon.id, "member")
    async with channel_for(short_mesh, member) as ch:
        cap = stub(ch)
        running = Running(cap, name, "1.0.0")
        report = await running.until(pb.INSTALL_PHASE_AWAITING_APPROVAL)
        approval = await cap.GetApproval(c.GetApprovalRequest(name=report.approval))
        ttl = approval.expire_time.ToDatetime() - approval.create_time.ToDatetime()
        assert abs(ttl.total_seconds() - TTL) < 1, ttl
        started = time.monotonic()
        run = await running.finish()  # nobody decides
        waited = time.monotonic() - started

    assert run.code == grpc.StatusCode.FAILED_PRECONDITION, run.describe()
    assert "expired" in run.details.lower(), run.details
    assert waited < TTL + 15, waited  # ended soon after the deadline, not at the call timeout
    failed = run.last
    assert failed.phase == pb.INSTALL_PHASE_FAILED
    assert failed.result.state == pb.INSTALLATION_STATE_REJECTED
    assert failed.result.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert pb.INSTALL_PHASE_EXTRACTING not in run.phases

    expired = await lumon.cap.GetApproval(c.GetApprovalRequest(name=report.approval))
    assert expired.state == pb.APPROVAL_STATE_EXPIRED and expired.HasField("decide_time")
    assert not expired.approver
    # Too late to decide now.
    approver = make_key(short_mesh, lumon.id, "approver")
    async with channel_for(short_mesh, approver) as ch:
        await fails(
            stub(ch).ApproveCapsule(c.ApproveCapsuleRequest(name=report.approval)),
            grpc.StatusCode.FAILED_PRECONDITION,
        )

    def expired_step(events: list[Any]) -> list[Any]:
        return [e for e in events if e.detail.get("step") == "approval_expired"]

    events = await audit_events(short_mesh, lumon.admin, lambda evs: bool(expired_step(evs)))
    steps = expired_step(events)
    assert len(steps) == 1, [(e.method, e.resource, dict(e.detail)) for e in events]
    assert steps[0].resource == failed.result.name
    assert steps[0].detail["approval"] == report.approval
    assert failed.result.requester == key_subject(member)
