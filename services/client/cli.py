"""`soma`: manage API keys and tokens of a Soma Mesh through Envoy, read its audit trail, and
publish, install and approve capsules.

    soma keys create [--name N] [--role R ...] [--scope S ...] [--expires-in 30d]
                     [--budget N] [--rate-limit N] [--request-id UUID]
    soma keys list [--state active|revoked|expired] [--owner SUBJECT]
    soma keys get KEY
    soma keys revoke KEY [--reason TEXT]
    soma keys rotate KEY [--grace 24h]
    soma token issue [--ttl 10m] [--scope S ...] [--audience AUD]
    soma audit list|tail|export|verify ...   (see services/client/audit_cli.py)
    soma capsule pack|keygen|sign|publish|list|show|install|approve ...  (capsule_cli.py)

Every command takes --target (SOMA_TARGET, default 127.0.0.1:8080), --api-key (SOMA_API_KEY;
prefer the variable: arguments show in `ps`), --token (SOMA_TOKEN), --timeout and --json.
KEY is a key id, `keys/<id>`, or a full API key (only its id is used).
Exit status: 0 ok, 1 the call failed (`error: <CODE>: <message>` on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TextIO

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from services.client import audit_cli, capsule_cli, render
from services.client.argtypes import non_negative
from services.client.commands import CommandGroup
from services.client.durations import parse_duration
from services.client.errors import ApiError, redact
from services.client.sdk import DEFAULT_TARGET, DEFAULT_TIMEOUT, ClientConfig, SomaClient
from services.common import apikeys
from soma.keys.v1 import keys_pb2, resources_pb2

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

STATES = {
    "active": resources_pb2.API_KEY_STATE_ACTIVE,
    "revoked": resources_pb2.API_KEY_STATE_REVOKED,
    "expired": resources_pb2.API_KEY_STATE_EXPIRED,
}


class UsageError(Exception):
    """A bad argument found after parsing; printed like argparse's own errors."""


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _connection_options() -> argparse.ArgumentParser:
    # Defaults are SUPPRESS so the options work before or after the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--target",
        default=argparse.SUPPRESS,
        help=f"host:port of Envoy (SOMA_TARGET, default {DEFAULT_TARGET})",
    )
    common.add_argument(
        "--api-key",
        default=argparse.SUPPRESS,
        help="API key (prefer SOMA_API_KEY: arguments show in ps)",
    )
    common.add_argument(
        "--token", default=argparse.SUPPRESS, help="a JWT instead of an API key (SOMA_TOKEN)"
    )
    common.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS,
        help=f"seconds per call (default {DEFAULT_TIMEOUT:g})",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _connection_options()
    parser = argparse.ArgumentParser(
        prog="soma",
        description=(
            "Manage Soma Mesh API keys and tokens; read the audit trail; publish, install and "
            "approve capsules."
        ),
        parents=[common],
    )
    groups = parser.add_subparsers(dest="group", required=True)

    keys = groups.add_parser("keys", help="API keys of your tenant", parents=[common])
    verbs = keys.add_subparsers(dest="verb", required=True)

    create = verbs.add_parser(
        "create", help="create a key (its secret is shown once)", parents=[common]
    )
    create.add_argument("--name", default="", help="display name")
    create.add_argument(
        "--role", action="append", default=[], help="admin, member, approver, auditor (repeat)"
    )
    create.add_argument("--scope", action="append", default=[], help="e.g. gateway:read (repeat)")
    create.add_argument("--expires-in", type=_duration, help="lifetime, e.g. 30d, 12h, 1h30m")
    create.add_argument(
        "--budget", type=non_negative, default=0, help="total calls allowed (0 = unlimited)"
    )
    create.add_argument(
        "--rate-limit", type=non_negative, default=0, help="calls per minute (0 = no limit)"
    )
    create.add_argument("--request-id", default="", help="UUID making the call idempotent")

    lst = verbs.add_parser("list", help="list keys, newest first", parents=[common])
    lst.add_argument("--state", choices=sorted(STATES), help="only keys in this state")
    lst.add_argument("--owner", default="", help="only keys of this owner, e.g. user:alice")
    lst.add_argument("--page-size", type=non_negative, default=0, help=argparse.SUPPRESS)

    get = verbs.add_parser("get", help="show one key", parents=[common])
    get.add_argument("key", metavar="KEY")

    revoke = verbs.add_parser("revoke", help="revoke a key everywhere at once", parents=[common])
    revoke.add_argument("key", metavar="KEY")
    revoke.add_argument("--reason", default="", help="recorded in the audit trail")
    revoke.add_argument("--request-id", default="")

    rotate = verbs.add_parser(
        "rotate", help="give a key a new secret (shown once)", parents=[common]
    )
    rotate.add_argument("key", metavar="KEY")
    rotate.add_argument(
        "--grace", type=_duration, help="how long the old secret still works (default 24h)"
    )
    rotate.add_argument("--request-id", default="")

    token = groups.add_parser("token", help="short-lived tokens", parents=[common])
    tverbs = token.add_subparsers(dest="verb", required=True)
    issue = tverbs.add_parser("issue", help="exchange the API key for a JWT", parents=[common])
    issue.add_argument("--ttl", type=_duration, help="lifetime (default 10m, at most 60m)")
    issue.add_argument("--scope", action="append", default=[], help="narrow the token (repeat)")
    issue.add_argument("--audience", default="", help="the token's aud (default: the mesh)")

    audit_cli.add_parser(groups, common)
    capsule_cli.add_parser(groups, common)
    return parser


