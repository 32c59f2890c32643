"""The capsule registry through Envoy on the shared mesh: publish over gRPC and REST, signatures
(tampered, wrong key, revoked key, missing, bundle), the malicious-archive corpus refused at
publish with nothing written, publisher keys, search/filter/sort/paging, versions, cross-tenant
visibility and ownership, bad inputs with their exact codes, and the audit trail.

Capsule names are global, so every capsule name carries a random suffix; each module works in
tenants of its own.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import tarfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.rpc import error_details_pb2, status_pb2

from soma.capsule.v1 import capsule_pb2 as c
from soma.capsule.v1 import resources_pb2 as pb
from tests.integration.capsules import (
    CHUNK,
    DENIED,
    INVALID,
    NOT_FOUND,
    PRECONDITION,
    Built,
    Entry,
    Signer,
    Tenant,
    audit_events,
    blob_path,
    capsule_dir,
    channel_for,
    error_reason,
    fails,
    file_upload,
    key_subject,
    leaked,
    make_key,
    manifest,
    metadata_for,
    methods_of,
    publish,
    raw_archive,
    register_key,
    rest,
    rest_publish_body,
    stub,
    tenant_fixture,
    unique,
    upload,
    zero_bomb,
)
from tests.integration.harness import MeshRunner

pytestmark = pytest.mark.integration

OK = grpc.StatusCode.OK


acme = tenant_fixture("reg-acme")


globex = tenant_fixture("reg-globex")


def tmp_files(mesh: MeshRunner) -> list[Path]:
    """Regular files left in the upload/extraction temp area (nothing once a call ended)."""
    root = capsule_dir(mesh) / "tmp"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


async def never_ending(
    first: c.PublishCapsuleRequest, stop: asyncio.Event
) -> AsyncIterator[c.PublishCapsuleRequest]:
    """An upload that sends its metadata and then waits: a refusal that arrives anyway was
    decided before any byte."""
    yield first
    await stop.wait()


async def refused_before_bytes(
    t: Tenant, meta: c.PublishCapsuleMetadata, code: grpc.StatusCode
) -> grpc.aio.AioRpcError:
    stop = asyncio.Event()
    try:
        return await fails(
            t.cap.PublishCapsule(
                never_ending(c.PublishCapsuleRequest(metadata=meta), stop), timeout=20
            ),
            code,
        )
    finally:
        stop.set()


# -- publish ---------------------------------------------------------------------------------------


async def test_publish_over_grpc_stores_verifies_and_describes_the_version(
    mesh: MeshRunner, acme: Tenant
) -> None:
    name = unique("hello")
    built = acme.build(
        name,
        "1.2.0",
        permissions=["storage.read"],
        description="Says hello",
        files={"README.md": b"# hello\n", "lib/util.py": b"X = 1\n"},
        random_files=3,
        random_bytes=(3 * CHUNK) // 2,  # more than one chunk
        homepage="https://example.com/hello",
        license="MIT",
    )
    signature = acme.signer.sign(built)  # ECDSA signatures differ every time: keep this one
    version = await acme.cap.PublishCapsule(
        file_upload(metadata_for(built, signature), built.path), timeout=60
    )

    assert version.name == f"capsules/{name}/versions/1.2.0"
    assert (version.tenant, version.version) == (acme.id, "1.2.0")
    assert version.digest == built.digest and version.size_bytes == built.size
    # capsule.yaml, bin/, bin/run.sh, README.md, lib/, lib/util.py, data/, data/000/, 3 blobs
    assert version.entry_count >= 8
    assert version.uncompressed_size_bytes >= (3 * CHUNK) // 2
    m = version.manifest
    assert (m.name, m.version, m.publisher, m.entrypoint) == (name, "1.2.0", acme.id, "bin/run.sh")
    assert list(m.permissions) == ["storage.read"] and m.description == "Says hello"
    assert (m.homepage, m.license) == ("https://example.com/hello", "MIT")
    s = version.signature
    assert s.format == pb.SIGNATURE_FORMAT_COSIGN
    assert s.algorithm == pb.SIGNATURE_ALGORITHM_ECDSA_P256_SHA256
    assert s.signature == signature and s.result == pb.VERIFICATION_RESULT_VERIFIED
    assert s.publisher_key == acme.key.name and s.key_fingerprint == acme.signer.fingerprint
    assert s.HasField("verify_time") and version.HasField("publish_time")
    assert version.uploader == key_subject(acme.admin) and not version.yanked

    # Content-addressed on disk, byte for byte; nothing left in the temp area.
    assert blob_path(mesh, built.digest).read_bytes() == built.data
    assert tmp_files(mesh) == []

    capsule = await acme.cap.GetCapsule(c.GetCapsuleRequest(name=f"capsules/{name}"))
    assert (capsule.tenant, capsule.latest_version, capsule.description) == (
        acme.id,
        "1.2.0",
        "Says hello",
    )
    assert capsule.verified and capsule.install_count == 0
    assert capsule.visibility == pb.CAPSULE_VISIBILITY_PRIVATE  # the default for a new capsule
    assert list(capsule.permissions) == ["storage.read"]
    assert (capsule.homepage, capsule.license) == ("https://example.com/hello", "MIT")
    assert capsule.HasField("create_time") and capsule.HasField("update_time")
    got = await acme.cap.GetCapsuleVersion(c.GetCapsuleVersionRequest(name=version.name))
    assert got == version

    checked = await acme.cap.VerifyCapsuleVersion(c.VerifyCapsuleVersionRequest(name=version.name))
    assert checked.verified and checked.result == pb.VERIFICATION_RESULT_VERIFIED
    assert checked.digest == built.digest and checked.name == version.name
    assert checked.signature.publisher_key == acme.key.name and checked.HasField("verify_time")


async def test_publish_over_rest_is_a_json_array_with_the_archive_in_base64(
    mesh: MeshRunner, acme: Tenant
) -> None:
    name = unique("rest-pub")
    built = acme.build(name, "0.1.0", files={"hello.txt": b"hi\n"}, random_bytes=200_000)
    body = rest_publish_body(built, acme.signer.sign(built), visibility="CAPSULE_VISIBILITY_PUBLIC")
    resp = rest(mesh, acme.admin, "POST", "/v1/capsules:publish", body)
    assert resp.status == 200, resp.body
    version = resp.json()
    assert version["name"] == f"capsules/{name}/versions/0.1.0"
    assert version["digest"] == built.digest and int(version["size_bytes"]) == built.size
    assert version["signature"]["result"] == "VERIFICATION_RESULT_VERIFIED"
    assert blob_path(mesh, built.digest).read_bytes() == built.data

    got = rest(mesh, acme.admin, "GET", f"/v1/capsules/{name}")
    assert got.status == 200, got.body
    assert got.json()["latest_version"] == "0.1.0"
    assert got.json()["visibility"] == "CAPSULE_VISIBILITY_PUBLIC"
    versions = rest(mesh, acme.admin, "GET", f"/v1/capsules/{name}/versions")
    assert [v["version"] for v in versions.json()["capsule_versions"]] == ["0.1.0"]

    # The same upload split in two messages (metadata, then the bytes) works too.
    built2 = acme.build(name, "0.2.0")
    split = rest_publish_body(built2, acme.signer.sign(built2))
    split = [{"metadata": split[0]["metadata"]}, {"chunk": split[0]["chunk"]}]
    resp2 = rest(mesh, acme.admin, "POST", "/v1/capsules:publish", split)
    assert resp2.status == 200, resp2.body
    assert resp2.json()["version"] == "0.2.0"

    # A REST refusal is a JSON google.rpc.Status: here the digest does not match the bytes.
    built3 = acme.build(name, "0.3.0")
    bad = rest_publish_body(built3, acme.signer.sign(built3), digest="sha256:" + "0" * 64)
    refused = rest(mesh, acme.admin, "POST", "/v1/capsules:publish", bad)
    assert refused.status == 400, refused.body
    assert refused.json()["code"] == 3  # INVALID_ARGUMENT


async def test_same_version_same_bytes_is_idempotent_other_bytes_already_exists(
    acme: Tenant,
) -> None:
    name = unique("twice")
    built, first = await acme.publish(name, "1.0.0")
    again = await publish(acme.cap, built, acme.signer)
    assert again == first  # the existing version, unchanged (same publish_time)

    other = acme.build(name, "1.0.0", files={"extra.txt": b"different bytes"})
    await fails(publish(acme.cap, other, acme.signer), grpc.StatusCode.ALREADY_EXISTS, "1.0.0")
    got = await acme.cap.GetCapsuleVersion(c.GetCapsuleVersionRequest(name=first.name))
    assert got.digest == built.digest


async def test_sigstore_bundle_is_accepted_and_recorded_as_such(acme: Tenant) -> None:
    name = unique("bundled")
    built = acme.build(name, "1.0.0")
    bundle = acme.signer.bundle(built)
    meta = metadata_for(built, bundle=bundle)
    version = await acme.cap.PublishCapsule(upload(meta, built.data), timeout=30)
    assert version.signature.format == pb.SIGNATURE_FORMAT_SIGSTORE_BUNDLE
    assert version.signature.result == pb.VERIFICATION_RESULT_VERIFIED
    assert version.signature.publisher_key == acme.key.name
    # ... and a bundle that is not one is refused with the field named.
    built2 = acme.build(name, "1.0.1")
    meta2 = metadata_for(built2, bundle='{"mediaType": "nonsense"}')
    error = await fails(acme.cap.PublishCapsule(upload(meta2, built2.data)), INVALID, "bundle")
    assert error_field(error) == "metadata.sigstore_bundle", error_field(error)


# -- signatures refused ----------------------------------------------------------------------------


def tamper_gzip_mtime(built: Any, out: Path) -> Path:
    """The same archive with one header byte changed (gzip's mtime field): still a valid
    archive with the same contents, but other bytes, so another digest."""
    data = bytearray(built.data)
    data[4] ^= 0x01
    out.write_bytes(bytes(data))
    return out


async def test_tampered_archive_is_refused(acme: Tenant) -> None:
    name = unique("tampered")
    original = acme.build(name, "1.0.0")
    signature = acme.signer.sign(original)
    tampered = Built(
        tamper_gzip_mtime(original, acme.work / f"{name}-tampered.tar.gz"), name, "1.0.0"
    )
    with gzip.open(tampered.path) as g1, gzip.open(original.path) as g2:
        assert g1.read() == g2.read()  # same contents: only the signature can tell

    # Declared with its own digest: the bytes are consistent, the signature is not.
    error = await fails(
        acme.cap.PublishCapsule(upload(metadata_for(tampered, signature), tampered.data)),
        PRECONDITION,
    )
    assert "signature" in (error.details() or "").lower()
    # Declared with the original's digest: the upload does not match what was announced.
    meta = metadata_for(tampered, signature, digest=original.digest)
    error = await fails(acme.cap.PublishCapsule(upload(meta, tampered.data)), INVALID)
    assert "digest" in (error.details() or "").lower()
    await fails(acme.cap.GetCapsule(c.GetCapsuleRequest(name=f"capsules/{name}")), NOT_FOUND)


async def test_wrong_key_garbage_and_missing_signatures_are_refused(acme: Tenant) -> None:
    name = unique("unsigned")
    built = acme.build(name, "1.0.0")
    stranger = Signer.new()  # never registered
    error = await fails(
        acme.cap.PublishCapsule(upload(metadata_for(built, stranger.sign(built)), built.data)),
        PRECONDITION,
    )
    assert "signature" in (error.details() or "").lower()
    # Well-formed base64 that is no DER signature at all.
    garbage = base64.b64encode(b"\x30\x06\x02\x01\x01\x02\x01\x01").decode()
    await fails(
        acme.cap.PublishCapsule(upload(metadata_for(built, garbage), built.data)), PRECONDITION
    )
    # No signature at all: the request is incomplete.
    error = await fails(acme.cap.PublishCapsule(upload(metadata_for(built), built.data)), INVALID)
    assert "signature" in (error.details() or "").lower()
    # Naming a key that is not the one that signed.
    other = await register_key(acme.cap, Signer.new(), "other")
    meta = metadata_for(built, acme.signer.sign(built), publisher_key=other.name)
    await fails(acme.cap.PublishCapsule(upload(meta, built.data)), PRECONDITION)
    await fails(acme.cap.GetCapsule(c.GetCapsuleRequest(name=f"capsules/{name}")), NOT_FOUND)


async def test_revoked_publisher_key_no_longer_publishes_and_unverifies_its_versions(
    acme: Tenant,
) -> None:
    signer = Signer.new()
    key = await register_key(acme.cap, signer, "to-revoke")
    name = unique("revoked")
    _, version = await acme.publish(name, "1.0.0", signer=signer)
    assert version.signature.publisher_key == key.name

    revoked = await acme.cap.RevokePublisherKey(
        c.RevokePublisherKeyRequest(name=key.name, reason="laptop stolen")
    )
    assert revoked.state == pb.PUBLISHER_KEY_STATE_REVOKED and revoked.HasField("revoke_time")
    again = await acme.cap.RevokePublisherKey(c.RevokePublisherKeyRequest(name=key.name))
    assert again == revoked  # unchanged

    built = acme.build(name, "1.1.0")
    error = await fails(publish(acme.cap, built, signer), PRECONDITION)
    assert "revoked" in (error.details() or "").lower()
    meta = metadata_for(built, signer.sign(built), publisher_key=key.name)
    await fails(acme.cap.PublishCapsule(upload(meta, built.data)), PRECONDITION, "revoked")

    # Versions it signed stop verifying, and the capsule is no longer `verified`.
    got = await acme.cap.GetCapsuleVersion(c.GetCapsuleVersionRequest(name=version.name))
    assert got.signature.result == pb.VERIFICATION_RESULT_KEY_REVOKED
    capsule = await acme.cap.GetCapsule(c.GetCapsuleRequest(name=f"capsules/{name}"))
    assert not capsule.verified
    checked = await acme.cap.VerifyCapsuleVersion(c.VerifyCapsuleVersionRequest(name=version.name))
    assert not checked.verified and checked.result == pb.VERIFICATION_RESULT_KEY_REVOKED
    assert checked.message


# -- the malicious corpus --------------------------------------------------------------------------


def corpus(marker: str) -> dict[str, tuple[list[Entry], str, str]]:
    """case -> (entries after a valid manifest and entrypoint, ErrorInfo reason, text in the
    message). Every escape aims at a path containing `marker`, so a leak is findable."""
    sym, lnk, dev = tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE
    return {
        "absolute path": (
            [Entry(f"/tmp/{marker}", b"pwned")],
            "ARCHIVE_ABSOLUTE_PATH",
            f"/tmp/{marker}",
        ),
        "dot-dot": ([Entry(f"../../{marker}", b"pwned")], "ARCHIVE_PATH_TRAVERSAL", marker),
        "dot-dot inside": (
            [Entry(f"lib/../../{marker}", b"pwned")],
            "ARCHIVE_PATH_TRAVERSAL",
            marker,
        ),
        "symlink out (absolute)": (
            [Entry(f"{marker}-link", type=sym, linkname="/etc/passwd")],
            "ARCHIVE_LINK_ESCAPE",
            marker,
        ),
        "symlink out (relative)": (
            [Entry(f"lib/{marker}-link", type=sym, linkname="../../..")],
            "ARCHIVE_LINK_ESCAPE",
            marker,
        ),
        "file through a symlink": (
            [
                Entry(f"{marker}-dir", type=sym, linkname="bin"),  # inside the tree ...
                Entry(f"{marker}-dir/{marker}", b"pwned"),  # ... but nothing goes through it
            ],
            "ARCHIVE_THROUGH_SYMLINK",
            marker,
        ),
        "hardlink out": (
            [Entry(f"{marker}-hard", type=lnk, linkname="/etc/passwd")],
            "ARCHIVE_LINK_ESCAPE",
            marker,
        ),
        "hardlink out (relative)": (
            [Entry(f"{marker}-hard", type=lnk, linkname=f"../../{marker}")],
            "ARCHIVE_LINK_ESCAPE",
            marker,
        ),
        "device file": (
            [Entry(f"{marker}-null", type=dev, mode=0o666, devmajor=1, devminor=3)],
            "ARCHIVE_DEVICE",
            marker,
        ),
        "fifo": ([Entry(f"{marker}-fifo", type=tarfile.FIFOTYPE)], "ARCHIVE_DEVICE", marker),
        "setuid": (
            [Entry(f"{marker}-suid", b"#!/bin/sh\n", mode=0o4755)],
            "ARCHIVE_SETUID",
            marker,
        ),
        "setgid": (
            [Entry(f"{marker}-sgid", b"#!/bin/sh\n", mode=0o2755)],
            "ARCHIVE_SETUID",
            marker,
        ),
        "duplicate name": (
            [Entry(f"{marker}.txt", b"one"), Entry(f"{marker}.txt", b"two")],
            "ARCHIVE_DUPLICATE_NAME",
            marker,
        ),
        "case collision": (
            [Entry(f"{marker}.txt", b"one"), Entry(f"{marker.upper()}.TXT", b"two")],
            "ARCHIVE_CASE_COLLISION",
            marker,
        ),
        "unicode collision": (
            [
                Entry(f"{marker}-caf\u00e9.txt", b"nfc"),
                Entry(f"{marker}-cafe\u0301.txt", b"nfd"),
            ],
            "ARCHIVE_UNICODE_COLLISION",
            marker,
        ),
        "backslash": (
            [Entry(f"..\\..\\{marker}", b"pwned")],
            "ARCHIVE_BACKSLASH",
            marker,
        ),
    }


CORPUS = list(corpus("x"))


@pytest.mark.parametrize("case", CORPUS)
async def test_malicious_archive_is_refused_at_publish_and_writes_nothing(
    mesh: MeshRunner, acme: Tenant, case: str
) -> None:
    marker = "escaped-" + uuid.uuid4().hex[:12]
    entries, reason, text = corpus(marker)[case]
    name = unique("evil")
    built = raw_archive(acme.work, name, "1.0.0", acme.id, entries)
    error = await fails(publish(acme.cap, built, acme.signer), INVALID)
    assert error_reason(error) == reason, (error_reason(error), error.details())
    assert text.lower() in (error.details() or "").lower(), error.details()
    # Nothing of it anywhere: not at the escape targets, not in the mesh, not stored.
    assert leaked(mesh, marker) == []
    assert not blob_path(mesh, built.digest).exists()
    assert tmp_files(mesh) == []
    await fails(acme.cap.GetCapsule(c.GetCapsuleRequest(name=f"capsules/{name}")), NOT_FOUND)


async def test_bomb_is_stopped_at_the_ratio_limit(mesh: MeshRunner, acme: Tenant) -> None:
    name = unique("bomb")
    # 256 MiB of zeros in about 260 KB: a ratio of ~1000 (the limit is 200).
    built = zero_bomb(acme.work, name, "1.0.0", acme.id, 256 << 20)
    assert built.size < 1 << 20
    error = await fails(publish(acme.cap, built, acme.signer), INVALID)
    assert error_reason(error) == "ARCHIVE_RATIO", error.details()
    assert not blob_path(mesh, built.digest).exists() and tmp_files(mesh) == []


async def test_too_many_entries_corrupt_and_incomplete_archives_are_refused(
    mesh: MeshRunner, acme: Tenant
) -> None:
    cases: list[tuple[Built, str]] = []
    name = unique("many")
    cases.append(
        (
            raw_archive(
                acme.work,
                name,
                "1.0.0",
                acme.id,
                [Entry(f"f/{i:05d}") for i in range(10_001)],
                tar_format=tarfile.USTAR_FORMAT,
            ),
            "ARCHIVE_TOO_MANY_ENTRIES",
        )
    )
    corrupt = acme.work / f"{name}-corrupt.tar.gz"
    good = acme.build(name, "1.0.0", random_bytes=50_000)
    corrupt.write_bytes(good.data[: good.size // 2])  # truncated mid-stream
    cases.append((Built(corrupt, name, "1.0.0"), "ARCHIVE_CORRUPT"))
    cases.append(
        (
            raw_archive(
                acme.work, name, "1.0.0", acme.id, [Entry("x.txt", b"x")], with_manifest=False
            ),
            "MANIFEST_MISSING",
        )
    )
    no_entry = [Entry("capsule.yaml", manifest(name, "1.0.0", acme.id, entrypoint="bin/nope"))]
    cases.append(
        (
            raw_archive(acme.work, name, "1.0.0", acme.id, no_entry, with_manifest=False),
            "ENTRYPOINT_MISSING",
        )
    )
    for built, reason in cases:
        error = await fails(publish(acme.cap, built, acme.signer), INVALID)
        assert error_reason(error) == reason, (reason, error_reason(error), error.details())
        assert not blob_path(mesh, built.digest).exists()
    assert tmp_files(mesh) == []


async def test_manifest_must_match_the_metadata_and_the_publisher(
    acme: Tenant, globex: Tenant
) -> None:
    name = unique("mismatch")
    built = acme.build(name, "1.0.0")
    sig = acme.signer.sign(built)
    for meta, text in (
        (metadata_for(built, sig, capsule=f"capsules/{name}x"), "name"),
        (metadata_for(built, sig, version="1.0.1"), "version"),
    ):
        error = await fails(acme.cap.PublishCapsule(upload(meta, built.data)), INVALID)
        assert text in (error.details() or "").lower()
    # A manifest that names another tenant as its publisher.
    foreign = globex.build(unique("foreign"), "1.0.0")
    error = await fails(publish(acme.cap, foreign, acme.signer), INVALID, "publisher")


async def test_upload_stream_shape_and_size_are_checked(acme: Tenant) -> None:
    name = unique("shape")
    built = acme.build(name, "1.0.0", random_bytes=100_000)
    sig = acme.signer.sign(built)
    meta = metadata_for(built, sig)
    # No metadata first.
    await fails(acme.cap.PublishCapsule(upload(None, built.data)), INVALID, "metadata")
    # Metadata twice.
    twice = [c.PublishCapsuleRequest(metadata=meta), *upload(meta, built.data)]
    await fails(acme.cap.PublishCapsule(iter(twice)), INVALID, "metadata")
    # Fewer and more bytes than announced.
    await fails(acme.cap.PublishCapsule(upload(meta, built.data[:-10])), INVALID)
    await fails(acme.cap.PublishCapsule(upload(meta, built.data + b"\0" * 10)), INVALID)
    # Larger than the service's limit (100 MiB): refused before any byte is accepted.
    big = metadata_for(built, sig, size_bytes=101 << 20)
    await refused_before_bytes(acme, big, grpc.StatusCode.RESOURCE_EXHAUSTED)
    # Metadata that is malformed in itself.
    for overrides in (
        {"capsule": "capsules/Bad_Name"},
        {"capsule": "hello"},
        {"capsule": "capsules/a"},  # one character: names have 2 to 63
        {"capsule": "capsules/" + "a" * 64},
        {"version": "1.0"},
        {"version": "v1.0.0"},
        {"version": "1.0.0+build.1"},  # build metadata is not allowed
        {"size_bytes": -1},
        {"digest": "md5:abc"},
        {"digest": "sha256:XYZ"},
        {"publisher_key": "keys/abc"},
    ):
        bad = metadata_for(built, sig, **overrides)
        await fails(acme.cap.PublishCapsule(upload(bad, built.data)), INVALID)
    await fails(acme.cap.GetCapsule(c.GetCapsuleRequest(name=f"capsules/{name}")), NOT_FOUND)


async def test_only_admins_publish_and_manage_keys(mesh: MeshRunner, acme: Tenant) -> None:
    member = make_key(mesh, acme.id, "member")
    built = acme.build(unique("by-member"), "1.0.0")
    async with channel_for(mesh, member) as ch:
        cap = stub(ch)
        await fails(publish(cap, built, acme.signer), DENIED)
        await fails(register_key(cap, Signer.new()), DENIED)
        await fails(cap.RevokePublisherKey(c.RevokePublisherKeyRequest(name=acme.key.name)), DENIED)
        # Members still read their tenant's keys.
        listed = await cap.ListPublisherKeys(c.ListPublisherKeysRequest())
        assert acme.key.name in [k.name for k in listed.publisher_keys]


# -- publisher keys --------------------------------------------------------------------------------


async def test_publisher_keys_register_list_and_refuse_bad_pems(
    acme: Tenant, globex: Tenant
) -> None:
    signer = Signer.new()
    key = await register_key(acme.cap, signer, "ci")
    assert key.name.startswith("publisherKeys/") and len(key.name.split("/")[1]) == 36
    assert (key.tenant, key.display_name, key.fingerprint) == (acme.id, "ci", signer.fingerprint)
    assert key.algorithm == pb.SIGNATURE_ALGORITHM_ECDSA_P256_SHA256
    assert key.state == pb.PUBLISHER_KEY_STATE_ACTIVE and not key.HasField("revoke_time")
    assert key.creator == key_subject(acme.admin) and key.HasField("create_time")
    assert key.public_key_pem.strip() == signer.public_pem.strip()
    await fails(register_key(acme.cap, signer), grpc.StatusCode.ALREADY_EXISTS)

    got = await acme.cap.GetPublisherKey(c.GetPublisherKeyRequest(name=key.name))
    assert got == key
    listed = await acme.cap.ListPublisherKeys(c.ListPublisherKeysRequest())
    names = [k.name for k in listed.publisher_keys]
    assert names[0] == key.name and acme.key.name in names  # newest first
    active = await acme.cap.ListPublisherKeys(
        c.ListPublisherKeysRequest(state=pb.PUBLISHER_KEY_STATE_REVOKED)
    )
    assert key.name not in [k.name for k in active.publisher_keys]
    paged = await acme.cap.ListPublisherKeys(c.ListPublisherKeysRequest(page_size=1))
    assert len(paged.publisher_keys) == 1 and paged.next_page_token

    # Another tenant sees none of it.
    await fails(globex.cap.GetPublisherKey(c.GetPublisherKeyRequest(name=key.name)), NOT_FOUND)
    await fails(
        globex.cap.RevokePublisherKey(c.RevokePublisherKeyRequest(name=key.name)), NOT_FOUND
    )
    theirs = await globex.cap.ListPublisherKeys(c.ListPublisherKeysRequest())
    assert key.name not in [k.name for k in theirs.publisher_keys]

    rsa_pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    p384_pem = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    private_pem = signer.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    for pem in (rsa_pem, p384_pem, "not a pem", "", private_pem, "A" * 5000):
        error = await fails(
            acme.cap.RegisterPublisherKey(
                c.RegisterPublisherKeyRequest(publisher_key=pb.PublisherKey(public_key_pem=pem))
            ),
            INVALID,
        )
        assert "public_key_pem" in str(error.details()) or error_field(error) == (
            "publisher_key.public_key_pem"
        )
    await fails(
        acme.cap.GetPublisherKey(c.GetPublisherKeyRequest(name=f"publisherKeys/{uuid.uuid4()}")),
        NOT_FOUND,
    )
    await fails(acme.cap.GetPublisherKey(c.GetPublisherKeyRequest(name="publisherKeys/x")), INVALID)
    await fails(acme.cap.ListPublisherKeys(c.ListPublisherKeysRequest(page_size=-1)), INVALID)


def error_field(error: grpc.aio.AioRpcError) -> str:
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    if not isinstance(raw, bytes):
        return ""
    for detail in status_pb2.Status.FromString(raw).details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad) and bad.field_violations:
            return bad.field_violations[0].field
    return ""


# -- listing ---------------------------------------------------------------------------------------


async def test_list_search_filter_sort_and_page(acme: Tenant, globex: Tenant) -> None:
    token = "zq" + uuid.uuid4().hex[:8]  # a word only these capsules have
    names = {k: f"{token}-{k}" for k in ("alpha", "bravo", "charlie", "delta", "echo")}
    spare = Signer.new()
    spare_key = await register_key(acme.cap, spare, "spare")
    for key, name in names.items():
        await acme.publish(
            name,
            "1.0.0",
            description=f"The {key.upper()} capsule ({token.upper()} suite)",
            permissions=["network"] if key in ("bravo", "delta") else [],
            visibility=pb.CAPSULE_VISIBILITY_PUBLIC if key != "echo" else 0,
            signer=spare if key == "charlie" else None,
        )
    # charlie becomes unverified; alpha gets a newer version (most recently updated).
    await acme.cap.RevokePublisherKey(c.RevokePublisherKeyRequest(name=spare_key.name))
    await acme.publish(names["alpha"], "1.1.0", description=f"The ALPHA capsule ({token})")

    async def listed(cap: Any = None, **kw: Any) -> list[str]:
        out, page_token = [], ""
        while True:
            resp = await (cap or acme.cap).ListCapsules(
                c.ListCapsulesRequest(query=token, page_token=page_token, **kw)
            )
            out += [x.name.split("/")[1] for x in resp.capsules]
            page_token = resp.next_page_token
            if not page_token:
                return out

    all_names = sorted(names.values())
    assert await listed(order_by=c.CAPSULE_ORDER_NAME) == all_names
    # The query is case-insensitive and searches descriptions too.
    by_description = await acme.cap.ListCapsules(
        c.ListCapsulesRequest(query=f"BRAVO capsule ({token}", order_by=c.CAPSULE_ORDER_NAME)
    )
    assert [x.name for x in by_description.capsules] == [f"capsules/{names['bravo']}"]
    upper = await acme.cap.ListCapsules(c.ListCapsulesRequest(query=token.upper()))
    assert len(upper.capsules) == 5
    # Paging: every capsule once, in order, two at a time.
    assert await listed(order_by=c.CAPSULE_ORDER_NAME, page_size=2) == all_names
    first = await acme.cap.ListCapsules(
        c.ListCapsulesRequest(query=token, page_size=2, order_by=c.CAPSULE_ORDER_NAME)
    )
    assert len(first.capsules) == 2 and first.next_page_token
    # Filters.
    assert await listed(order_by=c.CAPSULE_ORDER_NAME, permission="network") == sorted(
        [names["bravo"], names["delta"]]
    )
    assert names["charlie"] not in await listed(verified_only=True)
    assert len(await listed(verified_only=True)) == 4
    assert await listed(publisher=acme.id, order_by=c.CAPSULE_ORDER_NAME) == all_names
    assert await listed(publisher=globex.id) == []
    # Most recently updated first: alpha got a version last, then echo was published last.
    updated = await listed(order_by=c.CAPSULE_ORDER_UPDATE_TIME)
    assert updated[:2] == [names["alpha"], names["echo"]]
    assert updated[2:] == [names["delta"], names["charlie"], names["bravo"]]
    # Most installed first (all 0 here): then by name; the default order.
    assert await listed(order_by=c.CAPSULE_ORDER_INSTALL_COUNT) == all_names
    assert await listed() == all_names

    alpha = await acme.cap.GetCapsule(c.GetCapsuleRequest(name=f"capsules/{names['alpha']}"))
    assert alpha.latest_version == "1.1.0" and alpha.verified

    # Another tenant sees the public ones only.
    assert await listed(globex.cap, order_by=c.CAPSULE_ORDER_NAME) == sorted(
        n for k, n in names.items() if k != "echo"
    )

    # A page token belongs to its query.
    await fails(
        acme.cap.ListCapsules(
            c.ListCapsulesRequest(query=token + "x", page_size=2, page_token=first.next_page_token)
        ),
        INVALID,
    )


async def test_list_bad_inputs(acme: Tenant) -> None:
    for request in (
        c.ListCapsulesRequest(page_size=-1),
        c.ListCapsulesRequest(page_token="not-a-token"),
        c.ListCapsulesRequest(query="q" * 201),
        c.ListCapsulesRequest(order_by=99),  # type: ignore[arg-type]
    ):
        await fails(acme.cap.ListCapsules(request), INVALID)
    big = await acme.cap.ListCapsules(c.ListCapsulesRequest(page_size=10_000))
    assert len(big.capsules) <= 500
    for name in ("", "hello", "capsules/", "capsules/Hello", "capsules/-x", "capsules/a"):
        await fails(acme.cap.GetCapsule(c.GetCapsuleRequest(name=name)), INVALID)
    await fails(
        acme.cap.GetCapsule(c.GetCapsuleRequest(name=f"capsules/{unique('nobody')}")), NOT_FOUND
    )
    for name in ("capsules/hello/versions/1.0", "capsules/hello/versions/", "capsules/hello"):
        await fails(acme.cap.GetCapsuleVersion(c.GetCapsuleVersionRequest(name=name)), INVALID)
    await fails(
        acme.cap.ListCapsuleVersions(c.ListCapsuleVersionsRequest(parent="capsules/x_y")), INVALID
    )
    await fails(
        acme.cap.ListCapsuleVersions(
            c.ListCapsuleVersionsRequest(parent=f"capsules/{unique('nobody')}")
        ),
        NOT_FOUND,
    )


async def test_versions_are_listed_highest_semver_first(acme: Tenant) -> None:
    name = unique("semver")
    for version in ("1.2.0", "1.10.0", "1.9.0", "1.10.0-beta.1", "0.9.12"):
        await acme.publish(name, version)
    pages, token = [], ""
    while True:
        resp = await acme.cap.ListCapsuleVersions(
            c.ListCapsuleVersionsRequest(parent=f"capsules/{name}", page_size=2, page_token=token)
        )
        pages.append([v.version for v in resp.capsule_versions])
        token = resp.next_page_token
        if not token:
            break
    assert pages == [["1.10.0", "1.10.0-beta.1"], ["1.9.0", "1.2.0"], ["0.9.12"]]
    capsule = await acme.cap.GetCapsule(c.GetCapsuleRequest(name=f"capsules/{name}"))
    assert capsule.latest_version == "1.10.0"
    await fails(
        acme.cap.ListCapsuleVersions(
            c.ListCapsuleVersionsRequest(parent=f"capsules/{name}", page_size=-1)
        ),
        INVALID,
    )
    await fails(
        acme.cap.GetCapsuleVersion(
            c.GetCapsuleVersionRequest(name=f"capsules/{name}/versions/3.0.0")
        ),
        NOT_FOUND,
    )


async def test_yank_is_for_the_publisher_and_keeps_the_version_listed(
    mesh: MeshRunner, acme: Tenant, globex: Tenant
) -> None:
    name = unique("yank")
    await acme.publish(name, "1.0.0", visibility=pb.CAPSULE_VISIBILITY_PUBLIC)
    _, v11 = await acme.publish(name, "1.1.0")
    await fails(globex.cap.YankCapsuleVersion(c.YankCapsuleVersionRequest(name=v11.name)), DENIED)
    member = make_key(mesh, acme.id, "member")
    async with channel_for(mesh, member) as ch:
        await fails(stub(ch).YankCapsuleVersion(c.YankCapsuleVersionRequest(name=v11.name)), DENIED)

    yanked = await acme.cap.YankCapsuleVersion(
        c.YankCapsuleVersionRequest(name=v11.name, reason="CVE-2099-0001")
    )
    assert yanked.yanked and yanked.yank_reason == "CVE-2099-0001" and yanked.HasField("yank_time")
    capsule = await acme.cap.GetCapsule(c.GetCapsuleRequest(name=f"capsules/{name}"))
    assert capsule.latest_version == "1.0.0"
    versions = await acme.cap.ListCapsuleVersions(
        c.ListCapsuleVersionsRequest(parent=f"capsules/{name}")
    )
    assert [(v.version, v.yanked) for v in versions.capsule_versions] == [
        ("1.1.0", True),
        ("1.0.0", False),
    ]
    await fails(
        acme.cap.YankCapsuleVersion(
            c.YankCapsuleVersionRequest(name=f"capsules/{name}/versions/9.9.9")
        ),
        NOT_FOUND,
    )
    await fails(
        acme.cap.YankCapsuleVersion(c.YankCapsuleVersionRequest(name=v11.name, reason="r" * 501)),
        INVALID,
    )


# -- tenants ---------------------------------------------------------------------------------------


async def test_private_capsules_are_invisible_and_names_are_owned(
    acme: Tenant, globex: Tenant
) -> None:
    private = unique("private")
    public = unique("public")
    _, pv = await acme.publish(private, "1.0.0")
    await acme.publish(public, "1.0.0", visibility=pb.CAPSULE_VISIBILITY_PUBLIC)

    for call in (
        globex.cap.GetCapsule(c.GetCapsuleRequest(name=f"capsules/{private}")),
        globex.cap.GetCapsuleVersion(c.GetCapsuleVersionRequest(name=pv.name)),
        globex.cap.ListCapsuleVersions(c.ListCapsuleVersionsRequest(parent=f"capsules/{private}")),
        globex.cap.VerifyCapsuleVersion(c.VerifyCapsuleVersionRequest(name=pv.name)),
        globex.cap.YankCapsuleVersion(c.YankCapsuleVersionRequest(name=pv.name)),
    ):
        error = await fails(call, NOT_FOUND)
        assert acme.id not in (error.details() or "")  # not even who owns it
    seen = await globex.cap.ListCapsules(c.ListCapsulesRequest(query=private))
    assert list(seen.capsules) == []
    shown = await globex.cap.GetCapsule(c.GetCapsuleRequest(name=f"capsules/{public}"))
    assert shown.tenant == acme.id

    # Names are global: globex cannot publish under acme's names, public or private, and is
    # told so before it sends a byte.
    for name in (private, public):
        theirs = globex.build(name, "2.0.0")
        meta = metadata_for(theirs, globex.signer.sign(theirs))
        await refused_before_bytes(globex, meta, DENIED)
        await fails(publish(globex.cap, theirs, globex.signer), DENIED)
    # The later publish keeps the visibility (unspecified = unchanged).
    await acme.publish(public, "1.1.0")
    again = await globex.cap.GetCapsule(c.GetCapsuleRequest(name=f"capsules/{public}"))
    assert again.latest_version == "1.1.0" and again.visibility == pb.CAPSULE_VISIBILITY_PUBLIC
    # ... and a private one can become public.
    await acme.publish(private, "1.1.0", visibility=pb.CAPSULE_VISIBILITY_PUBLIC)
    now = await globex.cap.GetCapsule(c.GetCapsuleRequest(name=f"capsules/{private}"))
    assert now.latest_version == "1.1.0"


# -- audit -----------------------------------------------------------------------------------------


async def test_registry_calls_are_audited(mesh: MeshRunner, acme: Tenant, globex: Tenant) -> None:
    name = unique("audited")
    built, version = await acme.publish(name, "1.0.0")
    await acme.cap.GetCapsule(c.GetCapsuleRequest(name=f"capsules/{name}"))
    stranger = Signer.new()
    other = acme.build(name, "1.0.1")
    await fails(publish(acme.cap, other, stranger), PRECONDITION)
    theirs = globex.build(name, "3.0.0")
    await fails(publish(globex.cap, theirs, globex.signer), DENIED)

    def on(resource_prefix: str, events: list[Any]) -> list[Any]:
        return [e for e in events if e.resource.startswith(resource_prefix)]

    def complete(events: list[Any]) -> bool:
        mine = on(f"capsules/{name}", events)
        codes = {(e.method.rsplit("/", 1)[1], e.status_code) for e in mine}
        return {("PublishCapsule", 0), ("PublishCapsule", 9), ("GetCapsule", 0)} <= codes

    events = await audit_events(mesh, acme.admin, complete)
    mine = on(f"capsules/{name}", events)
    assert complete(events), [(e.method, e.resource, e.status_code) for e in mine]
    published = next(e for e in mine if e.method.endswith("/PublishCapsule") and e.status_code == 0)
    assert published.actor.subject == key_subject(acme.admin) and published.tenant == acme.id
    assert "RegisterPublisherKey" in methods_of(events)
    # The signature is not a secret, but the archive bytes never go into an event.
    assert all(built.data[:64] not in e.SerializeToString() for e in mine)
    assert version.digest == built.digest

    theirs_events = await audit_events(
        mesh,
        globex.admin,
        lambda evs: any(e.method.endswith("/PublishCapsule") and e.status_code == 7 for e in evs),
    )
    denied = [e for e in theirs_events if e.method.endswith("/PublishCapsule")]
    assert any(e.status_code == 7 for e in denied), denied  # PERMISSION_DENIED, recorded
