"""Installs: run on the server as tasks, reported live to every stream attached to them.

    request -> [AWAITING_APPROVAL] -> VERIFYING_SIGNATURE -> EXTRACTING -> ACTIVATING -> DONE
                                                                              (or FAILED)

* An install is a task of the replica that accepted it (`installation.replica`), not of the
  call: a client that goes away does not stop it, and InstallCapsule with the same
  `request_id` attaches to it again, on any replica.
* Progress goes to an in-process channel per installation (streams on this replica see every
  step) and, at most every half second and at each phase, to the installation's row, followed
  by a core-NATS nudge on `capsule.install.<id>`, so streams on other replicas (which read the
  row) wake at once; they also poll, in case a nudge is lost. Approval decisions and expiries,
  made on any replica, change the row and send the same nudge.
* Disk: the archive is re-hashed and its signature checked against the publisher's keys as
  they are now, then extracted (in a thread: the event loop stays responsive) into
  `<capsules>/tmp/<replica>/<installation id>`, and renamed into
  `<capsules>/tenants/<tenant>/installed/<name>/<version>` under a per-(tenant, capsule) lock,
  in the transaction that makes it the current installation. A killed install leaves only its
  temporary directory, which its replica removes when it starts again; the same start marks
  such installs FAILED and removes a directory renamed into place whose commit never happened.
* A janitor (every replica) heartbeats its running installs, expires approvals nobody decided
  in time, and fails installs whose replica stopped reporting for a minute (it died for good).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2

from services.capsule import archive, trust
from services.capsule.blobs import (
    BlobStore,
    format_digest,
    fsync_dir,
    hash_file,
    safe_component,
)
from services.capsule.errors import Failure
from services.capsule.manifest import manifest_from_mapping
from services.capsule.policy import ApprovalPolicy, InstallFacts
from services.capsule.settings import CapsuleSettings
from services.capsule.store import (
    AWAITING,
    PENDING,
    CapsuleStore,
    NewApproval,
    NewInstallation,
    Progress,
    Row,
    manifest_data,
    progress_from_row,
    version_name,
)
from services.common import metrics
from services.common.audit.event import CallInfo, build_event
from services.common.audit.recorder import AuditRecorder
from services.common.auth.principal import Principal
from services.common.errors import FailedPrecondition, SomaError, Unavailable
from services.common.events import Bus
from services.common.tasks import cancel_and_wait
from soma.capsule.v1 import capsule_pb2
from soma.capsule.v1 import resources_pb2 as pb

log = logging.getLogger(__name__)

INSTALL_METHOD = "/soma.capsule.v1.CapsuleService/InstallCapsule"
NUDGE_PREFIX = "capsule.install."
INSTALLED_SUBJECT = "capsule.installed"
SAVE_INTERVAL = 0.5  # seconds between progress writes to the database
TICK = 0.1  # seconds between progress reports while a thread works
JANITOR_SECONDS = 5.0
STALE_AFTER = timedelta(seconds=60)

QUEUED = pb.INSTALL_PHASE_QUEUED
AWAITING_APPROVAL = pb.INSTALL_PHASE_AWAITING_APPROVAL
VERIFYING = pb.INSTALL_PHASE_VERIFYING_SIGNATURE
EXTRACTING = pb.INSTALL_PHASE_EXTRACTING
ACTIVATING = pb.INSTALL_PHASE_ACTIVATING
DONE = pb.INSTALL_PHASE_DONE
FAILED_PHASE = pb.INSTALL_PHASE_FAILED
# The share of the overall percentage each phase covers.
_SPANS: dict[int, tuple[float, float]] = {
    QUEUED: (0.0, 0.0),
    AWAITING_APPROVAL: (0.0, 0.0),
    VERIFYING: (1.0, 20.0),
    EXTRACTING: (20.0, 95.0),
    ACTIVATING: (97.0, 97.0),
    DONE: (100.0, 100.0),
}

PHASE_ORDER = (QUEUED, AWAITING_APPROVAL, VERIFYING, EXTRACTING, ACTIVATING, DONE)

INTERRUPTED = Failure(
    grpc.StatusCode.UNAVAILABLE.value[0],
    "the replica running this install stopped before it finished; nothing was installed: "
    "install again",
    "INSTALL_INTERRUPTED",
)

T = TypeVar("T")


def now_stamp() -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(datetime.now(UTC))
    return stamp


def failure_of(status: status_pb2.Status) -> Failure:
    """The Failure a FAILED progress report carries (reason from its ErrorInfo)."""
    reason = ""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            reason = info.reason
    return Failure(status.code, status.message, reason)


def _count_outcome(outcome: str, row: Row) -> None:
    """soma_capsule_installs_total and, when the row has both ends, the install's duration."""
    start, end = row.get("create_time"), row.get("complete_time")
    seconds = (end - start).total_seconds() if start and end else None
    metrics.capsule_install(outcome, seconds)


