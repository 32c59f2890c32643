"""`soma capsule ...`: pack, sign, publish, find, install and approve capsules.

Publisher (pack, keygen and sign run offline: no mesh, no credential):
    soma capsule pack DIR [-o FILE]
    soma capsule keygen [--output-prefix cosign] [--password-env VAR] [--cosign-format]
                        [--force]
    soma capsule sign FILE --key cosign.key [--password-env VAR] [--bundle] [-o FILE.sig]
    soma capsule publisher-key add PEMFILE [--display-name N] | list [--state S] | revoke KEY
    soma capsule publish FILE [--signature FILE.sig | --bundle FILE.sigstore.json]
                         [--public | --private] [--publisher-key KEY] [--request-id UUID]
    soma capsule yank NAME@VERSION [--reason TEXT]
Tenant:
    soma capsule list [--query Q] [--publisher T] [--verified] [--permission P]
                      [--order installs|updated|name] [--limit N]
    soma capsule show NAME[@VERSION] [--versions]
    soma capsule verify NAME@VERSION
    soma capsule install NAME[@VERSION] [--request-id UUID]
    soma capsule uninstall NAME
    soma capsule installations [NAME] [--state S] [--requester SUBJECT] [--limit N]
Approver:
    soma capsule approvals [--pending | --state S] [--capsule NAME]
    soma capsule approve APPROVAL [--comment TEXT]
    soma capsule reject APPROVAL --reason TEXT

NAME is a capsule id or `capsules/<id>`; APPROVAL and KEY are ids or full resource names.
The walkthrough, formats, limits and errors are in docs/capsules.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, TextIO, TypeVar

import grpc

from services.client import capsule_render as show
from services.client import progress, render
from services.client.argtypes import non_negative
from services.client.commands import CommandGroup
from services.client.errors import ApiError
from services.common.errors import SomaError
from soma.capsule.v1 import capsule_pb2
from soma.capsule.v1 import resources_pb2 as pb

OFFLINE_VERBS = ("pack", "keygen", "sign")
MAX_PAGE = 500  # the server's cap on page_size
MAX_SIGNATURE_FILE = 1 << 20  # a .sig is ~100 bytes and a bundle a few KiB: more is a mistake
MAX_PEM_FILE = 64 << 10

ORDERS = {
    "installs": capsule_pb2.CAPSULE_ORDER_INSTALL_COUNT,
    "updated": capsule_pb2.CAPSULE_ORDER_UPDATE_TIME,
    "name": capsule_pb2.CAPSULE_ORDER_NAME,
}
KEY_STATES = {
    "active": pb.PUBLISHER_KEY_STATE_ACTIVE,
    "revoked": pb.PUBLISHER_KEY_STATE_REVOKED,
}
INSTALLATION_STATES = {
    "pending": pb.INSTALLATION_STATE_PENDING,
    "awaiting-approval": pb.INSTALLATION_STATE_AWAITING_APPROVAL,
    "installed": pb.INSTALLATION_STATE_INSTALLED,
    "failed": pb.INSTALLATION_STATE_FAILED,
    "rejected": pb.INSTALLATION_STATE_REJECTED,
    "superseded": pb.INSTALLATION_STATE_SUPERSEDED,
    "uninstalled": pb.INSTALLATION_STATE_UNINSTALLED,
}
APPROVAL_STATES = {
    "pending": pb.APPROVAL_STATE_PENDING,
    "approved": pb.APPROVAL_STATE_APPROVED,
    "rejected": pb.APPROVAL_STATE_REJECTED,
    "expired": pb.APPROVAL_STATE_EXPIRED,
}


class CapsuleCliError(Exception):
    """A local problem (a file, an argument, a refused archive): `error: <message>`, exit 1."""


# -- argument types ---------------------------------------------------------------------------


def _ref(collection: str, text: str) -> str:
    """`abc` or `<collection>/abc` -> `<collection>/abc`."""
    value = text.strip().removeprefix(f"{collection}/")
    if not value or "/" in value or "@" in value:
        raise argparse.ArgumentTypeError(f"{text!r} is not an id or a `{collection}/<id>` name")
    return f"{collection}/{value}"


def capsule_ref(text: str) -> str:
    return _ref("capsules", text)


def approval_ref(text: str) -> str:
    return _ref("approvals", text)


def publisher_key_ref(text: str) -> str:
    return _ref("publisherKeys", text)


def capsule_and_version(text: str) -> tuple[str, str]:
    """`NAME[@VERSION]` or `capsules/NAME/versions/VERSION` -> (`capsules/NAME`, VERSION or "")."""
    value = text.strip()
    if "/versions/" in value:
        capsule, _, version = value.partition("/versions/")
    else:
        capsule, _, version = value.partition("@")
    if not version and ("@" in value or "/versions/" in value):
        raise argparse.ArgumentTypeError(f"{text!r}: the version after @ is empty")
    if "/" in version or "@" in version:
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME@VERSION, e.g. hello@1.2.0")
    return capsule_ref(capsule), version


def versioned(text: str) -> tuple[str, str]:
    """Like `capsule_and_version`, but the version is required."""
    capsule, version = capsule_and_version(text)
    if not version:
        raise argparse.ArgumentTypeError(f"{text!r}: name the version, e.g. hello@1.2.0")
    return capsule, version


def add_parser(
    groups: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Adds `capsule` and its verbs to the `soma` parser."""
    capsule = groups.add_parser(
        "capsule", help="capsules: pack, sign, publish, install, approve", parents=[common]
    )
    verbs = capsule.add_subparsers(dest="verb", required=True)

    def verb(name: str, text: str) -> argparse.ArgumentParser:
        return verbs.add_parser(name, help=text, description=text, parents=[common])

    pack = verb("pack", "build a reproducible capsule archive from DIR (offline)")
    pack.add_argument("dir", metavar="DIR", help="a directory holding capsule.yaml")
    pack.add_argument("-o", "--output", help="archive to write (default NAME-VERSION.tar.gz)")

    keygen = verb("keygen", "make a cosign-compatible ECDSA P-256 key pair (offline)")
    keygen.add_argument(
        "--output-prefix", default="cosign", help="writes PREFIX.key and PREFIX.pub"
    )
    keygen.add_argument(
        "--password-env", metavar="VAR", help="encrypt the private key with this variable's value"
    )
    keygen.add_argument(
        "--cosign-format",
        action="store_true",
        help="write the private key in cosign's own encrypted format (ENCRYPTED SIGSTORE PRIVATE "
        "KEY), which `cosign sign-blob --key` reads; always encrypted, with an empty password "
        "unless --password-env gives one",
    )
    keygen.add_argument("--force", action="store_true", help="overwrite existing files")

    sign = verb("sign", "sign an archive like `cosign sign-blob --key` (offline)")
    sign.add_argument("file", metavar="FILE", help="the capsule archive")
    sign.add_argument(
        "--key",
        required=True,
        help="private key PEM: from `soma capsule keygen` or `cosign generate-key-pair`",
    )
    sign.add_argument(
        "--password-env",
        metavar="VAR",
        help="the variable holding its password (e.g. COSIGN_PASSWORD)",
    )
    sign.add_argument(
        "--bundle", action="store_true", help="write a Sigstore bundle (v0.3 JSON) instead"
    )
    sign.add_argument(
        "-o", "--output", help="where to write it (default FILE.sig or FILE.sigstore.json)"
    )

    publish = verb("publish", "upload a signed archive to the registry")
    publish.add_argument("file", metavar="FILE", help="the capsule archive")
    signature = publish.add_mutually_exclusive_group()
    signature.add_argument(
        "--signature", metavar="SIGFILE", help="cosign signature file (default FILE.sig)"
    )
    signature.add_argument(
        "--bundle", metavar="BUNDLE", help="Sigstore bundle JSON (default FILE.sigstore.json)"
    )
    visibility = publish.add_mutually_exclusive_group()
    visibility.add_argument(
        "--public", action="store_true", help="list it for every tenant (marketplace)"
    )
    visibility.add_argument("--private", action="store_true", help="your tenant only")
    publish.add_argument(
        "--publisher-key", type=publisher_key_ref, help="the key that must verify it"
    )
    publish.add_argument("--request-id", default="", help="UUID making the call idempotent")

    lst = verb("list", "search the capsules you can see")
    lst.add_argument("--query", default="", help="text in the name or description")
    lst.add_argument("--publisher", default="", help="only this publishing tenant's")
    lst.add_argument("--verified", action="store_true", help="only verified latest versions")
    lst.add_argument("--permission", default="", help="only capsules requesting it")
    lst.add_argument("--order", choices=list(ORDERS), default="installs")
    lst.add_argument("--limit", type=non_negative, default=50, help="at most N (0 = all)")

    show = verb("show", "show a capsule, or one version with NAME@VERSION")
    show.add_argument("ref", metavar="NAME[@VERSION]", type=capsule_and_version)
    show.add_argument("--versions", action="store_true", help="also list every version")

    verify = verb("verify", "re-check a version's digest and signature now (exit 1 if bad)")
    verify.add_argument("ref", metavar="NAME@VERSION", type=versioned)

    install = verb("install", "install for your tenant, with live progress")
    install.add_argument("ref", metavar="NAME[@VERSION]", type=capsule_and_version)
    install.add_argument(
        "--request-id", default="", help="UUID; repeat it to attach to a running install"
    )

    uninstall = verb("uninstall", "remove your tenant's installation")
    uninstall.add_argument("capsule", metavar="NAME", type=capsule_ref)
    uninstall.add_argument("--request-id", default="")

    installations = verb("installations", "install history: who, when, version, outcome")
    installations.add_argument("capsule", metavar="NAME", type=capsule_ref, nargs="?")
    installations.add_argument("--state", choices=list(INSTALLATION_STATES))
    installations.add_argument("--requester", default="", help="e.g. user:alice")
    installations.add_argument("--limit", type=non_negative, default=50, help="0 = all")

    yank = verb("yank", "stop new installs of a version (installed copies stay)")
    yank.add_argument("ref", metavar="NAME@VERSION", type=versioned)
    yank.add_argument("--reason", default="", help="shown to people who look at it")
    yank.add_argument("--request-id", default="")

    approvals = verb("approvals", "approval requests of your tenant")
    state = approvals.add_mutually_exclusive_group()
    state.add_argument("--pending", action="store_true", help="only those awaiting a decision")
    state.add_argument("--state", choices=list(APPROVAL_STATES))
    approvals.add_argument("--capsule", type=capsule_ref, help="only this capsule")
    approvals.add_argument("--limit", type=non_negative, default=50, help="0 = all")

    approve = verb("approve", "approve a pending install (approvers; never your own)")
    approve.add_argument("approval", metavar="APPROVAL", type=approval_ref)
    approve.add_argument("--comment", default="")
    approve.add_argument("--request-id", default="")

    reject = verb("reject", "reject a pending install; its requester sees the reason")
    reject.add_argument("approval", metavar="APPROVAL", type=approval_ref)
    reject.add_argument("--reason", required=True, help="why (shown to the requester)")
    reject.add_argument("--request-id", default="")

    keys = verb("publisher-key", "public keys your tenant signs capsules with")
    key_verbs = keys.add_subparsers(dest="key_verb", required=True)
    add = key_verbs.add_parser("add", help="register a public key PEM", parents=[common])
    add.add_argument("pem", metavar="PEMFILE", help="cosign.pub")
    add.add_argument("--display-name", default="")
    add.add_argument("--request-id", default="")
    klist = key_verbs.add_parser("list", help="list keys, newest first", parents=[common])
    klist.add_argument("--state", choices=list(KEY_STATES))
    revoke = key_verbs.add_parser(
        "revoke", help="revoke: versions it signed stop verifying", parents=[common]
    )
    revoke.add_argument("key", metavar="KEY", type=publisher_key_ref)
    revoke.add_argument("--reason", default="", help="recorded in the audit trail")
    revoke.add_argument("--request-id", default="")


