"""services.common.metrics: the definitions, the /metrics server, the helpers the services call,
and the RPC interceptor on a real in-process grpc.aio server (loopback, port 0)."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from services.common import metrics
from services.common.auth.authn import AuthnInterceptor, credential_kind
from services.common.auth.keycache import KeyCache
from services.common.auth.principal import Principal
from services.common.config import load_config
from services.common.errors import NotFound, Unauthenticated, Unavailable
from services.common.interceptors import build_interceptors
from services.common.server import RunningServer, create_server
from soma.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from soma.gateway.v1 import resources_pb2 as pb
from tests.unit.test_audit_emit_recorder import FakeJetStream, _event, _recorder

SERVICE = "metrics-test"  # the interceptor's own label, apart from whatever else counts here
NAME = "soma.gateway.v1.GatewayService"
GET_SESSION = f"/{NAME}/GetSession"
GET_HEALTH = f"/{NAME}/GetHealth"
GET_VERSION = f"/{NAME}/GetVersion"
STREAM = f"/{NAME}/StreamSessionEvents"

# Every metric of the contract table in services/common/metrics.py (exposition names).
TABLE = [
    "soma_build_info",
    "soma_rpc_requests_total",
    "soma_rpc_duration_seconds",
    "soma_rpc_in_flight",
    "soma_auth_decisions_total",
    "soma_cache_requests_total",
    "soma_jetstream_published_total",
    "soma_jetstream_publish_failures_total",
    "soma_jetstream_consumed_total",
    "soma_jetstream_redeliveries_total",
    "soma_jetstream_consumer_pending",
    "soma_audit_outbox_depth",
    "soma_audit_fail_closed_refusals_total",
    "soma_db_pool_connections",
    "soma_capsule_installs_total",
    "soma_capsule_install_duration_seconds",
    "soma_circuit_breaker_state",
    "soma_circuit_breaker_rejections_total",
]


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def requests(method: str, code: str) -> float:
    return value("soma_rpc_requests_total", service=SERVICE, method=method, code=code)


def decisions(decision: str, credential: str, service: str | None = None) -> float:
    return value(
        "soma_auth_decisions_total",
        service=service or metrics.service(),
        decision=decision,
        credential=credential,
    )


def lookups(cache: str, result: str) -> float:
    return value("soma_cache_requests_total", service=metrics.service(), cache=cache, result=result)


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


# -- definitions and the server --------------------------------------------------------------


def test_every_table_metric_is_served_on_loopback() -> None:
    port = metrics.start_metrics_server(0)
    assert port > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    for name in TABLE:
        assert f"# TYPE {name} " in body, name
    assert metrics.enabled()
    assert metrics.server_interceptors()  # from now on create_server counts RPCs


def test_metrics_server_refuses_non_loopback_and_names_the_variable() -> None:
    with pytest.raises(ValueError, match="loopback"):
        metrics.start_metrics_server(0, host="0.0.0.0")
    port = metrics.start_metrics_server(0)
    with pytest.raises(OSError, match="SOMA_METRICS_PORT"):
        metrics.start_metrics_server(port)  # taken


def test_config_reads_the_metrics_port() -> None:
    assert load_config("gateway", {}).server.metrics_port == 0  # off by default
    assert load_config("gateway", {"SOMA_METRICS_PORT": "9464"}).server.metrics_port == 9464


def test_init_sets_build_info() -> None:
    previous = metrics.service()
    try:
        metrics.init("keys")
        assert value("soma_build_info", service="keys", version=metrics.version()) == 1
        metrics.auth_decision("allow", "api_key")
        assert decisions("allow", "api_key", service="keys") == 1
    finally:
        metrics.init(previous)


@pytest.mark.parametrize(
    ("reply", "count"),
    [
        ("$JS.ACK.SESSIONS.worker-p0.3.10.7.1700000000000000000.0", 3),
        ("$JS.ACK._.ACCHASH.SESSIONS.worker-p0.2.10.7.1700000000000000000.0.tok", 2),
        ("$JS.ACK.SESSIONS.worker-p0.1.10.7.1700000000000000000.0", 1),
        (None, 1),
        ("_INBOX.abc", 1),
    ],
)
def test_delivery_count(reply: str | None, count: int) -> None:
    assert metrics.delivery_count(reply) == count


def test_redeliveries_and_acks() -> None:
    labels = {"service": metrics.service(), "consumer": "unit-consumer"}
    metrics.received("unit-consumer", "$JS.ACK.S.unit-consumer.1.1.1.1.0")
    metrics.received("unit-consumer", "$JS.ACK.S.unit-consumer.4.2.2.1.0")
    metrics.acked("unit-consumer", 2)
    assert value("soma_jetstream_redeliveries_total", **labels) == 1
    assert value("soma_jetstream_consumed_total", **labels) == 2


class FakePool:
    def get_size(self) -> int:
        return 4

    def get_idle_size(self) -> int:
        return 1

    def get_max_size(self) -> int:
        return 10


def test_pool_is_read_at_scrape_time() -> None:
    pool = FakePool()
    metrics.watch_pool(pool)
    service = metrics.service()
    assert value("soma_db_pool_connections", service=service, state="in_use") == 3
    assert value("soma_db_pool_connections", service=service, state="idle") == 1
    assert value("soma_db_pool_connections", service=service, state="max") == 10


class FakeJs:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    async def consumer_info(self, stream: str, consumer: str, **kw: Any) -> Any:
        self.calls.append((stream, consumer))
        if consumer == "missing":
            raise RuntimeError("consumer not found")
        return type("Info", (), {"num_pending": 5, "num_ack_pending": 2})()


async def test_consumer_lag_sampler() -> None:
    js = FakeJs()
    task = asyncio.create_task(
        metrics.sample_consumer_lag(js, [("S", "missing"), ("S", "lagging")], interval=0.01)  # type: ignore[arg-type]
    )
    await until(lambda: len(js.calls) >= 4)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    lag = value("soma_jetstream_consumer_pending", service=metrics.service(), consumer="lagging")
    assert lag == 7


async def test_key_cache_counts_hits_and_misses() -> None:
    before_hit, before_miss = lookups("api_key", "hit"), lookups("api_key", "miss")

    async def lookup(key_id: str) -> None:
        return None

    cache = KeyCache(lookup)
    await cache.get("k1")
    await cache.get("k1")
    await cache.get("k1")
    assert lookups("api_key", "miss") == before_miss + 1
    assert lookups("api_key", "hit") == before_hit + 2


async def test_audit_outbox_depth_and_fail_closed_refusals(tmp_path: Path) -> None:
    js = FakeJetStream()
    recorder = _recorder(tmp_path, js)
    metrics.watch_audit_outbox(lambda: recorder.outbox.pending)
    service = metrics.service()
    refusals = value("soma_audit_fail_closed_refusals_total", service=service)
    failures = value("soma_jetstream_publish_failures_total", service=service, stream="AUDIT")
    js.broken = True  # connected, but JetStream answers with errors
    assert await recorder.record(_event(1)) is False  # into the outbox
    assert value("soma_audit_outbox_depth", service=service) == 1
    failed = value("soma_jetstream_publish_failures_total", service=service, stream="AUDIT")
    assert failed == failures + 1
    with pytest.raises(Unavailable):
        await recorder.ensure_durable()
    assert value("soma_audit_fail_closed_refusals_total", service=service) == refusals + 1
    await recorder.close()


def test_credential_kind() -> None:
    assert credential_kind([]) == "none"
    assert credential_kind([("authorization", "Bearer eyJhbGciOi.x.y")]) == "jwt"
    assert credential_kind([("x-api-key", "soma_dev_abc")]) == "api_key"
    assert credential_kind([("authorization", "Basic abc")]) == "none"


# -- the interceptor on a real server ----------------------------------------------------------


class Toy(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def GetSession(self, request, context):  # type: ignore[no-untyped-def]
        raise NotFound(f"session {request.name} does not exist")

    async def GetVersion(self, request, context):  # type: ignore[no-untyped-def]
        raise RuntimeError("a bug")

    async def GetHealth(self, request, context):  # type: ignore[no-untyped-def]
        await self.release.wait()  # the tests decide when it answers
        return pb.Health(status=pb.Health.STATUS_SERVING)

    async def StreamSessionEvents(self, request, context) -> AsyncIterator[pb.SessionEvent]:  # type: ignore[no-untyped-def]
        yield pb.SessionEvent(sequence=1)
        raise NotFound("gone mid-stream")


class FakeAuthenticator:
    """Anyone sending `authorization: Bearer let-me-in` is a member; nobody else."""

    async def authenticate_optional(self, metadata: Iterable[Any]) -> Principal | None:
        return None

    async def authenticate(self, metadata: Iterable[Any]) -> Principal:
        if ("authorization", "Bearer let-me-in") in list(metadata):
            return Principal("key:k", "acme", frozenset({"member"}), frozenset({"*"}), "jwt")
        raise Unauthenticated("missing credentials", reason="CREDENTIALS_MISSING")


@pytest.fixture
async def toy() -> AsyncIterator[tuple[Toy, gateway_pb2_grpc.GatewayServiceStub]]:
    servicer = Toy()
    config = load_config("gateway", {"SOMA_PORT": "0"})
    chain = [
        metrics.MetricsInterceptor(SERVICE),
        *build_interceptors(authn=AuthnInterceptor(FakeAuthenticator())),  # type: ignore[arg-type]
    ]
    running: RunningServer = await create_server(
        config,
        [NAME],
        lambda s: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, s),
        chain,
    )
    await running.set_serving(True)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield servicer, gateway_pb2_grpc.GatewayServiceStub(channel)
    servicer.release.set()
    await channel.close()
    await running.server.stop(0)


async def test_interceptor_counts_final_codes(toy) -> None:  # type: ignore[no-untyped-def]
    servicer, stub = toy
    servicer.release.set()
    member = (("authorization", "Bearer let-me-in"),)
    before = {
        key: requests(*key)
        for key in [
            (GET_SESSION, "NOT_FOUND"),
            (GET_SESSION, "UNAUTHENTICATED"),
            (GET_VERSION, "INTERNAL"),
            (GET_HEALTH, "OK"),
            (STREAM, "NOT_FOUND"),
        ]
    }
    unauthenticated = decisions("unauthenticated", "none")

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetSession(gateway_pb2.GetSessionRequest(name="sessions/x"), metadata=member)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as raised:  # refused by authn: still counted
        await stub.GetSession(gateway_pb2.GetSessionRequest(name="sessions/x"))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetVersion(gateway_pb2.GetVersionRequest())
    await stub.GetHealth(gateway_pb2.GetHealthRequest())
    with pytest.raises(grpc.aio.AioRpcError):
        async for _ in stub.StreamSessionEvents(
            gateway_pb2.StreamSessionEventsRequest(session="sessions/x"), metadata=member
        ):
            pass

    await until(lambda: requests(STREAM, "NOT_FOUND") == before[(STREAM, "NOT_FOUND")] + 1)
    for key, count in before.items():
        assert requests(*key) == count + 1, key
    assert decisions("unauthenticated", "none") == unauthenticated + 1
    # Unary calls are timed, streams are not.
    assert value("soma_rpc_duration_seconds_count", service=SERVICE, method=GET_HEALTH) >= 1
    assert value("soma_rpc_duration_seconds_count", service=SERVICE, method=STREAM) == 0


async def test_interceptor_tracks_in_flight_and_deadlines(toy) -> None:  # type: ignore[no-untyped-def]
    servicer, stub = toy
    in_flight = lambda: value("soma_rpc_in_flight", service=SERVICE)  # noqa: E731
    assert in_flight() == 0
    call = asyncio.ensure_future(stub.GetHealth(gateway_pb2.GetHealthRequest()))
    await until(lambda: in_flight() == 1)
    servicer.release.set()
    await call
    await until(lambda: in_flight() == 0)

    servicer.release.clear()
    expired = requests(GET_HEALTH, "DEADLINE_EXCEEDED")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetHealth(gateway_pb2.GetHealthRequest(), timeout=0.2)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await until(lambda: requests(GET_HEALTH, "DEADLINE_EXCEEDED") == expired + 1)
    await until(lambda: in_flight() == 0)


async def test_create_server_puts_metrics_outside_authentication() -> None:
    metrics.start_metrics_server(0)  # metrics on: create_server adds the interceptor itself
    config = load_config("gateway", {"SOMA_PORT": "0"})
    running = await create_server(
        config,
        [NAME],
        lambda s: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(Toy(), s),
        build_interceptors(authn=AuthnInterceptor(FakeAuthenticator())),  # type: ignore[arg-type]
    )
    key = {"service": metrics.service(), "method": GET_SESSION, "code": "UNAUTHENTICATED"}
    before = value("soma_rpc_requests_total", **key)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.GetSession(gateway_pb2.GetSessionRequest(name="sessions/x"))
        await until(lambda: value("soma_rpc_requests_total", **key) == before + 1)
    finally:
        await running.server.stop(0)
