"""Capsule installs through Envoy on the shared mesh: the progress stream over gRPC and REST,
the tree on disk (atomic, byte for byte), reinstall and request-id idempotency, upgrades,
uninstall, the history, yanked versions and revoked keys, an archive altered on disk, other
tenants, bad inputs with their exact codes, and the audit trail."""

from __future__ import annotations

import stat
import tarfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from soma.capsule.v1 import capsule_pb2 as c
from soma.capsule.v1 import resources_pb2 as pb
from tests.integration.capsules import (
    DENIED,
    INVALID,
    NOT_FOUND,
    PRECONDITION,
    Entry,
    Install,
    Signer,
    Tenant,
    audit_events,
    blob_path,
    capsule_dir,
    channel_for,
    fails,
    install,
    key_subject,
    leaked,
    make_key,
    ndjson,
    raw_archive,
    register_key,
    rest,
    stub,
    tenant_fixture,
    tenant_root,
    unique,
)
from tests.integration.harness import MeshRunner

pytestmark = pytest.mark.integration

P = pb.InstallPhase


initech = tenant_fixture("inst-initech")


umbrella = tenant_fixture("inst-umbrella")


@pytest.fixture(scope="module")
def member(mesh: MeshRunner, initech: Tenant) -> str:
    """A member of initech: members install (no approval is needed for these capsules)."""
    return make_key(mesh, initech.id, "member")


@pytest.fixture
async def as_member(mesh: MeshRunner, member: str) -> AsyncIterator[Any]:
    async with channel_for(mesh, member) as ch:
        yield stub(ch)


# -- helpers ---------------------------------------------------------------------------------------


def archive_tree(path: Path) -> dict[str, bytes | None]:
    """Relative path -> contents (None for directories) of an archive."""
    tree: dict[str, bytes | None] = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            name = member.name.rstrip("/")
            f = tar.extractfile(member) if member.isfile() else None
            tree[name] = f.read() if f is not None else None
    return tree


def disk_tree(root: Path) -> dict[str, bytes | None]:
    tree: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        tree[rel] = None if path.is_dir() else path.read_bytes()
    return tree


def leftovers(mesh: MeshRunner) -> list[Path]:
    """Anything in the replicas' temporary areas: empty once every call has ended."""
    root = capsule_dir(mesh) / "tmp"
    return [p for p in root.rglob("*") if not p.is_dir()] if root.exists() else []


def installed_dir(mesh: MeshRunner, tenant: str, name: str, version: str) -> Path:
    return tenant_root(mesh, tenant) / "installed" / name / version


def exists(path: Path) -> bool:
    return path.exists()


def inode(path: Path) -> int:
    return path.stat().st_ino


def check_stream(run: Install, name: str, version: str) -> pb.Installation:
    """The stream of a successful fresh install: every phase in order, percent never going
    down, every report about the same installation, files and bytes adding up."""
    run.check_completed(awaited_approval=False)
    assert len({p.installation for p in run.progress}) == 1
    assert all(p.HasField("event_time") for p in run.progress)
    # The stream sends the latest report when the client is ready for one, so a small install
    # may go from "0 of N files" straight to ACTIVATING: counts only ever grow to their totals.
    extracting = [p for p in run.progress if p.phase == P.INSTALL_PHASE_EXTRACTING]
    last = extracting[-1]
    assert 0 <= last.files_done <= last.files_total and last.files_total > 0, last
    assert 0 <= last.bytes_done <= last.bytes_total and last.bytes_total > 0, last
    assert len({(p.files_total, p.bytes_total) for p in extracting}) == 1
    done = [(p.files_done, p.bytes_done) for p in extracting]
    assert done == sorted(done)
    result = run.result
    assert result.name == run.progress[0].installation
    assert (result.capsule, result.version) == (f"capsules/{name}", version)
    assert result.state == pb.INSTALLATION_STATE_INSTALLED
    assert result.path == f"installed/{name}/{version}"
    assert result.file_count > 0 and result.size_bytes == last.bytes_total
    assert result.HasField("create_time") and result.HasField("complete_time")
    assert result.HasField("duration") and not result.HasField("remove_time")
    assert not result.approval and not result.HasField("error")
    return result