# -- errors -----------------------------------------------------------------------------------


def describe_local(exc: SomaError) -> str:
    """A domain error raised on this machine (pack, sign, a refused archive), for people."""
    fields = [f for f, _ in getattr(exc, "violations", ()) if f and f not in exc.message]
    where = f"{fields[0]}: " if fields else ""
    return f"{exc.code.name}: {where}{exc.message}"


_ARCHIVE_HINT = (
    "the archive is unsafe or malformed: build it with `soma capsule pack DIR`, which refuses "
    "links, special files and names that cannot be extracted safely"
)
_INSTALL_ARCHIVE_HINT = (
    "the published archive was refused while extracting and nothing was installed: "
    "tell its publisher (`soma capsule show NAME`)"
)
_HINTS: dict[tuple[str, grpc.StatusCode], str] = {
    ("publish", grpc.StatusCode.PERMISSION_DENIED): (
        "publishing needs the admin role; capsule names are global and belong to the first "
        "tenant that published them: if another tenant owns it, change `name` in capsule.yaml"
    ),
    ("publish", grpc.StatusCode.FAILED_PRECONDITION): (
        "the signature must verify with an active key of your tenant: `soma capsule "
        "publisher-key list`, and `soma capsule publisher-key add cosign.pub` for the key you "
        "signed with; sign again if the archive changed after signing"
    ),
    ("publish", grpc.StatusCode.ALREADY_EXISTS): (
        "a published version never changes: raise `version` in capsule.yaml, then pack, sign "
        "and publish again"
    ),
    ("publish", grpc.StatusCode.RESOURCE_EXHAUSTED): (
        "the archive is over the registry's size limit (SOMA_CAPSULE_MAX_BYTES on the server)"
    ),
    ("install", grpc.StatusCode.FAILED_PRECONDITION): (
        "a rejected or expired approval, a yanked version or a signature that no longer "
        "verifies stops an install: `soma capsule installations NAME` shows why"
    ),
    ("install", grpc.StatusCode.NOT_FOUND): "`soma capsule list` shows what you can install",
    ("install", grpc.StatusCode.PERMISSION_DENIED): "installing needs the member or admin role",
    ("uninstall", grpc.StatusCode.FAILED_PRECONDITION): (
        "it is not installed for your tenant: `soma capsule installations NAME`"
    ),
    ("approve", grpc.StatusCode.PERMISSION_DENIED): (
        "approving needs the approver or admin role, and nobody approves their own install"
    ),
    ("approve", grpc.StatusCode.FAILED_PRECONDITION): (
        "it was already decided or has expired: `soma capsule approvals --pending`"
    ),
    ("yank", grpc.StatusCode.PERMISSION_DENIED): "only an admin of the publishing tenant yanks",
    ("publisher-key", grpc.StatusCode.PERMISSION_DENIED): (
        "publisher keys are managed by tenant admins"
    ),
}


