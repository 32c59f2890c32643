"""services.mesh.prometheus: rendering observability/prometheus.yml for a topology."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from services.mesh.errors import MeshError
from services.mesh.prometheus import TEMPLATE, render, write_prometheus_config

TARGETS = {
    "worker": [("worker", "127.0.0.1:7005")],
    "gateway": [("gateway-0", "127.0.0.1:7001"), ("gateway-1", "127.0.0.1:7002")],
    "keys": [("keys-0", "127.0.0.1:7003")],
}


def test_the_real_template_renders_every_replica_and_envoy(tmp_path: Path) -> None:
    out = write_prometheus_config(tmp_path / "prometheus.yml", TARGETS, "127.0.0.1:9901")
    config = yaml.safe_load(out.read_text())
    jobs = [job["job_name"] for job in config["scrape_configs"]]
    assert jobs == ["gateway", "keys", "worker", "envoy"]  # kinds in fixed order, none empty
    gateway = config["scrape_configs"][0]
    assert [(g["labels"]["replica"], g["targets"]) for g in gateway["static_configs"]] == [
        ("gateway-0", ["127.0.0.1:7001"]),
        ("gateway-1", ["127.0.0.1:7002"]),
    ]
    envoy = config["scrape_configs"][-1]
    assert envoy["metrics_path"] == "/stats/prometheus"
    assert envoy["static_configs"][0]["targets"] == ["127.0.0.1:9901"]
    assert config["rule_files"] == [str((TEMPLATE.parent / "alerts.yml").resolve())]
    assert "__" not in out.read_text().split("\n", 2)[2]  # no placeholder left
    if shutil.which("promtool"):
        checked = subprocess.run(
            ["promtool", "check", "config", "--syntax-only", str(out)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_rules_on_a_small_template(tmp_path: Path) -> None:
    template = {
        "rule_files": ["rules/*.yml", "/abs/other.yml"],
        "scrape_configs": [
            {
                "job_name": "__SERVICE__",
                "static_configs": [
                    {"targets": ["__REPLICA_TARGET__"], "labels": {"replica": "__REPLICA__"}},
                    {"targets": ["127.0.0.1:1"], "labels": {"kept": "yes"}},
                ],
            },
            {"job_name": "envoy", "static_configs": [{"targets": ["__ENVOY_ADMIN__"]}]},
            {"job_name": "node", "static_configs": [{"targets": ["127.0.0.1:9100"]}]},
        ],
    }
    config = render(template, tmp_path, {"keys": [("keys-0", "h:1")]}, envoy_admin=None)
    assert config["rule_files"] == [str(tmp_path / "rules/*.yml"), "/abs/other.yml"]
    keys, node = config["scrape_configs"]  # no Envoy: its job is dropped
    assert keys["static_configs"] == [
        {"targets": ["h:1"], "labels": {"replica": "keys-0"}},
        {"targets": ["127.0.0.1:1"], "labels": {"kept": "yes"}},
    ]
    assert node == template["scrape_configs"][2]  # an operator's own job is copied unchanged
    assert template["scrape_configs"][0]["job_name"] == "__SERVICE__"  # input not modified


def test_a_broken_template_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "t.yml"
    bad.write_text("global: {}\n")
    with pytest.raises(MeshError, match=r"t\.yml"):
        write_prometheus_config(tmp_path / "out.yml", TARGETS, None, template=bad)
    with pytest.raises(MeshError, match=r"missing\.yml"):
        write_prometheus_config(tmp_path / "out.yml", TARGETS, None, tmp_path / "missing.yml")