# -- install ---------------------------------------------------------------------------------------


async def test_install_over_grpc_streams_progress_and_lands_the_exact_tree(
    mesh: MeshRunner, initech: Tenant, member: str, as_member: Any
) -> None:
    name = unique("app")
    built, version = await initech.publish(
        name,
        "1.0.0",
        files={"README.md": b"# app\n", "lib/app/__init__.py": b"VERSION = 1\n"},
        random_files=40,
        random_bytes=2 << 20,
    )
    run = await install(as_member, name, "1.0.0")
    result = check_stream(run, name, "1.0.0")
    assert (result.tenant, result.digest) == (initech.id, built.digest)
    assert result.requester == key_subject(member)
    assert result.size_bytes == version.uncompressed_size_bytes
    verifying = [p for p in run.progress if p.phase == P.INSTALL_PHASE_VERIFYING_SIGNATURE]
    assert verifying[-1].bytes_total == built.size

    target = installed_dir(mesh, initech.id, name, "1.0.0")
    assert disk_tree(target) == archive_tree(built.path)
    mode = (target / "bin" / "run.sh").stat().st_mode
    assert mode & stat.S_IXUSR and not mode & (stat.S_ISUID | stat.S_ISGID)
    assert leftovers(mesh) == []

    got = await as_member.GetInstallation(c.GetInstallationRequest(name=result.name))
    assert got == result
    capsule = await as_member.GetCapsule(c.GetCapsuleRequest(name=f"capsules/{name}"))
    assert capsule.install_count == 1


async def test_install_over_rest_streams_newline_delimited_json(
    mesh: MeshRunner, initech: Tenant, member: str
) -> None:
    name = unique("rest-app")
    built, _ = await initech.publish(name, "2.1.0", files={"a.txt": b"a\n"})
    resp = rest(mesh, member, "POST", f"/v1/capsules/{name}:install", {"version": "2.1.0"})
    assert resp.status == 200, resp.body
    assert resp.headers["content-type"].startswith("application/json")
    lines = ndjson(resp.body)
    phases = [line["phase"] for line in lines]
    assert phases[0] == "INSTALL_PHASE_QUEUED" and phases[-1] == "INSTALL_PHASE_DONE", phases
    assert "INSTALL_PHASE_EXTRACTING" in phases
    result = lines[-1]["result"]
    assert result["state"] == "INSTALLATION_STATE_INSTALLED"
    assert result["path"] == f"installed/{name}/2.1.0"
    assert disk_tree(installed_dir(mesh, initech.id, name, "2.1.0")) == archive_tree(built.path)

    listed = rest(mesh, member, "GET", f"/v1/installations?capsule=capsules/{name}")
    assert listed.status == 200, listed.body
    assert [i["name"] for i in listed.json()["installations"]] == [result["name"]]
    got = rest(mesh, member, "GET", f"/v1/{result['name']}")
    assert got.status == 200 and got.json()["state"] == "INSTALLATION_STATE_INSTALLED"

    # A refusal before the stream starts is a JSON google.rpc.Status.
    missing = rest(mesh, member, "POST", f"/v1/capsules/{name}:install", {"version": "9.0.0"})
    assert missing.status == 404, missing.body
    assert missing.json()["code"] == 5  # NOT_FOUND

    gone = rest(mesh, member, "POST", f"/v1/capsules/{name}:uninstall", {})
    assert gone.status == 200, gone.body
    assert gone.json()["state"] == "INSTALLATION_STATE_UNINSTALLED"


