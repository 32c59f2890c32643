"""Capsule smoke test, through Envoy over gRPC on the real mesh: a publisher key, a packed and
signed capsule published in chunks, installed with streamed progress onto the disk; an install
the policy sends to an approver. (The full suite is tests/integration/test_capsule_*.py.)"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest

from services.capsule import archive, signing
from soma.capsule.v1 import capsule_pb2 as c
from soma.capsule.v1 import capsule_pb2_grpc
from soma.capsule.v1 import resources_pb2 as pb
from tests.integration.harness import MeshRunner, authed_channel

pytestmark = pytest.mark.integration

CHUNK = 64 << 10
TENANT = "default"


def make_capsule(root: Path, name: str, version: str, permissions: Sequence[str]) -> Path:
    """A capsule directory packed into `<root>/<name>-<version>.tar.gz`."""
    src = root / f"{name}-{version}"
    (src / "bin").mkdir(parents=True)
    (src / "capsule.yaml").write_text(
        f"name: {name}\nversion: {version}\ndescription: smoke test capsule\n"
        f"publisher: {TENANT}\nentrypoint: bin/run.sh\npermissions: {list(permissions)}\n"
    )
    (src / "bin" / "run.sh").write_text("#!/bin/sh\necho hello\n")
    (src / "bin" / "run.sh").chmod(0o755)
    (src / "data.bin").write_bytes(uuid.uuid4().bytes * 40_000)  # 640 KB: several chunks
    out = root / f"{name}-{version}.tar.gz"
    archive.pack(src, out)
    return out


async def upload(data: bytes, name: str, version: str, signature: str) -> AsyncIterator[object]:
    yield c.PublishCapsuleRequest(
        metadata=c.PublishCapsuleMetadata(
            capsule=f"capsules/{name}",
            version=version,
            size_bytes=len(data),
            cosign_signature=signature,
        )
    )
    for start in range(0, len(data), CHUNK):
        yield c.PublishCapsuleRequest(chunk=data[start : start + CHUNK])


@pytest.fixture(scope="module")
def signer() -> tuple[object, str]:
    private_pem, public_pem = signing.generate_keypair(None)
    return signing.load_private_key(private_pem, None), public_pem.decode()


async def publish(
    stub: capsule_pb2_grpc.CapsuleServiceStub,
    tmp_path: Path,
    signer: tuple[object, str],
    permissions: Sequence[str] = (),
) -> tuple[str, Path]:
    private_key, public_pem = signer
    try:
        await stub.RegisterPublisherKey(
            c.RegisterPublisherKeyRequest(
                publisher_key=pb.PublisherKey(display_name="smoke", public_key_pem=public_pem)
            )
        )
    except grpc.aio.AioRpcError as error:  # the module's second test: registered already
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    name = f"smoke-{uuid.uuid4().hex[:8]}"
    path = make_capsule(tmp_path, name, "1.0.0", permissions)
    signature = signing.sign_file(path, private_key)  # type: ignore[arg-type]
    version = await stub.PublishCapsule(upload(path.read_bytes(), name, "1.0.0", signature))
    assert version.name == f"capsules/{name}/versions/1.0.0"
    assert version.digest == "sha256:" + signing.file_sha256(path).hex()
    assert version.size_bytes == path.stat().st_size
    assert version.signature.result == pb.VERIFICATION_RESULT_VERIFIED
    assert list(version.manifest.permissions) == list(permissions)
    return name, path


async def test_publish_and_install_over_grpc(
    mesh: MeshRunner, admin_key: str, tmp_path: Path, signer: tuple[object, str]
) -> None:
    async with authed_channel(mesh.grpc_target, admin_key) as channel:
        stub = capsule_pb2_grpc.CapsuleServiceStub(channel)
        name, path = await publish(stub, tmp_path, signer)
        # The same name, version and bytes again: the version that exists.
        again = await stub.PublishCapsule(
            upload(path.read_bytes(), name, "1.0.0", signing.sign_file(path, signer[0]))  # type: ignore[arg-type]
        )
        assert (
            again.publish_time
            == (
                await stub.GetCapsuleVersion(c.GetCapsuleVersionRequest(name=again.name))
            ).publish_time
        )
        capsule = await stub.GetCapsule(c.GetCapsuleRequest(name=f"capsules/{name}"))
        assert (capsule.latest_version, capsule.verified, capsule.tenant) == ("1.0.0", True, TENANT)

        reports = [
            p async for p in stub.InstallCapsule(c.InstallCapsuleRequest(name=f"capsules/{name}"))
        ]
        phases = [p.phase for p in reports]
        assert phases[0] == pb.INSTALL_PHASE_QUEUED and phases[-1] == pb.INSTALL_PHASE_DONE
        assert pb.INSTALL_PHASE_EXTRACTING in phases and pb.INSTALL_PHASE_ACTIVATING in phases
        assert pb.INSTALL_PHASE_AWAITING_APPROVAL not in phases  # no sensitive permission
        assert phases == sorted(phases)
        percents = [p.percent for p in reports]
        assert percents == sorted(percents) and percents[-1] == 100
        result = reports[-1].result
        assert result.state == pb.INSTALLATION_STATE_INSTALLED
        assert result.path == f"installed/{name}/1.0.0" and result.file_count >= 3
        assert result.duration.ToNanoseconds() > 0
        installed = mesh.data_dir / "capsules" / "tenants" / TENANT / result.path
        assert (installed / "bin" / "run.sh").read_text() == "#!/bin/sh\necho hello\n"
        assert (installed / "capsule.yaml").is_file()
        # Nothing left in the temporary areas.
        assert not [p for p in (mesh.data_dir / "capsules" / "tmp").rglob("*") if p.is_file()]

        # Installing what is installed: DONE at once, the same installation.
        repeat = [
            p async for p in stub.InstallCapsule(c.InstallCapsuleRequest(name=f"capsules/{name}"))
        ]
        assert [p.phase for p in repeat] == [pb.INSTALL_PHASE_DONE]
        assert repeat[0].result.name == result.name
        history = await stub.ListInstallations(
            c.ListInstallationsRequest(capsule=f"capsules/{name}")
        )
        assert [i.name for i in history.installations] == [result.name]

        removed = await stub.UninstallCapsule(c.UninstallCapsuleRequest(name=f"capsules/{name}"))
        assert removed.state == pb.INSTALLATION_STATE_UNINSTALLED and not installed.exists()


async def test_install_waits_for_an_approver(
    mesh: MeshRunner, admin_key: str, tmp_path: Path, signer: tuple[object, str]
) -> None:
    member = mesh.create_key(tenant=TENANT, roles=("member",))
    approver = mesh.create_key(tenant=TENANT, roles=("approver",))
    async with (
        authed_channel(mesh.grpc_target, admin_key) as admin_channel,
        authed_channel(mesh.grpc_target, member) as member_channel,
        authed_channel(mesh.grpc_target, approver) as approver_channel,
    ):
        admin = capsule_pb2_grpc.CapsuleServiceStub(admin_channel)
        name, _ = await publish(admin, tmp_path, signer, permissions=["network"])
        stream = capsule_pb2_grpc.CapsuleServiceStub(member_channel).InstallCapsule(
            c.InstallCapsuleRequest(name=f"capsules/{name}", request_id=str(uuid.uuid4()))
        )
        reports = []
        async for progress in stream:
            reports.append(progress)
            if progress.phase == pb.INSTALL_PHASE_AWAITING_APPROVAL:
                break
        approval_name = reports[-1].approval
        approvals = capsule_pb2_grpc.CapsuleServiceStub(approver_channel)
        approval = await approvals.GetApproval(c.GetApprovalRequest(name=approval_name))
        assert approval.state == pb.APPROVAL_STATE_PENDING
        assert approval.policy_reason == "requests sensitive permission network"
        approved = await approvals.ApproveCapsule(
            c.ApproveCapsuleRequest(name=approval_name, comment="ok")
        )
        assert approved.state == pb.APPROVAL_STATE_APPROVED
        async for progress in stream:  # the same stream goes on
            reports.append(progress)
        assert reports[-1].phase == pb.INSTALL_PHASE_DONE
        assert reports[-1].result.approval == approval_name
        with pytest.raises(grpc.aio.AioRpcError) as raised:  # decided already
            await approvals.RejectCapsule(c.RejectCapsuleRequest(name=approval_name))
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