def phase_percent(phase: int, fraction: float) -> float:
    low, high = _SPANS.get(phase, (0.0, 0.0))
    return round(low + (high - low) * min(max(fraction, 0.0), 1.0), 1)


def requester_principal(subject: str, tenant: str) -> Principal:
    """The actor of an install step recorded outside a call (the task acts for the requester)."""
    key_id = subject.removeprefix("key:") if subject.startswith("key:") else None
    return Principal(subject, tenant, frozenset(), frozenset(), "", key_id=key_id)


def _gap(
    phases: list[int],
    last: int,
    upto: capsule_pb2.InstallProgress,
    channel: Channel,
    row: Row,
) -> list[capsule_pb2.InstallProgress]:
    """Reports for the phases between the last one a stream sent and `upto`'s. Real ones when
    this replica ran them; otherwise made up from `upto`, except before a failure (which
    could have happened in any of them)."""
    if upto.phase == FAILED_PHASE:
        return [channel.phases[p] for p in phases if p > last and p in channel.phases]
    out = []
    for skipped in (p for p in phases if last < p < upto.phase):
        seen = channel.phases.get(skipped)
        out.append(seen if seen is not None else _made_up(skipped, upto, row))
    return out


def _made_up(
    phase: int, upto: capsule_pb2.InstallProgress, row: Row
) -> capsule_pb2.InstallProgress:
    """A report for a phase a stream did not see, from a later report."""
    files = upto.result.file_count if upto.phase == DONE else upto.files_total
    size = upto.result.size_bytes if upto.phase == DONE else upto.bytes_total
    report = capsule_pb2.InstallProgress(
        installation=upto.installation,
        phase=phase,  # type: ignore[arg-type]
        percent=_SPANS[phase][1],
        event_time=now_stamp(),
    )
    if phase == QUEUED:
        report.message = "queued"
    elif phase == AWAITING_APPROVAL:
        report.approval = f"approvals/{row['approval']}"
        report.message = f"waiting for approval {report.approval}"
    elif phase == VERIFYING:
        report.message = "digest and signature verified"
    else:
        report.files_done = report.files_total = files
        report.bytes_done = report.bytes_total = size
        report.message = f"extracted {files} files" if phase == EXTRACTING else "moving into place"
    return report


# -- live progress ------------------------------------------------------------------------------


class Channel:
    """The latest progress of one install on this replica, and a way to wait for the next."""

    def __init__(self) -> None:
        self.latest: capsule_pb2.InstallProgress | None = None  # set only by a local task
        self.phases: dict[int, capsule_pb2.InstallProgress] = {}  # the last report of each
        self.refs = 0
        self._event = asyncio.Event()

    def waiter(self) -> asyncio.Event:
        """Set at the next change; take it before reading, so no change is missed."""
        return self._event

    def notify(self, progress: capsule_pb2.InstallProgress | None = None) -> None:
        if progress is not None:
            self.latest = progress
            self.phases[progress.phase] = progress
        event, self._event = self._event, asyncio.Event()
        event.set()


class Hub:
    def __init__(self) -> None:
        self._channels: dict[str, Channel] = {}

    def acquire(self, installation_id: str) -> Channel:
        channel = self._channels.setdefault(installation_id, Channel())
        channel.refs += 1
        return channel

    def release(self, installation_id: str) -> None:
        channel = self._channels.get(installation_id)
        if channel is not None:
            channel.refs -= 1
            if channel.refs <= 0:
                del self._channels[installation_id]

    def poke(self, installation_id: str) -> None:
        channel = self._channels.get(installation_id)
        if channel is not None:
            channel.notify()