async def test_reinstall_and_request_ids_are_idempotent(
    mesh: MeshRunner, initech: Tenant, as_member: Any
) -> None:
    name = unique("again")
    await initech.publish(name, "1.0.0")
    first = check_stream(await install(as_member, name, "1.0.0"), name, "1.0.0")
    target = installed_dir(mesh, initech.id, name, "1.0.0")
    before = inode(target)

    # The installed version again: DONE at once, the same installation, nothing redone.
    again = await install(as_member, name, "1.0.0")
    assert again.code == grpc.StatusCode.OK, again.describe()
    assert again.last.phase == P.INSTALL_PHASE_DONE
    assert P.INSTALL_PHASE_EXTRACTING not in again.phases
    assert again.result.name == first.name and again.result.state == pb.INSTALLATION_STATE_INSTALLED
    # ... also when the version is left to the registry (the latest, the same one).
    latest = await install(as_member, name)
    assert latest.result.name == first.name
    assert inode(target) == before
    listed = await as_member.ListInstallations(
        c.ListInstallationsRequest(capsule=f"capsules/{name}")
    )
    assert [i.name for i in listed.installations] == [first.name]

    # A repeated request id attaches to the install it started, even after it ended.
    await initech.publish(name, "1.1.0")
    request_id = str(uuid.uuid4())
    upgrade = await install(as_member, name, "1.1.0", request_id=request_id)
    result = check_stream(upgrade, name, "1.1.0")
    repeat = await install(as_member, name, "1.1.0", request_id=request_id)
    assert repeat.code == grpc.StatusCode.OK, repeat.describe()
    assert repeat.result.name == result.name and repeat.last.phase == P.INSTALL_PHASE_DONE


async def test_upgrade_supersedes_and_uninstall_removes(
    mesh: MeshRunner, initech: Tenant, member: str, as_member: Any
) -> None:
    name = unique("upgrade")
    await initech.publish(name, "1.0.0")
    await initech.publish(name, "2.0.0", files={"new.txt": b"new\n"})
    old = check_stream(await install(as_member, name, "1.0.0"), name, "1.0.0")
    new = check_stream(await install(as_member, name, "2.0.0"), name, "2.0.0")

    superseded = await as_member.GetInstallation(c.GetInstallationRequest(name=old.name))
    assert superseded.state == pb.INSTALLATION_STATE_SUPERSEDED
    assert superseded.HasField("remove_time") and superseded.remover == key_subject(member)
    installed = await as_member.ListInstallations(
        c.ListInstallationsRequest(
            capsule=f"capsules/{name}", state=pb.INSTALLATION_STATE_INSTALLED
        )
    )
    assert [i.name for i in installed.installations] == [new.name]
    assert exists(installed_dir(mesh, initech.id, name, "2.0.0") / "new.txt")

    # A downgrade is an install like any other.
    back = check_stream(await install(as_member, name, "1.0.0"), name, "1.0.0")
    assert back.name not in (old.name, new.name)

    removed = await as_member.UninstallCapsule(c.UninstallCapsuleRequest(name=f"capsules/{name}"))
    assert removed.name == back.name and removed.state == pb.INSTALLATION_STATE_UNINSTALLED
    assert removed.remover == key_subject(member) and removed.HasField("remove_time")
    assert not exists(installed_dir(mesh, initech.id, name, "1.0.0"))
    assert not exists(installed_dir(mesh, initech.id, name, "2.0.0"))
    assert leftovers(mesh) == []
    await fails(
        as_member.UninstallCapsule(c.UninstallCapsuleRequest(name=f"capsules/{name}")),
        PRECONDITION,
    )
    capsule = await as_member.GetCapsule(c.GetCapsuleRequest(name=f"capsules/{name}"))
    assert capsule.install_count == 3  # uninstalls do not count down


