"""Metrics on the session mesh: every Python part serves /metrics on the loopback port the
supervisor recorded in state.json, the counters move with real calls through Envoy, every metric
of the contract table (services/common/metrics.py) is exposed, and `soma-mesh up` rendered a
valid Prometheus scrape config naming every replica."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from soma.gateway.v1 import gateway_pb2 as g
from soma.gateway.v1 import gateway_pb2_grpc
from soma.gateway.v1 import resources_pb2 as pb
from soma.keys.v1 import keys_pb2, keys_pb2_grpc
from tests.integration.harness import MeshRunner, free_port
from tests.integration.scraping import Scrape, metrics_parts, scrape, scrape_all
from tests.unit.test_metrics import TABLE
from tests.unit.test_observability_rules import (
    PROMETHEUS_NAMES,
    SUFFIXES,
    dashboard_expressions,
    load_rules,
    metric_names,
    recorded_names,
    rule_expressions,
)

pytestmark = pytest.mark.integration

GET_VERSION = "/soma.gateway.v1.GatewayService/GetVersion"
LIST_KEYS = "/soma.keys.v1.KeysService/ListApiKeys"


def by_service(scrapes: dict[str, Scrape], parts: dict[str, tuple[str, str]]) -> Any:
    grouped: dict[str, list[Scrape]] = defaultdict(list)
    for name, result in scrapes.items():
        grouped[parts[name][0]].append(result)

    def total(service: str, name: str, **labels: str) -> float:
        return sum(s.total(name, **labels) for s in grouped[service])

    return total


async def wait_for(check: Callable[[], Any], within: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            if await check():
                return
        except AssertionError:
            pass
        assert asyncio.get_running_loop().time() < deadline, f"not reached in {within}s"
        await asyncio.sleep(0.5)


async def test_every_replica_serves_the_table_and_counters_move(
    mesh: MeshRunner, channel: grpc.aio.Channel
) -> None:
    parts = metrics_parts(mesh)
    services = {service for service, _ in parts.values()}
    assert {"gateway", "keys", "audit", "worker"} <= services, parts
    assert sum(1 for s, _ in parts.values() if s == "gateway") == mesh.replicas
    assert all(address.startswith("127.0.0.1:") for _, address in parts.values())

    before = by_service(await scrape_all(mesh), parts)
    version_ok = before("gateway", "soma_rpc_requests_total", method=GET_VERSION, code="OK")
    keys_ok = before("keys", "soma_rpc_requests_total", method=LIST_KEYS, code="OK")
    unauthenticated = before("keys", "soma_rpc_requests_total", code="UNAUTHENTICATED")

    gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
    keys = keys_pb2_grpc.KeysServiceStub(channel)
    for _ in range(4):
        await gateway.GetVersion(g.GetVersionRequest())
        await keys.ListApiKeys(keys_pb2.ListApiKeysRequest(page_size=1))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await keys.ListApiKeys(
            keys_pb2.ListApiKeysRequest(), metadata=(("authorization", "Bearer not-a-token"),)
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # One message through JetStream and the worker, twice: a tool-cache miss, then a hit.
    session = await gateway.CreateSession(
        g.CreateSessionRequest(session=pb.Session(display_name="metrics"))
    )
    text = f"metrics {uuid.uuid4()}"
    for _ in range(2):
        await gateway.SendMessage(
            g.SendMessageRequest(parent=session.name, message=pb.Message(content=text))
        )

    async def moved() -> bool:
        scrapes = await scrape_all(mesh)
        after = by_service(scrapes, parts)
        rpc = "soma_rpc_requests_total"
        assert after("gateway", rpc, method=GET_VERSION, code="OK") == version_ok + 4
        assert after("keys", rpc, method=LIST_KEYS, code="OK") == keys_ok + 4
        assert after("keys", rpc, code="UNAUTHENTICATED") == unauthenticated + 1
        assert after("keys", "soma_rpc_duration_seconds_count", method=LIST_KEYS) >= 4
        assert after("keys", "soma_auth_decisions_total", decision="allow") >= 4
        assert after("keys", "soma_auth_decisions_total", decision="unauthenticated") >= 1
        assert after("keys", "soma_cache_requests_total", cache="api_key", result="hit") >= 1
        assert after("keys", "soma_cache_requests_total", cache="policy", result="hit") >= 1
        stream = "SESSIONS"
        assert after("gateway", "soma_jetstream_published_total", stream=stream) >= 2
        assert after("worker", "soma_jetstream_published_total", stream=stream) >= 2
        assert after("worker", "soma_jetstream_consumed_total") >= 2
        assert after("gateway", "soma_jetstream_consumed_total", consumer="gateway-replies") >= 2
        assert after("worker", "soma_cache_requests_total", cache="tool_result", result="hit") >= 1
        assert after("worker", "soma_cache_requests_total", cache="tool_result", result="miss") >= 1
        # Reads are audited on the session mesh: events published, and stored by Audit.
        assert after("keys", "soma_jetstream_published_total", stream="AUDIT") >= 4
        assert after("audit", "soma_jetstream_consumed_total", consumer="audit-writer") >= 4
        for name, result in scrapes.items():
            service = parts[name][0]
            missing = [m for m in TABLE if not result.declares(m)]
            assert not missing, f"{name} does not declare {missing}"
            assert result.total("soma_build_info", service=service) == 1, name
            assert result.total("soma_rpc_requests_total", service=service) > 0, name
            if service != "worker":
                assert result.total("soma_db_pool_connections", state="max") > 0, name
        # Lag is sampled every 5 s by the Gateway, for its consumer and the workers' too.
        sampled = {
            dict(labels)["consumer"]
            for name, result in scrapes.items()
            if parts[name][0] == "gateway"
            for metric, labels in result.samples
            if metric == "soma_jetstream_consumer_pending"
        }
        assert {"gateway-replies", "worker-p0"} <= sampled, sampled
        return True

    await wait_for(moved)


def test_up_rendered_a_prometheus_config_for_every_replica(mesh: MeshRunner) -> None:
    state = mesh.state() or {}
    path = Path(state["urls"]["prometheus_config"])
    assert path == mesh.data_dir.resolve() / "prometheus.yml"
    config = yaml.safe_load(path.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    rendered = {
        group["labels"]["replica"]: group["targets"]
        for name, job in jobs.items()
        if name != "envoy"
        for group in job["static_configs"]
    }
    assert rendered == {name: [address] for name, (_, address) in metrics_parts(mesh).items()}
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert jobs["envoy"]["static_configs"][0]["targets"] == [state["admin"]]
    assert all(Path(rule).is_absolute() for rule in config["rule_files"])
    if shutil.which("promtool"):
        checked = subprocess.run(
            ["promtool", "check", "config", "--syntax-only", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr


def declared_series(text: str) -> set[str]:
    """The series names a /metrics text can hold, from its `# TYPE` lines: a family declared
    without samples yet (a labelled counter nobody incremented) still counts as existing."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(maxsplit=3)
            base = family.removesuffix("_total") if kind == "counter" else family
            # prometheus-client counters are `x_total`; Envoy's counters carry no suffix.
            names |= {family} | {base + suffix for suffix in SUFFIXES.get(kind, ("",))}
    return names


