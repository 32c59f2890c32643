"""Alert rules, their promtool tests, the Grafana dashboards, and the metric names they use.

* `promtool check rules` / `promtool test rules` on observability/ (Debian's `prometheus`
  package ships promtool; missing, these tests skip locally and fail in CI);
* every metric name a rule, a dashboard panel or a dashboard variable queries exists: soma_* in
  services/common/metrics.py (read from its prometheus-client registry), envoy_* in the
  /stats/prometheus of a real Envoy started with the mesh's bootstrap, plus Prometheus' own
  `up` and `ALERTS`;
* every alert has a severity, a summary, a description, a runbook section, and a firing and a
  quiet promtool case; dashboards use the `${datasource}` variable; the Prometheus template
  renders into a configuration promtool accepts.

`metric_names`, `rule_expressions` and `dashboard_expressions` are importable, e.g. to check the
names against the live /metrics of a running mesh.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from services.common import metrics  # noqa: F401  (defines and registers every soma_* metric)
from services.mesh import prometheus as prometheus_config
from services.mesh.envoy import envoy_binary
from services.mesh.envoy_config import describe_services, render_envoy_config
from services.mesh.ports import PortAllocator
from services.mesh.topology import Endpoint, Topology

REPO = Path(__file__).resolve().parents[2]
OBSERVABILITY = REPO / "observability"
ALERTS = OBSERVABILITY / "alerts.yml"
RULE_TESTS = sorted((OBSERVABILITY / "tests").glob("*.yml"))
DASHBOARD_DIR = OBSERVABILITY / "grafana" / "dashboards"
DASHBOARDS = sorted(DASHBOARD_DIR.glob("*.json"))
PROVISIONING = OBSERVABILITY / "grafana" / "provisioning"
RUNBOOK = REPO / "docs" / "runbook.md"
DESCRIPTORS = REPO / "gen" / "soma.binpb"

# Series Prometheus makes itself: scrape health, and the state of every alert.
PROMETHEUS_NAMES = frozenset({"up", "ALERTS"})
SEVERITIES = frozenset({"critical", "warning"})
EXPECTED_DASHBOARDS = {"mesh-overview", "service", "jetstream", "envoy"}

# --------------------------------------------------------------------------- PromQL names

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GRAFANA_VARIABLE = re.compile(r"\$\{?\w+\}?")  # $service, ${datasource}, $__rate_interval
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
# An identifier not glued to a number (`5m`, `1e3`) or another name; `(` after it = a function.
_IDENTIFIER = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan"}
)
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*\w+\s*\)\s*$", re.DOTALL)


def metric_names(expr: str) -> set[str]:
    """The metric (or recording-rule) names a PromQL expression selects.

    A rough parser, enough for our own rules and panels: label matchers, ranges, grouping
    clauses, strings and Grafana variables are cut out; what remains as an identifier not
    followed by `(` and not a keyword is a metric name."""
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VARIABLE.sub("", text)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    return {name for name, call in _IDENTIFIER.findall(text) if not call and name not in _KEYWORDS}


def variable_expression(query: str) -> str | None:
    """The PromQL inside a Grafana variable query (`label_values(<expr>, label)`), if any."""
    match = _LABEL_VALUES.match(query)
    if match:
        return match.group(1)
    if query.strip().startswith("label_values("):
        return None  # label_values(label): every series, no metric named
    return query


# --------------------------------------------------------------------------- the files


def load_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in load_rules() if "alert" in rule]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in load_rules() if "record" in rule}


def rule_expressions() -> list[tuple[str, str]]:
    """(where, expr) of every recording and alerting rule."""
    return [(f"alerts.yml: {r.get('alert') or r.get('record')}", r["expr"]) for r in load_rules()]


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or [])  # collapsed rows hold their panels


def load_dashboard(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, expr) of every panel target and every query variable of every dashboard."""
    found = []
    for path in DASHBOARDS:
        board = load_dashboard(path)
        for panel in _panels(board["panels"]):
            for target in panel.get("targets") or []:
                found.append((f"{path.name}: {panel['title']}", target["expr"]))
        for var in board["templating"]["list"]:
            if var["type"] != "query":
                continue
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            expr = variable_expression(query)
            if expr is not None:
                found.append((f"{path.name}: variable {var['name']}", expr))
    return found


SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "unknown": ("",),
}


def soma_metric_names() -> dict[str, set[str]]:
    """Every soma_* family services/common/metrics.py registers -> the series names it
    exports (a counter `x` as `x_total`, a histogram as `x_bucket`, `x_count`, `x_sum`)."""
    families: dict[str, set[str]] = {}
    for family in REGISTRY.collect():
        if family.name.startswith("soma_"):
            families[family.name] = {family.name + s for s in SUFFIXES[family.type]}
    # Empty would make every check below vacuous (e.g. the metrics moved to another registry).
    assert "soma_rpc_requests" in families, "services.common.metrics registered no RPC metrics"
    return families


def known_names() -> set[str]:
    """Every name a rule or panel may select, Envoy's aside."""
    return set().union(*soma_metric_names().values()) | PROMETHEUS_NAMES | recorded_names()


def _unknown(
    expressions: list[tuple[str, str]], known: set[str], envoy: set[str] | None = None
) -> list[str]:
    """`where: name` for every name an expression uses that is not known. Envoy names are
    checked only when `envoy` (the names of a real Envoy) is given."""
    problems = []
    for where, expr in expressions:
        for name in sorted(metric_names(expr)):
            if name.startswith("envoy_"):
                if envoy is not None and name not in envoy:
                    problems.append(f"{where}: {name} (not served by Envoy's /stats/prometheus)")
            elif name not in known:
                problems.append(f"{where}: {name}")
    return problems


# --------------------------------------------------------------------------- promtool


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path:
        return path
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(
            "promtool is missing in CI: scripts/check.sh must install it "
            "(apt-get install -y prometheus)"
        )
    pytest.skip("promtool not installed (Debian: apt-get install -y prometheus); CI runs this")


def run_promtool(promtool: str, *args: str) -> str:
    result = subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=120, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"promtool {' '.join(args)} failed:\n{output}"
    return output


def test_promtool_check_rules(promtool: str) -> None:
    output = run_promtool(promtool, "check", "rules", str(ALERTS))
    assert f"SUCCESS: {len(load_rules())} rules found" in output


