"""A real Envoy with the rendered bootstrap, in front of real grpc.aio Gateway replicas.

The replicas are small fakes written here (GetHealth, GetSession, ListSessions,
StreamSessionEvents, CreateSession) with grpc health and reflection; everything between the
client and them is the production config: REST/JSON transcoding, gRPC, gRPC-Web, CORS, error
mapping, X-API-Version, limits, legacy aliases, OpenAPI, health checking.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.mesh.envoy_config import (
    GatewayConfig,
    LimitsConfig,
    describe_services,
    load_gateway_config,
    write_envoy_config,
)
from services.mesh.topology import Endpoint, Topology
from soma.gateway.v1 import gateway_pb2, gateway_pb2_grpc, resources_pb2

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ENVOY = shutil.which("envoy") or str(REPO / ".venv" / "bin" / "envoy")
GATEWAY = "soma.gateway.v1.GatewayService"
SMALL_BODY_LIMIT = 64 * 1024


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- fake replicas


class FakeGateway(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, replica: str) -> None:
        self.replica = replica

    async def GetHealth(self, request, context):
        return resources_pb2.Health(
            status=resources_pb2.Health.STATUS_SERVING, replica=self.replica
        )

    async def GetSession(self, request, context):
        if request.name != "sessions/known":
            await context.abort(grpc.StatusCode.NOT_FOUND, f"session {request.name!r} not found")
        return resources_pb2.Session(name=request.name, display_name="known one")

    async def ListSessions(self, request, context):
        if request.page_size < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_size must not be negative")
        return gateway_pb2.ListSessionsResponse(
            sessions=[resources_pb2.Session(name="sessions/a")], next_page_token=""
        )

    async def CreateSession(self, request, context):
        session = resources_pb2.Session()
        session.CopyFrom(request.session)
        session.name = "sessions/new"
        session.tenant = "t1"
        return session

    async def GetVersion(self, request, context):
        if self.replica == "gateway-1":  # a flaky replica: reads are retried on another one
            await context.abort(grpc.StatusCode.UNAVAILABLE, "gateway-1 is flaky")
        return resources_pb2.Version(version=self.replica, api_version="v1")

    async def GetQueueStats(self, request, context):
        await asyncio.sleep(3)  # longer than the route timeout of the test config
        return resources_pb2.QueueStats()

    async def StreamSessionEvents(self, request, context):
        for seq in range(1, 4):
            yield resources_pb2.SessionEvent(
                session=request.session,
                sequence=seq,
                create_time=timestamp_pb2.Timestamp(seconds=1_700_000_000 + seq),
            )
            await asyncio.sleep(0.05)


class Replica:
    """One grpc.aio server on its own event loop thread; stop() makes it go away."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: aio.Server | None = None

    def start(self) -> Replica:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        server = aio.server()
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(FakeGateway(self.name), server)
        health_servicer = health.aio.HealthServicer()
        for service in ("", GATEWAY):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection([GATEWAY, reflection.SERVICE_NAME], server)
        server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(10)
            self._server = None

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


# --------------------------------------------------------------------------- envoy


@dataclass
class Mesh:
    topology: Topology
    process: subprocess.Popen[bytes]

    @property
    def host(self) -> str:
        return self.topology.listener.address

    def admin(self, path: str) -> str:
        conn = http.client.HTTPConnection(self.topology.admin.address, timeout=5)
        conn.request("GET", path)
        return conn.getresponse().read().decode()


def make_topology(tmp: Path, replicas: dict[str, tuple[Endpoint, ...]]) -> Topology:
    openapi = tmp / "soma.openapi.json"
    openapi.write_text(
        json.dumps(
            {
                "openapi": "3.1.0",
                "info": {"title": "Soma", "version": "v1"},
                "paths": {"/v1/health": {}},
                "pad": "x" * 20_000,
            }
        )
    )
    return Topology(
        listener=Endpoint("127.0.0.1", free_port()),
        admin=Endpoint("127.0.0.1", free_port()),
        replicas=replicas,
        descriptor_set=REPO / "gen" / "soma.binpb",
        openapi_document=openapi,
        gateway_config_dir=REPO / "gateway-config",
        run_dir=tmp / "run",
    )


