"""`soma-mesh status`: Envoy's view of each replica, read from admin /clusters?format=json, and
the Envoy admin kept on loopback whichever bootstrap is written."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from services.mesh import envoy
from services.mesh.status import (
    NOT_IN_ENVOY,
    attach_envoy_view,
    envoy_hosts,
    format_table,
    parse_clusters,
)
from services.mesh.topology import Endpoint, Topology


def host(port: int, stats: dict[str, str] | None = None, **health: Any) -> dict[str, Any]:
    return {
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "health_status": {"eds_health_status": "HEALTHY", **health},
        "stats": [{"name": k, "value": v} for k, v in (stats or {}).items()]
        + [{"name": "rq_timeout"}],  # Envoy leaves out the value of zero counters
    }


# Shaped like Envoy 1.40's answer (only the fields we read, plus some we do not).
CLUSTERS = {
    "cluster_statuses": [
        {
            "name": "gateway",
            "observability_name": "gateway",
            "host_statuses": [
                host(5001, {"rq_total": "12", "rq_error": "1"}),
                host(5002, failed_outlier_check=True),
                host(5003, failed_active_health_check=True, failed_outlier_check=True),
            ],
        },
        {
            "name": "keys",
            "host_statuses": [
                host(5004, pending_active_hc=True),
                host(5005, eds_health_status="DRAINING"),
                {"address": {"pipe": {"path": "/tmp/x.sock"}}, "health_status": {}},
            ],
        },
        {"name": "self"},  # no hosts at all
    ]
}


def test_each_replica_gets_envoys_words_for_its_state() -> None:
    hosts = parse_clusters(CLUSTERS)
    assert set(hosts) == {f"127.0.0.1:{p}" for p in range(5001, 5006)}
    assert hosts["127.0.0.1:5001"].state == "healthy" and hosts["127.0.0.1:5001"].healthy
    assert hosts["127.0.0.1:5001"].stats == {"rq_total": 12, "rq_error": 1}
    assert hosts["127.0.0.1:5002"].state == "ejected" and not hosts["127.0.0.1:5002"].healthy
    assert hosts["127.0.0.1:5003"].state == "failed health check, ejected"
    assert hosts["127.0.0.1:5004"].state == "awaiting first health check"
    assert hosts["127.0.0.1:5005"].state == "draining"
    assert hosts["127.0.0.1:5004"].cluster == "keys"


def test_only_service_replicas_get_an_envoy_view() -> None:
    parts: list[dict[str, Any]] = [
        {"name": "gateway-0", "kind": "service", "address": "127.0.0.1:5001"},
        {"name": "gateway-1", "kind": "service", "address": "127.0.0.1:5002"},
        {"name": "keys-0", "kind": "service", "address": "127.0.0.1:6000"},
        {"name": "worker", "kind": "worker", "address": "127.0.0.1:5003"},
        {"name": "nats", "kind": "nats", "address": "127.0.0.1:4222"},
    ]
    attach_envoy_view(parts, parse_clusters(CLUSTERS))
    assert parts[0]["envoy"]["state"] == "healthy" and parts[0]["envoy"]["healthy"]
    assert parts[1]["envoy"] == {
        "healthy": False,
        "cluster": "gateway",
        "state": "ejected",
        "flags": ("ejected",),
        "stats": {},
    }
    assert parts[2]["envoy"] == {"state": NOT_IN_ENVOY, "healthy": False}
    assert "envoy" not in parts[3] and "envoy" not in parts[4]
    json.dumps(parts)  # `status --json` prints it


def test_the_table_shows_envoys_view_and_why_it_is_missing() -> None:
    parts = [
        {
            "name": "gateway-1",
            "kind": "service",
            "address": "127.0.0.1:5002",
            "status": "healthy",
            "health": {"healthy": True, "detail": "SERVING"},
            "envoy": {"state": "ejected", "healthy": False},
        },
        {"name": "nats", "kind": "nats", "status": "healthy", "health": {"healthy": True}},
    ]
    table = format_table({"pid": 1, "status": "ready", "parts": parts})
    header, gateway, nats = table.splitlines()[2:5]
    assert "ENVOY" in header
    assert "ok SERVING" in gateway and "ejected" in gateway
    assert header.index("ENVOY") == gateway.index("ejected")
    assert nats[header.index("ENVOY")] == "-"  # not behind Envoy
    broken = format_table({"parts": [], "envoy_view_error": "Envoy admin 127.0.0.1:1: refused"})
    assert "ENVOY: Envoy admin 127.0.0.1:1: refused" in broken


@pytest.fixture
def admin() -> Iterator[str]:
    """A stand-in Envoy admin answering /clusters?format=json."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(CLUSTERS).encode() if self.path == "/clusters?format=json" else b""
            self.send_response(200 if body else 404)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


async def test_envoy_hosts_reads_the_admin_endpoint(admin: str) -> None:
    hosts = await envoy_hosts(admin)
    assert hosts["127.0.0.1:5002"].state == "ejected"
    with pytest.raises(OSError):  # nothing listens there
        await envoy_hosts("127.0.0.1:1", wait_s=0.5)


def topology(tmp_path: Path, admin_host: str) -> Topology:
    return Topology(
        listener=Endpoint("127.0.0.1", 18080),
        admin=Endpoint(admin_host, 19901),
        replicas={"gateway": (Endpoint("127.0.0.1", 50051),)},
        run_dir=tmp_path,
        descriptor_set=tmp_path / "none.binpb",
        openapi_document=tmp_path / "none.json",
        gateway_config_dir=tmp_path,
    )


@pytest.mark.parametrize("admin_host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
@pytest.mark.parametrize("minimal", [True, False])
def test_envoy_admin_is_refused_off_loopback(
    tmp_path: Path, admin_host: str, minimal: bool
) -> None:
    with pytest.raises(ValueError, match="loopback"):
        envoy.write_config(topology(tmp_path, admin_host), minimal=minimal)
    assert not (tmp_path / "envoy.json").exists()


@pytest.mark.parametrize("admin_host", ["127.0.0.1", "::1", "localhost"])
def test_envoy_admin_on_loopback_is_written(tmp_path: Path, admin_host: str) -> None:
    path = envoy.write_config(topology(tmp_path, admin_host), minimal=True)
    written = json.loads(path.read_text())
    assert written["admin"]["address"]["socket_address"]["address"] == admin_host
