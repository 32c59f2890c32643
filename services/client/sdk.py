"""A small typed async client for Soma Mesh.

    async with SomaClient("127.0.0.1:8080", api_key=os.environ["SOMA_API_KEY"]) as soma:
        key = await soma.keys.GetApiKey(keys_pb2.GetApiKeyRequest(name="keys/abc..."))
        async for key in soma.iter_api_keys():
            ...

Every call carries the credential (`authorization: Bearer <token or API key>`), unary calls get
a 10 s deadline unless the call passes `timeout=`, and unary Get*/List* calls are retried on
UNAVAILABLE with backoff (see `_retry`). The four stubs are the generated ones, unchanged.
Create the client inside a running event loop (grpc.aio binds the channel to it).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType

import grpc
from google.protobuf import duration_pb2

from services.client._interceptors import interceptors
from services.client._retry import RetryPolicy, service_config
from soma.audit.v1 import audit_pb2, audit_pb2_grpc
from soma.capsule.v1 import capsule_pb2, capsule_pb2_grpc
from soma.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from soma.keys.v1 import keys_pb2, keys_pb2_grpc, resources_pb2

DEFAULT_TARGET = "127.0.0.1:8080"
DEFAULT_TIMEOUT = 10.0

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
        token = ""
        while True:
            page = await self.keys.ListApiKeys(
                keys_pb2.ListApiKeysRequest(
                    page_size=page_size, page_token=token, state=state, owner=owner
                )
            )
            for key in page.api_keys:
                yield key
            token = page.next_page_token
            if not token:
                return

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
