"""`soma-mesh admin` and the bootstrap key: parsing, validation, the once-only banner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.client.durations import parse_duration
from services.mesh import bootstrap
from services.mesh.cli import build_parser, main, print_ready
from services.mesh.errors import MeshError
from services.mesh.supervisor import Mesh, MeshOptions

SECRET = "soma_dev_aaaaaaaaaaaaaaaa_bbbbbbbbbbbbbbbbbbbbbbbbbbccccccc"


def _key(created_tenant: bool = True) -> bootstrap.CreatedKey:
    return bootstrap.CreatedKey(
        key_id="aaaaaaaaaaaaaaaa",
        tenant="default",
        roles=("admin", "platform_admin"),
        scopes=("*",),
        owner="user:admin",
        display_name="bootstrap admin",
        created_tenant=created_tenant,
        secret=SECRET,
    )


def test_create_key_defaults(tmp_path: Path) -> None:
    args = build_parser().parse_args(["admin", "create-key", "--data-dir", str(tmp_path)])
    assert (args.command, args.admin_command) == ("admin", "create-key")
    assert args.tenant == "default" and args.role is None and args.scope is None
    assert args.owner == "user:admin" and args.json is False


def test_create_key_options() -> None:
    args = build_parser().parse_args(
        [
            "admin",
            "create-key",
            "--tenant",
            "acme",
            "--role",
            "member",
            "--role",
            "auditor",
            "--scope",
            "gateway:read",
            "--name",
            "ci",
            "--json",
        ]
    )
    assert args.tenant == "acme" and args.role == ["member", "auditor"]
    assert args.scope == ["gateway:read"] and args.name == "ci" and args.json


def test_rotate_signing_key_parses() -> None:
    args = build_parser().parse_args(["admin", "rotate-signing-key", "--json"])
    assert args.admin_command == "rotate-signing-key" and args.json


def test_admin_on_a_stopped_mesh_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["admin", "create-key", "--data-dir", str(tmp_path)]) == 3
    assert "no mesh is running" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (bootstrap.KeySpec(tenant="A"), "tenant"),
        (bootstrap.KeySpec(tenant="ab"), "tenant"),
        (bootstrap.KeySpec(tenant="9lives"), "tenant"),
        (bootstrap.KeySpec(roles=("root",)), "roles"),
        (bootstrap.KeySpec(roles=()), "roles"),
        (bootstrap.KeySpec(env="prod"), "SOMA_ENV"),
    ],
)
def test_key_spec_validation(spec: bootstrap.KeySpec, message: str) -> None:
    with pytest.raises(MeshError, match=message):
        spec.validate()


def test_default_spec_is_the_bootstrap_admin() -> None:
    spec = bootstrap.KeySpec()
    spec.validate()
    assert spec.tenant == "default" and spec.roles == ("admin", "platform_admin")
    assert spec.scopes == ("*",) and spec.owner == "user:admin"


def test_created_key_never_shows_its_secret_in_repr() -> None:
    key = _key()
    assert SECRET not in repr(key)
    assert key.name == "keys/aaaaaaaaaaaaaaaa"
    assert key.to_json()["secret"] == SECRET  # --json is how tests and scripts get it
    json.dumps(key.to_json())


def test_ready_banner_prints_the_key_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mesh = Mesh(MeshOptions(data_dir=tmp_path))
    mesh.bootstrap_key = _key()
    print_ready(mesh)
    first = capsys.readouterr().out
    assert first.count(SECRET) == 1
    assert "Store it now" in first and "soma-mesh admin create-key" in first
    assert mesh.bootstrap_key is None  # forgotten after printing
    print_ready(mesh)
    assert SECRET not in capsys.readouterr().out


def test_bootstrap_can_be_turned_off() -> None:
    assert MeshOptions().bootstrap is None
    assert MeshOptions(bootstrap=False).bootstrap is False


def test_durations_shared_with_the_cli() -> None:
    assert parse_duration("24h").total_seconds() == 86400