def test_promtool_rule_unit_tests(promtool: str) -> None:
    assert RULE_TESTS, "no promtool tests in observability/tests/"
    run_promtool(promtool, "test", "rules", *map(str, RULE_TESTS))


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, as a recording rule promtool
    parses: a typo in a panel fails here, not in front of an operator."""
    fill = {
        "$__rate_interval": "1m",
        "$__interval": "1m",
        "$__range": "1h",
        "$service": "gateway",
        "$instance": ".*",
        "$cluster": ".*",
    }
    rules = []
    for i, (_where, expr) in enumerate(dashboard_expressions()):
        for variable, value in fill.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"a Grafana variable this test does not fill in: {expr}"
        rules.append({"record": f"dashboard_query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    run_promtool(promtool, "check", "rules", str(path))


def test_rendered_prometheus_config_is_valid(promtool: str, tmp_path: Path) -> None:
    """The template, rendered as `soma-mesh up` does, passes `promtool check config`, which
    also loads the rule file it names (observability/alerts.yml, by absolute path)."""
    out = prometheus_config.write_prometheus_config(
        tmp_path / "prometheus.yml",
        {"gateway": [("gateway-0", "127.0.0.1:9101"), ("gateway-1", "127.0.0.1:9102")]},
        "127.0.0.1:9901",
    )
    run_promtool(promtool, "check", "config", str(out))
    rendered = yaml.safe_load(out.read_text())
    assert rendered["rule_files"] == [str(ALERTS)]
    jobs = {job["job_name"]: job for job in rendered["scrape_configs"]}
    assert set(jobs) == {"gateway", "envoy"}
    assert [g["labels"]["replica"] for g in jobs["gateway"]["static_configs"]] == [
        "gateway-0",
        "gateway-1",
    ]
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"


# --------------------------------------------------------------------------- metric names


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (service, le) (rate(soma_a_bucket{method!~"/grpc[.].*", le="0.25"}[5m]))'
        " / on (service) group_left sum without (code) (soma_b_total offset 1h)"
        ' > 14.4 * 0.001 and rec:rule:ratio_rate5m unless absent(up{job="x"})'
        ' or histogram_quantile(0.9, c_bucket{service="$service"}[$__rate_interval]) > 1e3'
    )
    assert metric_names(expr) == {
        "soma_a_bucket",
        "soma_b_total",
        "rec:rule:ratio_rate5m",
        "up",
        "c_bucket",
    }
    assert variable_expression('label_values(soma_build_info{service="$service"}, instance)') == (
        'soma_build_info{service="$service"}'
    )
    assert variable_expression("label_values(service)") is None


def test_rules_name_only_exported_metrics() -> None:
    assert not _unknown(rule_expressions(), known_names())


def test_dashboards_name_only_exported_metrics() -> None:
    assert not _unknown(dashboard_expressions(), known_names())


def test_unknown_metric_is_reported() -> None:
    """The checks above can fail: a misspelled name and an Envoy stat that does not exist."""
    known = {"soma_rpc_requests_total"}
    expressions = [("x", "rate(soma_rpc_request_total[5m]) + envoy_cluster_nope")]
    assert _unknown(expressions, known, envoy={"envoy_cluster_membership_healthy"}) == [
        "x: envoy_cluster_nope (not served by Envoy's /stats/prometheus)",
        "x: soma_rpc_request_total",
    ]


def test_every_soma_metric_has_a_panel() -> None:
    used = set().union(*(metric_names(expr) for _, expr in dashboard_expressions()))
    missing = [family for family, names in soma_metric_names().items() if not names & used]
    assert not missing, f"metrics no dashboard shows: {missing}"


@pytest.fixture(scope="module")
def envoy_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The names in a real Envoy's /stats/prometheus, with the mesh's bootstrap and one healthy
    gateway replica (a grpc.health server) that has served a call, so that the per-request
    histograms exist too."""
    tmp = tmp_path_factory.mktemp("envoy")
    ports = PortAllocator()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    for name in ("", "soma.gateway.v1.GatewayService"):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    replica_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    topology = Topology(
        listener=Endpoint("127.0.0.1", ports.take()),
        admin=Endpoint("127.0.0.1", ports.take()),
        replicas={"gateway": (Endpoint("127.0.0.1", replica_port),)},
        descriptor_set=DESCRIPTORS,
        openapi_document=REPO / "gen" / "openapi" / "soma.openapi.json",
        gateway_config_dir=REPO / "gateway-config",
        run_dir=tmp,
    )
    config = tmp / "envoy.json"
    config.write_text(json.dumps(render_envoy_config(topology)))
    argv = [envoy_binary(), "-c", str(config), "--use-dynamic-base-id"]
    argv += ["--base-id-path", str(tmp / "base-id"), "--log-level", "error"]
    with (tmp / "envoy.log").open("wb") as log:
        envoy = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        _call_through_envoy(topology.listener.address, envoy)
        with urllib.request.urlopen(
            f"http://{topology.admin.address}/stats/prometheus", timeout=5
        ) as response:
            text = response.read().decode()
    except AssertionError as error:
        log_tail = (tmp / "envoy.log").read_text(errors="replace")[-2000:]
        raise AssertionError(f"{error}\nenvoy.log:\n{log_tail}") from None
    finally:
        envoy.terminate()
        try:
            envoy.wait(timeout=10)
        except subprocess.TimeoutExpired:
            envoy.kill()
            envoy.wait()
        server.stop(grace=None)
    # The names of the samples as served (Envoy's counters have no `_total` suffix).
    return {line.split("{")[0].split()[0] for line in text.splitlines() if line[:1].isalpha()}


