"""`soma capsule`: argument parsing, pack/keygen/sign end to end (offline, on a temp dir),
progress rendering, and the calls and their errors against a fake CapsuleService on port 0."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.rpc import code_pb2, error_details_pb2, status_pb2

from services.capsule import signing
from services.client import progress, sdk
from services.client.cli import build_parser, main, run
from soma.capsule.v1 import capsule_pb2, capsule_pb2_grpc
from soma.capsule.v1 import resources_pb2 as pb
from tests.unit.local_server import serving

MANIFEST = """\
name: hello
version: 1.2.0
description: Says hello to the agents.
publisher: acme
entrypoint: bin/hello.sh
permissions: [network]
license: MIT
"""


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["capsule", *argv])


def make_capsule_dir(root: Path, manifest: str = MANIFEST, payload: bytes = b"") -> Path:
    src = root / "hello"
    (src / "bin").mkdir(parents=True)
    (src / "capsule.yaml").write_text(manifest)
    script = src / "bin" / "hello.sh"
    script.write_text("#!/bin/sh\necho hello\n")
    script.chmod(0o755)
    if payload:
        (src / "data.bin").write_bytes(payload)
    return src


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["capsule", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- parsing ----------------------------------------------------------------------------------


def test_names_and_versions_are_normalised() -> None:
    assert parse("install", "hello").ref == ("capsules/hello", "")
    assert parse("install", "hello@1.2.0").ref == ("capsules/hello", "1.2.0")
    assert parse("show", "capsules/hello/versions/2.0.0-rc.1").ref == (
        "capsules/hello",
        "2.0.0-rc.1",
    )
    assert parse("uninstall", "capsules/hello").capsule == "capsules/hello"
    assert parse("approve", "0f0e").approval == "approvals/0f0e"
    assert parse("reject", "approvals/0f0e", "--reason", "no").approval == "approvals/0f0e"
    args = parse("publisher-key", "revoke", "publisherKeys/k1", "--reason", "leaked")
    assert (args.verb, args.key_verb, args.key, args.reason) == (
        "publisher-key", "revoke", "publisherKeys/k1", "leaked",
    )  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        ["install", "hello@"],
        ["install", "a/b"],
        ["install", ""],
        ["yank", "hello"],  # a version is required
        ["verify", "hello"],
        ["reject", "a1"],  # --reason is required
        ["publish", "f.tar.gz", "--signature", "s", "--bundle", "b"],
        ["publish", "f.tar.gz", "--public", "--private"],
        ["approvals", "--pending", "--state", "approved"],
        ["list", "--order", "stars"],
        ["list", "--limit", "-1"],
        ["sign", "f.tar.gz"],  # --key is required
        ["publisher-key"],
    ],
)
def test_bad_arguments_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        parse(*argv)
    assert raised.value.code == 2


def test_defaults_and_connection_options_after_the_verb() -> None:
    args = parse("list", "--json", "--target", "h:1", "--verified", "--order", "updated")
    assert (args.json, args.target, args.verified, args.limit) == (True, "h:1", True, 50)
    assert (args.query, args.publisher, args.permission) == ("", "", "")
    args = parse("keygen")
    assert (args.output_prefix, args.password_env, args.force) == ("cosign", None, False)
    assert args.cosign_format is False
    args = parse("publish", "x.tar.gz")
    assert (args.signature, args.bundle, args.public, args.private) == (None, None, False, False)
    assert parse("installations").capsule is None


# -- pack, keygen, sign, offline through main() -----------------------------------------------


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_publisher_flow_offline(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_capsule_dir(workdir)
    code, out, err = cli(["pack", str(src)], capsys)
    assert (code, err) == (0, "")
    archive = workdir / "hello-1.2.0.tar.gz"
    assert "Packed hello 1.2.0" in out and "soma capsule sign hello-1.2.0.tar.gz" in out
    first = archive.read_bytes()
    code, _, _ = cli(["pack", str(src), "-o", "again.tar.gz"], capsys)
    assert code == 0 and (workdir / "again.tar.gz").read_bytes() == first  # reproducible
    with tarfile.open(archive) as tar:
        assert {"capsule.yaml", "bin/hello.sh"} <= set(tar.getnames())

    code, out, _ = cli(["keygen"], capsys)
    assert code == 0 and "NOT encrypted" in out
    assert (workdir / "cosign.key").stat().st_mode & 0o777 == 0o600
    public_pem = (workdir / "cosign.pub").read_bytes()
    assert public_pem.startswith(b"-----BEGIN PUBLIC KEY-----")

    code, out, _ = cli(["sign", str(archive), "--key", "cosign.key"], capsys)
    assert code == 0 and f"--signature {archive}.sig" in out
    signature = Path(f"{archive}.sig").read_text()
    assert "\n" not in signature  # like cosign: bare base64
    # Checked with `cryptography` alone: ECDSA P-256, DER, over SHA-256 of the archive bytes.
    public_key = serialization.load_pem_public_key(public_pem)
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(base64.b64decode(signature), first, ec.ECDSA(hashes.SHA256()))

    code, out, _ = cli(["sign", str(archive), "--key", "cosign.key", "--bundle", "--json"], capsys)
    assert code == 0 and json.loads(out)["format"] == "sigstore-bundle"
    bundle = signing.parse_bundle(Path(f"{archive}.sigstore.json").read_text())
    assert bundle.key_hint == signing.key_hint(public_key)
    assert signing.verify_digest(public_key, signing.file_sha256(archive), bundle.signature_b64)


def test_keygen_refuses_to_overwrite_and_encrypts_with_a_password(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli(["keygen", "--output-prefix", "k"], capsys)[0] == 0
    before = (workdir / "k.key").read_bytes()
    code, _, err = cli(["keygen", "--output-prefix", "k"], capsys)
    assert code == 1 and "already exist" in err and "--force" in err
    assert (workdir / "k.key").read_bytes() == before

    code, _, err = cli(["keygen", "--output-prefix", "p", "--password-env", "PW"], capsys)
    assert code == 1 and "PW" in err and not (workdir / "p.key").exists()
    monkeypatch.setenv("PW", "correct horse")
    code, out, _ = cli(["keygen", "--output-prefix", "p", "--password-env", "PW"], capsys)
    assert code == 0 and "encrypted." in out
    assert b"ENCRYPTED PRIVATE KEY" in (workdir / "p.key").read_bytes()

    blob = workdir / "blob.tar.gz"
    blob.write_bytes(b"anything")
    code, _, err = cli(["sign", str(blob), "--key", "p.key"], capsys)
    assert code == 1 and "encrypted" in err and "--password-env" in err
    monkeypatch.setenv("PW", "wrong")
    code, _, err = cli(["sign", str(blob), "--key", "p.key", "--password-env", "PW"], capsys)
    assert code == 1 and "wrong password" in err
    monkeypatch.setenv("PW", "correct horse")
    code, _, _ = cli(["sign", str(blob), "--key", "p.key", "--password-env", "PW"], capsys)
    assert code == 0 and Path(f"{blob}.sig").is_file()


COSIGN_DATA = Path(__file__).parent / "data" / "cosign"


def test_keygen_cosign_format_signs_and_verifies(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    blob = workdir / "blob.tar.gz"
    blob.write_bytes(b"capsule bytes")

    # No password: cosign's format is still encrypted, with the empty password, and says so.
    code, out, err = cli(["keygen", "--output-prefix", "c", "--cosign-format"], capsys)
    assert (code, err) == (0, "")
    assert "NOT encrypted" not in out and "EMPTY password" in out and "cosign sign-blob" in out
    pem = (workdir / "c.key").read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n")
    assert (workdir / "c.key").stat().st_mode & 0o777 == 0o600
    code, out, _ = cli(["sign", str(blob), "--key", "c.key"], capsys)
    assert code == 0 and f"--signature {blob}.sig" in out
    public_key = signing.load_public_key((workdir / "c.pub").read_text())
    digest = signing.file_sha256(blob)
    assert signing.verify_digest(public_key, digest, Path(f"{blob}.sig").read_text())

    # With a password, as cosign's COSIGN_PASSWORD: needed to sign, and the JSON is truthful.
    monkeypatch.setenv("COSIGN_PASSWORD", "correct horse")
    argv = ["keygen", "--output-prefix", "p", "--cosign-format", "--password-env"]
    code, out, _ = cli([*argv, "COSIGN_PASSWORD", "--json"], capsys)
    result = json.loads(out)
    assert code == 0 and "EMPTY" not in result["text"] and "NOT encrypted" not in result["text"]
    truth = {k: result[k] for k in ("format", "encrypted", "password_protected")}
    assert truth == {"format": "cosign", "encrypted": True, "password_protected": True}
    code, _, err = cli(["sign", str(blob), "--key", "p.key"], capsys)
    assert code == 1 and "password" in err and "--password-env" in err
    code, _, _ = cli(
        ["sign", str(blob), "--key", "p.key", "--password-env", "COSIGN_PASSWORD"], capsys
    )
    assert code == 0
    public_key = signing.load_public_key((workdir / "p.pub").read_text())
    assert signing.verify_digest(public_key, digest, Path(f"{blob}.sig").read_text())

    for prefix, flags, expected in [
        ("e", ["--cosign-format"], ("cosign", True, False)),  # encrypted, empty password
        ("u", [], ("pkcs8", False, False)),
        ("k", ["--password-env", "COSIGN_PASSWORD"], ("pkcs8", True, True)),
    ]:
        code, out, _ = cli(["keygen", "--output-prefix", prefix, *flags, "--json"], capsys)
        result = json.loads(out)
        assert code == 0
        assert (result["format"], result["encrypted"], result["password_protected"]) == expected


# The public key of cosign's `pemsigstorekey` (sigstore-encrypted.key, password "hello"), pinned
# in test_capsule_signing.py from the point cosign stored inside the key.
COSIGN_TEST_PUBLIC_KEY = (
    "-----BEGIN PUBLIC KEY-----\n"
    "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE7z9gA/tqa9iHt/f9F3ulyVi4lwqU\n"
    "LfHWfhG2mK4eyJ8LDcLstb+VVhxj3pkMjc3fNo+sSfiIY2NLR7c+DG1V4w==\n"
    "-----END PUBLIC KEY-----\n"
)


def test_sign_with_real_cosign_keys(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    blob = workdir / "blob.tar.gz"
    blob.write_bytes(b"capsule bytes")
    digest = signing.file_sha256(blob)
    key = str(COSIGN_DATA / "sigstore-encrypted.key")  # from cosign's own tests

    code, _, err = cli(["sign", str(blob), "--key", key], capsys)
    assert code == 1 and "password" in err and "--password-env" in err
    monkeypatch.setenv("COSIGN_PASSWORD", "wrong")
    code, _, err = cli(
        ["sign", str(blob), "--key", key, "--password-env", "COSIGN_PASSWORD"], capsys
    )
    assert code == 1 and "wrong password" in err
    monkeypatch.setenv("COSIGN_PASSWORD", "hello")
    argv = ["sign", str(blob), "--key", key, "--password-env", "COSIGN_PASSWORD", "--bundle"]
    code, out, err = cli(argv, capsys)
    assert (code, err) == (0, "")
    public_key = signing.load_public_key(COSIGN_TEST_PUBLIC_KEY)
    assert signing.fingerprint(public_key) in out
    bundle = signing.parse_bundle(Path(f"{blob}.sigstore.json").read_text())
    assert bundle.key_hint == signing.key_hint(public_key)
    assert signing.verify_digest(public_key, digest, bundle.signature_b64)

    # A key `cosign generate-key-pair` wrote with an empty password signs without --password-env.
    key = str(COSIGN_DATA / "sigstore-rs-empty-password.key")
    code, out, err = cli(["sign", str(blob), "--key", key, "--json"], capsys)
    assert (code, err) == (0, "")
    public_key = signing.load_private_key(Path(key).read_bytes(), b"").public_key()
    assert json.loads(out)["key_fingerprint"] == signing.fingerprint(public_key)
    assert signing.verify_digest(public_key, digest, Path(f"{blob}.sig").read_text())


def test_pack_errors_name_the_problem(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(["pack", "missing"], capsys)
    assert code == 1 and "missing: not a directory" in err

    (workdir / "empty").mkdir()
    code, _, err = cli(["pack", "empty"], capsys)
    assert code == 1 and "capsule.yaml" in err and "missing" in err

    src = make_capsule_dir(workdir, MANIFEST.replace("1.2.0", "one"))
    code, _, err = cli(["pack", str(src)], capsys)
    assert code == 1 and err.startswith("error: INVALID_ARGUMENT:") and "version" in err

    (src / "capsule.yaml").write_text(MANIFEST)
    (src / "escape").symlink_to("/etc/passwd")
    code, _, err = cli(["pack", str(src)], capsys)
    assert code == 1 and "escape" in err
    assert not (workdir / "hello-1.2.0.tar.gz").exists()


def test_offline_json_output(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_capsule_dir(workdir)
    code, out, _ = cli(["pack", str(src), "--json"], capsys)
    packed = json.loads(out)
    assert code == 0 and packed["manifest"]["name"] == "hello"
    assert packed["digest"] == "sha256:" + signing.file_sha256(Path(packed["archive"])).hex()
    code, out, _ = cli(["keygen", "--json"], capsys)
    assert code == 0 and json.loads(out)["fingerprint"].startswith("sha256:")


# -- progress rendering -----------------------------------------------------------------------


def install_stream(*, fail: bool = False) -> list[capsule_pb2.InstallProgress]:
    name = "installations/7b1c"
    steps = [
        capsule_pb2.InstallProgress(installation=name, phase=pb.INSTALL_PHASE_QUEUED),
        capsule_pb2.InstallProgress(
            installation=name, phase=pb.INSTALL_PHASE_AWAITING_APPROVAL, percent=5,
            approval="approvals/a1", message="requests sensitive permission network",
        ),
        capsule_pb2.InstallProgress(
            installation=name, phase=pb.INSTALL_PHASE_VERIFYING_SIGNATURE, percent=10,
            bytes_total=4096, bytes_done=4096,
        ),
        *[
            capsule_pb2.InstallProgress(
                installation=name, phase=pb.INSTALL_PHASE_EXTRACTING, percent=10 + 20 * i,
                files_done=i, files_total=4, bytes_done=i * 1024, bytes_total=4096,
            )
            for i in range(1, 5)
        ],
    ]  # fmt: skip
    if fail:
        error = status_pb2.Status(
            code=code_pb2.INVALID_ARGUMENT, message="entry '../x' leaves the capsule directory"
        )
        steps.append(
            capsule_pb2.InstallProgress(
                installation=name, phase=pb.INSTALL_PHASE_FAILED, percent=90, error=error
            )
        )
        return steps
    done = pb.Installation(
        name=name, capsule="capsules/hello", version="1.2.0", path="installed/hello/1.2.0",
        file_count=4, size_bytes=4096, state=pb.INSTALLATION_STATE_INSTALLED,
    )  # fmt: skip
    done.duration.FromMilliseconds(1500)
    steps += [
        capsule_pb2.InstallProgress(
            installation=name, phase=pb.INSTALL_PHASE_ACTIVATING, percent=95
        ),
        capsule_pb2.InstallProgress(
            installation=name, phase=pb.INSTALL_PHASE_DONE, percent=100, result=done
        ),
    ]
    return steps


def test_plain_view_prints_one_line_per_phase() -> None:
    out = io.StringIO()
    view = progress.install_view(out, as_json=False)  # StringIO is not a terminal
    assert isinstance(view, progress.PlainView)
    for step in install_stream():
        view.update(step)
    view.close()
    assert out.getvalue().splitlines() == [
        "[  0%] queued installations/7b1c",
        "[  5%] awaiting approval approvals/a1 (requests sensitive permission network); "
        "an approver runs `soma capsule approve a1`",
        "[ 10%] verifying signature",
        "[ 30%] extracting 4 files, 4.0 KiB",
        "[ 95%] activating",
        "[100%] done: hello 1.2.0 in installed/hello/1.2.0 (4 files, 4.0 KiB, 1.5 s)",
    ]


def test_plain_view_failure_and_percent_never_goes_down() -> None:
    out = io.StringIO()
    view = progress.PlainView(out)
    steps = install_stream(fail=True)
    for step in [*steps[:5], steps[2], *steps[5:]]:  # a re-attach replays an older phase
        view.update(step)
    lines = out.getvalue().splitlines()
    assert lines[-1] == (
        "[ 90%] failed: INVALID_ARGUMENT: entry '../x' leaves the capsule directory"
    )
    percents = [int(line[1:4]) for line in lines]
    assert percents == sorted(percents)


def test_json_view_keeps_every_message() -> None:
    out = io.StringIO()
    view = progress.install_view(out, as_json=True)
    steps = install_stream()
    for step in steps:
        view.update(step)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == len(steps)
    assert lines[-1]["phase"] == "INSTALL_PHASE_DONE"
    assert lines[4]["files_done"] == "2"  # int64 as a JSON string, as proto3 JSON says


def test_rich_view_draws_on_a_terminal() -> None:
    from rich.console import Console

    out = io.StringIO()
    view = progress.RichView(out, console=Console(file=out, force_terminal=True, width=120))
    for step in install_stream():
        view.update(step)
    view.close()
    text = out.getvalue()
    assert "awaiting approval approvals/a1" in text and "done: hello 1.2.0" in text
    assert "100%" in text


def test_human_bytes() -> None:
    assert [progress.human_bytes(n) for n in (0, 1023, 1024, 1536, 5 << 20, 3 << 30)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 MiB", "3.0 GiB",
    ]  # fmt: skip


# -- against a fake CapsuleService ------------------------------------------------------------


def _abort_metadata(reason: str) -> tuple[tuple[str, bytes], ...]:
    info = error_details_pb2.ErrorInfo(reason=reason, domain="soma.dev")
    status = status_pb2.Status(code=code_pb2.FAILED_PRECONDITION)
    status.details.add().Pack(info)
    return (("grpc-status-details-bin", status.SerializeToString()),)


@dataclass
class FakeCapsules(capsule_pb2_grpc.CapsuleServiceServicer):
    uploads: list[list[capsule_pb2.PublishCapsuleRequest]] = field(default_factory=list)
    installs: list[capsule_pb2.InstallCapsuleRequest] = field(default_factory=list)
    publish_error: tuple[grpc.StatusCode, str, str] | None = None
    install_steps: list[capsule_pb2.InstallProgress] = field(default_factory=install_stream)
    install_error: tuple[grpc.StatusCode, str] | None = None
    break_first_install_after: int | None = None  # UNAVAILABLE after N messages, once
    stall_install_after: int | None = None  # then waits until the client goes away
    stalled: asyncio.Event = field(default_factory=asyncio.Event)

    async def PublishCapsule(self, request_iterator: Any, context: Any) -> pb.CapsuleVersion:
        messages = [m async for m in request_iterator]
        self.uploads.append(messages)
        if self.publish_error:
            code, message, reason = self.publish_error
            await context.abort(code, message, trailing_metadata=_abort_metadata(reason))
        meta = messages[0].metadata
        version = meta.version
        return pb.CapsuleVersion(
            name=f"{meta.capsule}/versions/{version}", version=version, digest=meta.digest,
            size_bytes=meta.size_bytes, tenant="acme",
        )  # fmt: skip

    async def InstallCapsule(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.installs.append(request)
        start = 0
        if len(self.installs) > 1 and self.break_first_install_after is not None:
            start = self.break_first_install_after - 1  # the re-attach replays the latest
        for i, step in enumerate(self.install_steps[start:], start):
            if len(self.installs) == 1 and i == self.break_first_install_after:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "replica restarting")
            if i == self.stall_install_after:
                self.stalled.set()
                await asyncio.sleep(60)
            yield step
        if self.install_error:
            await context.abort(*self.install_error)

    async def ListCapsules(self, request: Any, context: Any) -> capsule_pb2.ListCapsulesResponse:
        first = pb.Capsule(
            name="capsules/hello", tenant="acme", latest_version="1.2.0", verified=True,
            install_count=3, permissions=["network"], visibility=pb.CAPSULE_VISIBILITY_PUBLIC,
            description="Says hello",
        )  # fmt: skip
        if not request.page_token:
            return capsule_pb2.ListCapsulesResponse(capsules=[first], next_page_token="p2")
        other = pb.Capsule(name="capsules/bye", tenant="beta", latest_version="0.1.0")
        return capsule_pb2.ListCapsulesResponse(capsules=[other])


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeCapsules, str]]:
    servicer = FakeCapsules()
    async with serving(capsule_pb2_grpc.add_CapsuleServiceServicer_to_server, servicer) as target:
        yield servicer, target


async def soma(target: str, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    args = build_parser().parse_args(["--target", target, "capsule", *argv])
    code = await run(args, {"SOMA_API_KEY": "soma_dev_test"}, out, err)
    return code, out.getvalue(), err.getvalue()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def packed(root: Path, payload: bytes = b"") -> Path:
    from services.capsule import archive

    target = root / "hello-1.2.0.tar.gz"
    archive.pack(make_capsule_dir(root, payload=payload), target)
    return target


async def test_publish_streams_metadata_then_chunks_of_at_most_1_mib(
    fake: tuple[FakeCapsules, str], tmp_path: Path
) -> None:
    servicer, target = fake
    archive = packed(tmp_path, payload=os.urandom(2_500_000))  # incompressible: 3 chunks
    write(Path(f"{archive}.sig"), "c2lnbmF0dXJl\n")
    code, out, err = await soma(target, "publish", str(archive), "--public")
    assert code == 0, err
    assert "Published capsules/hello/versions/1.2.0" in out and "using the signature" in err
    (messages,) = servicer.uploads
    meta = messages[0].metadata
    assert messages[0].HasField("metadata") and not messages[0].chunk
    assert (meta.capsule, meta.version) == ("capsules/hello", "1.2.0")
    assert meta.cosign_signature == "c2lnbmF0dXJl"
    assert meta.visibility == pb.CAPSULE_VISIBILITY_PUBLIC
    assert meta.size_bytes == archive.stat().st_size
    assert meta.digest == "sha256:" + signing.file_sha256(archive).hex()
    chunks = [m.chunk for m in messages[1:]]
    assert all(not m.HasField("metadata") for m in messages[1:])
    assert len(chunks) == 3 and max(map(len, chunks)) == sdk.PUBLISH_CHUNK_BYTES
    assert b"".join(chunks) == archive.read_bytes()


async def test_publish_refusals_are_reported_with_a_hint(
    fake: tuple[FakeCapsules, str], tmp_path: Path
) -> None:
    servicer, target = fake
    archive = packed(tmp_path)
    code, _, err = await soma(target, "publish", str(archive))
    assert code == 1 and "no signature for" in err and "soma capsule sign" in err
    assert servicer.uploads == []  # nothing sent

    bundle = write(tmp_path / "b.json", '{"mediaType": "x"}')
    servicer.publish_error = (
        grpc.StatusCode.FAILED_PRECONDITION,
        "the signature does not verify with any active publisher key of tenant acme",
        "PUBLISH_REFUSED",  # a reason without its own hint: the code's hint
    )
    code, _, err = await soma(target, "publish", str(archive), "--bundle", str(bundle))
    assert code == 1
    assert servicer.uploads[-1][0].metadata.sigstore_bundle == '{"mediaType": "x"}'
    assert err.splitlines()[0] == (
        "error: FAILED_PRECONDITION: the signature does not verify with any active publisher "
        "key of tenant acme"
    )
    assert "hint: the signature must verify" in err and "publisher-key add" in err

    servicer.publish_error = (
        grpc.StatusCode.FAILED_PRECONDITION,
        "the signature of capsules/hello/versions/1.2.0 does not verify: ...",
        "KEY_REVOKED",
    )
    code, _, err = await soma(target, "publish", str(archive), "--bundle", str(bundle))
    assert code == 1 and err.count("hint:") == 1 and "hint: the signing key was revoked" in err


async def test_an_unsafe_archive_is_refused_before_any_upload(
    fake: tuple[FakeCapsules, str], tmp_path: Path
) -> None:
    servicer, target = fake
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        for name, data in (("capsule.yaml", MANIFEST.encode()), ("../x", b"boom")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write(Path(f"{evil}.sig"), "c2ln")
    code, _, err = await soma(target, "publish", str(evil))
    assert code == 1 and "\nerror: INVALID_ARGUMENT: " in err and "'../x'" in err
    assert "hint: the archive is unsafe" in err
    assert servicer.uploads == []


async def test_install_success_and_plain_progress(fake: tuple[FakeCapsules, str]) -> None:
    servicer, target = fake
    code, out, err = await soma(target, "install", "hello@1.2.0")
    assert (code, err) == (0, "")
    assert out.splitlines()[-1].startswith("[100%] done: hello 1.2.0")
    (request,) = servicer.installs
    assert (request.name, request.version) == ("capsules/hello", "1.2.0")
    assert len(request.request_id) == 36  # made up, so that the call can be repeated


async def test_install_failure_ends_with_the_status_and_exit_1(
    fake: tuple[FakeCapsules, str],
) -> None:
    servicer, target = fake
    servicer.install_steps = install_stream(fail=True)
    servicer.install_error = (
        grpc.StatusCode.INVALID_ARGUMENT,
        "entry '../x' leaves the capsule directory",
    )
    code, out, err = await soma(target, "install", "hello", "--json")
    assert code == 1
    assert json.loads(out.splitlines()[-1])["phase"] == "INSTALL_PHASE_FAILED"
    assert err.startswith("error: INVALID_ARGUMENT: entry '../x' leaves the capsule directory")


async def test_install_reattaches_with_the_same_request_id(
    fake: tuple[FakeCapsules, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    servicer, target = fake
    monkeypatch.setattr(sdk, "INSTALL_REATTACH_BACKOFF", 0.01)
    servicer.break_first_install_after = 3
    code, out, _ = await soma(target, "install", "hello", "--request-id", "r-1")
    assert code == 0 and "done: hello" in out
    assert [r.request_id for r in servicer.installs] == ["r-1", "r-1"]
    assert out.count("verifying signature") == 1  # the replayed phase is not printed twice


async def test_interrupting_install_says_how_to_attach_again(
    fake: tuple[FakeCapsules, str],
) -> None:
    servicer, target = fake
    servicer.stall_install_after = 2
    out, err = io.StringIO(), io.StringIO()
    args = build_parser().parse_args(["--target", target, "capsule", "install", "hello@1.2.0"])
    task = asyncio.create_task(run(args, {}, out, err))
    await asyncio.wait_for(servicer.stalled.wait(), 5)
    task.cancel()  # what Ctrl-C does to asyncio.run's main task
    with pytest.raises(asyncio.CancelledError):
        await task
    request_id = servicer.installs[0].request_id
    assert "the install continues on the server" in err.getvalue()
    assert f"soma capsule install hello@1.2.0 --request-id {request_id}" in err.getvalue()


async def test_a_failed_phase_without_an_error_status_still_exits_1(
    fake: tuple[FakeCapsules, str],
) -> None:
    servicer, target = fake
    servicer.install_steps = install_stream(fail=True)  # and the call then ends OK
    code, out, err = await soma(target, "install", "hello")
    assert code == 1 and "failed: INVALID_ARGUMENT" in out
    assert err == "error: INVALID_ARGUMENT: entry '../x' leaves the capsule directory\n"


async def test_list_follows_pages_into_a_table(fake: tuple[FakeCapsules, str]) -> None:
    _, target = fake
    code, out, _ = await soma(target, "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:4] == ["NAME", "LATEST", "PUBLISHER", "VERIFIED"]
    assert lines[1].split()[:6] == ["hello", "1.2.0", "acme", "yes", "3", "network"]
    assert lines[2].split()[:2] == ["bye", "0.1.0"]
    code, out, _ = await soma(target, "list", "--limit", "1", "--json")
    assert [c["name"] for c in json.loads(out)["capsules"]] == ["capsules/hello"]


async def test_unimplemented_calls_report_the_code(fake: tuple[FakeCapsules, str]) -> None:
    _, target = fake
    code, _, err = await soma(target, "approve", "a1")
    assert code == 1 and err.startswith("error: UNIMPLEMENTED:")