async def test_history_is_complete_and_filterable(
    mesh: MeshRunner, initech: Tenant, member: str, as_member: Any
) -> None:
    name = unique("history")
    await initech.publish(name, "1.0.0")
    await initech.publish(name, "1.1.0")
    first = check_stream(await install(as_member, name, "1.0.0"), name, "1.0.0")
    # Another person of the tenant upgrades; then the member uninstalls.
    admin_run = await install(initech.cap, name, "1.1.0")
    second = check_stream(admin_run, name, "1.1.0")
    await as_member.UninstallCapsule(c.UninstallCapsuleRequest(name=f"capsules/{name}"))

    history = await as_member.ListInstallations(
        c.ListInstallationsRequest(capsule=f"capsules/{name}")
    )
    rows = list(history.installations)
    assert [r.name for r in rows] == [second.name, first.name]  # newest first
    newest, oldest = rows
    assert (newest.version, newest.state, newest.requester) == (
        "1.1.0",
        pb.INSTALLATION_STATE_UNINSTALLED,
        key_subject(initech.admin),
    )
    assert (oldest.version, oldest.state, oldest.requester) == (
        "1.0.0",
        pb.INSTALLATION_STATE_SUPERSEDED,
        key_subject(member),
    )
    for row in rows:  # who, when, version, outcome, duration
        assert row.HasField("create_time") and row.HasField("complete_time")
        assert row.HasField("duration") and row.HasField("remove_time")
        assert row.complete_time.ToDatetime() >= row.create_time.ToDatetime()
        spent = row.complete_time.ToDatetime() - row.create_time.ToDatetime()
        assert abs(row.duration.ToTimedelta() - spent).total_seconds() < 0.01
        assert row.tenant == initech.id and row.digest.startswith("sha256:")
    assert newest.create_time.ToDatetime() >= oldest.complete_time.ToDatetime()

    mine = await as_member.ListInstallations(
        c.ListInstallationsRequest(capsule=f"capsules/{name}", requester=key_subject(member))
    )
    assert [r.name for r in mine.installations] == [first.name]
    gone = await as_member.ListInstallations(
        c.ListInstallationsRequest(state=pb.INSTALLATION_STATE_UNINSTALLED)
    )
    assert second.name in [r.name for r in gone.installations]
    assert all(r.state == pb.INSTALLATION_STATE_UNINSTALLED for r in gone.installations)
    # Paging through everything the tenant did: each installation once.
    seen: list[str] = []
    token = ""
    while True:
        page = await as_member.ListInstallations(
            c.ListInstallationsRequest(page_size=2, page_token=token)
        )
        assert len(page.installations) <= 2
        seen += [r.name for r in page.installations]
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) and {first.name, second.name} <= set(seen)


async def test_yanked_version_cannot_be_installed_but_installed_copies_stay(
    mesh: MeshRunner, initech: Tenant, as_member: Any
) -> None:
    name = unique("yanked")
    _, v1 = await initech.publish(name, "1.0.0")
    _, v2 = await initech.publish(name, "1.1.0")
    kept = check_stream(await install(as_member, name, "1.1.0"), name, "1.1.0")
    await initech.cap.YankCapsuleVersion(c.YankCapsuleVersionRequest(name=v2.name, reason="bad"))

    refused = await install(as_member, name, "1.1.0")
    assert refused.code == PRECONDITION, refused.describe()
    assert "yank" in refused.details.lower()
    still = await as_member.GetInstallation(c.GetInstallationRequest(name=kept.name))
    assert still.state == pb.INSTALLATION_STATE_INSTALLED
    assert exists(installed_dir(mesh, initech.id, name, "1.1.0"))
    # Without a version, the latest installable one: 1.0.0.
    older = check_stream(await install(as_member, name), name, "1.0.0")
    assert older.version == "1.0.0"
    # Every version yanked: nothing to install.
    await initech.cap.YankCapsuleVersion(c.YankCapsuleVersionRequest(name=v1.name))
    none_left = await install(as_member, name)
    assert none_left.code == PRECONDITION, none_left.describe()


async def test_revoked_key_blocks_install(
    mesh: MeshRunner, initech: Tenant, as_member: Any
) -> None:
    signer = Signer.new()
    key = await register_key(initech.cap, signer, "short-lived")
    name = unique("revoked")
    await initech.publish(name, "1.0.0", signer=signer)
    await initech.cap.RevokePublisherKey(c.RevokePublisherKeyRequest(name=key.name))
    run = await install(as_member, name, "1.0.0")
    assert run.code == PRECONDITION, run.describe()
    assert "revoked" in run.details.lower()
    if run.progress:  # if it got as far as a stream, the stream says so too
        assert run.last.phase == P.INSTALL_PHASE_FAILED
        assert run.last.error.code == PRECONDITION.value[0]
        assert run.last.result.state == pb.INSTALLATION_STATE_FAILED
    assert not exists(tenant_root(mesh, initech.id) / "installed" / name)
    assert leftovers(mesh) == []


