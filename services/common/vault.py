"""OpenBao (Vault API) access shared by the services: the API key pepper and the JWT public keys.

hvac is blocking: the `*_async` variants run it in a thread. Every call retries for a short
while when OpenBao is not up yet (connection refused, sealed, no raft leader): the mesh starts
the services in parallel with OpenBao's unseal.

Calls made while serving requests go through `call`: the OpenBao circuit breaker, a wait
bounded by the call's budget (services.common.dependency; retries included) and a thread
pool of their own, so that a hung OpenBao cannot occupy the default executor that the audit
outbox and other blocking work share.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import json
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import hvac
import requests
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from hvac import exceptions as hvac_errors
from jwt.algorithms import ECAlgorithm

from services.common.breaker import openbao_failure
from services.common.config import VaultConfig
from services.common.dependency import REASON, Dependency
from services.common.errors import Unavailable

log = logging.getLogger(__name__)

KV_MOUNT = "secret"
PEPPER_PATH = "soma/apikey-pepper"
PEPPER_FIELD = "pepper"
TRANSIT_MOUNT = "transit"
JWT_KEY_NAME = "soma-jwt"
RETRY_SECONDS = 10.0

T = TypeVar("T")

# Worth retrying: OpenBao starting, sealed, or electing a leader.
_TRANSIENT: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    hvac_errors.VaultDown,
    hvac_errors.VaultNotInitialized,
    hvac_errors.InternalServerError,
    hvac_errors.BadGateway,
)


class VaultUnavailable(Unavailable):
    """OpenBao did not answer usefully within the retry window (UNAVAILABLE to a caller)."""

    default_reason = REASON

    def __init__(
        self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata or {"dependency": "openbao"})


OPENBAO = Dependency("openbao", "OpenBao", openbao_failure, error=VaultUnavailable)
# hvac blocks a thread per call; a hung OpenBao holds each for up to the client timeout.
_EXECUTOR = ThreadPoolExecutor(max_workers=4, thread_name_prefix="openbao")


def client(vault: VaultConfig, timeout: float = 10.0) -> hvac.Client:
    """An hvac client; `timeout` bounds each HTTP connect and read (seconds)."""
    return hvac.Client(url=vault.addr, token=vault.token, timeout=timeout)


async def call(fn: Callable[[float], T], what: str) -> T:
    """Runs blocking `fn(budget_seconds)` for a request: refused at once while OpenBao's
    breaker is open, abandoned (UNAVAILABLE naming OpenBao) when the budget runs out. `fn`
    should bound its own retries and HTTP waits by the budget it is given, so that its
    thread is freed soon after."""
    async with OPENBAO.guard(what) as budget:
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()  # the trace and request id, in the thread too
        return await loop.run_in_executor(_EXECUTOR, context.run, fn, budget.seconds)


def with_retry(fn: Callable[[], T], what: str, seconds: float = RETRY_SECONDS) -> T:
    deadline = time.monotonic() + seconds
    delay = 0.1
    while True:
        try:
            return fn()
        except _TRANSIENT as error:
            if time.monotonic() + delay > deadline:
                raise VaultUnavailable(f"OpenBao unavailable ({what}): {error}") from error
            log.info("OpenBao not ready (%s): %s; retrying", what, type(error).__name__)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def _read_pepper(c: hvac.Client, path: str) -> bytes | None:
    try:
        secret = c.secrets.kv.v2.read_secret_version(
            path=path, mount_point=KV_MOUNT, raise_on_deleted_version=True
        )
    except hvac_errors.InvalidPath:
        return None
    pepper = base64.b64decode(secret["data"]["data"][PEPPER_FIELD])
    if len(pepper) < 32:
        raise ValueError(f"{KV_MOUNT}/{path} holds a pepper shorter than 32 bytes")
    return pepper


def load_pepper(vault: VaultConfig, path: str = PEPPER_PATH) -> bytes:
    """The API key pepper, created (32 random bytes, check-and-set 0) by whoever asks first."""
    c = client(vault)

    def attempt() -> bytes:
        existing = _read_pepper(c, path)
        if existing is not None:
            return existing
        fresh = base64.b64encode(secrets.token_bytes(32)).decode()
        try:
            c.secrets.kv.v2.create_or_update_secret(
                path=path, secret={PEPPER_FIELD: fresh}, cas=0, mount_point=KV_MOUNT
            )
            log.info("created the API key pepper at %s/%s", KV_MOUNT, path)
        except hvac_errors.InvalidRequest:
            pass  # cas=0 lost: another process created it between our read and write
        created = _read_pepper(c, path)
        if created is None:
            raise VaultUnavailable(f"{KV_MOUNT}/{path} vanished right after creation")
        return created

    return with_retry(attempt, "load pepper")


async def load_pepper_async(vault: VaultConfig, path: str = PEPPER_PATH) -> bytes:
    return await asyncio.to_thread(load_pepper, vault, path)


def kid_for(version: int | str, key_name: str = JWT_KEY_NAME) -> str:
    return f"{key_name}-v{version}"


def public_jwk(pem: str, kid: str) -> dict[str, Any]:
    """A PEM EC P-256 public key as a JWK with kid, alg ES256, use sig."""
    key = load_pem_public_key(pem.encode())
    jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(key))  # type: ignore[arg-type]
    jwk.update(kid=kid, alg="ES256", use="sig")
    return jwk


def transit_public_keys(
    vault: VaultConfig, key_name: str = JWT_KEY_NAME, seconds: float = RETRY_SECONDS
) -> dict[str, dict[str, Any]]:
    """kid -> JWK of every version of transit key `key_name` that can still verify, asking
    OpenBao for at most about `seconds`.

    Empty when the key does not exist yet (the Keys service creates it on start).
    """
    c = client(vault, timeout=min(seconds, 10.0))

    def attempt() -> dict[str, dict[str, Any]]:
        try:
            data = c.secrets.transit.read_key(name=key_name, mount_point=TRANSIT_MOUNT)["data"]
        except hvac_errors.InvalidPath:
            return {}
        minimum = int(data.get("min_decryption_version") or 1)
        keys: dict[str, dict[str, Any]] = {}
        for version, info in (data.get("keys") or {}).items():
            pem = info.get("public_key") if isinstance(info, dict) else None
            if int(version) >= minimum and pem:
                kid = kid_for(version, key_name)
                keys[kid] = public_jwk(pem, kid)
        return keys

    return with_retry(attempt, f"read transit key {key_name}", seconds)


async def transit_public_keys_async(
    vault: VaultConfig, key_name: str = JWT_KEY_NAME
) -> dict[str, dict[str, Any]]:
    return await call(
        lambda seconds: transit_public_keys(vault, key_name, seconds),
        f"read transit key {key_name}",
    )
