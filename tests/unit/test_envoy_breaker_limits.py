"""Envoy's retry, ejection and circuit-breaker numbers (gateway-config/limits.yaml) against the
replicas' own dependency timeout and breakers: the relations gateway-config/limits.yaml and
services/mesh/README.md ("Failure handling") rely on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.common import dependency
from services.common.config import load_config
from services.mesh.envoy_config import LimitsConfig, load_gateway_config, render_envoy_config
from services.mesh.topology import Endpoint, Topology

REPO = Path(__file__).resolve().parents[2]
LIMITS: LimitsConfig = load_gateway_config(REPO / "gateway-config").limits


def test_a_replica_answers_before_envoy_gives_up_on_the_try() -> None:
    # The replica's UNAVAILABLE (naming the dependency) must reach Envoy before its per-try
    # timer cuts the call, with room for a loaded machine.
    assert dependency.DEFAULT_TIMEOUT + 1.0 <= LIMITS.per_try_timeout_s
    # ...and every try of a read fits in the request timeout.
    assert (LIMITS.num_retries + 1) * LIMITS.per_try_timeout_s <= LIMITS.request_timeout_s
    assert "unavailable" in LIMITS.retry_on.split(",")  # breakers are per replica
    assert "unavailable" not in LIMITS.safe_retry_on.split(",")  # a mutation is never repeated


def test_a_lone_client_trips_a_hung_dependencys_breaker() -> None:
    # FAILURES sequential timeouts fit in the breaker's window.
    assert dependency.FAILURES * dependency.DEFAULT_TIMEOUT <= dependency.WINDOW
    assert dependency.COUNTED_WAIT < dependency.DEFAULT_TIMEOUT
    for dep in dependency._ALL:
        if dep.name in ("postgres", "nats", "openbao"):
            assert dep.breaker.failure_threshold == dependency.FAILURES
            assert dep.breaker.open_seconds == dependency.OPEN_SECONDS


def test_health_checks_take_a_dead_replica_out_before_a_drained_one_stops() -> None:
    drain_delay = load_config("gateway", {}).server.drain_delay_seconds
    assert LIMITS.hc_interval_s * LIMITS.hc_unhealthy_threshold < drain_delay


def cluster(tmp_path: Path, name: str) -> dict[str, Any]:
    openapi = tmp_path / "openapi.json"
    openapi.write_text('{"openapi": "3.1.0"}')
    topology = Topology(
        listener=Endpoint("127.0.0.1", 18080),
        admin=Endpoint("127.0.0.1", 19901),
        replicas={"gateway": (Endpoint("127.0.0.1", 50051), Endpoint("127.0.0.1", 50052))},
        descriptor_set=REPO / "gen" / "soma.binpb",
        openapi_document=openapi,
        gateway_config_dir=REPO / "gateway-config",
        run_dir=tmp_path / "run",
    )
    clusters = render_envoy_config(topology)["static_resources"]["clusters"]
    return next(c for c in clusters if c["name"] == name)


def test_ejection_is_bounded_and_undone_by_a_passed_health_check(tmp_path: Path) -> None:
    outlier = cluster(tmp_path, "gateway")["outlier_detection"]
    # A shared dependency down makes every replica answer UNAVAILABLE: at least half of a
    # cluster stays in rotation, and an ejected replica that passes its health check is back.
    assert outlier["max_ejection_percent"] <= 50
    assert outlier["successful_active_health_check_uneject_host"] is True
    assert outlier["consecutive_gateway_failure"] < outlier["consecutive_5xx"]


def test_envoy_caps_retries_in_flight(tmp_path: Path) -> None:
    [thresholds] = cluster(tmp_path, "gateway")["circuit_breakers"]["thresholds"]
    assert 0 < thresholds["max_retries"] <= 64  # the retry budget: no retry storms
    assert thresholds["max_requests"] >= 1024  # long-lived streams hold one each