# The service's ErrorInfo reasons that say more than their code (services/capsule/*).
_REASON_HINTS = {
    "UNKNOWN_KEY": (
        "the signature matches no publisher key of your tenant: register the public half of the "
        "key you signed with (`soma capsule publisher-key add cosign.pub`, tenant admins)"
    ),
    "BAD_SIGNATURE": (
        "the signature is not this archive's with that key: sign this exact file again "
        "(`soma capsule sign FILE --key cosign.key`) and publish"
    ),
    "KEY_REVOKED": (
        "the signing key was revoked: sign with an active key (`soma capsule publisher-key "
        "list`); the publisher publishes a new version signed with it"
    ),
    "SIGNATURE_MISSING": "sign it first: `soma capsule sign FILE --key cosign.key`",
    "CAPSULE_OWNED_BY_ANOTHER_TENANT": (
        "capsule names are global and this one belongs to another tenant: change `name` in "
        "capsule.yaml, then pack, sign and publish"
    ),
    "CAPSULE_VERSION_EXISTS": (
        "a published version never changes: raise `version` in capsule.yaml, then pack, sign "
        "and publish again"
    ),
    "CAPSULE_VERSION_YANKED": (
        "that version was yanked: `soma capsule show NAME --versions` lists the others"
    ),
    "REQUESTER_CANNOT_APPROVE": "nobody approves their own install: another approver decides",
    "APPROVAL_REJECTED": "`soma capsule installations NAME` keeps the decision and its reason",
    "APPROVAL_EXPIRED": "ask an approver to watch `soma capsule approvals --pending`, then "
    "install again",
    "INSTALL_INTERRUPTED": "nothing was installed: run the same install again",
}


