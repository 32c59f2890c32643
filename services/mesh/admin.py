"""`soma-mesh admin`: operator commands that work on the data directory of a running mesh.

    soma-mesh admin create-key [--data-dir D] [--tenant default] [--role R ...] [--scope S ...]
                               [--name N] [--owner user:admin] [--json]
    soma-mesh admin rotate-signing-key [--data-dir D] [--json]

They go straight to PostgreSQL and OpenBao (state.json + openbao/init.json), so they work before
any API key exists and whatever the policy says. Local development: the OpenBao root token is
read from init.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable

from services.mesh import bootstrap
from services.mesh.errors import MeshError, NotRunningError

EXIT_FAILED = 1
EXIT_NOT_RUNNING = 3

STORE_IT_NOW = "Store it now: it is shown only once. `soma-mesh admin create-key` makes another."


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    data_dir: Callable[[argparse.ArgumentParser], None],
) -> None:
    admin = sub.add_parser("admin", help="operator commands (keys, signing key) on a running mesh")
    verbs = admin.add_subparsers(dest="admin_command", required=True)

    create = verbs.add_parser("create-key", help="create an API key directly (secret shown once)")
    data_dir(create)
    create.add_argument("--tenant", default=bootstrap.DEFAULT_TENANT, help="created if missing")
    create.add_argument(
        "--role", action="append", help="repeat; default: --role admin --role platform_admin"
    )
    create.add_argument("--scope", action="append", help="repeat; default: *")
    create.add_argument("--name", default="admin", help="display name")
    create.add_argument("--owner", default=bootstrap.ADMIN_OWNER, help="owner subject")
    create.add_argument("--json", action="store_true", help="machine-readable output")

    rotate = verbs.add_parser(
        "rotate-signing-key", help="add a version to the JWT signing key (new kid)"
    )
    data_dir(rotate)
    rotate.add_argument("--json", action="store_true", help="machine-readable output")


def main(args: argparse.Namespace) -> int:
    try:
        connection = bootstrap.connection_for(
            args.data_dir.expanduser().resolve(), dict(os.environ)
        )
        if args.admin_command == "create-key":
            return create_key(args, connection)
        return rotate_signing_key(args, connection)
    except NotRunningError as exc:
        print(f"soma-mesh: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except MeshError as exc:
        print(f"soma-mesh: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # database/OpenBao errors: one line, no traceback, no secret
        print(
            f"soma-mesh: {args.admin_command} failed: {type(exc).__name__}: {exc}", file=sys.stderr
        )
        return EXIT_FAILED


def create_key(args: argparse.Namespace, connection: bootstrap.Connection) -> int:
    spec = bootstrap.KeySpec(
        tenant=args.tenant,
        roles=tuple(args.role or bootstrap.ADMIN_ROLES),
        # `gateway.read` (the contract's spelling) is stored as `gateway:read`, as Keys does
        scopes=tuple(sc if ":" in sc else sc.replace(".", ":", 1) for sc in args.scope or ("*",)),
        owner=args.owner,
        display_name=args.name,
        env=os.environ.get("SOMA_ENV", "dev").strip().lower() or "dev",
    )
    key = asyncio.run(bootstrap.create_key(connection, spec))
    assert key is not None  # only the bootstrap passes only_if_none
    if args.json:
        print(json.dumps(key.to_json(), indent=2))
        return 0
    tenant_note = " (new tenant)" if key.created_tenant else ""
    print(f"Created API key {key.name} in tenant {key.tenant}{tenant_note}")
    print(f"  roles  {', '.join(key.roles)}   scopes {', '.join(key.scopes)}   owner {key.owner}")
    print(f"  key    {key.secret}")
    print(STORE_IT_NOW)
    return 0


def rotate_signing_key(args: argparse.Namespace, connection: bootstrap.Connection) -> int:
    result = bootstrap.rotate_signing_key(connection.vault)
    if args.json:
        print(json.dumps({"version": result.version, "kid": result.kid, "created": result.created}))
        return 0
    verb = "Created" if result.created else "Rotated"
    print(f"{verb} the JWT signing key: new tokens are signed with kid {result.kid}.")
    if not result.created:
        print("Tokens signed with earlier versions stay valid until they expire.")
    return 0
