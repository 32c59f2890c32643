"""Test capsules for the capsule integration tests and bench/capsule_throughput.py.

Clean capsules are built with the real packer (`services.capsule.archive.pack`) and signed with
the real signer (`services.capsule.signing`), the way a publisher does it. Malicious archives
cannot come out of the packer (it refuses them), so `raw_archive` writes them with `tarfile`
directly. Uploads, installs and keys go through Envoy like any client's.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import os
import tarfile
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.rpc import error_details_pb2, status_pb2

from services.capsule import archive, signing
from soma.audit.v1 import audit_pb2, audit_pb2_grpc
from soma.capsule.v1 import capsule_pb2 as c
from soma.capsule.v1 import capsule_pb2_grpc
from soma.capsule.v1 import resources_pb2 as pb
from tests.integration.harness import MeshRunner, authed_channel, http_request

CHUNK = 1 << 20  # the contract's largest PublishCapsule chunk over gRPC
ENTRYPOINT = "bin/run.sh"

# The codes the capsule tests expect, short enough to read in `fails(call, DENIED, ...)`.
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def unique(prefix: str) -> str:
    """A name no other test (or earlier run on the same mesh) uses: capsule names are global."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- keys of the mesh ------------------------------------------------------------------------------


def make_key(mesh: MeshRunner, tenant: str, *roles: str, owner: str | None = None) -> str:
    """An API key of `tenant` with `roles`, owned by a person of its own.

    Like MeshRunner.create_key (`soma-mesh admin create-key`), but every key gets its own owner:
    the approval rule "never the requester" must not be satisfied or defeated by two keys that
    happen to share the default owner."""
    return mesh.create_key(
        tenant, roles, owner=owner or f"user:{uuid.uuid4().hex[:10]}", name="-".join(roles) or "key"
    )


def key_subject(secret: str) -> str:
    """`key:<key id>`: the subject a call with this key acts as (the id is the secret's middle
    part, `soma_<env>_<id>_<secret>`)."""
    parts = secret.split("_")
    return f"key:{parts[2]}"


# -- building --------------------------------------------------------------------------------------


@dataclass
class Built:
    """An archive on disk and what a publisher states about it."""

    path: Path
    name: str
    version: str

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    @property
    def digest(self) -> str:
        return "sha256:" + signing.file_sha256(self.path).hex()

    @property
    def capsule(self) -> str:
        return f"capsules/{self.name}"

    @property
    def version_name(self) -> str:
        return f"capsules/{self.name}/versions/{self.version}"


def manifest(
    name: str,
    version: str,
    publisher: str,
    *,
    permissions: Sequence[str] = (),
    description: str = "",
    entrypoint: str = ENTRYPOINT,
    **extra: Any,
) -> bytes:
    data: dict[str, Any] = {
        "name": name,
        "version": version,
        "description": description or f"test capsule {name}",
        "publisher": publisher,
        "entrypoint": entrypoint,
        "permissions": list(permissions),
        **extra,
    }
    return yaml.safe_dump(data, sort_keys=False).encode()


def build(
    workdir: Path,
    name: str,
    version: str = "1.0.0",
    *,
    publisher: str,
    permissions: Sequence[str] = (),
    description: str = "",
    files: dict[str, bytes] | None = None,
    random_files: int = 0,
    random_bytes: int = 0,
    **extra: Any,
) -> Built:
    """A capsule packed by the real packer: manifest, entrypoint, `files`, and `random_bytes`
    of incompressible data spread over `random_files` files (so sizes and MB/s are honest)."""
    src = workdir / f"src-{name}-{version}-{uuid.uuid4().hex[:6]}"
    (src / "bin").mkdir(parents=True)
    (src / "capsule.yaml").write_bytes(
        manifest(
            name,
            version,
            publisher,
            permissions=permissions,
            description=description,
            **extra,
        )
    )
    entry = src / ENTRYPOINT
    entry.write_text(f"#!/bin/sh\necho {name} {version}\n")
    entry.chmod(0o755)
    for rel, content in (files or {}).items():
        target = src / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    if random_bytes:
        count = max(1, random_files)
        each = random_bytes // count
        for i in range(count):
            target = src / "data" / f"{i // 100:03d}" / f"blob-{i:05d}.bin"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(os.urandom(each))
    out = workdir / f"{name}-{version}-{uuid.uuid4().hex[:6]}.tar.gz"
    archive.pack(src, out)
    return Built(out, name, version)