def hints(verb: str, code: grpc.StatusCode, reason: str) -> list[str]:
    """What to do next about a failed capsule call, for people (the CLI prints `hint: ...`):
    by the error's reason when it has a specific hint, else by the verb and code."""
    archive = reason.startswith("ARCHIVE_") or reason in ("MANIFEST_MISSING", "ENTRYPOINT_MISSING")
    if archive and verb == "install":
        return [_INSTALL_ARCHIVE_HINT]
    if archive:  # pack's own refusals already say what to change in DIR
        return [] if verb == "pack" else [_ARCHIVE_HINT]
    if reason in _REASON_HINTS:
        return [_REASON_HINTS[reason]]
    hint = _HINTS.get(("approve" if verb == "reject" else verb, code))
    return [hint] if hint else []


def print_hints(verb: str, code: grpc.StatusCode, reason: str, err: TextIO) -> None:
    for line in hints(verb, code, reason):
        print(f"hint: {line}", file=err)


def report_hints(args: argparse.Namespace, error: ApiError, err: TextIO) -> None:
    """After `cli.report` printed a failed call's `error:` line."""
    print_hints(args.verb, error.code, error.reason, err)


def report_local(verb: str, exc: SomaError, err: TextIO) -> int:
    """A domain error raised on this machine: `error: CODE: message`, hints, exit status 1."""
    print(f"error: {describe_local(exc)}", file=err)
    print_hints(verb, exc.code, exc.reason, err)
    return 1


# -- offline commands: pack, keygen, sign -------------------------------------------------------