def test_rules_and_dashboards_name_only_metrics_the_live_mesh_serves(mesh: MeshRunner) -> None:
    """issue 6: every metric an alert rule or a dashboard panel selects is served by this running
    mesh — the Python parts' /metrics or Envoy's /stats/prometheus (Prometheus' own `up` and
    `ALERTS`, and the rules' recorded series, aside)."""
    live: set[str] = set()
    for _, address in metrics_parts(mesh).values():
        live |= declared_series(scrape(address).text)
    admin = (mesh.state() or {})["admin"]
    with urllib.request.urlopen(f"http://{admin}/stats/prometheus", timeout=10) as response:
        live |= declared_series(response.read().decode())
    assert any(n.startswith("soma_rpc_") for n in live) and any(
        n.startswith("envoy_cluster_") for n in live
    ), "the scrape found neither our RPC metrics nor Envoy's cluster stats"
    aside = PROMETHEUS_NAMES | recorded_names()
    missing = [
        f"{where}: {name}"
        for where, expr in rule_expressions() + dashboard_expressions()
        for name in sorted(metric_names(expr))
        if name not in aside and name not in live
    ]
    assert not missing, "not served by the running mesh:\n" + "\n".join(missing)


def query_prometheus(base: str, path: str) -> Any:
    with urllib.request.urlopen(f"{base}{path}", timeout=5) as response:
        body = json.loads(response.read().decode())
    assert body["status"] == "success", body
    return body["data"]


def test_a_real_prometheus_scrapes_the_rendered_config(mesh: MeshRunner, tmp_path: Path) -> None:
    """What an operator does (docs/monitoring_quickstart.md): run Prometheus on the config
    `soma-mesh up` wrote. Every target (each replica, the worker, Envoy) is scraped healthy and
    every alert rule of observability/alerts.yml is loaded."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("prometheus (Debian's prometheus package) is missing in CI")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    config = Path((mesh.state() or {})["urls"]["prometheus_config"])
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("wb"),
    )
    try:
        expected = len(metrics_parts(mesh)) + 1  # + Envoy
        deadline = time.monotonic() + 60
        while True:
            try:
                targets = query_prometheus(base, "/api/v1/targets")["activeTargets"]
                if len(targets) == expected and all(t["health"] == "up" for t in targets):
                    break
            except OSError:
                targets = []
            assert server.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, f"targets not all up within 60 s: {targets}"
            time.sleep(1)
        jobs = {t["labels"]["job"] for t in targets}
        assert jobs == {"gateway", "keys", "audit", "capsule", "worker", "envoy"}
        loaded = {
            rule["name"]
            for group in query_prometheus(base, "/api/v1/rules")["groups"]
            for rule in group["rules"]
            if rule["type"] == "alerting"
        }
        assert loaded == {rule["alert"] for rule in load_rules() if "alert" in rule}
    finally:
        server.terminate()
        server.wait(10)
