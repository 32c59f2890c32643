"""The Capsule service's pure parts: settings, SemVer order, the approval policy, signature
trust, the blob store's uploads and temporary area, stored errors, progress plumbing."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.capsule import signing, trust
from services.capsule.blobs import BlobStore, check_digest, format_digest, hash_file
from services.capsule.errors import Failure
from services.capsule.installer import Hub, failure_of, phase_percent
from services.capsule.policy import ApprovalPolicy, InstallFacts
from services.capsule.settings import DEFAULT_POLICY_FILE, load_settings
from services.common.config import ConfigError, load_config
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.common.rego import PolicyError
from soma.capsule.v1 import resources_pb2 as pb

# -- settings ---------------------------------------------------------------------------------


def test_settings_defaults_and_environment(tmp_path: Path) -> None:
    config = load_config("capsule", {"SOMA_DATA_DIR": str(tmp_path), "SOMA_REPLICA": "capsule-1"})
    settings = load_settings(config, {})
    assert settings.root == (tmp_path / "capsules").resolve()
    assert settings.replica == "capsule-1"
    assert settings.max_bytes == 100 << 20
    assert settings.approval_ttl == timedelta(hours=24)
    assert settings.policy_file == DEFAULT_POLICY_FILE and DEFAULT_POLICY_FILE.is_file()
    custom = load_settings(
        config,
        {
            "SOMA_CAPSULE_DIR": str(tmp_path / "elsewhere"),
            "SOMA_CAPSULE_MAX_BYTES": "50MiB",
            "SOMA_CAPSULE_MAX_ENTRIES": "20",
            "SOMA_CAPSULE_MAX_UNPACKED_BYTES": "1GiB",
            "SOMA_CAPSULE_MAX_RATIO": "50",
            "SOMA_CAPSULE_APPROVAL_TTL": "90m",
        },
    )
    assert custom.root == (tmp_path / "elsewhere").resolve()
    assert custom.max_bytes == 50 << 20
    assert (custom.limits.max_entries, custom.limits.max_unpacked_bytes) == (20, 1 << 30)
    assert custom.limits.max_ratio == 50.0
    assert custom.approval_ttl == timedelta(minutes=90)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SOMA_CAPSULE_MAX_BYTES", "lots"),
        ("SOMA_CAPSULE_MAX_BYTES", "0"),
        ("SOMA_CAPSULE_APPROVAL_TTL", "tomorrow"),
        ("SOMA_CAPSULE_MAX_RATIO", "-1"),
    ],
)
def test_bad_settings_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings(load_config("capsule", {}), {name: value})


# -- the approval policy ---------------------------------------------------------------------------


def facts(**overrides: Any) -> InstallFacts:
    values: dict[str, Any] = {
        "tenant": "acme",
        "enterprise_mode": False,
        "capsule": "hello",
        "publisher": "acme",
        "visibility": pb.CAPSULE_VISIBILITY_PUBLIC,
        "version": "1.0.0",
        "permissions": [],
        "requester": "key:abc",
    }
    values.update(overrides)
    return InstallFacts(**values)


@pytest.fixture(scope="module")
def policy() -> ApprovalPolicy:
    return ApprovalPolicy(DEFAULT_POLICY_FILE)


@pytest.mark.parametrize(
    ("overrides", "required", "reason"),
    [
        ({}, False, "no sensitive permission requested"),
        ({"permissions": ["filesystem.read"]}, False, "no sensitive permission requested"),
        ({"permissions": ["network"]}, True, "requests sensitive permission network"),
        (
            {"permissions": ["secrets.read", "network.outbound", "filesystem.read"]},
            True,
            "requests sensitive permissions network.outbound, secrets.read",
        ),
        ({"permissions": ["networking"]}, False, "no sensitive permission requested"),
        ({"enterprise_mode": True}, False, "no sensitive permission requested"),
        (
            {"enterprise_mode": True, "publisher": "tools"},
            True,
            "tenant acme is in enterprise mode and capsule hello is published by another "
            "tenant (tools)",
        ),
    ],
)
def test_shipped_policy(
    policy: ApprovalPolicy, overrides: dict[str, Any], required: bool, reason: str
) -> None:
    decision = policy.decide(facts(**overrides))
    assert (decision.required, decision.reason) == (required, reason)


def test_policy_without_a_decision_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "capsule.rego"
    path.write_text(
        "package soma.capsule.approval\nimport rego.v1\n"
        'decision := {"required": false, "reason": "x"} if input.version == "1.0.0"\n'
    )
    policy = ApprovalPolicy(path)
    assert not policy.decide(facts()).required
    undefined = policy.decide(facts(version="2.0.0"))
    assert undefined.required and "no decision" in undefined.reason


def test_broken_policy_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "capsule.rego"
    path.write_text("package soma.capsule.approval\nallow := true\n")
    with pytest.raises(PolicyError, match=str(path)):
        ApprovalPolicy(path)


# -- trust ---------------------------------------------------------------------------------------


def key_row(public_pem: str, state: int = pb.PUBLISHER_KEY_STATE_ACTIVE) -> dict[str, Any]:
    public_key = signing.load_public_key(public_pem)
    return {
        "id": uuid.uuid4(),
        "display_name": "",
        "public_key_pem": public_pem,
        "fingerprint": signing.fingerprint(public_key),
        "key_hint": signing.key_hint(public_key),
        "state": state,
        "revoke_time": datetime.now(UTC) if state == pb.PUBLISHER_KEY_STATE_REVOKED else None,
    }


def new_key() -> tuple[Any, str]:
    private_pem, public_pem = signing.generate_keypair(None)
    return signing.load_private_key(private_pem, None), public_pem.decode()


def test_trust_verdicts() -> None:
    digest = hashlib.sha256(b"capsule bytes").digest()
    signer, signer_pem = new_key()
    _, other_pem = new_key()
    signature = signing.sign_digest(signer, digest)
    good, other = key_row(signer_pem), key_row(other_pem)
    verdict = trust.check([other, good], "acme", digest, signature)
    assert verdict.verified and verdict.key is good
    assert trust.check([good], "acme", digest, "").result == trust.NO_SIGNATURE
    assert trust.check([], "acme", digest, signature).result == trust.UNKNOWN_KEY
    assert trust.check([other], "acme", digest, signature).result == trust.BAD_SIGNATURE
    tampered = hashlib.sha256(b"capsule bytes!").digest()
    assert trust.check([good], "acme", tampered, signature).reason == "BAD_SIGNATURE"
    revoked = key_row(signer_pem, pb.PUBLISHER_KEY_STATE_REVOKED)
    assert trust.check([revoked], "acme", digest, signature).result == trust.KEY_REVOKED
    named = trust.check([good, other], "acme", digest, signature, key_id=str(other["id"]))
    assert named.result == trust.BAD_SIGNATURE and named.key is other
    missing = trust.check([good], "acme", digest, signature, key_id=str(uuid.uuid4()))
    assert missing.result == trust.UNKNOWN_KEY
    assert trust.check([good], "acme", digest, signature, hint="nope").result == trust.UNKNOWN_KEY
    hinted = trust.check([other, good], "acme", digest, signature, hint=good["key_hint"])
    assert hinted.verified


# -- blobs ---------------------------------------------------------------------------------------


def test_upload_is_hashed_limited_and_committed_by_digest(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, "capsule-0")
    store.prepare()
    upload = store.new_upload(declared_size=6, limit=10)
    upload.write(b"abc")
    upload.write(b"defgh")  # past the declared size: counted and hashed, not written
    digest = upload.finish()
    assert digest == format_digest(hashlib.sha256(b"abcdefgh").digest())
    assert upload.size == 8 and upload.path.read_bytes() == b"abcdef"
    with pytest.raises(ResourceExhausted):
        upload.write(b"xyz")  # 11 > 10
    upload.discard()
    good = store.new_upload(declared_size=3, limit=10)
    good.write(b"abc")
    digest = good.finish()
    path = good.commit(digest)
    assert path == store.path(digest) and path.read_bytes() == b"abc"
    assert hash_file(path) == (hashlib.sha256(b"abc").digest(), 3)
    again = store.new_upload(declared_size=3, limit=10)
    again.write(b"abc")
    assert again.commit(again.finish()) == path and not again.path.exists()
    assert not list(store.tmp_dir.iterdir())


def test_prepare_removes_only_this_replicas_leftovers(tmp_path: Path) -> None:
    mine, theirs = BlobStore(tmp_path, "capsule-0"), BlobStore(tmp_path, "capsule-1")
    for store in (mine, theirs):
        store.prepare()
        (store.tmp_dir / "half-extracted" / "dir").mkdir(parents=True)
        (store.temp_path("upload-x")).write_bytes(b"partial")
    assert sorted(mine.prepare()) == ["half-extracted", "upload-x"]
    assert not list(mine.tmp_dir.iterdir()) and len(list(theirs.tmp_dir.iterdir())) == 2


def test_discard_tree_and_digest_checks(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, "r/../x")  # a replica name never escapes tmp/
    store.prepare()
    assert store.tmp_dir.parent == tmp_path / "tmp"
    tree = tmp_path / "installed" / "a"
    (tree / "b").mkdir(parents=True)
    (tree / "b" / "f").write_text("x")
    store.discard_tree(tree)
    assert not tree.exists() and not list(store.tmp_dir.iterdir())
    store.discard_tree(tree)  # gone already: fine
    with pytest.raises(InvalidArgument):
        check_digest("sha256:ABC", "metadata.digest")
    with pytest.raises(InvalidArgument):
        store.path("md5:" + "0" * 32)


# -- errors and progress -----------------------------------------------------------------------


def test_stored_failures_round_trip_with_their_reason() -> None:
    failure = Failure.of(FailedPrecondition("rejected", reason="APPROVAL_REJECTED"))
    assert failure.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    again = failure_of(failure.status())
    assert again == failure
    error = again.error()
    assert isinstance(error, FailedPrecondition) and error.reason == "APPROVAL_REJECTED"
    unknown = Failure(13, "bug", "INTERNAL").error()
    assert unknown.code == grpc.StatusCode.INTERNAL


def test_phase_percentages_only_grow() -> None:
    phases = [
        (pb.INSTALL_PHASE_QUEUED, 0.0),
        (pb.INSTALL_PHASE_AWAITING_APPROVAL, 0.0),
        (pb.INSTALL_PHASE_VERIFYING_SIGNATURE, 0.0),
        (pb.INSTALL_PHASE_VERIFYING_SIGNATURE, 1.0),
        (pb.INSTALL_PHASE_EXTRACTING, 0.0),
        (pb.INSTALL_PHASE_EXTRACTING, 0.5),
        (pb.INSTALL_PHASE_EXTRACTING, 2.0),  # clamped
        (pb.INSTALL_PHASE_ACTIVATING, 0.0),
        (pb.INSTALL_PHASE_DONE, 0.0),
    ]
    values = [phase_percent(p, f) for p, f in phases]
    assert values == sorted(values) and values[-1] == 100.0 and max(values[:-1]) < 100


async def test_hub_wakes_waiters_and_forgets_unused_channels() -> None:
    hub = Hub()
    channel = hub.acquire("i1")
    waiter = channel.waiter()
    hub.poke("i1")
    await asyncio.wait_for(waiter.wait(), 1)
    assert not channel.waiter().is_set()  # the next change needs a new waiter
    hub.poke("unknown")  # nobody listens: nothing happens
    hub.release("i1")
    assert hub.acquire("i1") is not channel