def offline_command(
    args: argparse.Namespace, out: TextIO, err: TextIO, env: Mapping[str, str] | None = None
) -> int:
    """pack, keygen or sign: 0 when done, 1 with `error: ...` on stderr."""
    env = os.environ if env is None else env
    try:
        if args.verb == "pack":
            result = pack(args)
        elif args.verb == "keygen":
            result = keygen(args, env)
        else:
            result = sign(args, env)
    except SomaError as exc:
        return report_local(args.verb, exc, err)
    except (CapsuleCliError, OSError) as exc:
        print(f"error: {_os_message(exc)}", file=err)
        return 1
    if getattr(args, "json", False):
        print(render.dump_json(result), file=out)
    else:
        print(result["text"], file=out)
    return 0


def _os_message(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc)


def pack(args: argparse.Namespace) -> dict[str, Any]:
    from services.capsule import archive, manifest, signing

    src = Path(args.dir)
    if not src.is_dir():
        raise CapsuleCliError(f"{src}: not a directory (pack a capsule's directory)")
    if args.output:
        target = Path(args.output)
    else:
        path = src / manifest.MANIFEST_NAME
        if not path.is_file():
            raise CapsuleCliError(
                f"{path}: missing; a capsule's directory holds a {manifest.MANIFEST_NAME} "
                "manifest (see docs/capsules.md)"
            )
        with path.open("rb") as handle:  # bounded: parse_manifest refuses the oversized
            found = manifest.parse_manifest(handle.read(manifest.MAX_MANIFEST_BYTES + 1))
        target = Path(f"{found.name}-{found.version}.tar.gz")
    info = archive.pack(src, target)
    digest = f"sha256:{signing.file_sha256(target).hex()}"
    size = target.stat().st_size
    m = info.manifest
    text = "\n".join(
        [
            f"Packed {m.name} {m.version} into {target}.\n",
            render.fields(
                [
                    ("archive", f"{target} ({progress.human_bytes(size)})"),
                    ("digest", digest),
                    ("entries", str(info.entry_count)),
                    ("unpacked", progress.human_bytes(info.unpacked_bytes)),
                    ("entrypoint", m.entrypoint),
                    ("permissions", show.joined(m.permissions)),
                ]
            ),
            f"\nNext: soma capsule sign {target} --key cosign.key",
        ]
    )
    return {
        "text": text,
        "archive": str(target),
        "digest": digest,
        "size_bytes": size,
        "entry_count": info.entry_count,
        "unpacked_bytes": info.unpacked_bytes,
        "manifest": render.to_dict(m.to_proto()),
    }


def _password(args: argparse.Namespace, env: Mapping[str, str]) -> bytes | None:
    var = args.password_env
    if not var:
        return None
    value = env.get(var)
    if not value:
        raise CapsuleCliError(f"--password-env {var}: the variable is not set or empty")
    return value.encode()


def _write_private(path: Path, data: bytes, *, force: bool) -> None:
    # O_EXCL unless --force, and 0600 from the first byte: never a moment world-readable.
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_TRUNC


def keygen(args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, Any]:
    from services.capsule import signing

    password = _password(args, env)
    private_path = Path(f"{args.output_prefix}.key")
    public_path = Path(f"{args.output_prefix}.pub")
    if not args.force:
        existing = [str(p) for p in (private_path, public_path) if p.exists()]
        if existing:
            raise CapsuleCliError(
                f"{' and '.join(existing)} already exist: keep them, choose another "
                "--output-prefix, or pass --force to overwrite"
            )
    cosign_format: bool = args.cosign_format
    private_pem, public_pem = signing.generate_keypair(password, cosign_format=cosign_format)
    _write_private(private_path, private_pem, force=args.force)
    public_path.write_bytes(public_pem)
    fingerprint = signing.fingerprint(signing.load_public_key(public_pem.decode()))
    # cosign's format is always encrypted, but with no password the password is empty: anyone
    # holding the file can use the key, so say so rather than "encrypted".
    if cosign_format and password:
        protection = ", in cosign's format, encrypted with the password."
    elif cosign_format:
        protection = (
            ", in cosign's format, encrypted with an EMPTY password: anyone holding the file can "
            "use it; keep it safe or use --password-env."
        )
    elif password:
        protection = ", encrypted."
    else:
        protection = ", NOT encrypted: keep it safe or use --password-env."
    lines = [
        f"Private key written to {private_path} (mode 0600){protection}",
        f"Public key written to {public_path} ({fingerprint}).",
        f"\nNext: soma capsule publisher-key add {public_path}   (a tenant admin, once)",
    ]
    if cosign_format:
        lines.append(
            f"Both `soma capsule sign FILE --key {private_path}` and "
            f"`cosign sign-blob --key {private_path} FILE` sign with it."
        )
    return {
        "text": "\n".join(lines),
        "private_key": str(private_path),
        "public_key": str(public_path),
        "fingerprint": fingerprint,
        "format": "cosign" if cosign_format else "pkcs8",
        # Encrypted at all (cosign's format always is), and whether a password protects it.
        "encrypted": cosign_format or password is not None,
        "password_protected": password is not None,
    }


