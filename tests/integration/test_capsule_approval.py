"""The approval flow through Envoy on the shared mesh: a capsule requesting a sensitive
permission waits for an approver; the requester cannot approve their own install; an approval
lets the waiting stream continue to DONE (also after the client went away and came back); a
rejection ends it FAILED with FAILED_PRECONDITION; enterprise mode asks for every install of
another tenant's capsule; approvals stay inside their tenant; every step is audited."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from soma.capsule.v1 import capsule_pb2 as c
from soma.capsule.v1 import resources_pb2 as pb
from soma.keys.v1 import keys_pb2, keys_pb2_grpc
from soma.keys.v1 import resources_pb2 as kpb
from tests.integration.capsules import (
    DENIED,
    INVALID,
    NOT_FOUND,
    PRECONDITION,
    Running,
    Tenant,
    audit_events,
    channel_for,
    error_reason,
    fails,
    install,
    key_subject,
    make_key,
    open_tenant,
    stub,
    tenant_fixture,
    tenant_root,
    unique,
)
from tests.integration.harness import MeshRunner

pytestmark = pytest.mark.integration

P = pb.InstallPhase


@dataclass
class People:
    """One tenant and the people in it, each with a key (and a channel) of their own."""

    org: Tenant
    member: str
    approver: str
    approver2: str
    auditor: str
    channels: dict[str, grpc.aio.Channel]

    def cap(self, who: str) -> Any:
        return stub(self.channels[who])

    def subject(self, who: str) -> str:
        return key_subject(getattr(self, who))


@pytest.fixture(scope="module")
async def hooli(
    mesh: MeshRunner, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[People]:
    async with open_tenant(mesh, "appr-hooli", tmp_path_factory.mktemp("hooli")) as org:
        keys = {
            "member": make_key(mesh, org.id, "member"),
            "approver": make_key(mesh, org.id, "approver"),
            "approver2": make_key(mesh, org.id, "approver"),
            "auditor": make_key(mesh, org.id, "auditor"),
        }
        channels = {who: channel_for(mesh, secret) for who, secret in keys.items()}
        yield People(org, channels=channels, **keys)
        for ch in channels.values():
            await ch.close()


pied_piper = tenant_fixture("appr-piper")


async def sensitive(people: People, **kw: Any) -> str:
    """A capsule of the tenant that requests `network` (sensitive: the policy asks)."""
    name = unique("netcap")
    await people.org.publish(name, "1.0.0", permissions=["network", "storage.read"], **kw)
    return name


async def waiting(people: People, who: str, name: str, **kw: Any) -> tuple[Running, str]:
    """Starts `who`'s install of `name` and reads up to AWAITING_APPROVAL: (stream, approval)."""
    running = Running(people.cap(who), name, "1.0.0", **kw)
    report = await running.until(P.INSTALL_PHASE_AWAITING_APPROVAL)
    assert report.approval.startswith("approvals/") and report.message, report
    return running, report.approval


async def approve(cap: Any, approval: str, comment: str = "") -> pb.Approval:
    return await cap.ApproveCapsule(c.ApproveCapsuleRequest(name=approval, comment=comment))


async def reject(cap: Any, approval: str, reason: str = "") -> pb.Approval:
    return await cap.RejectCapsule(c.RejectCapsuleRequest(name=approval, reason=reason))


# -- the flow --------------------------------------------------------------------------------------


async def test_sensitive_install_waits_and_continues_once_approved(
    mesh: MeshRunner, hooli: People
) -> None:
    name = await sensitive(hooli)
    running, approval_name = await waiting(hooli, "member", name)
    installation = running.run.progress[-1].installation

    waiting_install = await hooli.cap("member").GetInstallation(
        c.GetInstallationRequest(name=installation)
    )
    assert waiting_install.state == pb.INSTALLATION_STATE_AWAITING_APPROVAL
    assert waiting_install.approval == approval_name
    inbox = await hooli.cap("approver").ListApprovals(
        c.ListApprovalsRequest(state=pb.APPROVAL_STATE_PENDING)
    )
    pending = next(a for a in inbox.approvals if a.name == approval_name)
    assert (pending.tenant, pending.installation) == (hooli.org.id, installation)
    assert (pending.capsule, pending.version) == (f"capsules/{name}", "1.0.0")
    assert sorted(pending.permissions) == ["network", "storage.read"]
    assert pending.requester == hooli.subject("member")
    assert "network" in pending.policy_reason
    assert pending.state == pb.APPROVAL_STATE_PENDING and not pending.approver
    assert pending.expire_time.ToDatetime() > pending.create_time.ToDatetime()
    assert not pending.HasField("decide_time")

    # Members (here: the requester) cannot approve; nothing changes.
    await fails(approve(hooli.cap("member"), approval_name), DENIED)
    await fails(reject(hooli.cap("member"), approval_name), DENIED)
    # Auditors neither.
    await fails(approve(hooli.cap("auditor"), approval_name), DENIED)

    approved = await approve(hooli.cap("approver"), approval_name, "looks fine")
    assert approved.state == pb.APPROVAL_STATE_APPROVED
    assert (approved.approver, approved.comment) == (hooli.subject("approver"), "looks fine")
    assert approved.HasField("decide_time")

    run = await running.finish()
    run.check_completed(awaited_approval=True)
    result = run.result
    assert result.name == installation and result.state == pb.INSTALLATION_STATE_INSTALLED
    assert result.approval == approval_name and result.requester == hooli.subject("member")
    # The wait is part of the duration.
    assert result.duration.ToTimedelta() >= (
        approved.decide_time.ToDatetime() - result.create_time.ToDatetime()
    )
    assert (tenant_root(mesh, hooli.org.id) / result.path / "capsule.yaml").exists()

    # A decided approval stays decided.
    await fails(approve(hooli.cap("approver2"), approval_name), PRECONDITION)
    await fails(reject(hooli.cap("approver2"), approval_name), PRECONDITION)
    listed = await hooli.cap("approver").ListApprovals(
        c.ListApprovalsRequest(capsule=f"capsules/{name}")
    )
    assert [(a.name, a.state) for a in listed.approvals] == [
        (approval_name, pb.APPROVAL_STATE_APPROVED)
    ]


