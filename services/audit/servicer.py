"""AuditService: query, tail, verify and export the audit chains; retention policies.

Access (on top of the policy, which lets only admins and auditors call these methods): a caller
reads its own tenant's events; `filter.tenant` / `tenant` may name another tenant only for a
platform admin (anyone else gets NOT_FOUND, so tenants' existence does not leak). Updating the
retention policy needs a tenant admin.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import nats.errors
from google.api import httpbody_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from services.audit import exporters, rows
from services.audit.ingest import nudge_subject
from services.audit.query import Where, build_where, check_filter, fingerprint
from services.audit.retention import MIN_RETENTION, POLICY_NAME, Retention, checkpoint_proto
from services.audit.store import AuditStore
from services.common import paging
from services.common.audit import chain
from services.common.auth.principal import Principal, require_principal
from services.common.errors import InvalidArgument, NotFound, OutOfRange, PermissionDenied
from services.common.events import Bus
from services.common.names import check_request_id, parse_name
from soma.audit.v1 import audit_pb2, audit_pb2_grpc
from soma.audit.v1 import resources_pb2 as pb

log = logging.getLogger(__name__)

READERS = frozenset({"auditor", "admin", "platform_admin"})
ADMINS = frozenset({"admin", "platform_admin"})
TAIL_POLL_SECONDS = 1.0
SCAN_PAGE = 1000
NEWEST_FIRST = audit_pb2.AUDIT_EVENT_ORDER_NEWEST_FIRST


def reader() -> Principal:
    principal = require_principal()
    if not principal.roles & READERS:
        raise PermissionDenied(
            "reading audit events needs the auditor or admin role in your tenant",
            reason="AUDIT_READER_REQUIRED",
        )
    return principal


def tenant_for(principal: Principal, requested: str) -> str:
    """The tenant a call reads: the caller's, or any for a platform admin."""
    if not requested or requested == principal.tenant:
        return principal.tenant
    if "platform_admin" in principal.roles:
        return requested
    raise NotFound(f"tenant {requested[:64]!r} not found", reason="TENANT_NOT_FOUND")


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC))
    return stamp


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(
        self, store: AuditStore, retention: Retention, bus: Bus, draining: asyncio.Event
    ) -> None:
        self.store = store
        self.retention = retention
        self.bus = bus
        self.draining = draining

    # -- reads ----------------------------------------------------------------------------------

    async def GetAuditEvent(
        self, request: audit_pb2.GetAuditEventRequest, context: aio.ServicerContext
    ) -> pb.AuditEvent:
        principal = reader()
        event_id = parse_name(request.name, "auditEvents", "name")
        row = await self.store.get(event_id)
        if row is None or (
            row["tenant"] != principal.tenant and "platform_admin" not in principal.roles
        ):
            raise NotFound(f"audit event {request.name} not found", reason="AUDIT_EVENT_NOT_FOUND")
        return rows.event_from_row(row)

    async def ListAuditEvents(
        self, request: audit_pb2.ListAuditEventsRequest, context: aio.ServicerContext
    ) -> audit_pb2.ListAuditEventsResponse:
        principal = reader()
        limit = paging.page_size(request.page_size)
        tenant = tenant_for(principal, request.filter.tenant)
        check_filter(request.filter)
        newest_first = request.order != audit_pb2.AUDIT_EVENT_ORDER_OLDEST_FIRST
        query = fingerprint(tenant, request.filter, int(newest_first))
        position = paging.decode_token(request.page_token, query)
        after = None
        if position is not None:
            try:
                after = (datetime.fromisoformat(position["t"]), int(position["s"]))
            except (KeyError, TypeError, ValueError):
                raise InvalidArgument("page_token is malformed", field="page_token") from None
        found = await self.store.page(
            build_where(tenant, request.filter),
            newest_first=newest_first,
            after=after,
            limit=limit + 1,
        )
        page = found[:limit]
        token = ""
        if len(found) > limit:
            last = page[-1]
            token = paging.encode_token(
                {"t": last["event_time"].isoformat(), "s": last["sequence"]}, query
            )
        return audit_pb2.ListAuditEventsResponse(
            audit_events=[rows.event_from_row(r) for r in page], next_page_token=token
        )

    async def TailAuditEvents(
        self, request: audit_pb2.TailAuditEventsRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.AuditEvent]:
        principal = reader()
        tenant = tenant_for(principal, request.filter.tenant)
        if request.after_sequence < 0:
            raise InvalidArgument("after_sequence must not be negative", field="after_sequence")
        where = build_where(tenant, request.filter, times=False)
        wake = asyncio.Event()

        async def on_nudge(_msg: object) -> None:
            wake.set()

        # Subscribe before the first read, so an event stored in between still wakes us.
        subscription = None
        with contextlib.suppress(nats.errors.Error, OSError):
            subscription = await self.bus.nc.subscribe(nudge_subject(tenant), cb=on_nudge)
        head = await self.store.head(tenant)
        if request.live_only:
            last = head.sequence
        else:
            if request.after_sequence > head.sequence:
                raise OutOfRange(
                    f"after_sequence {request.after_sequence} is beyond the chain's head "
                    f"({head.sequence}); resume from a sequence you received",
                    field="after_sequence",
                )
            last = request.after_sequence
        try:
            while not self.draining.is_set():
                wake.clear()
                # Rows up to the head read first are all committed (head and rows move in one
                # transaction), so `last` may jump to it even when the filter skipped rows.
                upto = (await self.store.head(tenant)).sequence
                while last < upto:
                    page = await self.store.by_sequences(where, last, upto, SCAN_PAGE)
                    for row in page:
                        yield rows.event_from_row(row)
                    last = page[-1]["sequence"] if len(page) == SCAN_PAGE else upto
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), TAIL_POLL_SECONDS)
        finally:
            if subscription is not None:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()

    async def VerifyAuditChain(
        self, request: audit_pb2.VerifyAuditChainRequest, context: aio.ServicerContext
    ) -> audit_pb2.VerifyAuditChainResponse:
        principal = reader()
        tenant = tenant_for(principal, request.tenant)
        if request.start_sequence < 0 or request.end_sequence < 0:
            raise InvalidArgument("sequences must not be negative", field="start_sequence")
        if request.end_sequence and request.end_sequence < request.start_sequence:
            raise InvalidArgument(
                "end_sequence must not be before start_sequence", field="end_sequence"
            )
        head = await self.store.head(tenant)
        checkpoint_row = await self.store.checkpoint(tenant)
        checkpoint = checkpoint_proto(tenant, checkpoint_row)
        response = audit_pb2.VerifyAuditChainResponse(tenant=tenant, verify_time=_now())
        end = min(request.end_sequence or head.sequence, head.sequence)
        if request.start_sequence <= checkpoint.sequence + 1:
            verifier = chain.ChainVerifier(checkpoint.sequence, checkpoint.hash, checkpoint=True)
            response.anchor.CopyFrom(checkpoint)
        else:
            verifier = await self._anchor_at(tenant, request.start_sequence)
        response.start_sequence = verifier.last_sequence + 1
        found = await self._verify_range(tenant, verifier, end)
        if found is None and end == head.sequence and verifier.head_hash != head.hash:
            found = chain.ChainBreak(
                sequence=head.sequence,
                event="",
                reason=chain.HASH_MISMATCH,
                expected_hash=head.hash,
                actual_hash=verifier.head_hash,
                message=f"event {head.sequence} is not the chain head recorded when it was "
                "stored: the end of the chain was altered",
            )
        response.ok = found is None
        if found is not None:
            response.first_break.CopyFrom(found.to_proto())
        response.end_sequence = verifier.last_sequence
        response.events_verified = verifier.count
        response.head_hash = verifier.head_hash
        return response

    async def _anchor_at(self, tenant: str, start: int) -> chain.ChainVerifier:
        """Verification from the middle of a chain continues from the stored event before."""
        before = await self.store.by_sequence(tenant, start - 1)
        if before is not None:
            return chain.ChainVerifier(start - 1, before["hash"])
        first = await self.store.by_sequence(tenant, start)
        return chain.ChainVerifier(start - 1, first["previous_hash"] if first else chain.GENESIS)

    async def _verify_range(
        self, tenant: str, verifier: chain.ChainVerifier, end: int
    ) -> chain.ChainBreak | None:
        where = Where()
        where.add("tenant = {}", tenant)
        while verifier.last_sequence < end:
            page = await self.store.by_sequences(where, verifier.last_sequence, end, SCAN_PAGE)
            if not page:
                return verifier.missing()
            for row in page:
                event = rows.event_from_row(row)
                in_order = row["sequence"] == verifier.last_sequence + 1
                drift = rows.column_drift(row, event) if in_order else None
                if drift is not None:
                    return chain.ChainBreak(
                        sequence=row["sequence"],
                        event=event.name,
                        reason=chain.HASH_MISMATCH,
                        expected_hash=row["hash"],
                        actual_hash="",
                        message=f"event {row['sequence']} was altered after it was stored "
                        f"(its {drift} column no longer matches its content)",
                    )
                found = verifier.check(event)
                if found is not None:
                    return found
        return None

    async def ExportAuditEvents(
        self, request: audit_pb2.ExportAuditEventsRequest, context: aio.ServicerContext
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        principal = reader()
        tenant = tenant_for(principal, request.filter.tenant)
        check_filter(request.filter)
        form = exporters.FORMATS.get(request.format)
        if form is None:
            raise InvalidArgument(f"unknown export format {request.format}", field="format")
        where = build_where(tenant, request.filter)
        chunker = exporters.Chunker()
        last = 0
        while True:
            page = await self.store.by_sequences(where, last, None, SCAN_PAGE)
            for row in page:
                line = form.render(rows.event_from_row(row))
                if line is not None and (full := chunker.add(line)) is not None:
                    yield httpbody_pb2.HttpBody(content_type=form.content_type, data=full)
            if len(page) < SCAN_PAGE:
                break
            last = page[-1]["sequence"]
        rest = chunker.flush()
        if rest is not None:
            yield httpbody_pb2.HttpBody(content_type=form.content_type, data=rest)

    # -- retention ------------------------------------------------------------------------------

    async def GetRetentionPolicy(
        self, request: audit_pb2.GetRetentionPolicyRequest, context: aio.ServicerContext
    ) -> pb.RetentionPolicy:
        principal = reader()
        _check_policy_name(request.name, "name")
        return await self.retention.policy(principal.tenant)

    async def UpdateRetentionPolicy(
        self, request: audit_pb2.UpdateRetentionPolicyRequest, context: aio.ServicerContext
    ) -> pb.RetentionPolicy:
        principal = require_principal()
        if not principal.roles & ADMINS:
            raise PermissionDenied(
                "changing the retention policy needs the admin role in your tenant",
                reason="TENANT_ADMIN_REQUIRED",
            )
        check_request_id(request.request_id)
        if not request.HasField("retention_policy"):
            raise InvalidArgument("retention_policy is required", field="retention_policy")
        _check_policy_name(request.retention_policy.name, "retention_policy.name")
        paths = list(request.update_mask.paths)
        if not paths:
            raise InvalidArgument(
                "update_mask is required; the only field you can change is `retention`",
                field="update_mask",
            )
        if any(p not in ("retention", "*") for p in paths):
            raise InvalidArgument(
                f"update_mask {','.join(paths)}: the only field you can change is `retention`",
                field="update_mask",
            )
        retention = request.retention_policy.retention
        if retention.nanos or retention.seconds < 0:
            raise InvalidArgument(
                "retention must be a whole number of seconds", field="retention_policy.retention"
            )
        if retention.seconds and retention.seconds < MIN_RETENTION.total_seconds():
            raise InvalidArgument(
                "retention must be at least 1 day (86400s), or 0s to keep events forever",
                field="retention_policy.retention",
            )
        await self.retention.set_retention(principal.tenant, retention.seconds)
        await self.retention.purge(principal.tenant)  # apply it now, not at the next round
        return await self.retention.policy(principal.tenant)


def _check_policy_name(name: str, field: str) -> None:
    if name != POLICY_NAME:
        raise InvalidArgument(f"{field} must be {POLICY_NAME!r} (got {name[:64]!r})", field=field)
