"""Which publisher key verifies a capsule's signature, and what to call it when none does.

Verification is offline: the signature (ECDSA P-256 over the archive's SHA-256, as `cosign
sign-blob --key` makes it) is checked against the publishing tenant's registered keys as they
are now. Used at publish (every active key, or the one named), at install and by
VerifyCapsuleVersion (the key recorded at publish).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.capsule import signing
from services.capsule.store import KEY_ACTIVE, Row
from services.common.errors import InvalidArgument
from soma.capsule.v1 import resources_pb2 as pb

VERIFIED = pb.VERIFICATION_RESULT_VERIFIED
BAD_SIGNATURE = pb.VERIFICATION_RESULT_BAD_SIGNATURE
UNKNOWN_KEY = pb.VERIFICATION_RESULT_UNKNOWN_KEY
KEY_REVOKED = pb.VERIFICATION_RESULT_KEY_REVOKED
NO_SIGNATURE = pb.VERIFICATION_RESULT_NO_SIGNATURE
DIGEST_MISMATCH = pb.VERIFICATION_RESULT_DIGEST_MISMATCH


@dataclass(frozen=True)
class Verdict:
    result: int  # VerificationResult
    key: Row | None  # the key that verified it (or that signed it, when revoked)
    message: str

    @property
    def verified(self) -> bool:
        return self.result == VERIFIED

    @property
    def reason(self) -> str:
        """An ErrorInfo reason, e.g. KEY_REVOKED."""
        return pb.VerificationResult.Name(self.result).removeprefix("VERIFICATION_RESULT_")

    @property
    def verified_key_id(self) -> str | None:
        """The id of the key that verified, to record on the version (None unless verified)."""
        return str(self.key["id"]) if self.key is not None and self.verified else None

    @property
    def key_fingerprint(self) -> str:
        """The fingerprint of the key the verdict names, or "" when it names none."""
        return self.key["fingerprint"] if self.key is not None else ""


def _name(key: Row) -> str:
    label = f" ({key['display_name']})" if key["display_name"] else ""
    return f"publisherKeys/{key['id']}{label}"


def _verifies(key: Row, digest: bytes, signature: str) -> bool:
    try:
        public_key = signing.load_public_key(key["public_key_pem"])
    except InvalidArgument:  # stored keys were checked when registered; never trust a bad one
        return False
    return signing.verify_digest(public_key, digest, signature)


def check(
    keys: Sequence[Row],
    tenant: str,
    digest: bytes,
    signature: str,
    *,
    key_id: str | None = None,
    hint: str = "",
) -> Verdict:
    """Verifies `signature` over `digest` with `tenant`'s `keys`. `key_id` restricts it to one
    key (named at publish, or recorded then); otherwise a key whose bundle hint matches is
    tried first, then every other key. A signature that verifies only with a revoked key is
    KEY_REVOKED, so a revocation is reported as such."""
    if not signature:
        return Verdict(NO_SIGNATURE, None, "the version carries no signature")
    if key_id is not None:
        named = [k for k in keys if str(k["id"]) == key_id]
        if not named:
            return Verdict(
                UNKNOWN_KEY,
                None,
                f"publisherKeys/{key_id} is not a publisher key of tenant {tenant}",
            )
        candidates = named
    else:
        if not keys:
            return Verdict(
                UNKNOWN_KEY,
                None,
                f"tenant {tenant} has no publisher keys; register the public key that signs its "
                "capsules first (RegisterPublisherKey, `soma capsule publisher-key add`)",
            )
        if hint and not any(k["key_hint"] == hint for k in keys):
            return Verdict(
                UNKNOWN_KEY,
                None,
                f"the bundle's publicKey hint {hint[:60]!r} matches no publisher key of tenant "
                f"{tenant}; register the key that made it",
            )
        # Active keys first: a key registered twice over time verifies as the active one.
        candidates = sorted(keys, key=lambda k: (k["key_hint"] != hint, k["state"] != KEY_ACTIVE))
    for key in candidates:
        if not _verifies(key, digest, signature):
            continue
        if key["state"] != KEY_ACTIVE:
            when = key["revoke_time"].isoformat() if key["revoke_time"] else "earlier"
            return Verdict(
                KEY_REVOKED,
                key,
                f"signed with publisher key {_name(key)}, revoked on {when}; it no longer "
                "vouches for anything: publish a version signed with an active key",
            )
        return Verdict(VERIFIED, key, f"signed with publisher key {_name(key)}")
    if len(candidates) == 1:
        return Verdict(
            BAD_SIGNATURE,
            candidates[0],
            f"the signature does not verify with publisher key {_name(candidates[0])}: the "
            "archive was changed after it was signed, or another key signed it",
        )
    return Verdict(
        BAD_SIGNATURE,
        None,
        f"the signature does not verify with any of the {len(candidates)} publisher keys of "
        f"tenant {tenant}: the archive was changed after it was signed, or it was signed with "
        "a key that is not registered",
    )


def check_published(keys: Sequence[Row], version: Row, digest: bytes) -> Verdict:
    """Verifies a published version (its capsule_versions row) again with its tenant's `keys`
    as they are now: the signature it was published with, by the key recorded then."""
    return check(
        keys,
        version["tenant"],
        digest,
        version["signature"],
        key_id=str(version["publisher_key"]) if version["publisher_key"] else None,
    )