async def test_the_requester_cannot_approve_their_own_install(hooli: People) -> None:
    name = await sensitive(hooli)
    # An approver asks for an install: someone else has to decide on it.
    running, approval_name = await waiting(hooli, "approver", name)
    for decide in (approve, reject):
        error = await fails(decide(hooli.cap("approver"), approval_name), DENIED, "you requested")
        assert error_reason(error) == "REQUESTER_CANNOT_APPROVE", error_reason(error)
    got = await hooli.cap("approver").GetApproval(c.GetApprovalRequest(name=approval_name))
    assert got.state == pb.APPROVAL_STATE_PENDING
    # A tenant admin is an approver too, and not the requester.
    await approve(hooli.org.cap, approval_name)
    run = await running.finish()
    assert run.code == grpc.StatusCode.OK, run.describe()
    assert run.result.state == pb.INSTALLATION_STATE_INSTALLED
    assert run.result.requester == hooli.subject("approver")


async def test_rejection_ends_the_stream_failed(mesh: MeshRunner, hooli: People) -> None:
    name = await sensitive(hooli)
    running, approval_name = await waiting(hooli, "member", name)
    rejected = await reject(hooli.cap("approver"), approval_name, "no network capsules this week")
    assert rejected.state == pb.APPROVAL_STATE_REJECTED
    assert rejected.approver == hooli.subject("approver")
    assert rejected.comment == "no network capsules this week"

    run = await running.finish()
    assert run.code == PRECONDITION, run.describe()
    assert "no network capsules this week" in run.details
    failed = run.last
    assert failed.phase == P.INSTALL_PHASE_FAILED
    assert failed.error.code == PRECONDITION.value[0]
    assert "no network capsules this week" in failed.error.message
    assert P.INSTALL_PHASE_EXTRACTING not in run.phases
    result = failed.result
    assert result.state == pb.INSTALLATION_STATE_REJECTED and result.approval == approval_name
    assert result.error.code == PRECONDITION.value[0] and result.HasField("complete_time")
    assert not (tenant_root(mesh, hooli.org.id) / "installed" / name).exists()

    # The rejected install is in the history; a new request asks again.
    history = await hooli.cap("member").ListInstallations(
        c.ListInstallationsRequest(capsule=f"capsules/{name}")
    )
    assert [(i.name, i.state) for i in history.installations] == [
        (result.name, pb.INSTALLATION_STATE_REJECTED)
    ]
    again, second = await waiting(hooli, "member", name)
    assert second != approval_name
    await reject(hooli.cap("approver2"), second, "still no")
    assert (await again.finish()).code == PRECONDITION


def restarts(mesh: MeshRunner) -> dict[str, int]:
    state = mesh.state() or {}
    return {p["name"]: p["restarts"] for p in state["parts"] if p["name"].startswith("capsule-")}


