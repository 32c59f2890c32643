"""A small typed async client for Soma Mesh.

    async with SomaClient("127.0.0.1:8080", api_key=os.environ["SOMA_API_KEY"]) as soma:
        key = await soma.keys.GetApiKey(keys_pb2.GetApiKeyRequest(name="keys/abc..."))
        async for key in soma.iter_api_keys():
            ...
        version = await soma.publish_capsule("hello-1.2.0.tar.gz", signature=sig_b64)
        async for progress in soma.install_capsule("hello"):
            print(progress.phase, progress.percent)

Every call carries the credential (`authorization: Bearer <token or API key>`), unary calls get
a 10 s deadline unless the call passes `timeout=`, and unary Get*/List* calls are retried on
UNAVAILABLE with backoff (see `_retry`). The four stubs are the generated ones, unchanged.
Create the client inside a running event loop (grpc.aio binds the channel to it).
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import duration_pb2

from services.client._interceptors import interceptors
from services.client._retry import RetryPolicy, service_config
from soma.audit.v1 import audit_pb2, audit_pb2_grpc
from soma.capsule.v1 import capsule_pb2, capsule_pb2_grpc
from soma.capsule.v1 import resources_pb2 as capsule_resources
from soma.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from soma.keys.v1 import keys_pb2, keys_pb2_grpc, resources_pb2

DEFAULT_TARGET = "127.0.0.1:8080"
DEFAULT_TIMEOUT = 10.0
PUBLISH_CHUNK_BYTES = 1 << 20  # the contract's largest chunk per PublishCapsule message
# Re-attaching to a running install after the stream broke (UNAVAILABLE: a replica or Envoy
# restarted): attempts after the first, and the first backoff (doubled each time, capped).
INSTALL_REATTACH_ATTEMPTS = 5
INSTALL_REATTACH_BACKOFF = 0.5
_FINAL_PHASES = (capsule_resources.INSTALL_PHASE_DONE, capsule_resources.INSTALL_PHASE_FAILED)

UploadProgress = Callable[[int, int], None]  # bytes sent, bytes total

SERVICE_DESCRIPTORS = (
    gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"],
    keys_pb2.DESCRIPTOR.services_by_name["KeysService"],
    audit_pb2.DESCRIPTOR.services_by_name["AuditService"],
    capsule_pb2.DESCRIPTOR.services_by_name["CapsuleService"],
)


@dataclass(frozen=True)
class ClientConfig:
    target: str = DEFAULT_TARGET
    api_key: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)  # a JWT from IssueToken; wins over api_key
    timeout: float | None = DEFAULT_TIMEOUT  # default deadline of unary calls; None = none
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClientConfig:
        """SOMA_TARGET, SOMA_API_KEY, SOMA_TOKEN."""
        env = os.environ if env is None else env
        return cls(
            target=env.get("SOMA_TARGET") or DEFAULT_TARGET,
            api_key=env.get("SOMA_API_KEY") or None,
            token=env.get("SOMA_TOKEN") or None,
        )

    def auth_metadata(self) -> list[tuple[str, str]]:
        credential = self.token or self.api_key
        return [("authorization", f"Bearer {credential}")] if credential else []

    @property
    def secrets(self) -> tuple[str, ...]:
        """What error messages must never show."""
        return tuple(s for s in (self.api_key, self.token) if s)


class SomaClient:
    """The four service stubs on one channel, with credentials, deadlines and read retries."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        api_key: str | None = None,
        token: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,  # TLS; None = plaintext (h2c)
        options: Sequence[tuple[str, str | int]] = (),
    ) -> None:
        self.config = ClientConfig(target, api_key, token, timeout, retry or RetryPolicy())
        channel_options: list[tuple[str, str | int]] = [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", service_config(SERVICE_DESCRIPTORS, self.config.retry)),
            *options,
        ]
        chain = interceptors(self.config.auth_metadata(), timeout)
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(
                target, options=channel_options, interceptors=chain
            )
        else:
            self.channel = grpc.aio.secure_channel(
                target, credentials, options=channel_options, interceptors=chain
            )
        self.gateway = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        self.keys = keys_pb2_grpc.KeysServiceStub(self.channel)
        self.audit = audit_pb2_grpc.AuditServiceStub(self.channel)
        self.capsule = capsule_pb2_grpc.CapsuleServiceStub(self.channel)

    @classmethod
    def from_config(cls, config: ClientConfig) -> SomaClient:
        return cls(
            config.target,
            api_key=config.api_key,
            token=config.token,
            timeout=config.timeout,
            retry=config.retry,
        )

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> SomaClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- conveniences over the raw stubs ------------------------------------------------------

    async def iter_api_keys(
        self,
        *,
        state: resources_pb2.ApiKeyState = resources_pb2.API_KEY_STATE_UNSPECIFIED,
        owner: str = "",
        page_size: int = 0,
    ) -> AsyncIterator[resources_pb2.ApiKey]:
        """Every key visible to the caller, following page tokens."""
        request = keys_pb2.ListApiKeysRequest(page_size=page_size, state=state, owner=owner)
        async for key in _pages(self.keys.ListApiKeys, request, "api_keys"):
            yield key

    async def issue_token(
        self,
        *,
        ttl: timedelta | None = None,
        scopes: Sequence[str] = (),
        audience: str = "",
    ) -> keys_pb2.IssueTokenResponse:
        """Exchange the client's API key (or the header credential) for a short-lived JWT."""
        request = keys_pb2.IssueTokenRequest(
            api_key=self.config.api_key or "", audience=audience, scopes=list(scopes)
        )
        if ttl is not None:
            request.ttl.CopyFrom(duration_pb2.Duration(seconds=int(ttl.total_seconds())))
        return await self.keys.IssueToken(request)

    # -- capsules -----------------------------------------------------------------------------

    def iter_capsules(
        self, request: capsule_pb2.ListCapsulesRequest | None = None
    ) -> AsyncIterator[capsule_resources.Capsule]:
        """Every capsule matching the request's query, filters and order, following pages."""
        request = request or capsule_pb2.ListCapsulesRequest()
        return _pages(self.capsule.ListCapsules, request, "capsules")

    def iter_capsule_versions(
        self, capsule: str
    ) -> AsyncIterator[capsule_resources.CapsuleVersion]:
        """A capsule's versions (`capsules/{capsule}`), highest first, yanked ones included."""
        request = capsule_pb2.ListCapsuleVersionsRequest(parent=capsule)
        return _pages(self.capsule.ListCapsuleVersions, request, "capsule_versions")

    def iter_publisher_keys(
        self,
        state: capsule_resources.PublisherKeyState = (
            capsule_resources.PUBLISHER_KEY_STATE_UNSPECIFIED
        ),
    ) -> AsyncIterator[capsule_resources.PublisherKey]:
        request = capsule_pb2.ListPublisherKeysRequest(state=state)
        return _pages(self.capsule.ListPublisherKeys, request, "publisher_keys")

    def iter_installations(
        self, request: capsule_pb2.ListInstallationsRequest | None = None
    ) -> AsyncIterator[capsule_resources.Installation]:
        """The tenant's install history, newest first."""
        request = request or capsule_pb2.ListInstallationsRequest()
        return _pages(self.capsule.ListInstallations, request, "installations")

    def iter_approvals(
        self, request: capsule_pb2.ListApprovalsRequest | None = None
    ) -> AsyncIterator[capsule_resources.Approval]:
        request = request or capsule_pb2.ListApprovalsRequest()
        return _pages(self.capsule.ListApprovals, request, "approvals")

    async def publish_capsule(
        self,
        path: str | os.PathLike[str],
        *,
        signature: str = "",
        sigstore_bundle: str = "",
        capsule: str = "",
        version: str = "",
        visibility: capsule_resources.CapsuleVisibility = (
            capsule_resources.CAPSULE_VISIBILITY_UNSPECIFIED
        ),
        publisher_key: str = "",
        request_id: str = "",
        on_progress: UploadProgress | None = None,
    ) -> capsule_resources.CapsuleVersion:
        """Uploads a capsule archive: metadata first, then the file in 1 MiB chunks.

        `signature` is a cosign signature (base64 DER), `sigstore_bundle` a bundle's JSON; give
        one. `capsule` (`capsules/{name}` or the bare name) and `version` default to the
        archive's manifest, which is read (and the archive checked) locally first so that an
        unpublishable file fails before any upload, with the `InvalidArgument` (from
        services.common.errors) the registry would answer. The file is streamed, never held
        whole.
        """
        if signature and sigstore_bundle:
            raise ValueError("give signature or sigstore_bundle, not both")
        archive_path = Path(path)
        size, digest, manifest = await asyncio.to_thread(
            _describe_archive, archive_path, need_manifest=not (capsule and version)
        )
        if manifest is not None:
            capsule = capsule or manifest.name
            version = version or manifest.version
        metadata = capsule_pb2.PublishCapsuleMetadata(
            capsule=capsule if capsule.startswith("capsules/") else f"capsules/{capsule}",
            version=version,
            size_bytes=size,
            digest=digest,
            publisher_key=publisher_key,
            visibility=visibility,
            request_id=request_id,
        )
        if signature:
            metadata.cosign_signature = signature
        elif sigstore_bundle:
            metadata.sigstore_bundle = sigstore_bundle
        requests = _upload(archive_path, metadata, size, on_progress)
        # No default deadline (it is a stream): wrap the call in asyncio.timeout() to bound it.
        result: capsule_resources.CapsuleVersion = await self.capsule.PublishCapsule(requests)
        return result

    async def install_capsule(
        self,
        capsule: str,
        version: str = "",
        *,
        request_id: str = "",
        reattach: bool = True,
    ) -> AsyncIterator[capsule_pb2.InstallProgress]:
        """Installs a capsule and yields its progress until DONE or FAILED.

        The install runs on the server. If the stream breaks with UNAVAILABLE before the end
        (a replica or Envoy restarted), the call is repeated with the same `request_id` (one is
        made up when none is given), which attaches to the same install and replays its latest
        progress; `reattach=False` turns that off. A FAILED install ends with the call's error
        (`grpc.aio.AioRpcError`, e.g. FAILED_PRECONDITION for a rejected approval) after the
        FAILED message has been yielded.
        """
        request = capsule_pb2.InstallCapsuleRequest(
            name=capsule if capsule.startswith("capsules/") else f"capsules/{capsule}",
            version=version,
            request_id=request_id or str(uuid.uuid4()),
        )
        attempts = INSTALL_REATTACH_ATTEMPTS if reattach else 0
        delay = INSTALL_REATTACH_BACKOFF
        finished = False
        while True:
            call = self.capsule.InstallCapsule(request)
            try:
                async for progress in call:
                    finished = finished or progress.phase in _FINAL_PHASES
                    yield progress
                return
            except grpc.aio.AioRpcError as exc:
                if finished or attempts <= 0 or exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                attempts -= 1
            finally:
                call.cancel()  # a consumer that stops early must not leave the call open
            await asyncio.sleep(delay)
            delay = min(delay * 2, 8.0)