def swap_blob(path: Path, replacement: bytes) -> None:
    path.chmod(0o644)
    path.write_bytes(replacement)


async def test_archive_altered_on_disk_is_caught_before_extraction(
    mesh: MeshRunner, initech: Tenant, as_member: Any
) -> None:
    name = unique("altered")
    built, version = await initech.publish(name, "1.0.0")
    # Someone with access to the disk swaps the stored archive for an escaping one.
    marker = "escaped-" + uuid.uuid4().hex[:12]
    evil = raw_archive(
        initech.work, name, "1.0.0", initech.id, [Entry(f"../../../{marker}", b"pwned")]
    )
    swap_blob(blob_path(mesh, built.digest), evil.data)

    run = await install(as_member, name, "1.0.0")
    assert run.code == PRECONDITION, run.describe()
    assert "digest" in run.details.lower()
    assert P.INSTALL_PHASE_EXTRACTING not in run.phases
    if run.progress:
        failed = run.last
        assert failed.phase == P.INSTALL_PHASE_FAILED
        assert failed.result.state == pb.INSTALLATION_STATE_FAILED
        assert failed.result.error.code == PRECONDITION.value[0] and failed.result.error.message
    assert leaked(mesh, marker) == []
    assert not exists(tenant_root(mesh, initech.id) / "installed" / name)
    assert leftovers(mesh) == []
    checked = await initech.cap.VerifyCapsuleVersion(
        c.VerifyCapsuleVersionRequest(name=version.name)
    )
    assert not checked.verified and checked.result == pb.VERIFICATION_RESULT_DIGEST_MISMATCH
    assert checked.digest != built.digest


async def test_other_tenants_install_public_capsules_and_see_only_their_own(
    mesh: MeshRunner, initech: Tenant, umbrella: Tenant, as_member: Any
) -> None:
    public, private = unique("shared"), unique("inhouse")
    await initech.publish(public, "1.0.0", visibility=pb.CAPSULE_VISIBILITY_PUBLIC)
    await initech.publish(private, "1.0.0")
    mine = check_stream(await install(as_member, public, "1.0.0"), public, "1.0.0")
    theirs = check_stream(await install(umbrella.cap, public, "1.0.0"), public, "1.0.0")
    assert theirs.tenant == umbrella.id and theirs.name != mine.name
    assert exists(installed_dir(mesh, umbrella.id, public, "1.0.0") / "capsule.yaml")

    await fails(
        umbrella.cap.InstallCapsule(c.InstallCapsuleRequest(name=f"capsules/{private}")).read(),
        NOT_FOUND,
    )
    for who, other in ((umbrella.cap, mine.name), (as_member, theirs.name)):
        await fails(who.GetInstallation(c.GetInstallationRequest(name=other)), NOT_FOUND)
    listed = await umbrella.cap.ListInstallations(
        c.ListInstallationsRequest(capsule=f"capsules/{public}")
    )
    assert [i.name for i in listed.installations] == [theirs.name]
    listed = await as_member.ListInstallations(
        c.ListInstallationsRequest(capsule=f"capsules/{public}")
    )
    assert [i.name for i in listed.installations] == [mine.name]
    capsule = await umbrella.cap.GetCapsule(c.GetCapsuleRequest(name=f"capsules/{public}"))
    assert capsule.install_count == 2  # by any tenant

    # Uninstalling in one tenant leaves the other's copy.
    await umbrella.cap.UninstallCapsule(c.UninstallCapsuleRequest(name=f"capsules/{public}"))
    assert exists(installed_dir(mesh, initech.id, public, "1.0.0"))
    # Nothing to uninstall: the same answer for another tenant's private capsule as for a
    # name nobody uses, so it reveals nothing.
    nobody = unique("nobody")
    for capsule in (private, nobody):
        error = await fails(
            umbrella.cap.UninstallCapsule(c.UninstallCapsuleRequest(name=f"capsules/{capsule}")),
            PRECONDITION,
        )
        assert initech.id not in (error.details() or "")