async def test_the_install_waits_on_the_server_when_the_client_leaves(
    mesh: MeshRunner, hooli: People
) -> None:
    before = restarts(mesh)
    name = await sensitive(hooli)
    request_id = str(uuid.uuid4())
    running, approval_name = await waiting(hooli, "member", name, request_id=request_id)
    installation = running.run.progress[-1].installation
    running.cancel()  # the client goes away while it waits

    await approve(hooli.cap("approver"), approval_name)
    deadline = time.monotonic() + 60
    while True:  # it goes on without anyone listening
        got = await hooli.cap("member").GetInstallation(c.GetInstallationRequest(name=installation))
        if got.state == pb.INSTALLATION_STATE_INSTALLED:
            break
        assert got.state in (
            pb.INSTALLATION_STATE_AWAITING_APPROVAL,
            pb.INSTALLATION_STATE_PENDING,
        ), got
        assert time.monotonic() < deadline, got
        await asyncio.sleep(0.3)

    # The same request id attaches to it again and sees the end.
    again = await install(hooli.cap("member"), name, "1.0.0", request_id=request_id)
    assert again.code == grpc.StatusCode.OK, again.describe()
    assert again.last.phase == P.INSTALL_PHASE_DONE and again.result.name == installation
    # A client going away is routine: no replica fell over because of it.
    assert restarts(mesh) == before, (before, restarts(mesh))


async def test_a_waiting_stream_can_be_attached_from_another_connection(hooli: People) -> None:
    """Two clients on the same request id both see the approval and the end (the second may
    well reach the other replica: attaching works through the database)."""
    name = await sensitive(hooli)
    request_id = str(uuid.uuid4())
    first, approval_name = await waiting(hooli, "member", name, request_id=request_id)
    async with channel_for(hooli.org.mesh, hooli.member) as other:
        second = Running(stub(other), name, "1.0.0", request_id=request_id)
        report = await second.until(P.INSTALL_PHASE_AWAITING_APPROVAL)
        assert report.approval == approval_name
        await approve(hooli.cap("approver"), approval_name)
        a, b = await asyncio.gather(first.finish(), second.finish())
    assert a.code == b.code == grpc.StatusCode.OK, (a.describe(), b.describe())
    assert a.result.name == b.result.name == first.run.progress[0].installation


async def test_enterprise_mode_asks_for_every_install_of_another_tenants_capsule(
    mesh: MeshRunner, hooli: People, pied_piper: Tenant
) -> None:
    # hooli publishes a harmless public capsule.
    name = unique("harmless")
    await hooli.org.publish(name, "1.0.0", visibility=pb.CAPSULE_VISIBILITY_PUBLIC)
    # pied_piper installs it without asking anyone ...
    plain = await install(pied_piper.cap, name, "1.0.0")
    assert plain.code == grpc.StatusCode.OK, plain.describe()
    assert P.INSTALL_PHASE_AWAITING_APPROVAL not in plain.phases
    await pied_piper.cap.UninstallCapsule(c.UninstallCapsuleRequest(name=f"capsules/{name}"))

    # ... until it turns enterprise mode on.
    keys = keys_pb2_grpc.KeysServiceStub(pied_piper.channel)
    updated = await keys.UpdateTenant(
        keys_pb2.UpdateTenantRequest(
            tenant=kpb.Tenant(name=f"tenants/{pied_piper.id}", enterprise_mode=True),
            update_mask=field_mask_pb2.FieldMask(paths=["enterprise_mode"]),
        )
    )
    assert updated.enterprise_mode
    running = Running(pied_piper.cap, name, "1.0.0")
    report = await running.until(P.INSTALL_PHASE_AWAITING_APPROVAL)
    got = await pied_piper.cap.GetApproval(c.GetApprovalRequest(name=report.approval))
    assert "enterprise" in got.policy_reason.lower(), got.policy_reason
    # An approver of pied_piper decides; the requester (its admin) cannot.
    await fails(approve(pied_piper.cap, report.approval), DENIED)
    approver = make_key(mesh, pied_piper.id, "approver")
    async with channel_for(mesh, approver) as ch:
        await approve(stub(ch), report.approval, "ok for us")
    run = await running.finish()
    assert run.code == grpc.StatusCode.OK, run.describe()
    assert run.result.approval == report.approval


async def test_approvals_stay_inside_their_tenant(hooli: People, pied_piper: Tenant) -> None:
    name = await sensitive(hooli, visibility=pb.CAPSULE_VISIBILITY_PUBLIC)
    running, approval_name = await waiting(hooli, "member", name)
    installation = running.run.progress[-1].installation
    outsider = pied_piper.cap  # an admin (so an approver) of another tenant
    await fails(outsider.GetApproval(c.GetApprovalRequest(name=approval_name)), NOT_FOUND)
    await fails(approve(outsider, approval_name), NOT_FOUND)
    await fails(reject(outsider, approval_name), NOT_FOUND)
    await fails(outsider.GetInstallation(c.GetInstallationRequest(name=installation)), NOT_FOUND)
    theirs = await outsider.ListApprovals(c.ListApprovalsRequest())
    assert approval_name not in [a.name for a in theirs.approvals]
    filtered = await outsider.ListApprovals(c.ListApprovalsRequest(capsule=f"capsules/{name}"))
    assert list(filtered.approvals) == []
    got = await hooli.cap("approver").GetApproval(c.GetApprovalRequest(name=approval_name))
    assert got.state == pb.APPROVAL_STATE_PENDING
    await reject(hooli.cap("approver"), approval_name, "cleanup")
    assert (await running.finish()).code == PRECONDITION