class Reporter:
    """What one install task reports: to its channel always, to the database when due."""

    def __init__(self, installer: Installer, installation_id: str, channel: Channel) -> None:
        self.installer = installer
        self.id = installation_id
        self.channel = channel
        self.percent = 0.0
        self._phase = 0
        self._saved_at = 0.0

    async def update(
        self,
        phase: int,
        *,
        done: int = 0,
        total: int = 0,
        files_done: int = 0,
        files_total: int = 0,
        message: str = "",
    ) -> None:
        fraction = done / total if total else (files_done / files_total if files_total else 0)
        self.percent = max(self.percent, phase_percent(phase, fraction))
        progress = capsule_pb2.InstallProgress(
            installation=f"installations/{self.id}",
            phase=phase,  # type: ignore[arg-type]
            percent=self.percent,
            files_done=files_done,
            files_total=files_total,
            bytes_done=done,
            bytes_total=total,
            message=message,
            event_time=now_stamp(),
        )
        self.channel.notify(progress)
        due = time.monotonic() - self._saved_at >= SAVE_INTERVAL
        if phase != self._phase or due:
            self._phase = phase
            self._saved_at = time.monotonic()
            await self.installer.store.save_progress(
                self.id,
                Progress(phase, self.percent, files_done, files_total, done, total, message),
            )
            await self.installer.nudge(self.id)

    def final(self, row: Row) -> None:
        progress = progress_from_row(row)
        progress.percent = max(progress.percent, self.percent)
        progress.event_time.CopyFrom(now_stamp())
        self.channel.notify(progress)


@dataclass(frozen=True)
class Requester:
    principal: Principal

    @property
    def owner(self) -> str:
        # The person behind the credential (a key's owner, e.g. user:alice): that person may
        # not approve the install either, under another credential.
        return self.principal.owner or self.principal.subject


# -- the installer -------------------------------------------------------------------------------