async def test_install_bad_inputs_and_roles(
    mesh: MeshRunner, initech: Tenant, as_member: Any
) -> None:
    name = unique("inputs")
    await initech.publish(name, "1.0.0")

    async def code_of(request: c.InstallCapsuleRequest) -> grpc.StatusCode:
        run = Install()
        try:
            async for progress in as_member.InstallCapsule(request, timeout=30):
                run.progress.append(progress)
        except grpc.aio.AioRpcError as error:
            run.error = error
        return run.code

    for request, code in (
        (c.InstallCapsuleRequest(name=""), INVALID),
        (c.InstallCapsuleRequest(name="capsules/Bad_Name"), INVALID),
        (c.InstallCapsuleRequest(name=f"capsules/{name}", version="1.0"), INVALID),
        (c.InstallCapsuleRequest(name=f"capsules/{name}", request_id="not-a-uuid"), INVALID),
        (c.InstallCapsuleRequest(name=f"capsules/{unique('nobody')}"), NOT_FOUND),
        (c.InstallCapsuleRequest(name=f"capsules/{name}", version="9.9.9"), NOT_FOUND),
    ):
        assert await code_of(request) == code, request
    for bad in ("", "installations/x", "installations/", "capsules/x"):
        await fails(as_member.GetInstallation(c.GetInstallationRequest(name=bad)), INVALID)
    await fails(
        as_member.GetInstallation(c.GetInstallationRequest(name=f"installations/{uuid.uuid4()}")),
        NOT_FOUND,
    )
    for request in (
        c.ListInstallationsRequest(page_size=-1),
        c.ListInstallationsRequest(page_token="garbage"),
        c.ListInstallationsRequest(capsule="nope"),
        c.ListInstallationsRequest(state=42),  # type: ignore[arg-type]
    ):
        await fails(as_member.ListInstallations(request), INVALID)
    await fails(
        as_member.UninstallCapsule(c.UninstallCapsuleRequest(name="capsules/Bad_Name")), INVALID
    )
    await fails(
        as_member.UninstallCapsule(c.UninstallCapsuleRequest(name=f"capsules/{name}")),
        PRECONDITION,
    )

    # Auditors read but do not install.
    auditor = make_key(mesh, initech.id, "auditor")
    async with channel_for(mesh, auditor) as ch:
        cap = stub(ch)
        run = await install(cap, name, "1.0.0")
        assert run.code == DENIED, run.describe()
        await cap.ListInstallations(c.ListInstallationsRequest())


# -- audit -----------------------------------------------------------------------------------------


async def test_installs_are_audited(
    mesh: MeshRunner, initech: Tenant, member: str, as_member: Any
) -> None:
    name = unique("audited")
    await initech.publish(name, "1.0.0")
    result = check_stream(await install(as_member, name, "1.0.0"), name, "1.0.0")
    await as_member.GetInstallation(c.GetInstallationRequest(name=result.name))
    await as_member.UninstallCapsule(c.UninstallCapsuleRequest(name=f"capsules/{name}"))

    def about(events: list[Any]) -> list[Any]:
        keys = (f"capsules/{name}", result.name)
        return [e for e in events if e.resource.startswith(keys)]

    def complete(events: list[Any]) -> bool:
        mine = about(events)
        got = {e.method.rsplit("/", 1)[1] for e in mine if e.status_code == 0}
        steps = {e.detail.get("step") for e in mine}
        return {"InstallCapsule", "UninstallCapsule", "GetInstallation"} <= got and "done" in steps

    events = await audit_events(mesh, initech.admin, complete)
    mine = about(events)
    assert complete(events), [(e.method, e.resource, e.status_code) for e in mine]
    call = next(e for e in mine if e.method.endswith("/InstallCapsule"))
    assert call.actor.subject == key_subject(member) and call.tenant == initech.id
    # The install's own outcome is recorded too (it runs on after the call), for the requester.
    steps = {e.detail["step"]: e for e in mine if "step" in e.detail}
    assert "done" in steps, [(e.method, e.resource, dict(e.detail)) for e in mine]
    done = steps["done"]
    assert done.resource == result.name and done.tenant == initech.id
    assert done.actor.subject == key_subject(member) and done.status_code == 0
    assert done.detail["version"] == "1.0.0" and done.detail["capsule"] == f"capsules/{name}"