async def _pages(
    call: Callable[[Any], Awaitable[Any]], request: Any, items: str
) -> AsyncIterator[Any]:
    """Every item of a List* call, following `next_page_token` (the request is not kept)."""
    request = _copy(request)  # page tokens are written into the copy, not the caller's
    while True:
        page = await call(request)
        for item in getattr(page, items):
            yield item
        if not page.next_page_token:
            return
        request.page_token = page.next_page_token


def _copy(message: Any) -> Any:
    clone = type(message)()
    clone.CopyFrom(message)
    return clone


def _describe_archive(path: Path, *, need_manifest: bool) -> tuple[int, str, Any]:
    """Size, `sha256:<hex>` digest and (if asked) manifest of an archive, each streamed."""
    from services.capsule import signing  # the client's only use of it: the streamed SHA-256

    size = path.stat().st_size
    manifest = read_archive_manifest(path) if need_manifest else None
    return size, f"sha256:{signing.file_sha256(path).hex()}", manifest


def read_archive_manifest(path: Path) -> Any:
    """The archive's manifest (`services.capsule.manifest.Manifest`), read by a streamed scan
    with every safety check but without the size limits, which are the server's to apply."""
    from services.capsule import archive  # imported here: only publishing needs it

    unbounded = archive.Limits(
        max_entries=sys.maxsize, max_unpacked_bytes=sys.maxsize, max_ratio=math.inf
    )
    return archive.inspect(path, unbounded).manifest


async def _upload(
    path: Path,
    metadata: capsule_pb2.PublishCapsuleMetadata,
    size: int,
    on_progress: UploadProgress | None,
) -> AsyncIterator[capsule_pb2.PublishCapsuleRequest]:
    yield capsule_pb2.PublishCapsuleRequest(metadata=metadata)
    sent = 0
    with path.open("rb") as handle:
        while chunk := await asyncio.to_thread(handle.read, PUBLISH_CHUNK_BYTES):
            sent += len(chunk)
            yield capsule_pb2.PublishCapsuleRequest(chunk=chunk)
            if on_progress is not None:
                on_progress(sent, size)
