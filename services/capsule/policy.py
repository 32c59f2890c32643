"""The approval policy (policy/capsule.rego): does an install need an approver first?

Evaluated once per install request (not per call), so it is not cached; the file is reloaded
when it changes, like the authorization policy. An undefined or malformed decision requires an
approval (fail closed), with a reason that says why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.rego import PolicyError, RegoFile, defines_decision
from soma.capsule.v1 import resources_pb2 as pb

log = logging.getLogger(__name__)

ENTRYPOINT = "soma/capsule/approval/decision"  # data.soma.capsule.approval.decision


@dataclass(frozen=True)
class ApprovalDecision:
    required: bool
    reason: str


@dataclass(frozen=True)
class InstallFacts:
    """What the policy sees about one install."""

    tenant: str
    enterprise_mode: bool
    capsule: str
    publisher: str  # the publishing tenant
    visibility: int
    version: str
    permissions: Sequence[str]
    requester: str

    def as_input(self) -> dict[str, Any]:
        return {
            "tenant": {"id": self.tenant, "enterprise_mode": self.enterprise_mode},
            "capsule": {
                "name": self.capsule,
                "tenant": self.publisher,
                "visibility": pb.CapsuleVisibility.Name(self.visibility).removeprefix(
                    "CAPSULE_VISIBILITY_"
                ),
            },
            "version": self.version,
            "permissions": list(self.permissions),
            "requester": self.requester,
            "publisher": self.publisher,
        }


def _check(path: Path, code: str) -> None:
    if not defines_decision(code, "soma.capsule.approval"):
        raise PolicyError(
            f"capsule approval policy {path} defines no decision: it must be "
            "`package soma.capsule.approval` with a rule "
            '`decision := {"required": <bool>, "reason": <string>}`'
        )


class ApprovalPolicy:
    def __init__(self, path: Path, *, reload_interval: float = 2.0) -> None:
        self._file = RegoFile(
            path,
            ENTRYPOINT,
            what="capsule approval policy",
            check=_check,
            reload_interval=reload_interval,
            log=log,
        )
        log.info("capsule approval policy loaded from %s", path)

    def decide(self, facts: InstallFacts) -> ApprovalDecision:
        if self._file.due():
            self._file.reload_if_changed()
        value = self._file.query(facts.as_input())
        if not isinstance(value, dict) or not isinstance(value.get("required"), bool):
            return ApprovalDecision(
                True,
                "the approval policy gave no decision for this install, so an approver decides",
            )
        return ApprovalDecision(value["required"], str(value.get("reason", "")))