def client_config(args: argparse.Namespace, env: Mapping[str, str]) -> ClientConfig:
    base = ClientConfig.from_env(env)
    return ClientConfig(
        target=getattr(args, "target", None) or base.target,
        api_key=getattr(args, "api_key", None) or base.api_key,
        token=getattr(args, "token", None) or base.token,
        timeout=getattr(args, "timeout", None) or DEFAULT_TIMEOUT,
    )


def key_name(text: str) -> str:
    """KEY as typed -> `keys/<id>`. A full API key is reduced to its id (never echoed)."""
    text = text.strip()
    if apikeys.looks_like_key(text):
        try:
            return f"keys/{apikeys.parse(text).key_id}"
        except apikeys.InvalidKeyFormat as exc:
            raise UsageError(f"KEY: {exc}") from None
    if not text or text == "keys/":
        raise UsageError("KEY is empty")
    return text if text.startswith("keys/") else f"keys/{text}"


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(moment)
    return ts


def _duration_pb(delta: timedelta) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=int(delta.total_seconds()))


class Commands(CommandGroup):
    """One method per command; output goes to `out`, notes to `err`."""

    async def keys_create(self, args: argparse.Namespace) -> None:
        key = resources_pb2.ApiKey(
            display_name=args.name,
            roles=args.role,
            scopes=args.scope,
            usage_budget=args.budget,
            rate_limit_per_minute=args.rate_limit,
        )
        if args.expires_in is not None:
            key.expire_time.CopyFrom(_timestamp(datetime.now(UTC) + args.expires_in))
        resp = await self.client.keys.CreateApiKey(
            keys_pb2.CreateApiKeyRequest(api_key=key, request_id=args.request_id)
        )
        if self.json:
            self.print(render.dump_json(render.to_dict(resp)))
            return
        self.print(f"Created API key {resp.api_key.name}.\n")
        self.print(render.key_details(resp.api_key))
        self._secret(resp.secret, "the key was created earlier with this --request-id")

    async def keys_list(self, args: argparse.Namespace) -> None:
        state = STATES[args.state] if args.state else resources_pb2.API_KEY_STATE_UNSPECIFIED
        keys = [
            k
            async for k in self.client.iter_api_keys(
                state=state, owner=args.owner, page_size=args.page_size
            )
        ]
        if self.json:
            self.print(render.dump_json({"api_keys": [render.to_dict(k) for k in keys]}))
        else:
            self.print(render.key_table(keys))

    async def keys_get(self, args: argparse.Namespace) -> None:
        key = await self.client.keys.GetApiKey(keys_pb2.GetApiKeyRequest(name=key_name(args.key)))
        self.print(render.dump_json(render.to_dict(key)) if self.json else render.key_details(key))

    async def keys_revoke(self, args: argparse.Namespace) -> None:
        key = await self.client.keys.RevokeApiKey(
            keys_pb2.RevokeApiKeyRequest(
                name=key_name(args.key), reason=args.reason, request_id=args.request_id
            )
        )
        if self.json:
            self.print(render.dump_json(render.to_dict(key)))
            return
        self.print(f"Revoked {key.name}: it is refused everywhere from now on.\n")
        self.print(render.key_details(key))

    async def keys_rotate(self, args: argparse.Namespace) -> None:
        request = keys_pb2.RotateApiKeyRequest(name=key_name(args.key), request_id=args.request_id)
        if args.grace is not None:
            request.grace_period.CopyFrom(_duration_pb(args.grace))
        resp = await self.client.keys.RotateApiKey(request)
        if self.json:
            self.print(render.dump_json(render.to_dict(resp)))
            return
        key = resp.api_key
        until = render.timestamp(
            key.previous_secret_expire_time, key.HasField("previous_secret_expire_time")
        )
        note = "stopped working" if until == "-" else f"works until {until}"
        self.print(f"Rotated {key.name}; the previous secret {note}.\n")
        self.print(render.key_details(key))
        self._secret(resp.secret, "nothing was rotated: this --request-id was used before")

    async def token_issue(self, args: argparse.Namespace) -> None:
        resp = await self.client.issue_token(
            ttl=args.ttl, scopes=args.scope, audience=args.audience
        )
        if self.json:
            self.print(render.dump_json(render.to_dict(resp)))
            return
        # The token alone on stdout, so `TOKEN=$(soma token issue)` works.
        self.print(resp.access_token)
        expires = render.timestamp(resp.expire_time, resp.HasField("expire_time"))
        print(f"expires {expires} (in {resp.expires_in} s)", file=self.err)

    def _secret(self, secret: str, absent: str) -> None:
        if secret:
            self.print(render.secret_block(secret))
        else:
            self.print(f"\nNo secret returned: {absent}.")


