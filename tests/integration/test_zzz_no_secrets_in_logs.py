"""Runs last: after every other test, no credential they made appears in any log line."""

from __future__ import annotations

import pytest

from tests.integration.harness import MeshRunner

pytestmark = pytest.mark.integration


def test_no_secret_in_any_log(mesh: MeshRunner) -> None:
    assert mesh.secrets, "the auth tests made no credentials: this check would prove nothing"
    logs = [*(mesh.data_dir / "logs").glob("*.log"), mesh.log_file]
    assert len(logs) >= 8
    text = {p.name: p.read_text(errors="replace") for p in logs}
    for secret in mesh.secrets:
        # the whole secret, and its secret part alone (a key's id is public; its tail is not)
        needles = {secret, secret[-33:]}
        for name, content in text.items():
            for needle in needles:
                assert needle not in content, f"a credential appears in {name}"