@dataclass
class Entry:
    """One member of a hand-made archive; `data` for regular files."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    mode: int = 0o644
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0

    def info(self) -> tarfile.TarInfo:
        info = tarfile.TarInfo(self.name)
        info.type = self.type
        info.mode = self.mode
        info.linkname = self.linkname
        info.devmajor, info.devminor = self.devmajor, self.devminor
        info.size = len(self.data) if self.type == tarfile.REGTYPE else 0
        info.mtime = 0
        return info


def raw_archive(
    workdir: Path,
    name: str,
    version: str,
    publisher: str,
    entries: Iterable[Entry],
    *,
    with_manifest: bool = True,
    tar_format: int = tarfile.PAX_FORMAT,
) -> Built:
    """A `.tar.gz` written entry by entry, bypassing every check of the packer: a valid
    manifest and entrypoint first (so the refusal is about the bad entry), then `entries`."""
    out = workdir / f"{name}-{version}-{uuid.uuid4().hex[:6]}.tar.gz"
    head = [Entry("bin/", type=tarfile.DIRTYPE, mode=0o755)]
    if with_manifest:
        head = [
            Entry("capsule.yaml", manifest(name, version, publisher)),
            *head,
            Entry(ENTRYPOINT, b"#!/bin/sh\n", mode=0o755),
        ]
    with (
        gzip.GzipFile(out, "wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tar_format) as tar,
    ):
        for entry in [*head, *entries]:
            tar.addfile(entry.info(), io.BytesIO(entry.data) if entry.data else None)
    return Built(out, name, version)


def zero_bomb(workdir: Path, name: str, version: str, publisher: str, size: int) -> Built:
    """`size` bytes of zeros in one entry: gzip shrinks them about 1000:1, far beyond any sane
    compression ratio. Streamed into the archive so building it needs no memory."""
    out = workdir / f"{name}-{version}-bomb.tar.gz"
    with (
        gzip.GzipFile(out, "wb", mtime=0, compresslevel=9) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for entry in (
            Entry("capsule.yaml", manifest(name, version, publisher)),
            Entry(ENTRYPOINT, b"#!/bin/sh\n", mode=0o755),
        ):
            tar.addfile(entry.info(), io.BytesIO(entry.data))
        info = tarfile.TarInfo("zeros.bin")
        info.size = size
        tar.addfile(info, _Zeros(size))
    return Built(out, name, version)


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


# -- signing ---------------------------------------------------------------------------------------


@dataclass
class Signer:
    """A publisher's key pair (what `soma capsule keygen` writes), signing like `cosign
    sign-blob --key`."""

    private_key: Any
    public_pem: str

    @classmethod
    def new(cls) -> Signer:
        private_pem, public_pem = signing.generate_keypair(None)
        return cls(signing.load_private_key(private_pem, None), public_pem.decode())

    def sign(self, built: Built) -> str:
        return signing.sign_file(built.path, self.private_key)

    def bundle(self, built: Built) -> str:
        digest = signing.file_sha256(built.path)
        public = signing.load_public_key(self.public_pem)
        return signing.make_bundle(
            signing.sign_digest(self.private_key, digest), digest, signing.key_hint(public)
        )

    @property
    def fingerprint(self) -> str:
        return signing.fingerprint(signing.load_public_key(self.public_pem))


# -- calls -----------------------------------------------------------------------------------------


def stub(channel: grpc.aio.Channel) -> capsule_pb2_grpc.CapsuleServiceStub:
    return capsule_pb2_grpc.CapsuleServiceStub(channel)


def metadata_for(
    built: Built,
    signature: str | None = None,
    *,
    bundle: str | None = None,
    visibility: int = pb.CAPSULE_VISIBILITY_UNSPECIFIED,
    **overrides: Any,
) -> c.PublishCapsuleMetadata:
    meta = c.PublishCapsuleMetadata(
        capsule=built.capsule,
        version=built.version,
        size_bytes=built.size,
        digest=built.digest,
        visibility=visibility,  # type: ignore[arg-type]
    )
    if signature is not None:
        meta.cosign_signature = signature
    if bundle is not None:
        meta.sigstore_bundle = bundle
    for key, value in overrides.items():
        setattr(meta, key, value)
    return meta


def upload(
    meta: c.PublishCapsuleMetadata | None, data: bytes, chunk: int = CHUNK
) -> Iterator[c.PublishCapsuleRequest]:
    """The upload stream: metadata first, then the bytes in order, `chunk` at a time."""
    if meta is not None:
        yield c.PublishCapsuleRequest(metadata=meta)
    for start in range(0, len(data), chunk):
        yield c.PublishCapsuleRequest(chunk=data[start : start + chunk])


def file_upload(
    meta: c.PublishCapsuleMetadata, path: Path, chunk: int = CHUNK
) -> Iterator[c.PublishCapsuleRequest]:
    """As `upload`, reading the file as it goes (the way the SDK streams a large archive)."""
    yield c.PublishCapsuleRequest(metadata=meta)
    with path.open("rb") as f:
        while block := f.read(chunk):
            yield c.PublishCapsuleRequest(chunk=block)


async def publish(
    capsules: capsule_pb2_grpc.CapsuleServiceStub,
    built: Built,
    signer: Signer,
    *,
    visibility: int = pb.CAPSULE_VISIBILITY_UNSPECIFIED,
    seconds: float = 60,
    **overrides: Any,
) -> pb.CapsuleVersion:
    meta = metadata_for(built, signer.sign(built), visibility=visibility, **overrides)
    return await capsules.PublishCapsule(file_upload(meta, built.path), timeout=seconds)


@dataclass
class Install:
    """What one InstallCapsule call streamed, and how it ended."""

    progress: list[c.InstallProgress] = field(default_factory=list)
    error: grpc.aio.AioRpcError | None = None

    @property
    def code(self) -> grpc.StatusCode:
        return self.error.code() if self.error is not None else grpc.StatusCode.OK

    @property
    def phases(self) -> list[int]:
        return [p.phase for p in self.progress]

    @property
    def last(self) -> c.InstallProgress:
        assert self.progress, f"no progress at all; ended {self.code.name}: {self.details}"
        return self.progress[-1]

    @property
    def result(self) -> pb.Installation:
        return self.last.result

    @property
    def details(self) -> str:
        return (self.error.details() or "") if self.error is not None else ""

    def describe(self) -> str:
        phases = [pb.InstallPhase.Name(p) for p in self.phases]
        return f"phases {phases}, ended {self.code.name}: {self.details}"

    def check_completed(self, *, awaited_approval: bool) -> None:
        """Asserts the stream ended OK after every phase in order, from QUEUED through
        VERIFYING_SIGNATURE, EXTRACTING and ACTIVATING to DONE (and through AWAITING_APPROVAL
        exactly when `awaited_approval`), its percent never going down and ending at 100."""
        assert self.code == grpc.StatusCode.OK, self.describe()
        phases = self.phases
        assert phases == sorted(phases), self.describe()
        assert phases[0] == pb.INSTALL_PHASE_QUEUED and phases[-1] == pb.INSTALL_PHASE_DONE
        for phase in (
            pb.INSTALL_PHASE_VERIFYING_SIGNATURE,
            pb.INSTALL_PHASE_EXTRACTING,
            pb.INSTALL_PHASE_ACTIVATING,
        ):
            assert phase in phases, self.describe()
        assert (pb.INSTALL_PHASE_AWAITING_APPROVAL in phases) == awaited_approval, self.describe()
        percents = [p.percent for p in self.progress]
        assert percents == sorted(percents) and percents[-1] == 100, percents


def install_request(name: str, version: str = "", request_id: str = "") -> c.InstallCapsuleRequest:
    return c.InstallCapsuleRequest(
        name=name if name.startswith("capsules/") else f"capsules/{name}",
        version=version,
        request_id=request_id,
    )


async def install(
    capsules: capsule_pb2_grpc.CapsuleServiceStub,
    name: str,
    version: str = "",
    *,
    request_id: str = "",
    seconds: float = 90,
) -> Install:
    """Runs InstallCapsule to its end and returns everything it streamed."""
    return await Running(capsules, name, version, request_id=request_id, seconds=seconds).finish()


def error_reason(error: grpc.aio.AioRpcError | status_pb2.Status) -> str:
    """The ErrorInfo reason of a failed call or of a google.rpc.Status (e.g. Installation.error)."""
    if isinstance(error, status_pb2.Status):
        status = error
    else:
        raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
        if not isinstance(raw, bytes):
            return ""
        status = status_pb2.Status.FromString(raw)
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


async def fails(call: Any, code: grpc.StatusCode, text: str = "") -> grpc.aio.AioRpcError:
    """Awaits `call` (a unary call or a coroutine) and asserts it failed with `code`."""
    try:
        got = await call
    except grpc.aio.AioRpcError as error:
        assert error.code() == code, (
            f"expected {code.name}, got {error.code().name}: {error.details()}"
        )
        assert text.lower() in (error.details() or "").lower(), error.details()
        return error
    raise AssertionError(f"expected {code.name}, the call succeeded: {got}")


async def register_key(
    capsules: capsule_pb2_grpc.CapsuleServiceStub, signer: Signer, display_name: str = "ci"
) -> pb.PublisherKey:
    return await capsules.RegisterPublisherKey(
        c.RegisterPublisherKeyRequest(
            publisher_key=pb.PublisherKey(
                display_name=display_name, public_key_pem=signer.public_pem
            )
        ),
        timeout=15,
    )


# -- REST ------------------------------------------------------------------------------------------


def rest(mesh: MeshRunner, secret: str, method: str, path: str, body: Any = None, **kw: Any) -> Any:
    return http_request(
        mesh.port, method, path, body, headers={"x-api-key": secret}, timeout=kw.pop("timeout", 60)
    )


def rest_publish_body(built: Built, signature: str, **metadata: Any) -> list[dict[str, Any]]:
    """PublishCapsule over REST: a JSON array of request messages; here one message carries the
    metadata and the whole archive (base64)."""
    return [
        {
            "metadata": {
                "capsule": built.capsule,
                "version": built.version,
                "size_bytes": str(built.size),
                "digest": built.digest,
                "cosign_signature": signature,
                **metadata,
            },
            "chunk": base64.b64encode(built.data).decode(),
        }
    ]


def ndjson(body: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in body.decode().splitlines() if line.strip()]


# -- the disk --------------------------------------------------------------------------------------


def capsule_dir(mesh: MeshRunner) -> Path:
    """SOMA_CAPSULE_DIR of the mesh's replicas (its default: `<data dir>/capsules`)."""
    return mesh.data_dir / "capsules"


def tenant_root(mesh: MeshRunner, tenant: str) -> Path:
    """Where a tenant's installs live; Installation.path is relative to it."""
    return capsule_dir(mesh) / "tenants" / tenant


def blob_path(mesh: MeshRunner, digest: str) -> Path:
    algorithm, _, hexdigest = digest.partition(":")
    return capsule_dir(mesh) / "blobs" / algorithm / hexdigest


def leaked(mesh: MeshRunner, marker: str) -> list[Path]:
    """Files named after `marker` at the escape targets or anywhere in the mesh's directory."""
    targets = [Path("/tmp") / marker, Path("/etc") / marker]
    return [p for p in targets if p.exists()] + files_named(mesh.data_dir.parent, marker)


def files_named(root: Path, fragment: str) -> list[Path]:
    """Every path under `root` whose name contains `fragment` (links included, not followed)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for n in [*dirnames, *filenames]:
            if fragment in n:
                found.append(Path(dirpath) / n)
    return found


def channel_for(mesh: MeshRunner, secret: str) -> grpc.aio.Channel:
    return authed_channel(mesh.grpc_target, secret)


# -- a publishing tenant ---------------------------------------------------------------------------


@dataclass
class Tenant:
    """A tenant of its own with an admin key, a registered publisher key and a work dir."""

    mesh: MeshRunner
    id: str
    admin: str
    channel: grpc.aio.Channel
    signer: Signer
    key: pb.PublisherKey
    work: Path

    @property
    def cap(self) -> capsule_pb2_grpc.CapsuleServiceStub:
        return stub(self.channel)

    def build(self, name: str, version: str = "1.0.0", **kw: Any) -> Built:
        return build(self.work, name, version, publisher=self.id, **kw)

    async def publish(
        self,
        name: str,
        version: str = "1.0.0",
        *,
        visibility: int = pb.CAPSULE_VISIBILITY_UNSPECIFIED,
        signer: Signer | None = None,
        **kw: Any,
    ) -> tuple[Built, pb.CapsuleVersion]:
        built = self.build(name, version, **kw)
        published = await publish(self.cap, built, signer or self.signer, visibility=visibility)
        return built, published

    def key_for(self, *roles: str) -> str:
        return make_key(self.mesh, self.id, *roles)


@asynccontextmanager
async def open_tenant(mesh: MeshRunner, prefix: str, work: Path) -> AsyncIterator[Tenant]:
    """A new tenant named after `prefix`, working in `work`; its admin channel closes on exit."""
    tenant = unique(prefix)
    admin = make_key(mesh, tenant, "admin")
    channel = channel_for(mesh, admin)
    try:
        signer = Signer.new()
        key = await register_key(stub(channel), signer, "release")
        yield Tenant(mesh, tenant, admin, channel, signer, key, work)
    finally:
        await channel.close()


def tenant_fixture(prefix: str) -> Any:
    """A module-scoped fixture: a new tenant of the session mesh named after `prefix`
    (open_tenant). The fixture's name is the module attribute it is assigned to:
    `acme = tenant_fixture("reg-acme")`."""

    @pytest.fixture(scope="module")
    async def fixture(
        mesh: MeshRunner, tmp_path_factory: pytest.TempPathFactory
    ) -> AsyncIterator[Tenant]:
        async with open_tenant(mesh, prefix, tmp_path_factory.mktemp(prefix)) as tenant:
            yield tenant

    return fixture


# -- audit -----------------------------------------------------------------------------------------

CAPSULE_SERVICE = "/soma.capsule.v1.CapsuleService/"


async def audit_events(
    mesh: MeshRunner,
    secret: str,
    until: Any,
    *,
    method: str = CAPSULE_SERVICE,
    resource: str = "",
    within: float = 30.0,
) -> list[Any]:
    """The caller's tenant's audit events of `method` (a prefix ending in `/` or a full method),
    newest first, once `until(events)` holds (ingest is asynchronous) or `within` has passed."""
    deadline = time.monotonic() + within
    async with channel_for(mesh, secret) as channel:
        audit = audit_pb2_grpc.AuditServiceStub(channel)
        while True:
            events: list[Any] = []
            token = ""
            while True:
                page = await audit.ListAuditEvents(
                    audit_pb2.ListAuditEventsRequest(
                        page_size=500,
                        page_token=token,
                        filter=audit_pb2.AuditEventFilter(method=method, resource=resource),
                    ),
                    timeout=15,
                )
                events.extend(page.audit_events)
                token = page.next_page_token
                if not token:
                    break
            if until(events) or time.monotonic() > deadline:
                return events
            await asyncio.sleep(0.5)


def methods_of(events: Iterable[Any]) -> set[str]:
    return {e.method.rsplit("/", 1)[-1] for e in events}


class Running:
    """An InstallCapsule stream read step by step (e.g. up to AWAITING_APPROVAL, then on)."""

    def __init__(
        self,
        capsules: capsule_pb2_grpc.CapsuleServiceStub,
        name: str,
        version: str = "",
        *,
        request_id: str = "",
        seconds: float = 110,
    ) -> None:
        self.call = capsules.InstallCapsule(
            install_request(name, version, request_id), timeout=seconds
        )
        self.run = Install()

    async def next(self) -> c.InstallProgress | None:
        """The next report, or None once the stream ended (its status then in `run.error`)."""
        if self.run.error is not None:
            return None
        try:
            progress = await self.call.read()
        except grpc.aio.AioRpcError as error:
            self.run.error = error
            return None
        if progress is grpc.aio.EOF:
            return None
        self.run.progress.append(progress)
        return progress

    async def until(self, phase: int) -> c.InstallProgress:
        while (progress := await self.next()) is not None:
            if progress.phase == phase:
                return progress
        raise AssertionError(f"ended before {pb.InstallPhase.Name(phase)}: {self.run.describe()}")

    async def finish(self) -> Install:
        while await self.next() is not None:
            pass
        return self.run

    def cancel(self) -> None:
        self.call.cancel()