def fast_config(**limits: object) -> GatewayConfig:
    """The repo's gateway-config, with limits tightened so that tests run fast."""
    cfg = load_gateway_config(REPO / "gateway-config")
    base = cfg.limits.__dict__ | {
        "hc_interval_s": 0.3,
        "hc_no_traffic_interval_s": 0.3,
        "hc_timeout_s": 0.5,
        "max_request_body_bytes": SMALL_BODY_LIMIT,
        "request_timeout_s": 1.0,
        **limits,
    }
    return GatewayConfig(routes=cfg.routes, cors=cfg.cors, limits=LimitsConfig(**base))


@contextmanager
def run_envoy(topology: Topology, cfg: GatewayConfig) -> Iterator[Mesh]:
    path = write_envoy_config(topology, cfg)
    log = (topology.run_dir / "envoy.log").open("wb")
    process = subprocess.Popen(
        [
            ENVOY,
            "-c",
            str(path),
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "--log-level",
            "warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    mesh = Mesh(topology, process)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert process.poll() is None, (topology.run_dir / "envoy.log").read_text()
            try:
                if mesh.admin("/ready").strip() == "LIVE":
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "envoy did not become ready"
            time.sleep(0.05)
        yield mesh
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[Replica]]:
    started = [Replica("gateway-0").start(), Replica("gateway-1").start()]
    yield started
    for replica in started:
        replica.close()


@contextmanager
def own_mesh(tmp: Path, *names: str) -> Iterator[tuple[Mesh, list[Replica]]]:
    """A separate Envoy and replicas, for tests that leave replicas ejected or stopped."""
    started = [Replica(name).start() for name in names]
    try:
        endpoints = tuple(Endpoint("127.0.0.1", r.port) for r in started)
        with run_envoy(make_topology(tmp, {"gateway": endpoints}), fast_config()) as running:
            yield running, started
    finally:
        for replica in started:
            replica.close()


@pytest.fixture(scope="module")
def mesh(replicas: list[Replica], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("envoy")
    endpoints = tuple(Endpoint("127.0.0.1", r.port) for r in replicas)
    with run_envoy(make_topology(tmp, {"gateway": endpoints}), fast_config()) as running:
        yield running


# --------------------------------------------------------------------------- clients


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def rest(
    mesh: Mesh,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    conn = http.client.HTTPConnection(mesh.host, timeout=10)
    hdrs = {"content-type": "application/json"} if body is not None else {}
    hdrs.update(headers or {})
    conn.request(method, path, body=body, headers=hdrs)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)


def assert_json_status(reply: Reply, http_status: int, code: int) -> dict[str, object]:
    assert reply.status == http_status, (reply.status, reply.body)
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    assert reply.headers.get("x-api-version") == "v1", reply.headers
    assert "grpc-status" not in reply.headers and "grpc-message" not in reply.headers
    body = reply.json()
    assert isinstance(body, dict)
    assert body["code"] == code and body["details"] == [] and body["message"], body
    return body


def grpc_web_call(mesh: Mesh, method: str, message: bytes, text: bool = False) -> Reply:
    frame = b"\x00" + struct.pack(">I", len(message)) + message
    kind = "application/grpc-web-text" if text else "application/grpc-web+proto"
    reply = rest(
        mesh,
        "POST",
        f"/{GATEWAY}/{method}",
        body=base64.b64encode(frame) if text else frame,
        headers={
            "content-type": kind,
            "accept": kind,
            "x-grpc-web": "1",
            "origin": "http://localhost:5173",
        },
    )
    if text:
        assert reply.headers["content-type"].startswith(
            kind
        )  # each frame is base64-encoded on its own, padding and all
        reply.body = b"".join(
            base64.b64decode(c) for c in re.findall(rb"[A-Za-z0-9+/]+=*", reply.body)
        )
    return reply


def grpc_web_frames(body: bytes) -> list[tuple[int, bytes]]:
    frames, i = [], 0
    while i < len(body):
        flag, length = body[i], struct.unpack(">I", body[i + 1 : i + 5])[0]
        frames.append((flag, body[i + 5 : i + 5 + length]))
        i += 5 + length
    return frames


def metadata(call: grpc.Call) -> dict[str, str | bytes]:
    """Initial and trailing metadata: a trailers-only error has only the latter."""
    return {**dict(call.initial_metadata() or ()), **dict(call.trailing_metadata() or ())}


@contextmanager
def channel(mesh: Mesh) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(mesh.host) as ch:
        yield ch


# --------------------------------------------------------------------------- REST


def test_rest_unary_transcoding(mesh: Mesh) -> None:
    reply = rest(mesh, "GET", "/v1/health")
    assert reply.status == 200
    assert reply.headers["x-api-version"] == "v1"
    assert "grpc-status" not in reply.headers
    body = reply.json()
    assert body["status"] == "STATUS_SERVING"
    assert body["dependencies"] == {}  # always_print_primitive_fields
    assert body["replica"] in ("gateway-0", "gateway-1")


def test_rest_post_body_and_field_names(mesh: Mesh) -> None:
    reply = rest(
        mesh, "POST", "/v1/sessions", json.dumps({"display_name": "mine", "agent": "a"}).encode()
    )
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["name"] == "sessions/new" and body["display_name"] == "mine"  # proto names
    assert body["message_count"] == "0"  # int64 as a string, and printed although zero
    # Unknown JSON body fields are ignored by the transcoder (documented in envoy/README.md).
    reply = rest(mesh, "POST", "/v1/sessions", json.dumps({"bogus": 1}).encode())
    assert reply.status == 200


def test_rest_grpc_error_becomes_json_status(mesh: Mesh) -> None:
    body = assert_json_status(rest(mesh, "GET", "/v1/sessions/nope"), 404, 5)
    assert "sessions/nope" in str(body["message"])
    assert_json_status(rest(mesh, "GET", "/v1/sessions?page_size=-1"), 400, 3)


def test_rest_unknown_path_is_json_404(mesh: Mesh) -> None:
    for path in ("/v1/nothing", "/nothing", "/v1/sessions/a/b/c", "/keysfoo"):
        assert_json_status(rest(mesh, "GET", path), 404, 5)
    assert_json_status(rest(mesh, "DELETE", "/v1/sessions"), 404, 5)


def test_rest_unknown_query_parameter_is_json_400(mesh: Mesh) -> None:
    assert_json_status(rest(mesh, "GET", "/v1/sessions?nope=1"), 400, 3)


def test_rest_malformed_json_is_json_400(mesh: Mesh) -> None:
    assert_json_status(rest(mesh, "POST", "/v1/sessions", b"{not json"), 400, 3)


def test_rest_body_too_large_is_json_413(mesh: Mesh) -> None:
    big = json.dumps({"display_name": "x" * (SMALL_BODY_LIMIT + 10)}).encode()
    assert_json_status(rest(mesh, "POST", "/v1/sessions", big), 413, 8)


def test_rest_server_stream_is_ndjson(mesh: Mesh) -> None:
    conn = http.client.HTTPConnection(mesh.host, timeout=10)
    conn.request("GET", "/v1/sessions/s1/events:stream")
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("x-api-version") == "v1"
    lines = [line for line in response.read().decode().splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]
    assert [e["sequence"] for e in events] == ["1", "2", "3"]
    assert all(e["session"] == "sessions/s1" for e in events)


def test_legacy_aliases(mesh: Mesh) -> None:
    reply = rest(mesh, "GET", "/health")
    assert reply.status == 200 and reply.json()["status"] == "STATUS_SERVING"
    assert reply.headers["x-api-version"] == "v1"
    assert rest(mesh, "GET", "/sessions/known").json()["name"] == "sessions/known"
    assert rest(mesh, "GET", "/sessions?page_size=5").json()["sessions"][0]["name"] == "sessions/a"
    created = rest(mesh, "POST", "/sessions", json.dumps({"display_name": "legacy"}).encode())
    assert created.json()["display_name"] == "legacy"
    assert_json_status(rest(mesh, "GET", "/sessions/nope"), 404, 5)
    assert_json_status(rest(mesh, "GET", "/sessions?bad=1"), 400, 3)
    assert_json_status(rest(mesh, "GET", "/sessionsfoo"), 404, 5)
    assert_json_status(rest(mesh, "GET", "/health/x"), 404, 5)
    # /keys is aliased too. No Keys replica runs here: a JSON 503 from the second hop if the
    # descriptor set has Keys REST rules, else a JSON 404; never a loop or a 200.
    has_keys = any(s.cluster == "keys" for s in describe_services(mesh.topology.descriptor_set))
    assert_json_status(rest(mesh, "GET", "/keys"), *((503, 14) if has_keys else (404, 5)))


def test_openapi_document_with_caching(mesh: Mesh) -> None:
    expected = mesh.topology.openapi_document.read_bytes()
    etags = set()
    for path in ("/openapi.json", "/v1/openapi.json"):
        reply = rest(mesh, "GET", path)
        assert reply.status == 200 and reply.body == expected
        assert reply.headers["content-type"] == "application/json"
        assert reply.headers["cache-control"] == "public, max-age=300"
        assert reply.headers["x-api-version"] == "v1"
        etags.add(reply.headers["etag"])
    assert len(etags) == 1
    revalidated = rest(mesh, "GET", "/openapi.json", headers={"if-none-match": etags.pop()})
    assert revalidated.status == 304 and revalidated.body == b""
    assert revalidated.headers["x-api-version"] == "v1"
    assert rest(mesh, "GET", "/openapi.json", headers={"if-none-match": '"old"'}).status == 200


def test_cors_preflight_and_actual(mesh: Mesh) -> None:
    origin = "http://localhost:5173"
    reply = rest(
        mesh,
        "OPTIONS",
        "/v1/sessions",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type,x-grpc-web",
        },
    )
    assert reply.status == 200, reply
    assert reply.headers["access-control-allow-origin"] == origin
    assert "x-grpc-web" in reply.headers["access-control-allow-headers"]
    assert reply.headers["x-api-version"] == "v1"
    reply = rest(mesh, "GET", "/v1/health", headers={"origin": origin})
    assert reply.headers["access-control-allow-origin"] == origin
    exposed = reply.headers["access-control-expose-headers"]
    assert all(h in exposed for h in ("grpc-status", "grpc-message", "x-api-version"))
    reply = rest(mesh, "GET", "/v1/health", headers={"origin": "http://evil.example"})
    assert "access-control-allow-origin" not in reply.headers


# --------------------------------------------------------------------------- gRPC


def test_grpc_unary_and_errors_untouched(mesh: Mesh) -> None:
    with channel(mesh) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        session, call = stub.GetSession.with_call(
            gateway_pb2.GetSessionRequest(name="sessions/known")
        )
        assert session.display_name == "known one"
        assert dict(call.initial_metadata())["x-api-version"] == "v1"
        with pytest.raises(grpc.RpcError) as err:
            stub.GetSession(gateway_pb2.GetSessionRequest(name="sessions/zz"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == "session 'sessions/zz' not found"  # not JSON
        assert metadata(err.value)["x-api-version"] == "v1"  # trailers-only error
        unknown = ch.unary_unary(f"/{GATEWAY}/NoSuchMethod")
        with pytest.raises(grpc.RpcError) as err:
            unknown(b"")
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        nowhere = ch.unary_unary("/other.v1.Thing/Do")
        with pytest.raises(grpc.RpcError) as err:
            nowhere(b"")
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert not err.value.details().startswith("{")  # local reply not rewritten as JSON
        assert metadata(err.value)["x-api-version"] == "v1"  # Envoy's local reply


def test_grpc_server_stream(mesh: Mesh) -> None:
    with channel(mesh) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        stream = stub.StreamSessionEvents(
            gateway_pb2.StreamSessionEventsRequest(session="sessions/s")
        )
        assert [e.sequence for e in stream] == [1, 2, 3]
        assert dict(stream.initial_metadata())["x-api-version"] == "v1"


def test_grpc_large_message_not_limited_by_rest_limit(mesh: Mesh) -> None:
    with channel(mesh) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        big = resources_pb2.Session(display_name="x" * (4 * SMALL_BODY_LIMIT))
        created = stub.CreateSession(gateway_pb2.CreateSessionRequest(session=big))
        assert len(created.display_name) == 4 * SMALL_BODY_LIMIT


def test_grpc_health_and_reflection_through_envoy(mesh: Mesh) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with channel(mesh) as ch:
        check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=GATEWAY))
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert GATEWAY in names


def test_grpc_web(mesh: Mesh) -> None:
    request = gateway_pb2.GetSessionRequest(name="sessions/known").SerializeToString()
    for text in (False, True):
        reply = grpc_web_call(mesh, "GetSession", request, text=text)
        assert reply.status == 200 and reply.headers["x-api-version"] == "v1"
        assert reply.headers["access-control-allow-origin"] == "http://localhost:5173"
        frames = grpc_web_frames(reply.body)
        assert resources_pb2.Session.FromString(frames[0][1]).display_name == "known one"
        assert frames[-1][0] == 0x80 and b"grpc-status:0" in frames[-1][1]
    # An error is trailers-only: HTTP 200 with grpc-status in the headers (kept for gRPC-Web).
    reply = grpc_web_call(
        mesh, "GetSession", gateway_pb2.GetSessionRequest(name="sessions/x").SerializeToString()
    )
    assert reply.status == 200 and reply.headers["grpc-status"] == "5"
    assert reply.headers["x-api-version"] == "v1"


# --------------------------------------------------------------------------- health and failure


def test_idempotent_reads_are_retried_on_another_replica(mesh: Mesh) -> None:
    for _ in range(8):
        reply = rest(mesh, "GET", "/v1/version")
        assert reply.status == 200 and reply.json()["version"] == "gateway-0"
    with channel(mesh) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        for _ in range(4):
            assert stub.GetVersion(gateway_pb2.GetVersionRequest()).version == "gateway-0"


def test_route_timeout_is_json_504(tmp_path: Path) -> None:
    # Own mesh: timeouts count as gateway failures, so the replica may end up ejected.
    with own_mesh(tmp_path, "gateway-0") as (mesh, _):
        check_route_timeout(mesh)


def check_route_timeout(mesh: Mesh) -> None:
    started = time.monotonic()
    body = assert_json_status(rest(mesh, "GET", "/v1/queue/stats"), 504, 4)
    assert "timeout" in str(body["message"])
    assert time.monotonic() - started < 2.5
    with channel(mesh) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetQueueStats(gateway_pb2.GetQueueStatsRequest())
        # Envoy maps its own 504 to UNAVAILABLE for gRPC (the gRPC HTTP mapping); a client's
        # own deadline still ends its call as DEADLINE_EXCEEDED.
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details() == "upstream request timeout"
        assert metadata(err.value)["x-api-version"] == "v1"
        with pytest.raises(grpc.RpcError) as err:
            stub.GetQueueStats(gateway_pb2.GetQueueStatsRequest(), timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_stopped_replica_is_marked_unhealthy(tmp_path: Path) -> None:
    with own_mesh(tmp_path, "gateway-0", "gateway-1") as (mesh, replicas):
        check_stopped_replica(mesh, replicas)


def check_stopped_replica(mesh: Mesh, replicas: list[Replica]) -> None:
    stopped = replicas[1]
    addr = f"127.0.0.1:{stopped.port}"
    assert f"{addr}::health_flags::healthy" in mesh.admin("/clusters")
    stopped.stop()
    deadline = time.monotonic() + 10
    while f"{addr}::health_flags::/failed_active_hc" not in mesh.admin("/clusters"):
        assert time.monotonic() < deadline, mesh.admin("/clusters")
        time.sleep(0.1)
    time.sleep(0.2)  # the admin thread knows first; workers get the new host set right after
    for _ in range(6):  # every call now lands on the remaining replica
        reply = rest(mesh, "GET", "/v1/health")
        assert reply.status == 200 and reply.json()["replica"] == "gateway-0", reply


def test_upstream_down_is_json_503_and_grpc_unavailable(tmp_path: Path) -> None:
    dead = (Endpoint("127.0.0.1", free_port()),)
    with run_envoy(make_topology(tmp_path, {"gateway": dead}), fast_config()) as down:
        body = assert_json_status(rest(down, "GET", "/v1/health"), 503, 14)
        assert "no healthy upstream" in str(body["message"])
        assert_json_status(rest(down, "GET", "/health"), 503, 14)  # through the alias hop
        with channel(down) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.GetHealth(gateway_pb2.GetHealthRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert err.value.details() == "no healthy upstream"
            assert metadata(err.value)["x-api-version"] == "v1"
        reply = grpc_web_call(down, "GetHealth", b"")
        # Envoy's own gRPC-Web error keeps the HTTP status (503); clients read grpc-status.
        assert reply.status in (200, 503) and reply.headers["grpc-status"] == "14"
        assert reply.headers["grpc-message"] == "no healthy upstream"
        assert reply.headers["x-api-version"] == "v1"