async def test_approval_bad_inputs(hooli: People) -> None:
    cap = hooli.cap("approver")
    for bad in ("", "approvals/x", "approvals/", "installations/" + str(uuid.uuid4())):
        await fails(approve(cap, bad), INVALID)
        await fails(cap.GetApproval(c.GetApprovalRequest(name=bad)), INVALID)
    unknown = f"approvals/{uuid.uuid4()}"
    await fails(approve(cap, unknown), NOT_FOUND)
    await fails(reject(cap, unknown), NOT_FOUND)
    await fails(cap.GetApproval(c.GetApprovalRequest(name=unknown)), NOT_FOUND)
    for request in (
        c.ListApprovalsRequest(page_size=-1),
        c.ListApprovalsRequest(page_token="garbage"),
        c.ListApprovalsRequest(capsule="Not A Capsule"),
        c.ListApprovalsRequest(state=17),  # type: ignore[arg-type]
    ):
        await fails(cap.ListApprovals(request), INVALID)

    name = await sensitive(hooli)
    running, approval_name = await waiting(hooli, "member", name)
    await fails(approve(cap, approval_name, "c" * 501), INVALID)
    await fails(reject(cap, approval_name, "r" * 501), INVALID)
    await fails(
        cap.ApproveCapsule(c.ApproveCapsuleRequest(name=approval_name, request_id="nope")),
        INVALID,
    )
    # Paging the approver's inbox.
    page = await cap.ListApprovals(c.ListApprovalsRequest(page_size=1))
    assert len(page.approvals) == 1 and page.next_page_token
    newest = page.approvals[0]
    assert newest.name == approval_name  # newest first
    await reject(cap, approval_name)
    assert (await running.finish()).code == PRECONDITION


# -- audit -----------------------------------------------------------------------------------------


async def test_every_approval_step_is_audited(mesh: MeshRunner, hooli: People) -> None:
    name = await sensitive(hooli)
    running, approved_one = await waiting(hooli, "member", name)
    await fails(approve(hooli.cap("member"), approved_one), DENIED)
    await approve(hooli.cap("approver"), approved_one)
    await running.finish()
    await hooli.cap("member").UninstallCapsule(c.UninstallCapsuleRequest(name=f"capsules/{name}"))
    running, rejected_one = await waiting(hooli, "member", name)
    await reject(hooli.cap("approver"), rejected_one, "no")
    await running.finish()

    def calls(events: list[Any]) -> set[tuple[str, int, str]]:
        return {(e.method.rsplit("/", 1)[1], e.status_code, e.resource) for e in events}

    wanted = {("ApproveCapsule", 0, approved_one), ("RejectCapsule", 0, rejected_one)}

    def steps_of(events: list[Any]) -> list[tuple[str, str]]:
        """(step, approval) of the install steps recorded for these two approvals."""
        return sorted(
            (e.detail["step"], e.detail.get("approval", ""))
            for e in events
            if "step" in e.detail and e.detail.get("approval") in (approved_one, rejected_one)
        )

    expected_steps = sorted(
        [
            ("approval_requested", approved_one),
            ("approved", approved_one),
            ("done", approved_one),
            ("approval_requested", rejected_one),
            ("rejected", rejected_one),
        ]
    )

    def refused(events: list[Any]) -> list[Any]:
        """The member's attempt, refused by the policy (which records no resource: the
        request is not read before the role check)."""
        member = hooli.subject("member")
        return [
            e
            for e in events
            if e.method.endswith("/ApproveCapsule")
            and e.status_code == 7
            and e.actor.subject == member
        ]

    def complete(events: list[Any]) -> bool:
        return (
            wanted <= calls(events)
            and set(expected_steps) <= set(steps_of(events))
            and bool(refused(events))
        )

    events = await audit_events(mesh, hooli.auditor, complete)
    assert wanted <= calls(events), sorted(calls(events))
    # Beyond the calls, the install's own steps, each once, naming the approval.
    assert steps_of(events) == expected_steps, steps_of(events)
    by_step = {
        (e.detail["step"], e.detail.get("approval")): e for e in events if "step" in e.detail
    }
    approved = by_step[("approved", approved_one)]
    assert approved.actor.subject == hooli.subject("approver")
    assert approved.detail["approver"] == hooli.subject("approver")
    requested = by_step[("approval_requested", approved_one)]
    assert requested.actor.subject == hooli.subject("member")
    assert requested.tenant == hooli.org.id
    assert refused(events), "the member's refused approval is not in the audit trail"
    assert all(e.decision == 2 for e in refused(events))  # AUDIT_DECISION_DENY