def _call_through_envoy(listener: str, envoy: subprocess.Popen[bytes]) -> None:
    """grpc.health Check through Envoy (routed to the gateway cluster) until it is answered:
    Envoy is up and its health check found the replica."""
    deadline = time.monotonic() + 30
    last: Exception | None = None
    with grpc.insecure_channel(listener) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert envoy.poll() is None, f"envoy exited with {envoy.returncode}"
            try:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                return
            except grpc.RpcError as error:
                last = error
                time.sleep(0.2)
    raise AssertionError(f"no call got through Envoy within 30 s: {last}")


def test_envoy_names_exist_in_a_real_envoy(envoy_names: set[str]) -> None:
    used = rule_expressions() + dashboard_expressions()
    assert any(n.startswith("envoy_") for _, e in used for n in metric_names(e))
    assert not _unknown(used, known_names(), envoy=envoy_names)


# --------------------------------------------------------------------------- alerts


def _anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("rule", alerts(), ids=lambda r: r["alert"])
def test_alert_has_severity_annotations_and_runbook(rule: dict[str, Any]) -> None:
    name = rule["alert"]
    assert rule.get("labels", {}).get("severity") in SEVERITIES, name
    annotations = rule.get("annotations", {})
    assert annotations.get("summary") and annotations.get("description"), name
    anchors = {
        _anchor(line.lstrip("#"))
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("## ")
    }
    assert annotations.get("runbook_url") == f"docs/runbook.md#{name.lower()}", name
    assert name.lower() in anchors, f"docs/runbook.md has no section `## {name}`"


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        document = yaml.safe_load(path.read_text())
        assert document["rule_files"] == ["../alerts.yml"], path
        for case in document["tests"]:
            for check in case.get("alert_rule_test") or []:
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - firing == set(), "alerts never seen firing in observability/tests"
    assert names - quiet == set(), "alerts never seen quiet in observability/tests"
    assert firing | quiet <= names, "tests of alerts that do not exist"


def test_latency_slo_leaves_out_every_streaming_method() -> None:
    """The latency rules exclude streams by name: the list must follow the contract."""
    services = describe_services(DESCRIPTORS)
    streaming = [s.path(m) for s in services for m in s.methods if m.streaming]
    unary = [s.path(m) for s in services for m in s.methods if not m.streaming]
    assert streaming and unary
    latency = [e for w, e in rule_expressions() if "soma_rpc_duration_seconds" in e]
    assert latency
    for expr in latency:
        excluded = [re.compile(p) for p in re.findall(r'method!~"([^"]*)"', expr)]
        assert excluded, expr

        def is_excluded(method: str, patterns: list[re.Pattern[str]] = excluded) -> bool:
            return any(p.fullmatch(method) for p in patterns)

        assert [m for m in streaming if not is_excluded(m)] == [], expr
        assert [m for m in unary if is_excluded(m)] == [], expr
        assert is_excluded("/grpc.health.v1.Health/Check")


# --------------------------------------------------------------------------- dashboards


def test_dashboards_are_all_there() -> None:
    assert {p.stem for p in DASHBOARDS} == EXPECTED_DASHBOARDS


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_shape(path: Path) -> None:
    board = load_dashboard(path)
    assert 36 <= board["schemaVersion"] <= 41
    assert board["uid"] == f"soma-{path.stem}" and board["id"] is None
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    if path.stem == "service":
        assert variables["service"]["type"] == "query"
    ids = []
    for panel in _panels(board["panels"]):
        ids.append(panel["id"])
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def test_provisioning_points_at_the_dashboards() -> None:
    (datasources,) = PROVISIONING.glob("datasources/*.yml")
    (source,) = yaml.safe_load(datasources.read_text())["datasources"]
    assert source["type"] == "prometheus"
    (providers,) = PROVISIONING.glob("dashboards/*.yml")
    (provider,) = yaml.safe_load(providers.read_text())["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "${SOMA_DASHBOARDS_DIR}"