class Installer:
    def __init__(
        self,
        store: CapsuleStore,
        blobs: BlobStore,
        settings: CapsuleSettings,
        policy: ApprovalPolicy,
        bus: Bus,
        audit: AuditRecorder | None,
        draining: asyncio.Event,
    ) -> None:
        self.store = store
        self.blobs = blobs
        self.settings = settings
        self.policy = policy
        self.bus = bus
        self.audit = audit
        self.draining = draining
        self.hub = Hub()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._background: list[asyncio.Task[Any]] = []
        self._subscription: Any = None
        self._expired_at = 0.0

    # -- paths -------------------------------------------------------------------------------

    def tenant_root(self, tenant: str) -> Path:
        return self.settings.root / "tenants" / safe_component(tenant)

    @staticmethod
    def relative_path(capsule: str, version: str) -> str:
        return f"installed/{capsule}/{version}"

    def target(self, tenant: str, capsule: str, version: str) -> Path:
        return self.tenant_root(tenant) / self.relative_path(capsule, version)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Cleans up after this replica's previous run, resumes what waited, starts the
        janitor and the nudge subscription."""
        removed = await asyncio.to_thread(self.blobs.prepare)
        if removed:
            log.info("removed %d leftovers of a previous run from %s", len(removed),
                     self.blobs.tmp_dir)  # fmt: skip
        for row in await self.store.interrupted(self.settings.replica, INTERRUPTED):
            log.warning("install installations/%s was interrupted by a stop; FAILED", row["id"])
            await self._reconcile(row)
            await self._audit_step("failed", row, code=INTERRUPTED.code)

        async def on_nudge(msg: Any) -> None:
            self.hub.poke(msg.subject.removeprefix(NUDGE_PREFIX))

        with contextlib.suppress(Exception):
            self._subscription = await self.bus.nc.subscribe(NUDGE_PREFIX + "*", cb=on_nudge)
        for row in await self.store.resumable(self.settings.replica):
            log.info("resuming install installations/%s (%s)", row["id"], row["message"])
            self._spawn(row)
        self._background.append(asyncio.create_task(self._janitor(), name="capsule-janitor"))

    async def close(self) -> None:
        await cancel_and_wait(self._background)
        await cancel_and_wait(list(self._tasks.values()))
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()

    async def _janitor(self) -> None:
        while True:
            await asyncio.sleep(JANITOR_SECONDS)
            try:
                await self.store.heartbeat(list(self._tasks))
                await self.expire_due()
                for row in await self.store.stale(STALE_AFTER, INTERRUPTED):
                    log.warning("install installations/%s: its replica %s stopped reporting; "
                                "FAILED", row["id"], row["replica"])  # fmt: skip
                    await self._audit_step("failed", row, code=INTERRUPTED.code)
                    await self.nudge(str(row["id"]))
            except Exception as error:  # the database may be briefly away: try again later
                log.warning("capsule janitor: %s", error)

    async def _reconcile(self, row: Row) -> None:
        """After an interrupted install: its directory may have been renamed into place
        without the commit that records it; remove it unless it is current."""
        target = self.target(row["tenant"], row["capsule"], row["version"])
        if not target.exists():
            return

        async def remove() -> None:
            await asyncio.to_thread(self.blobs.discard_tree, target)

        await self.store.reconcile(row["tenant"], row["capsule"], row["version"], remove)

    # -- notifications and audit -------------------------------------------------------------

    async def nudge(self, installation_id: str) -> None:
        """Wakes every stream and waiting task of an installation, on every replica."""
        self.hub.poke(installation_id)
        with contextlib.suppress(Exception):
            await self.bus.nc.publish(NUDGE_PREFIX + installation_id, b"")

    async def _announce(self, subject: str, payload: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            await self.bus.nc.publish(subject, json.dumps(payload).encode())

    async def _audit_step(
        self,
        step: str,
        row: Row,
        *,
        actor: Principal | None = None,
        code: int = 0,
        call: CallInfo | None = None,
        **detail: object,
    ) -> None:
        """One audit event per install step (approval requested / approved / rejected /
        expired, install done / failed), in the installing tenant's chain."""
        if self.audit is None:
            return
        if actor is None and step != "approval_expired":
            actor = requester_principal(row["requester"], row["tenant"])
        facts: dict[str, object] = {
            "step": step,
            "capsule": f"capsules/{row['capsule']}",
            "version": row["version"],
        }
        if row.get("approval"):
            facts["approval"] = f"approvals/{row['approval']}"
        if row.get("error_reason"):
            facts["error_reason"] = row["error_reason"]
        facts.update(detail)
        event = build_event(
            method=INSTALL_METHOD,
            principal=actor,
            allow=True,
            reason=f"install step: {step.replace('_', ' ')}",
            status_code=code,
            call=call or CallInfo(request_id=row.get("request_id") or ""),
            resource=f"installations/{row['id']}",
            tenant=row["tenant"],
            detail=facts,
        )
        try:
            await self.audit.record(event)
        except Exception as error:  # the recorder keeps events in its outbox; never fail here
            log.warning("could not record install step %s: %s", step, error)

    async def record_decision(
        self, approval: Row, installation: Row | None, approver: Principal, call: CallInfo
    ) -> None:
        """After ApproveCapsule/RejectCapsule (on any replica): audit it and wake the install."""
        step = "approved" if approval["state"] == pb.APPROVAL_STATE_APPROVED else "rejected"
        row = installation or await self.store.get_installation(str(approval["installation"]))
        if row is not None:
            await self._audit_step(step, row, actor=approver, call=call, approver=approver.subject)
        await self.nudge(str(approval["installation"]))

    async def expire_due(self) -> None:
        """Expires approvals nobody decided in time (on whichever replica looks first)."""
        self._expired_at = time.monotonic()
        for approval, installation in await self.store.expire_due():
            log.info("approval approvals/%s expired", approval["id"])
            if installation is not None:
                await self._audit_step(
                    "approval_expired", installation, code=installation["error_code"]
                )
            await self.nudge(str(approval["installation"]))

    async def maybe_expire(self) -> None:
        """expire_due at most once a second (before approvals are read)."""
        if time.monotonic() - self._expired_at >= 1.0:
            await self.expire_due()

    # -- requests --------------------------------------------------------------------------------

    async def request(
        self,
        requester: Requester,
        capsule: Row,
        version: Row,
        request_id: str,
        call: CallInfo,
    ) -> tuple[Row, bool]:
        """Starts an install (or finds the one in place). Returns its installation row and
        whether this call started it."""
        principal = requester.principal
        tenant, name = principal.tenant, capsule["name"]
        current = await self.store.current_installation(tenant, name)
        if (
            current is not None
            and current["version"] == version["version"]
            and current["digest"] == version["digest"]
            and self.target(tenant, name, version["version"]).is_dir()
        ):
            return current, False  # already installed: idempotent, DONE at once
        permissions = list(manifest_data(version).get("permissions", []))
        decision = self.policy.decide(
            InstallFacts(
                tenant=tenant,
                enterprise_mode=await self.store.enterprise_mode(tenant),
                capsule=name,
                publisher=capsule["tenant"],
                visibility=capsule["visibility"],
                version=version["version"],
                permissions=permissions,
                requester=principal.subject,
            )
        )
        row, approval, created = await self.store.create_installation(
            NewInstallation(
                id=str(uuid.uuid4()),
                tenant=tenant,
                capsule=name,
                version=version["version"],
                digest=version["digest"],
                requester=principal.subject,
                requester_owner=requester.owner,
                replica=self.settings.replica,
                request_id=request_id,
            ),
            NewApproval(permissions, decision.reason, self.settings.approval_ttl)
            if decision.required
            else None,
        )
        if not created:
            return row, False  # a concurrent repeat of the same request id won: attach to it
        if approval is not None:
            await self._audit_step(
                "approval_requested",
                row,
                actor=principal,
                call=call,
                policy_reason=decision.reason,
            )
        self._spawn(row)
        return row, True

    def _spawn(self, row: Row) -> None:
        installation_id = str(row["id"])
        channel = self.hub.acquire(installation_id)
        first = progress_from_row(row)
        first.event_time.CopyFrom(now_stamp())
        channel.notify(first)
        task = asyncio.create_task(
            self._run(installation_id, channel), name=f"install-{installation_id}"
        )
        self._tasks[installation_id] = task

        def done(_: asyncio.Task[None]) -> None:
            self._tasks.pop(installation_id, None)
            self.hub.release(installation_id)

        task.add_done_callback(done)

    # -- following -------------------------------------------------------------------------------

    async def follow(
        self, row: Row, *, from_start: bool = False
    ) -> AsyncIterator[capsule_pb2.InstallProgress]:
        """The progress of an installation until it ends. `percent` never goes down and
        phases never go back; a FAILED report is followed by the install's error, raised.

        Reports are "latest wins" (a slow reader skips intermediate ones), but no phase is
        skipped: a phase the reader did not see gets its last report when this replica runs
        the install, else one made from what the next report says (e.g. the files a DONE
        installation has). `from_start` (a new install) begins at QUEUED; attaching again
        begins with the latest report."""
        installation_id = str(row["id"])
        channel = self.hub.acquire(installation_id)
        phases: list[int] = [p for p in PHASE_ORDER if p != AWAITING_APPROVAL or row["approval"]]
        try:
            sent: tuple[Any, ...] | None = None
            percent, phase = 0.0, (0 if from_start else -1)
            snapshot: capsule_pb2.InstallProgress | None = progress_from_row(row)
            while True:
                waiter = channel.waiter()
                latest = channel.latest
                # This replica's own report, unless its task died without a last word.
                if latest is not None and (
                    latest.phase in (DONE, FAILED_PHASE) or installation_id in self._tasks
                ):
                    snapshot = latest
                elif snapshot is None:
                    current = await self.store.get_installation(installation_id)
                    snapshot = progress_from_row(current) if current is not None else None
                if snapshot is None:
                    raise FailedPrecondition("the installation no longer exists")
                terminal = snapshot.phase in (DONE, FAILED_PHASE)
                reports = [snapshot] if terminal or snapshot.phase >= phase else []
                if reports and phase >= 0:
                    reports = _gap(phases, phase, snapshot, channel, row) + reports
                for report in reports:
                    out = capsule_pb2.InstallProgress()
                    out.CopyFrom(report)
                    out.percent = max(out.percent, percent)
                    if not out.HasField("event_time"):
                        out.event_time.CopyFrom(now_stamp())
                    key = (
                        out.phase,
                        out.percent,
                        out.files_done,
                        out.bytes_done,
                        out.message,
                        out.approval,
                    )
                    if key != sent:
                        sent, percent, phase = key, out.percent, out.phase
                        yield out
                phase = max(phase, 0)
                if terminal:
                    if snapshot.phase == FAILED_PHASE:
                        raise failure_of(snapshot.error).error()
                    return
                if self.draining.is_set():
                    raise Unavailable(
                        "this replica is shutting down; the install goes on: repeat the call "
                        "with the same request_id to follow it again",
                        reason="REPLICA_DRAINING",
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.wait(), self.settings.poll_seconds)
                snapshot = None  # read again (the channel, or the row for a remote install)
        finally:
            self.hub.release(installation_id)

    # -- the task ---------------------------------------------------------------------------------

    async def _run(self, installation_id: str, channel: Channel) -> None:
        reporter = Reporter(self, installation_id, channel)
        try:
            row = await self.store.get_installation(installation_id)
            if row is None:
                return
            if row["state"] == AWAITING:
                row = await self._await_decision(row, channel)
            if row["state"] != PENDING:
                reporter.final(row)  # rejected or expired (recorded by who decided)
                _count_outcome("rejected", row)
                return
            await self._install(row, reporter)
        except asyncio.CancelledError:
            # Stopping: an install that waits for an approval is resumed at the next start;
            # one that was working ends FAILED (its temporary files are gone already).
            with contextlib.suppress(Exception):
                await asyncio.shield(self._stop(installation_id, reporter))
            raise
        except SomaError as error:
            await self._fail(installation_id, Failure.of(error), reporter)
        except Exception:
            log.exception("install installations/%s failed", installation_id)
            failure = Failure(
                grpc.StatusCode.INTERNAL.value[0],
                f"internal error while installing; quote installations/{installation_id} "
                "when reporting it",
                "INTERNAL",
            )
            await self._fail(installation_id, failure, reporter)

    async def _stop(self, installation_id: str, reporter: Reporter) -> None:
        row = await self.store.get_installation(installation_id)
        if row is not None and row["state"] == PENDING and row["phase"] >= VERIFYING:
            await self._fail(installation_id, INTERRUPTED, reporter)

    async def _fail(self, installation_id: str, failure: Failure, reporter: Reporter) -> None:
        row = await self.store.fail_installation(installation_id, failure)
        if row is not None:
            log.info(
                "install installations/%s FAILED: %s (%s)",
                installation_id,
                failure.message,
                failure.reason,
            )
            await self._audit_step("failed", row, code=failure.code)
            _count_outcome("failed", row)
        else:  # it had ended already (rejected, expired, or failed as stale)
            row = await self.store.get_installation(installation_id)
        if row is not None:
            reporter.final(row)
        await self.nudge(installation_id)

    async def _await_decision(self, row: Row, channel: Channel) -> Row:
        """Waits until the approval is decided or expires; returns the installation then."""
        installation_id = str(row["id"])
        approval_id = str(row["approval"])
        while True:
            waiter = channel.waiter()
            current = await self.store.get_installation(installation_id)
            if current is None or current["state"] != AWAITING:
                return current if current is not None else row
            approval = await self.store.get_approval(approval_id)
            if approval is None:
                return current
            left = (approval["expire_time"] - datetime.now(UTC)).total_seconds()
            if left <= 0:
                await self.expire_due()  # the row changes: read it again shortly
                left = 0.2
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), min(self.settings.poll_seconds, left + 0.05))

    async def _in_thread(
        self, work: Callable[[], T], tick: Callable[[], Any], cancel: threading.Event | None
    ) -> T:
        """Runs blocking `work` in a thread, calling (and awaiting) `tick()` every TICK
        seconds meanwhile. Cancelled: sets `cancel` and waits for the thread to stop."""
        future = asyncio.ensure_future(asyncio.to_thread(work))
        try:
            while not future.done():
                await asyncio.wait({future}, timeout=TICK)
                await tick()
        except asyncio.CancelledError:
            if cancel is not None:
                cancel.set()
            await asyncio.wait({future})
            raise
        return future.result()

    async def _install(self, row: Row, reporter: Reporter) -> None:
        installation_id = str(row["id"])
        tenant, name, version = row["tenant"], row["capsule"], row["version"]
        label = version_name(name, version)
        stored = await self.store.get_version(name, version)
        if stored is None:
            raise FailedPrecondition(
                f"{label} no longer exists", reason="CAPSULE_VERSION_NOT_FOUND"
            )
        if stored["yanked"]:
            raise FailedPrecondition(
                f"{label} was yanked ({stored['yank_reason'] or 'no reason given'}); install "
                "another version",
                reason="CAPSULE_VERSION_YANKED",
            )

        # Verifying: the stored bytes against the digest, the signature against the keys.
        size = int(stored["size_bytes"])
        hashed = [0, size]

        def on_hash(done: int, total: int) -> None:
            hashed[0], hashed[1] = done, total

        async def hash_tick() -> None:
            await reporter.update(
                VERIFYING, done=hashed[0], total=hashed[1], message="checking digest and signature"
            )

        await hash_tick()
        blob = self.blobs.path(stored["digest"])
        try:
            raw, _ = await self._in_thread(lambda: hash_file(blob, on_hash), hash_tick, None)
        except FileNotFoundError:
            raw = b""
        digest = format_digest(raw) if raw else "(missing)"
        if digest != stored["digest"]:
            await self.store.record_verification(name, version, trust.DIGEST_MISMATCH, None, "")
            raise FailedPrecondition(
                f"the stored archive of {label} does not match its digest {stored['digest']} "
                f"(found {digest}): it was altered or lost on disk, so it is not installed",
                reason="DIGEST_MISMATCH",
            )
        verdict = trust.check_published(await self.store.keys_of(stored["tenant"]), stored, raw)
        await self.store.record_verification(
            name, version, verdict.result, verdict.verified_key_id, verdict.key_fingerprint
        )
        if not verdict.verified:
            raise FailedPrecondition(
                f"{label} does not verify: {verdict.message}", reason=verdict.reason
            )

        # Extracting into this replica's temporary directory.
        manifest = manifest_from_mapping(manifest_data(stored))
        expected = archive.ArchiveInfo(manifest, stored["entry_count"], stored["unpacked_bytes"])
        counts = [0, expected.entry_count, 0, expected.unpacked_bytes]

        def on_extract(files_done: int, files_total: int, done: int, total: int) -> None:
            counts[:] = [files_done, files_total, done, total]

        async def extract_tick() -> None:
            await reporter.update(
                EXTRACTING,
                files_done=counts[0],
                files_total=counts[1],
                done=counts[2],
                total=counts[3],
                message=f"extracting {counts[0]}/{counts[1]} files",
            )

        await extract_tick()
        temp = self.blobs.temp_path(installation_id)
        cancel = threading.Event()
        try:
            info = await self._in_thread(
                lambda: archive.extract(
                    blob,
                    temp,
                    self.settings.limits,
                    expected=expected,
                    progress=on_extract,
                    cancel=cancel,
                ),
                extract_tick,
                cancel,
            )
            await extract_tick()
            await reporter.update(
                ACTIVATING,
                files_done=info.entry_count,
                files_total=info.entry_count,
                done=info.unpacked_bytes,
                total=info.unpacked_bytes,
                message="moving into place",
            )
            row = await self._activate(row, temp, info)
        finally:
            if temp.exists():
                await asyncio.to_thread(self.blobs.discard_tree, temp)
        reporter.final(row)
        _count_outcome("installed", row)
        log.info("installed %s for tenant %s (installations/%s)", label, tenant, installation_id)
        await self._audit_step("done", row, files=row["file_count"], bytes=row["size_bytes"])
        await self.nudge(installation_id)
        await self._announce(
            INSTALLED_SUBJECT,
            {
                "tenant": tenant,
                "capsule": name,
                "version": version,
                "installation": installation_id,
            },
        )

    async def _activate(self, row: Row, temp: Path, info: archive.ArchiveInfo) -> Row:
        tenant, name, version = row["tenant"], row["capsule"], row["version"]
        target = self.target(tenant, name, version)
        placed = False

        async def place(current: Row | None) -> None:
            nonlocal placed
            if current is not None and current["version"] == version and target.is_dir():
                return  # the same version is in place already (a concurrent install)
            await asyncio.to_thread(self._move_into_place, temp, target)
            placed = True

        try:
            done, superseded = await self.store.activate(
                str(row["id"]),
                tenant,
                name,
                path=self.relative_path(name, version),
                file_count=info.entry_count,
                size_bytes=info.unpacked_bytes,
                place=place,
            )
        except BaseException:
            if placed:  # renamed, but the commit did not happen: take it back out
                await asyncio.shield(asyncio.to_thread(self.blobs.discard_tree, target))
            raise
        if superseded is not None and superseded["version"] != version:
            old = self.target(tenant, name, superseded["version"])
            await asyncio.to_thread(self.blobs.discard_tree, old)
        return done

    def _move_into_place(self, temp: Path, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            self.blobs.discard_tree(target)  # left by an install that never committed
        os.rename(temp, target)
        fsync_dir(target.parent)

    def remove_installed(self, row: Row) -> None:
        """Removes an installation's directory (blocking: run it in a thread)."""
        self.blobs.discard_tree(self.target(row["tenant"], row["capsule"], row["version"]))