def sign(args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, Any]:
    from services.capsule import signing

    archive_path = Path(args.file)
    if not archive_path.is_file():
        raise CapsuleCliError(f"{archive_path}: no such file (pack one with `soma capsule pack`)")
    password = _password(args, env)
    private_key = signing.load_private_key(Path(args.key).read_bytes(), password)
    digest = signing.file_sha256(archive_path)
    signature = signing.sign_digest(private_key, digest)
    public_key = private_key.public_key()
    if args.bundle:
        content = signing.make_bundle(signature, digest, signing.key_hint(public_key))
        target = Path(args.output or f"{archive_path}.sigstore.json")
        flag = f"--bundle {target}"
    else:
        content = signature  # like cosign's --output-signature: base64, no newline
        target = Path(args.output or f"{archive_path}.sig")
        flag = f"--signature {target}"
    target.write_text(content, encoding="utf-8")
    fingerprint = signing.fingerprint(public_key)
    text = (
        f"Signed {archive_path} (sha256:{digest.hex()}) with {fingerprint}.\n"
        f"Signature written to {target}.\n\nNext: soma capsule publish {archive_path} {flag}"
    )
    return {
        "text": text,
        "archive": str(archive_path),
        "digest": f"sha256:{digest.hex()}",
        "signature_file": str(target),
        "format": "sigstore-bundle" if args.bundle else "cosign",
        "key_fingerprint": fingerprint,
    }


# -- commands against the mesh ----------------------------------------------------------------

T = TypeVar("T")


async def take(items: AsyncIterator[T], limit: int) -> list[T]:
    """The first `limit` items (all when 0), closing the iterator early."""
    found: list[T] = []
    async for item in items:
        found.append(item)
        if limit and len(found) >= limit:
            break
    aclose: Callable[[], Any] | None = getattr(items, "aclose", None)
    if aclose is not None:
        await aclose()
    return found


def _page_size(limit: int) -> int:
    return MAX_PAGE if limit == 0 else min(MAX_PAGE, limit)


def _read_small(path: Path, what: str, limit: int) -> bytes:
    size = path.stat().st_size
    if size > limit:
        raise CapsuleCliError(
            f"{path}: {size} bytes is too large for {what}: is it the right file?"
        )
    return path.read_bytes()


