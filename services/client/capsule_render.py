"""What `soma capsule` prints: tables and key/value blocks of capsule resources.

Enum values are shown as short lowercase words (`INSTALLATION_STATE_AWAITING_APPROVAL` ->
`awaiting-approval`); times as UTC; sizes in binary units.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import duration_pb2

from services.client import render
from services.client.progress import code_name, human_bytes
from soma.capsule.v1 import resources_pb2 as pb

CAPSULE_COLUMNS = ("NAME", "LATEST", "PUBLISHER", "VERIFIED", "INSTALLS", "PERMISSIONS",
                   "VISIBILITY", "UPDATED", "DESCRIPTION")  # fmt: skip
VERSION_COLUMNS = ("VERSION", "DIGEST", "SIZE", "FILES", "SIGNATURE", "YANKED", "PUBLISHED")
KEY_COLUMNS = ("KEY", "NAME", "STATE", "FINGERPRINT", "CREATOR", "CREATED", "REVOKED")
INSTALLATION_COLUMNS = ("INSTALLATION", "CAPSULE", "VERSION", "STATE", "REQUESTER", "CREATED",
                        "DURATION", "DETAIL")  # fmt: skip
APPROVAL_COLUMNS = ("APPROVAL", "CAPSULE", "VERSION", "PERMISSIONS", "REQUESTER", "STATE",
                    "REASON", "EXPIRES")  # fmt: skip


# -- rendering --------------------------------------------------------------------------------


def label(enum: Any, value: int, prefix: str) -> str:
    """`INSTALLATION_STATE_AWAITING_APPROVAL` -> `awaiting-approval`; unknown values as numbers."""
    if value not in enum.values():
        return str(value)
    return str(enum.Name(value)).removeprefix(prefix).lower().replace("_", "-")


def short_id(name: str) -> str:
    return name.rsplit("/", 1)[-1] or "-"


def joined(values: Sequence[str]) -> str:
    return ",".join(values) if values else "-"


def _ts(message: Any, field: str) -> str:
    return render.timestamp(getattr(message, field), message.HasField(field))


def _seconds(duration: duration_pb2.Duration) -> str:
    return f"{duration.ToTimedelta().total_seconds():.1f}s"


def _short(text: str, width: int = 48) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def verification(signature: pb.CapsuleSignature) -> str:
    return label(pb.VerificationResult, signature.result, "VERIFICATION_RESULT_")


def capsule_table(capsules: Sequence[pb.Capsule]) -> str:
    if not capsules:
        return "No capsules."
    rows = [
        [
            short_id(c.name),
            c.latest_version or "-",
            c.tenant,
            "yes" if c.verified else "no",
            str(c.install_count),
            joined(c.permissions),
            label(pb.CapsuleVisibility, c.visibility, "CAPSULE_VISIBILITY_"),
            _ts(c, "update_time"),
            _short(c.description) or "-",
        ]
        for c in capsules
    ]
    return render.table(CAPSULE_COLUMNS, rows)


def capsule_details(c: pb.Capsule) -> str:
    return render.fields(
        [
            ("name", c.name),
            ("publisher", c.tenant),
            ("description", c.description or "-"),
            ("latest version", c.latest_version or "- (every version is yanked)"),
            ("verified", "yes" if c.verified else "no"),
            ("permissions", joined(c.permissions)),
            ("installs", str(c.install_count)),
            ("visibility", label(pb.CapsuleVisibility, c.visibility, "CAPSULE_VISIBILITY_")),
            ("homepage", c.homepage or "-"),
            ("license", c.license or "-"),
            ("created", _ts(c, "create_time")),
            ("updated", _ts(c, "update_time")),
        ]
    )


def version_table(versions: Sequence[pb.CapsuleVersion]) -> str:
    if not versions:
        return "No versions."
    rows = [
        [
            v.version,
            v.digest[:19] + "…" if len(v.digest) > 20 else v.digest or "-",
            human_bytes(v.size_bytes),
            str(v.entry_count),
            verification(v.signature),
            "yes" if v.yanked else "no",
            _ts(v, "publish_time"),
        ]
        for v in versions
    ]
    return render.table(VERSION_COLUMNS, rows)


def version_details(v: pb.CapsuleVersion) -> str:
    m, s = v.manifest, v.signature
    yanked = (
        f"yes, {_ts(v, 'yank_time')}: {v.yank_reason or 'no reason given'}" if v.yanked else "no"
    )
    return render.fields(
        [
            ("name", v.name),
            ("publisher", v.tenant),
            ("description", m.description or "-"),
            ("entrypoint", m.entrypoint or "-"),
            ("permissions", joined(m.permissions)),
            ("homepage", m.homepage or "-"),
            ("license", m.license or "-"),
            ("digest", v.digest),
            ("size", f"{human_bytes(v.size_bytes)} "
                     f"({human_bytes(v.uncompressed_size_bytes)} unpacked, "
                     f"{v.entry_count} entries)"),
            ("signature", f"{label(pb.SignatureFormat, s.format, 'SIGNATURE_FORMAT_')}, "
                          f"{verification(s)} at {_ts(s, 'verify_time')}"),
            ("publisher key", f"{s.publisher_key or '-'} {s.key_fingerprint}".rstrip()),
            ("yanked", yanked),
            ("uploader", v.uploader or "-"),
            ("published", _ts(v, "publish_time")),
        ]
    )  # fmt: skip


def key_table(keys: Sequence[pb.PublisherKey]) -> str:
    if not keys:
        return "No publisher keys."
    rows = [
        [
            short_id(k.name),
            k.display_name or "-",
            label(pb.PublisherKeyState, k.state, "PUBLISHER_KEY_STATE_"),
            k.fingerprint,
            k.creator or "-",
            _ts(k, "create_time"),
            _ts(k, "revoke_time"),
        ]
        for k in keys
    ]
    return render.table(KEY_COLUMNS, rows)


def key_details(k: pb.PublisherKey) -> str:
    return render.fields(
        [
            ("name", k.name),
            ("display name", k.display_name or "-"),
            ("state", label(pb.PublisherKeyState, k.state, "PUBLISHER_KEY_STATE_")),
            ("fingerprint", k.fingerprint),
            ("algorithm", label(pb.SignatureAlgorithm, k.algorithm, "SIGNATURE_ALGORITHM_")),
            ("creator", k.creator or "-"),
            ("created", _ts(k, "create_time")),
            ("revoked", _ts(k, "revoke_time")),
        ]
    )


def installation_detail(i: pb.Installation) -> str:
    if i.HasField("error") and i.error.message:
        return f"{code_name(i.error.code)}: {_short(i.error.message, 80)}"
    return i.path or "-"


def installation_table(installs: Sequence[pb.Installation]) -> str:
    if not installs:
        return "No installations."
    rows = [
        [
            short_id(i.name),
            short_id(i.capsule),
            i.version or "-",
            label(pb.InstallationState, i.state, "INSTALLATION_STATE_"),
            i.requester or "-",
            _ts(i, "create_time"),
            _seconds(i.duration) if i.HasField("duration") else "-",
            installation_detail(i),
        ]
        for i in installs
    ]
    return render.table(INSTALLATION_COLUMNS, rows)


def installation_details(i: pb.Installation) -> str:
    return render.fields(
        [
            ("name", i.name),
            ("capsule", f"{i.capsule} {i.version}"),
            ("state", label(pb.InstallationState, i.state, "INSTALLATION_STATE_")),
            ("path", i.path or "-"),
            ("requester", i.requester or "-"),
            ("approval", i.approval or "-"),
            ("removed", f"{_ts(i, 'remove_time')} by {i.remover or '-'}"),
        ]
    )


def approval_table(approvals: Sequence[pb.Approval]) -> str:
    if not approvals:
        return "No approvals."
    rows = [
        [
            short_id(a.name),
            short_id(a.capsule),
            a.version,
            joined(a.permissions),
            a.requester or "-",
            label(pb.ApprovalState, a.state, "APPROVAL_STATE_"),
            _short(a.policy_reason, 40) or "-",
            _ts(a, "expire_time"),
        ]
        for a in approvals
    ]
    return render.table(APPROVAL_COLUMNS, rows)


def approval_details(a: pb.Approval) -> str:
    return render.fields(
        [
            ("name", a.name),
            ("capsule", f"{a.capsule} {a.version}"),
            ("permissions", joined(a.permissions)),
            ("requester", a.requester or "-"),
            ("policy reason", a.policy_reason or "-"),
            ("state", label(pb.ApprovalState, a.state, "APPROVAL_STATE_")),
            ("approver", a.approver or "-"),
            ("comment", a.comment or "-"),
            ("installation", a.installation or "-"),
            ("expires", _ts(a, "expire_time")),
            ("decided", _ts(a, "decide_time")),
        ]
    )
