"""CapsuleService: the registry (publish, list, versions, yank, verify), publisher keys,
installs with streamed progress, and approvals.

Who may do what (on top of the policy, which decides which roles may call each method):

* Capsule names are global. The first tenant to publish a name owns it; only that tenant
  publishes and yanks its versions (another tenant publishing it: PERMISSION_DENIED, decided
  before any byte of the upload is accepted).
* A PRIVATE capsule is seen and installed by its tenant only: for anyone else every read, an
  install and a yank say NOT_FOUND, as for a capsule that does not exist.
* Publisher keys, installations and approvals belong to one tenant: another tenant's are
  NOT_FOUND, to read or to change (revoke, approve, reject), exactly like ones that do not
  exist. A capsule another tenant published PUBLIC is visible, so changing it (yank,
  publish) is PERMISSION_DENIED.
* Registering and revoking publisher keys needs a tenant admin; approving and rejecting an
  approver (or admin), never the requester of the install (nor another credential of the
  same owner).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import AsyncIterator

from grpc import aio

from services.capsule import archive, signing, trust
from services.capsule.blobs import BlobStore, check_digest, format_digest, hash_file
from services.capsule.installer import Installer, Requester
from services.capsule.manifest import NAME_RE, parse_semver
from services.capsule.settings import CapsuleSettings
from services.capsule.store import (
    PUBLIC,
    CapsuleStore,
    NewVersion,
    Row,
    approval_from_row,
    capsule_from_row,
    installation_from_row,
    key_from_row,
    key_not_found,
    order_of,
    owned_elsewhere,
    semver_sort_key,
    version_exists,
    version_from_row,
    version_name,
    version_not_found,
)
from services.common import paging
from services.common.audit.event import CallInfo, call_info
from services.common.audit.interceptor import annotate
from services.common.auth.principal import Principal, require_principal
from services.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from services.common.events import Bus
from services.common.logs import request_id_var
from services.common.names import check_request_id, parse_name
from soma.capsule.v1 import capsule_pb2, capsule_pb2_grpc
from soma.capsule.v1 import resources_pb2 as pb

log = logging.getLogger(__name__)

ADMINS = frozenset({"admin", "platform_admin"})
APPROVERS = frozenset({"approver", "admin", "platform_admin"})
MAX_QUERY = 200
MAX_DISPLAY_NAME = 200
MAX_REASON = 500
MAX_SIGNATURE_CHARS = 4096
PUBLISHED_SUBJECT = "capsule.published"
BINDINGS_CHANGED = "bindings.changed"


# -- names and arguments -------------------------------------------------------------------------


def parse_capsule(name: str, field: str) -> str:
    """The id in `capsules/{capsule}`."""
    if not name:
        raise InvalidArgument(f"{field} is required, e.g. capsules/hello", field=field)
    capsule = name.removeprefix("capsules/") if name.startswith("capsules/") else ""
    if len(capsule) < 2 or not NAME_RE.match(capsule):
        raise InvalidArgument(
            f"{field} {name[:100]!r} is not a capsule name; expected capsules/<name>, the name "
            "being 2 to 63 lowercase letters, digits and '-'",
            field=field,
        )
    return capsule


def check_version(version: str, field: str) -> str:
    parse_semver(version, field=field)
    return version


def parse_version_name(name: str, field: str) -> tuple[str, str]:
    """(capsule, version) of `capsules/{capsule}/versions/{version}`."""
    head, sep, version = name.partition("/versions/")
    if not name or not sep:
        raise InvalidArgument(
            f"{field} {name[:100]!r} is not a capsule version name; expected "
            "capsules/<name>/versions/<semantic version>, e.g. capsules/hello/versions/1.2.0",
            field=field,
        )
    return parse_capsule(head, field), check_version(version, field)


def check_text(value: str, limit: int, field: str) -> str:
    if len(value) > limit:
        raise InvalidArgument(f"{field} is at most {limit} characters", field=field)
    return value


def check_enum(value: int, enum: object, field: str) -> int:
    if value not in enum.values():  # type: ignore[attr-defined]
        raise InvalidArgument(
            f"{field} {value} is not a valid value; leave it unset for all", field=field
        )
    return value


def caller_owner(principal: Principal) -> str:
    return principal.owner or principal.subject


def require_role(principal: Principal, roles: frozenset[str], what: str, reason: str) -> None:
    if not principal.roles & roles:
        raise PermissionDenied(what, reason=reason)


def visible(row: Row | None, tenant: str) -> bool:
    return row is not None and (row["tenant"] == tenant or row["visibility"] == PUBLIC)


def capsule_not_found(capsule: str) -> NotFound:
    return NotFound(f"capsule capsules/{capsule} does not exist", reason="CAPSULE_NOT_FOUND")


def approval_not_found(approval_id: str) -> NotFound:
    return NotFound(f"approval approvals/{approval_id} does not exist", reason="APPROVAL_NOT_FOUND")


def context_call(context: aio.ServicerContext, request_id: str = "") -> CallInfo:
    current = request_id_var.get()
    return call_info(
        context.invocation_metadata() or (),
        context.peer(),
        request_id or ("" if current == "-" else current),
    )


def _signature_text(text: str) -> str:
    """A cosign signature: base64 of DER, whitespace and line breaks ignored."""
    compact = "".join(text.split())
    if len(compact) > MAX_SIGNATURE_CHARS:
        raise InvalidArgument(
            "metadata.cosign_signature is too long for an ECDSA P-256 signature",
            field="metadata.cosign_signature",
            reason="SIGNATURE_INVALID",
        )
    try:
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if not raw:
        raise InvalidArgument(
            "metadata.cosign_signature is not base64: pass the content of the .sig file "
            "`cosign sign-blob --key` or `soma capsule sign` wrote",
            field="metadata.cosign_signature",
            reason="SIGNATURE_INVALID",
        )
    return base64.b64encode(raw).decode()


class CapsuleServicer(capsule_pb2_grpc.CapsuleServiceServicer):
    def __init__(
        self,
        store: CapsuleStore,
        blobs: BlobStore,
        installer: Installer,
        settings: CapsuleSettings,
        bus: Bus,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.installer = installer
        self.settings = settings
        self.bus = bus

    async def _visible_capsule(self, capsule: str, tenant: str) -> Row:
        row = await self.store.get_capsule(capsule)
        if row is None or not visible(row, tenant):
            raise capsule_not_found(capsule)
        return row

    async def _visible_version(self, capsule: str, version: str, tenant: str) -> Row:
        await self._visible_capsule(capsule, tenant)
        row = await self.store.get_version(capsule, version)
        if row is None:
            raise version_not_found(capsule, version)
        return row

    async def _publish_event(self, subject: str, payload: dict[str, str]) -> None:
        try:
            await self.bus.nc.publish(subject, json.dumps(payload).encode())
        except Exception as error:  # an announcement; the registry is the record
            log.debug("could not publish %s: %s", subject, error)

    # -- capsules -----------------------------------------------------------------------------

    async def GetCapsule(
        self, request: capsule_pb2.GetCapsuleRequest, context: aio.ServicerContext
    ) -> pb.Capsule:
        principal = require_principal()
        capsule = parse_capsule(request.name, "name")
        return capsule_from_row(await self._visible_capsule(capsule, principal.tenant))

    async def ListCapsules(
        self, request: capsule_pb2.ListCapsulesRequest, context: aio.ServicerContext
    ) -> capsule_pb2.ListCapsulesResponse:
        principal = require_principal()
        limit = paging.page_size(request.page_size)
        query = check_text(request.query, MAX_QUERY, "query")
        publisher = check_text(request.publisher, 63, "publisher")
        permission = check_text(request.permission, 64, "permission")
        check_enum(request.order_by, capsule_pb2.CapsuleOrder, "order_by")
        order = order_of(request.order_by)
        fingerprint = {
            "method": "ListCapsules",
            "view": principal.tenant,  # what a tenant sees differs: its private capsules
            "query": query,
            "publisher": publisher,
            "verified": request.verified_only,
            "permission": permission,
            "order": order,
        }
        position = paging.decode_token(request.page_token, fingerprint)
        rows, last = await self.store.list_capsules(
            tenant=principal.tenant,
            query=query,
            publisher=publisher,
            verified_only=request.verified_only,
            permission=permission,
            order=order,
            after=position,
            limit=limit,
        )
        token = ""
        if last is not None:
            mark: dict[str, object] = {"n": last["name"]}
            if order == "installs":
                mark["c"] = last["install_count"]
            elif order == "updated":
                mark["t"] = last["update_time"].isoformat()
            token = paging.encode_token(mark, fingerprint)
        return capsule_pb2.ListCapsulesResponse(
            capsules=[capsule_from_row(r) for r in rows], next_page_token=token
        )

    async def GetCapsuleVersion(
        self, request: capsule_pb2.GetCapsuleVersionRequest, context: aio.ServicerContext
    ) -> pb.CapsuleVersion:
        principal = require_principal()
        capsule, version = parse_version_name(request.name, "name")
        return version_from_row(await self._visible_version(capsule, version, principal.tenant))

    async def ListCapsuleVersions(
        self, request: capsule_pb2.ListCapsuleVersionsRequest, context: aio.ServicerContext
    ) -> capsule_pb2.ListCapsuleVersionsResponse:
        principal = require_principal()
        capsule = parse_capsule(request.parent, "parent")
        limit = paging.page_size(request.page_size)
        await self._visible_capsule(capsule, principal.tenant)
        fingerprint = {"method": "ListCapsuleVersions", "capsule": capsule}
        position = paging.decode_token(request.page_token, fingerprint)
        rows, last = await self.store.list_versions(
            capsule, str(position["k"]) if position else None, limit
        )
        token = paging.encode_token({"k": last}, fingerprint) if last is not None else ""
        return capsule_pb2.ListCapsuleVersionsResponse(
            capsule_versions=[version_from_row(r) for r in rows], next_page_token=token
        )

    # -- publish ------------------------------------------------------------------------------

    async def PublishCapsule(
        self,
        request_iterator: AsyncIterator[capsule_pb2.PublishCapsuleRequest],
        context: aio.ServicerContext,
    ) -> pb.CapsuleVersion:
        principal = require_principal()
        require_role(
            principal,
            ADMINS,
            "publishing capsules needs the admin role in your tenant",
            "TENANT_ADMIN_REQUIRED",
        )
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("metadata"):
            raise InvalidArgument(
                "the first message of the upload must carry `metadata` (capsule, version, "
                "size_bytes, signature); the archive's bytes follow in `chunk`s",
                field="metadata",
            )
        meta = first.metadata
        capsule = parse_capsule(meta.capsule, "metadata.capsule")
        version = check_version(meta.version, "metadata.version")
        annotate(resource=version_name(capsule, version), size_bytes=meta.size_bytes)
        if meta.size_bytes <= 0:
            raise InvalidArgument(
                "metadata.size_bytes must be the archive's size in bytes (positive)",
                field="metadata.size_bytes",
            )
        if meta.size_bytes > self.settings.max_bytes:
            raise ResourceExhausted(
                f"the archive is {meta.size_bytes} bytes; this registry takes at most "
                f"{self.settings.max_bytes} bytes per capsule",
                reason="CAPSULE_TOO_LARGE",
            )
        expected_digest = check_digest(meta.digest, "metadata.digest") if meta.digest else ""
        kind = meta.WhichOneof("signature")
        if kind is None or not getattr(meta, kind).strip():
            raise InvalidArgument(
                "a signature is required: set metadata.cosign_signature (the base64 output of "
                "`cosign sign-blob --key` or `soma capsule sign`) or metadata.sigstore_bundle",
                field="metadata.signature",
                reason="SIGNATURE_MISSING",
            )
        bundle = None
        if kind == "sigstore_bundle":
            bundle = signing.parse_bundle(meta.sigstore_bundle)
            signature = bundle.signature_b64
        else:
            signature = _signature_text(meta.cosign_signature)
        key_id = (
            parse_name(meta.publisher_key, "publisherKeys", "metadata.publisher_key")
            if meta.publisher_key
            else None
        )
        check_enum(meta.visibility, pb.CapsuleVisibility, "metadata.visibility")
        request_id = check_request_id(meta.request_id)

        # Before any byte: ownership, repeats, a version that cannot be this upload.
        tenant = principal.tenant
        owner = await self.store.get_capsule(capsule)
        if owner is not None and owner["tenant"] != tenant:
            raise owned_elsewhere(capsule)
        first_use = await self.store.request_resource(tenant, request_id)
        if first_use is not None:
            if first_use != ("PublishCapsule", version_name(capsule, version)):
                raise InvalidArgument(
                    f"request_id {request_id} was already used for a different request; use "
                    "a new UUID for each distinct request",
                    field="metadata.request_id",
                )
            existing = await self.store.get_version(capsule, version)
            if existing is not None:
                return version_from_row(existing)
        existing = await self.store.get_version(capsule, version)
        if existing is not None and expected_digest and existing["digest"] != expected_digest:
            raise version_exists(capsule, version, existing["digest"])

        upload = self.blobs.new_upload(meta.size_bytes, self.settings.max_bytes)
        try:
            if first.chunk:
                await asyncio.to_thread(upload.write, first.chunk)
            async for message in request_iterator:
                if message.HasField("metadata"):
                    raise InvalidArgument(
                        "metadata may only be sent in the first message of the upload",
                        field="metadata",
                    )
                if message.chunk:
                    await asyncio.to_thread(upload.write, message.chunk)
            digest = await asyncio.to_thread(upload.finish)
            if upload.size != meta.size_bytes:
                raise InvalidArgument(
                    f"received {upload.size} bytes but metadata.size_bytes says "
                    f"{meta.size_bytes}: the upload was cut short or the size is wrong",
                    field="metadata.size_bytes",
                    reason="SIZE_MISMATCH",
                )
            if expected_digest and digest != expected_digest:
                raise InvalidArgument(
                    f"the archive received is {digest}, not metadata.digest {expected_digest}: "
                    "it changed on the way or the digest is of another file",
                    field="metadata.digest",
                    reason="DIGEST_MISMATCH",
                )
            raw = bytes.fromhex(digest.removeprefix("sha256:"))
            if bundle is not None:
                signing.check_bundle_digest(bundle, raw)
            # The signature first: bytes nobody vouches for are not even parsed.
            verdict = trust.check(
                await self.store.keys_of(tenant),
                tenant,
                raw,
                signature,
                key_id=key_id,
                hint=bundle.key_hint if bundle is not None else "",
            )
            if not verdict.verified:
                raise FailedPrecondition(
                    f"the signature of {version_name(capsule, version)} does not verify: "
                    f"{verdict.message}",
                    reason=verdict.reason,
                )
            assert verdict.key is not None
            info = await asyncio.to_thread(archive.inspect, upload.path, self.settings.limits)
            self._check_manifest(info, capsule, version, tenant)
            await asyncio.to_thread(upload.commit, digest)
        except BaseException:
            await asyncio.to_thread(upload.discard)
            raise
        row, created, new_capsule = await self.store.publish(
            NewVersion(
                capsule=capsule,
                version=version,
                sort_key=semver_sort_key(parse_semver(version)),
                tenant=tenant,
                digest=digest,
                size_bytes=upload.size,
                entry_count=info.entry_count,
                unpacked_bytes=info.unpacked_bytes,
                manifest=info.manifest.to_dict(),
                signature_format=pb.SIGNATURE_FORMAT_SIGSTORE_BUNDLE
                if bundle is not None
                else pb.SIGNATURE_FORMAT_COSIGN,
                signature=signature,
                publisher_key=str(verdict.key["id"]),
                key_fingerprint=verdict.key["fingerprint"],
                verify_result=verdict.result,
                uploader=principal.subject,
            ),
            meta.visibility,
            request_id,
        )
        annotate(digest=digest, created=created)
        if new_capsule:
            await self._publish_event(
                BINDINGS_CHANGED,
                {
                    "tenant": tenant,
                    "subject": f"tenant:{tenant}",
                    "relation": "owner",
                    "object": f"capsule:{capsule}",
                },
            )
        if created:
            log.info("published %s (%s) for tenant %s", row["version"], digest, tenant)
            await self._publish_event(
                PUBLISHED_SUBJECT,
                {"tenant": tenant, "capsule": capsule, "version": version, "digest": digest},
            )
        return version_from_row(row)

    @staticmethod
    def _check_manifest(info: archive.ArchiveInfo, capsule: str, version: str, tenant: str) -> None:
        manifest = info.manifest
        if manifest.name != capsule:
            raise InvalidArgument(
                f"capsule.yaml says name {manifest.name!r} but the upload is for "
                f"capsules/{capsule}; publish it as capsules/{manifest.name}",
                field="metadata.capsule",
                reason="MANIFEST_MISMATCH",
            )
        if manifest.version != version:
            raise InvalidArgument(
                f"capsule.yaml says version {manifest.version!r} but metadata.version is "
                f"{version!r}",
                field="metadata.version",
                reason="MANIFEST_MISMATCH",
            )
        if manifest.publisher != tenant:
            raise InvalidArgument(
                f"capsule.yaml says publisher {manifest.publisher!r} but you publish as tenant "
                f"{tenant!r}; the publisher is the publishing tenant's id",
                field="capsule.yaml: publisher",
                reason="MANIFEST_MISMATCH",
            )

    async def YankCapsuleVersion(
        self, request: capsule_pb2.YankCapsuleVersionRequest, context: aio.ServicerContext
    ) -> pb.CapsuleVersion:
        principal = require_principal()
        capsule, version = parse_version_name(request.name, "name")
        reason = check_text(request.reason, MAX_REASON, "reason")
        request_id = check_request_id(request.request_id)
        await self._visible_capsule(capsule, principal.tenant)
        row = await self.store.yank(principal.tenant, capsule, version, reason, request_id)
        return version_from_row(row)

    async def VerifyCapsuleVersion(
        self, request: capsule_pb2.VerifyCapsuleVersionRequest, context: aio.ServicerContext
    ) -> capsule_pb2.VerifyCapsuleVersionResponse:
        principal = require_principal()
        capsule, version = parse_version_name(request.name, "name")
        stored = await self._visible_version(capsule, version, principal.tenant)
        name = version_name(capsule, version)
        try:
            raw, _ = await asyncio.to_thread(hash_file, self.blobs.path(stored["digest"]))
            digest = format_digest(raw)
        except FileNotFoundError:
            raw, digest = b"", ""
        if digest != stored["digest"]:
            verdict = trust.Verdict(
                trust.DIGEST_MISMATCH,
                None,
                f"the stored archive is {digest or 'missing'}, not the recorded "
                f"{stored['digest']}: it was altered or lost on disk",
            )
        else:
            verdict = trust.check_published(await self.store.keys_of(stored["tenant"]), stored, raw)
        row = await self.store.record_verification(
            capsule, version, verdict.result, verdict.verified_key_id, verdict.key_fingerprint
        )
        version_pb = version_from_row(row)
        return capsule_pb2.VerifyCapsuleVersionResponse(
            name=name,
            verified=verdict.verified,
            result=verdict.result,  # type: ignore[arg-type]
            message=verdict.message,
            digest=digest,
            signature=version_pb.signature,
            verify_time=version_pb.signature.verify_time,
        )

    # -- publisher keys -----------------------------------------------------------------------

    async def RegisterPublisherKey(
        self, request: capsule_pb2.RegisterPublisherKeyRequest, context: aio.ServicerContext
    ) -> pb.PublisherKey:
        principal = require_principal()
        require_role(
            principal,
            ADMINS,
            "registering publisher keys needs the admin role in your tenant",
            "TENANT_ADMIN_REQUIRED",
        )
        if not request.HasField("publisher_key"):
            raise InvalidArgument(
                "publisher_key is required, with its public_key_pem", field="publisher_key"
            )
        spec = request.publisher_key
        if not spec.public_key_pem.strip():
            raise InvalidArgument(
                "publisher_key.public_key_pem is required: the PEM `PUBLIC KEY` (cosign.pub)",
                field="publisher_key.public_key_pem",
            )
        public_key = signing.load_public_key(spec.public_key_pem)
        row = await self.store.register_key(
            tenant=principal.tenant,
            display_name=check_text(
                spec.display_name, MAX_DISPLAY_NAME, "publisher_key.display_name"
            ),
            pem=signing.public_key_pem(public_key),
            fingerprint=signing.fingerprint(public_key),
            key_hint=signing.key_hint(public_key),
            creator=principal.subject,
            request_id=check_request_id(request.request_id),
        )
        return key_from_row(row)

    async def GetPublisherKey(
        self, request: capsule_pb2.GetPublisherKeyRequest, context: aio.ServicerContext
    ) -> pb.PublisherKey:
        principal = require_principal()
        key_id = parse_name(request.name, "publisherKeys", "name")
        row = await self.store.get_key(principal.tenant, key_id)
        if row is None:
            raise key_not_found(key_id)
        return key_from_row(row)

    async def ListPublisherKeys(
        self, request: capsule_pb2.ListPublisherKeysRequest, context: aio.ServicerContext
    ) -> capsule_pb2.ListPublisherKeysResponse:
        principal = require_principal()
        limit = paging.page_size(request.page_size)
        state = check_enum(request.state, pb.PublisherKeyState, "state")
        fingerprint = {"method": "ListPublisherKeys", "state": state}
        before = paging.decode_pos(request.page_token, fingerprint)
        rows, last = await self.store.list_keys(principal.tenant, state, before, limit)
        token = paging.encode_pos(last, fingerprint)
        return capsule_pb2.ListPublisherKeysResponse(
            publisher_keys=[key_from_row(r) for r in rows], next_page_token=token
        )

    async def RevokePublisherKey(
        self, request: capsule_pb2.RevokePublisherKeyRequest, context: aio.ServicerContext
    ) -> pb.PublisherKey:
        principal = require_principal()
        key_id = parse_name(request.name, "publisherKeys", "name")
        require_role(
            principal,
            ADMINS,
            "revoking publisher keys needs the admin role in your tenant",
            "TENANT_ADMIN_REQUIRED",
        )
        reason = check_text(request.reason, MAX_REASON, "reason")
        row, flipped = await self.store.revoke_key(
            principal.tenant, key_id, reason, check_request_id(request.request_id)
        )
        if flipped:
            log.info("revoked publisherKeys/%s: %d versions no longer verify", key_id, len(flipped))
            annotate(versions_unverified=len(flipped))
        return key_from_row(row)

    # -- installs -----------------------------------------------------------------------------

    async def InstallCapsule(
        self, request: capsule_pb2.InstallCapsuleRequest, context: aio.ServicerContext
    ) -> AsyncIterator[capsule_pb2.InstallProgress]:
        principal = require_principal()
        capsule = parse_capsule(request.name, "name")
        version = check_version(request.version, "version") if request.version else ""
        request_id = check_request_id(request.request_id)
        tenant = principal.tenant
        row = await self.store.installation_by_request(tenant, request_id)
        fresh = False
        if row is not None:
            if row["capsule"] != capsule or (version and row["version"] != version):
                raise InvalidArgument(
                    f"request_id {request_id} was already used to install "
                    f"{version_name(row['capsule'], row['version'])}; use a new UUID for "
                    "each distinct request",
                    field="request_id",
                )
        else:
            found = await self._visible_capsule(capsule, tenant)
            version = version or found["latest_version"]
            if not version:
                raise FailedPrecondition(
                    f"capsules/{capsule} has no version that can be installed: every version "
                    "is yanked",
                    reason="NO_INSTALLABLE_VERSION",
                )
            stored = await self._visible_version(capsule, version, tenant)
            if stored["yanked"]:
                raise FailedPrecondition(
                    f"{version_name(capsule, version)} is yanked "
                    f"({stored['yank_reason'] or 'no reason given'}); install another version",
                    reason="CAPSULE_VERSION_YANKED",
                )
            row, fresh = await self.installer.request(
                Requester(principal), found, stored, request_id, context_call(context, request_id)
            )
        annotate(
            resource=f"installations/{row['id']}",
            capsule=f"capsules/{capsule}",
            version=row["version"],
        )
        async for progress in self.installer.follow(row, from_start=fresh):
            yield progress

    async def UninstallCapsule(
        self, request: capsule_pb2.UninstallCapsuleRequest, context: aio.ServicerContext
    ) -> pb.Installation:
        principal = require_principal()
        capsule = parse_capsule(request.name, "name")
        request_id = check_request_id(request.request_id)

        async def remove(row: Row) -> None:
            await asyncio.to_thread(self.installer.remove_installed, row)

        row = await self.store.uninstall(
            principal.tenant, capsule, principal.subject, request_id, remove
        )
        annotate(resource=f"installations/{row['id']}", capsule=f"capsules/{capsule}")
        return installation_from_row(row)

    async def GetInstallation(
        self, request: capsule_pb2.GetInstallationRequest, context: aio.ServicerContext
    ) -> pb.Installation:
        principal = require_principal()
        installation_id = parse_name(request.name, "installations", "name")
        row = await self.store.get_installation(installation_id, principal.tenant)
        if row is None:
            raise NotFound(
                f"installation installations/{installation_id} does not exist",
                reason="INSTALLATION_NOT_FOUND",
            )
        return installation_from_row(row)

    async def ListInstallations(
        self, request: capsule_pb2.ListInstallationsRequest, context: aio.ServicerContext
    ) -> capsule_pb2.ListInstallationsResponse:
        principal = require_principal()
        limit = paging.page_size(request.page_size)
        capsule = parse_capsule(request.capsule, "capsule") if request.capsule else ""
        state = check_enum(request.state, pb.InstallationState, "state")
        requester = check_text(request.requester, 300, "requester")
        fingerprint = {
            "method": "ListInstallations",
            "capsule": capsule,
            "state": state,
            "requester": requester,
        }
        before = paging.decode_pos(request.page_token, fingerprint)
        rows, last = await self.store.list_installations(
            principal.tenant,
            capsule=capsule,
            state=state,
            requester=requester,
            before_pos=before,
            limit=limit,
        )
        token = paging.encode_pos(last, fingerprint)
        return capsule_pb2.ListInstallationsResponse(
            installations=[installation_from_row(r) for r in rows], next_page_token=token
        )

    # -- approvals ----------------------------------------------------------------------------

    async def GetApproval(
        self, request: capsule_pb2.GetApprovalRequest, context: aio.ServicerContext
    ) -> pb.Approval:
        principal = require_principal()
        approval_id = parse_name(request.name, "approvals", "name")
        await self.installer.maybe_expire()
        row = await self.store.get_approval(approval_id, principal.tenant)
        if row is None:
            raise approval_not_found(approval_id)
        return approval_from_row(row)

    async def ListApprovals(
        self, request: capsule_pb2.ListApprovalsRequest, context: aio.ServicerContext
    ) -> capsule_pb2.ListApprovalsResponse:
        principal = require_principal()
        limit = paging.page_size(request.page_size)
        state = check_enum(request.state, pb.ApprovalState, "state")
        capsule = parse_capsule(request.capsule, "capsule") if request.capsule else ""
        fingerprint = {"method": "ListApprovals", "state": state, "capsule": capsule}
        before = paging.decode_pos(request.page_token, fingerprint)
        await self.installer.maybe_expire()
        rows, last = await self.store.list_approvals(
            principal.tenant,
            state=state,
            capsule=capsule,
            before_pos=before,
            limit=limit,
        )
        token = paging.encode_pos(last, fingerprint)
        return capsule_pb2.ListApprovalsResponse(
            approvals=[approval_from_row(r) for r in rows], next_page_token=token
        )

    async def ApproveCapsule(
        self, request: capsule_pb2.ApproveCapsuleRequest, context: aio.ServicerContext
    ) -> pb.Approval:
        return await self._decide(
            request.name, request.comment, "comment", request.request_id, True, context
        )

    async def RejectCapsule(
        self, request: capsule_pb2.RejectCapsuleRequest, context: aio.ServicerContext
    ) -> pb.Approval:
        return await self._decide(
            request.name, request.reason, "reason", request.request_id, False, context
        )

    async def _decide(
        self,
        name: str,
        comment: str,
        comment_field: str,
        request_id: str,
        approve: bool,
        context: aio.ServicerContext,
    ) -> pb.Approval:
        principal = require_principal()
        approval_id = parse_name(name, "approvals", "name")
        comment = check_text(comment, MAX_REASON, comment_field)
        request_id = check_request_id(request_id)
        verb = "approve" if approve else "reject"
        require_role(
            principal,
            APPROVERS,
            f"only approvers of tenant {principal.tenant} can {verb} installs",
            "APPROVER_ROLE_REQUIRED",
        )

        def check(row: Row | None) -> None:
            if row is None:  # another tenant's approval is as unknown as one that never was
                raise approval_not_found(approval_id)
            # The requester, as a subject or as the person behind a key (user:alice asked with
            # a key she owns, or a key of hers approves what user:alice asked). Two keys that
            # merely share an owner are two credentials an operator handed out: not refused.
            if principal.subject in (row["requester"], row["requester_owner"]) or (
                caller_owner(principal) == row["requester"]
            ):
                raise PermissionDenied(
                    f"you requested this install ({row['requester']}), so you cannot {verb} "
                    "it: another approver of your tenant must decide",
                    reason="REQUESTER_CANNOT_APPROVE",
                )

        await self.installer.maybe_expire()
        row, installation = await self.store.decide(
            principal.tenant,
            approval_id,
            approve=approve,
            approver=principal.subject,
            comment=comment,
            request_id=request_id,
            check=check,
        )
        if installation is not None:  # not a repeat
            await self.installer.record_decision(
                row, installation, principal, context_call(context, request_id)
            )
        annotate(installation=f"installations/{row['installation']}")
        return approval_from_row(row)
