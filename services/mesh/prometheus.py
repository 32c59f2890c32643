"""`<data dir>/prometheus.yml`: the Prometheus scrape config of the running mesh.

Rendered by `soma-mesh up` from the template observability/prometheus.yml, whose header states
the rules applied here (YAML in, YAML out, no text substitution):

1. relative `rule_files` are resolved against the template's directory;
2. the scrape config `job_name: __SERVICE__` is a prototype, replaced by one job per part kind
   that serves metrics (gateway, keys, audit, capsule, worker order), named after the kind;
3. in each, the static_configs entry targeting `__REPLICA_TARGET__` is repeated per replica with
   its metrics address and `labels.replica` = the part's name (`__REPLICA__` in the template);
4. `__ENVOY_ADMIN__` becomes Envoy's admin address (scrape configs naming it are dropped when
   the mesh runs without Envoy).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from services.mesh.errors import MeshError
from services.mesh.pyparts import REPO_ROOT

TEMPLATE = REPO_ROOT / "observability" / "prometheus.yml"
KINDS = ("gateway", "keys", "audit", "capsule", "worker")
SERVICE = "__SERVICE__"
REPLICA_TARGET = "__REPLICA_TARGET__"
REPLICA = "__REPLICA__"
ENVOY_ADMIN = "__ENVOY_ADMIN__"

# kind -> [(replica name, "host:port" of its metrics)]
MetricsTargets = Mapping[str, Sequence[tuple[str, str]]]


def _targets(group: Any) -> list[Any]:
    return list(group.get("targets") or []) if isinstance(group, dict) else []


def _replica_jobs(prototype: dict[str, Any], targets: MetricsTargets) -> list[dict[str, Any]]:
    jobs = []
    for kind in KINDS:
        replicas = targets.get(kind) or ()
        if not replicas:
            continue
        job = copy.deepcopy(prototype)
        job["job_name"] = kind
        groups: list[Any] = []
        for group in prototype.get("static_configs") or []:
            if _targets(group) != [REPLICA_TARGET]:
                groups.append(copy.deepcopy(group))
                continue
            for name, address in replicas:
                filled = copy.deepcopy(group)
                filled["targets"] = [address]
                labels = filled.get("labels") or {}
                filled["labels"] = {
                    key: name if value == REPLICA else value for key, value in labels.items()
                } | {"replica": name}
                groups.append(filled)
        job["static_configs"] = groups
        jobs.append(job)
    return jobs


def _with_envoy(job: dict[str, Any], admin: str) -> dict[str, Any]:
    job = copy.deepcopy(job)
    for group in job.get("static_configs") or []:
        if isinstance(group, dict) and group.get("targets"):
            group["targets"] = [admin if t == ENVOY_ADMIN else t for t in group["targets"]]
    return job


def _names_envoy(job: dict[str, Any]) -> bool:
    return any(ENVOY_ADMIN in _targets(g) for g in job.get("static_configs") or [])


def render(
    template: dict[str, Any], base: Path, targets: MetricsTargets, envoy_admin: str | None
) -> dict[str, Any]:
    """The rendered configuration (a new dict); `base` resolves relative rule files."""
    config = copy.deepcopy(template)
    config["rule_files"] = [
        str(path if Path(path).is_absolute() else (base / path).resolve())
        for path in config.get("rule_files") or []
    ]
    jobs: list[dict[str, Any]] = []
    for job in config.get("scrape_configs") or []:
        if job.get("job_name") == SERVICE:
            jobs.extend(_replica_jobs(job, targets))
        elif _names_envoy(job):
            if envoy_admin:
                jobs.append(_with_envoy(job, envoy_admin))
        else:
            jobs.append(job)
    config["scrape_configs"] = jobs
    return config


def write_prometheus_config(
    out: Path,
    targets: MetricsTargets,
    envoy_admin: str | None,
    template: Path = TEMPLATE,
) -> Path:
    """Renders `template` for this topology into `out` (atomically); returns `out`."""
    try:
        loaded = yaml.safe_load(template.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise MeshError(f"cannot read the Prometheus template {template}: {error}") from error
    if not isinstance(loaded, dict) or not isinstance(loaded.get("scrape_configs"), list):
        raise MeshError(f"{template} is not a Prometheus configuration (no scrape_configs list)")
    rendered = render(loaded, template.parent, targets, envoy_admin)
    header = (
        f"# Rendered by `soma-mesh up` from {template} at "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}; edit the template, not this file.\n"
        f"# prometheus --config.file={out} --storage.tsdb.path={out.parent / 'prometheus'}\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(header + yaml.safe_dump(rendered, sort_keys=False))
    tmp.replace(out)
    return out