async def run(
    args: argparse.Namespace,
    env: Mapping[str, str] | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    if args.group == "audit" and args.verb == "verify":
        return audit_cli.verify_command(args, out, err)  # offline: no connection, no credential
    if args.group == "capsule" and args.verb in capsule_cli.OFFLINE_VERBS:
        return capsule_cli.offline_command(args, out, err, env)  # pack, keygen, sign: offline
    config = client_config(args, os.environ if env is None else env)
    status = EXIT_OK
    try:
        async with SomaClient.from_config(config) as client:
            as_json = bool(getattr(args, "json", False))
            if args.group == "audit":
                await audit_cli.AuditCommands(client, as_json, out, err).dispatch(args)
            elif args.group == "capsule":
                capsule = capsule_cli.CapsuleCommands(client, as_json, out, err)
                status = await capsule.dispatch(args)
            else:
                commands = Commands(client, as_json, out, err)
                await getattr(commands, f"{args.group}_{args.verb}")(args)
    except grpc.aio.AioRpcError as exc:
        error = ApiError.from_rpc_error(exc, config.secrets)
        status = report(error, config, err)
        if args.group == "capsule":
            capsule_cli.report_hints(args, error, err)
        return status
    except UsageError as exc:
        print(f"soma: error: {redact(str(exc), config.secrets)}", file=err)
        return EXIT_USAGE
    return status


def report(error: ApiError, config: ClientConfig, err: TextIO) -> int:
    print(f"error: {error.code.name}: {error.message}", file=err)
    if error.code == grpc.StatusCode.UNAVAILABLE:
        print(f"hint: is the mesh running at {config.target}? (--target / SOMA_TARGET)", file=err)
    elif error.code == grpc.StatusCode.UNAUTHENTICATED and not config.secrets:
        print("hint: set SOMA_API_KEY (or pass --api-key / --token)", file=err)
    return EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