class CapsuleCommands(CommandGroup):
    """`soma capsule <verb>` against the Capsule service; `dispatch` returns the exit status."""

    def emit(self, message: Any, text: str) -> None:
        self.print(render.dump_json(render.to_dict(message)) if self.json else text)

    async def dispatch(self, args: argparse.Namespace) -> int:
        name = f"capsule_{args.verb.replace('-', '_')}"
        if args.verb == "publisher-key":
            name = f"{name}_{args.key_verb}"
        try:
            result: int | None = await getattr(self, name)(args)
        except SomaError as exc:  # raised here, before any call: e.g. an unsafe archive
            return report_local(args.verb, exc, self.err)
        except (CapsuleCliError, OSError) as exc:
            print(f"error: {_os_message(exc)}", file=self.err)
            return 1
        return result or 0

    # publisher -----------------------------------------------------------------------------

    def _signature(self, args: argparse.Namespace, archive_path: Path) -> tuple[str, str]:
        """(cosign signature, bundle JSON): the file named, else FILE.sig / FILE.sigstore.json."""
        from services.capsule import signing

        sig = Path(args.signature) if args.signature else None
        bundle = Path(args.bundle) if args.bundle else None
        if sig is None and bundle is None:
            sig, bundle = Path(f"{archive_path}.sig"), Path(f"{archive_path}.sigstore.json")
            if sig.is_file():
                bundle = None
            elif bundle.is_file():
                sig = None
            else:
                raise CapsuleCliError(
                    f"no signature for {archive_path}: sign it with `soma capsule sign "
                    f"{archive_path} --key cosign.key` (writes {sig.name}), or pass "
                    "--signature SIGFILE / --bundle BUNDLE"
                )
            print(f"using the signature in {sig or bundle}", file=self.err)
        if sig is not None:  # base64 text as cosign writes it, or raw DER (cosign accepts both)
            return signing.read_signature(_read_small(sig, "a signature", MAX_SIGNATURE_FILE)), ""
        assert bundle is not None
        return "", _read_small(bundle, "a bundle", MAX_SIGNATURE_FILE).decode("utf-8", "replace")

    def _publish_inputs(self, args: argparse.Namespace) -> tuple[Path, int, str, str]:
        """The archive, its size and its signature, checked before connecting."""
        archive_path = Path(args.file)
        if not archive_path.is_file():
            raise CapsuleCliError(f"{archive_path}: no such file")
        signature, bundle = self._signature(args, archive_path)
        return archive_path, archive_path.stat().st_size, signature, bundle

    async def capsule_publish(self, args: argparse.Namespace) -> None:
        archive_path, size, signature, bundle = self._publish_inputs(args)
        visibility = pb.CAPSULE_VISIBILITY_UNSPECIFIED
        if args.public:
            visibility = pb.CAPSULE_VISIBILITY_PUBLIC
        elif args.private:
            visibility = pb.CAPSULE_VISIBILITY_PRIVATE
        bar = progress.upload_bar(self.out, size, as_json=self.json)
        try:
            version = await self.client.publish_capsule(
                archive_path,
                signature=signature,
                sigstore_bundle=bundle,
                visibility=visibility,
                publisher_key=args.publisher_key or "",
                request_id=args.request_id,
                on_progress=bar,
            )
        finally:
            if bar is not None:
                bar.close()
        self.emit(version, f"Published {version.name}.\n\n{show.version_details(version)}")

    async def capsule_yank(self, args: argparse.Namespace) -> None:
        capsule, version = args.ref
        result = await self.client.capsule.YankCapsuleVersion(
            capsule_pb2.YankCapsuleVersionRequest(
                name=f"{capsule}/versions/{version}", reason=args.reason,
                request_id=args.request_id,
            )
        )  # fmt: skip
        self.emit(
            result, f"Yanked {result.name}: no new installs.\n\n{show.version_details(result)}"
        )

    async def capsule_publisher_key_add(self, args: argparse.Namespace) -> None:
        pem = _read_small(Path(args.pem), "a public key", MAX_PEM_FILE).decode("utf-8", "replace")
        key = await self.client.capsule.RegisterPublisherKey(
            capsule_pb2.RegisterPublisherKeyRequest(
                publisher_key=pb.PublisherKey(display_name=args.display_name, public_key_pem=pem),
                request_id=args.request_id,
            )
        )
        self.emit(key, f"Registered {key.name}.\n\n{show.key_details(key)}")

    async def capsule_publisher_key_list(self, args: argparse.Namespace) -> None:
        state = KEY_STATES[args.state] if args.state else pb.PUBLISHER_KEY_STATE_UNSPECIFIED
        keys = [k async for k in self.client.iter_publisher_keys(state)]
        if self.json:
            self.print(render.dump_json({"publisher_keys": [render.to_dict(k) for k in keys]}))
        else:
            self.print(show.key_table(keys))

    async def capsule_publisher_key_revoke(self, args: argparse.Namespace) -> None:
        key = await self.client.capsule.RevokePublisherKey(
            capsule_pb2.RevokePublisherKeyRequest(
                name=args.key, reason=args.reason, request_id=args.request_id
            )
        )
        self.emit(
            key,
            f"Revoked {key.name}: versions it signed no longer verify.\n\n{show.key_details(key)}",
        )

    # tenant --------------------------------------------------------------------------------

    async def capsule_list(self, args: argparse.Namespace) -> None:
        request = capsule_pb2.ListCapsulesRequest(
            page_size=_page_size(args.limit), query=args.query, publisher=args.publisher,
            verified_only=args.verified, permission=args.permission, order_by=ORDERS[args.order],
        )  # fmt: skip
        capsules = await take(self.client.iter_capsules(request), args.limit)
        if self.json:
            self.print(render.dump_json({"capsules": [render.to_dict(c) for c in capsules]}))
        else:
            self.print(show.capsule_table(capsules))

    async def capsule_show(self, args: argparse.Namespace) -> None:
        capsule, version = args.ref
        if version:
            found = await self.client.capsule.GetCapsuleVersion(
                capsule_pb2.GetCapsuleVersionRequest(name=f"{capsule}/versions/{version}")
            )
            self.emit(found, show.version_details(found))
            return
        item = await self.client.capsule.GetCapsule(capsule_pb2.GetCapsuleRequest(name=capsule))
        versions = (
            [v async for v in self.client.iter_capsule_versions(capsule)] if args.versions else []
        )
        if self.json:
            shown = render.to_dict(item)
            if args.versions:
                shown["versions"] = [render.to_dict(v) for v in versions]
            self.print(render.dump_json(shown))
            return
        self.print(show.capsule_details(item))
        if args.versions:
            self.print(f"\n{show.version_table(versions)}")

    async def capsule_verify(self, args: argparse.Namespace) -> int:
        capsule, version = args.ref
        result = await self.client.capsule.VerifyCapsuleVersion(
            capsule_pb2.VerifyCapsuleVersionRequest(name=f"{capsule}/versions/{version}")
        )
        outcome = show.label(pb.VerificationResult, result.result, "VERIFICATION_RESULT_")
        text = f"{result.name}: {outcome}"
        self.emit(result, f"{text}: {result.message}" if result.message else text)
        return 0 if result.verified else 1

    async def capsule_install(self, args: argparse.Namespace) -> int:
        capsule, version = args.ref
        request_id = args.request_id or str(uuid.uuid4())  # so that a re-run can attach again
        again = (
            f"soma capsule install {show.short_id(capsule)}{'@' + version if version else ''} "
            f"--request-id {request_id}"
        )
        view = progress.install_view(self.out, as_json=self.json)
        last: capsule_pb2.InstallProgress | None = None
        interrupted = False
        try:
            async for update in self.client.install_capsule(
                capsule, version, request_id=request_id
            ):
                view.update(update)
                last = update
        except asyncio.CancelledError:  # Ctrl-C: the install itself goes on on the server
            interrupted = True
            raise
        finally:
            view.close()  # before any note, so that the bar does not draw over it
            if interrupted:
                print(
                    f"\ninterrupted: the install continues on the server; follow it again "
                    f"with `{again}`",
                    file=self.err,
                )
        if last is not None and last.phase == pb.INSTALL_PHASE_DONE:
            return 0
        if last is not None and last.phase == pb.INSTALL_PHASE_FAILED:
            # The contract ends the call with the error; a server that ended it OK still failed.
            error = f"{progress.code_name(last.error.code)}: {last.error.message}"
            print(f"error: {error if last.HasField('error') else 'the install failed'}",
                  file=self.err)  # fmt: skip
            return 1
        print(
            f"error: the progress stream ended before the install did; follow it with `{again}`",
            file=self.err,
        )
        return 1

    async def capsule_uninstall(self, args: argparse.Namespace) -> None:
        result = await self.client.capsule.UninstallCapsule(
            capsule_pb2.UninstallCapsuleRequest(name=args.capsule, request_id=args.request_id)
        )
        self.emit(
            result,
            f"Uninstalled {show.short_id(result.capsule)} {result.version}.\n\n"
            f"{show.installation_details(result)}",
        )

    async def capsule_installations(self, args: argparse.Namespace) -> None:
        request = capsule_pb2.ListInstallationsRequest(
            page_size=_page_size(args.limit), capsule=args.capsule or "", requester=args.requester
        )
        if args.state:
            request.state = INSTALLATION_STATES[args.state]
        installs = await take(self.client.iter_installations(request), args.limit)
        if self.json:
            self.print(render.dump_json({"installations": [render.to_dict(i) for i in installs]}))
        else:
            self.print(show.installation_table(installs))

    # approver ------------------------------------------------------------------------------

    async def capsule_approvals(self, args: argparse.Namespace) -> None:
        request = capsule_pb2.ListApprovalsRequest(
            page_size=_page_size(args.limit), capsule=args.capsule or ""
        )
        if args.pending or args.state:
            request.state = APPROVAL_STATES[args.state or "pending"]
        found = await take(self.client.iter_approvals(request), args.limit)
        if self.json:
            self.print(render.dump_json({"approvals": [render.to_dict(a) for a in found]}))
        else:
            self.print(show.approval_table(found))

    async def capsule_approve(self, args: argparse.Namespace) -> None:
        result = await self.client.capsule.ApproveCapsule(
            capsule_pb2.ApproveCapsuleRequest(
                name=args.approval, comment=args.comment, request_id=args.request_id
            )
        )
        self.emit(
            result,
            f"Approved {result.name}: the install continues.\n\n{show.approval_details(result)}",
        )

    async def capsule_reject(self, args: argparse.Namespace) -> None:
        result = await self.client.capsule.RejectCapsule(
            capsule_pb2.RejectCapsuleRequest(
                name=args.approval, reason=args.reason, request_id=args.request_id
            )
        )
        details = show.approval_details(result)
        self.emit(result, f"Rejected {result.name}: the install ends.\n\n{details}")
