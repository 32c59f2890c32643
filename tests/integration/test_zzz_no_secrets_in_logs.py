"""Runs last: after every other test, no credential they made appears in any log line."""

from __future__ import annotations

import pytest

from tests.integration.harness import MeshRunner

pytestmark = pytest.mark.integration


def test_no_secret_in_any_log(mesh: MeshRunner) -> None:
    assert mesh.secrets, "the auth tests made no credentials: this check would prove nothing"
    logs = [*(mesh.data_dir / "logs").glob("*.log"), mesh.log_file]
    assert len(logs) >= 8
    text = {p.name: p.read_text(errors="replace") for p in logs}
    for secret in mesh.secrets:
        # the whole secret, and its secret part alone (a key's id is public; its tail is not)
        needles = {secret, secret[-33:]}
        for name, content in text.items():
            for needle in needles:
                assert needle not in content, f"a credential appears in {name}"


async def test_no_secret_in_any_audit_event(mesh: MeshRunner) -> None:
    """Every stored audit event of every tenant, read as a platform admin."""
    from soma.audit.v1 import audit_pb2, audit_pb2_grpc
    from tests.integration.harness import authed_channel

    assert mesh.secrets
    platform = mesh.create_key(tenant="default", roles=("admin", "platform_admin"))
    events = 0
    async with authed_channel(mesh.grpc_target, platform) as channel:
        audit = audit_pb2_grpc.AuditServiceStub(channel)
        token = ""
        while True:
            page = await audit.ListAuditEvents(
                audit_pb2.ListAuditEventsRequest(page_size=500, page_token=token)
            )
            for event in page.audit_events:
                text = str(event)
                events += 1
                for secret in mesh.secrets:
                    assert secret not in text and secret[-33:] not in text, event.name
            token = page.next_page_token
            if not token:
                break
    assert events > 1000  # the whole test run was audited
