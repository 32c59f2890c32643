"""The Gateway over REST/JSON through Envoy's transcoder, and over gRPC-Web."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from soma.gateway.v1 import gateway_pb2 as g
from soma.gateway.v1 import resources_pb2 as pb
from tests.integration.harness import MeshRunner, grpc_web_call, http_request

pytestmark = pytest.mark.integration


def rest(mesh: MeshRunner, method: str, path: str, body=None, **kw):  # type: ignore[no-untyped-def]
    """A REST call with the admin key (x-api-key), unless headers say otherwise."""
    headers = {"x-api-key": mesh.admin_key, **kw.pop("headers", {})}
    return http_request(mesh.port, method, path, body, headers=headers, **kw)


def web(mesh: MeshRunner, path: str, message: bytes):  # type: ignore[no-untyped-def]
    return grpc_web_call(mesh.port, path, message, mesh.admin_key)


def wait_for_agent_reply(mesh: MeshRunner, session: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = rest(mesh, "GET", f"/v1/{session}/messages").json()
        replies = [m for m in listed["messages"] if m["role"] == "MESSAGE_ROLE_AGENT"]
        if replies:
            return replies[0]
        time.sleep(0.2)
    raise AssertionError(f"no agent reply within {timeout}s")


def test_health_over_rest(mesh: MeshRunner) -> None:
    resp = rest(mesh, "GET", "/v1/health")
    assert resp.status == 200, resp.body
    assert resp.json()["status"] == "STATUS_SERVING"
    assert resp.headers["x-api-version"] == "v1"
    assert resp.headers["content-type"].startswith("application/json")


def test_session_lifecycle_over_rest(mesh: MeshRunner) -> None:
    created = rest(
        mesh, "POST", "/v1/sessions", {"display_name": "rest", "labels": {"via": "curl"}}
    )
    assert created.status == 200, created.body
    session = created.json()
    assert session["state"] == "SESSION_STATE_ACTIVE" and session["labels"] == {"via": "curl"}
    name = session["name"]
    assert rest(mesh, "GET", f"/v1/{name}").json()["name"] == name

    sent = rest(mesh, "POST", f"/v1/{name}/messages", {"content": "hello from rest"})
    assert sent.status == 200, sent.body
    assert sent.json()["state"] == "MESSAGE_STATE_QUEUED"
    reply = wait_for_agent_reply(mesh, name)
    assert reply["content"] == "hello from rest"

    closed = rest(mesh, "POST", f"/v1/{name}:close", {})
    assert closed.status == 200 and closed.json()["state"] == "SESSION_STATE_CLOSED"
    refused = rest(mesh, "POST", f"/v1/{name}/messages", {"content": "late"})
    assert refused.status == 400 and refused.json()["code"] == 9  # FAILED_PRECONDITION

    # Server streaming over REST: newline-delimited JSON, one event per line.
    stream = rest(mesh, "GET", f"/v1/{name}/events:stream?after_sequence=1&stop_when_closed=true")
    assert stream.status == 200, stream.body
    assert stream.headers["x-api-version"] == "v1"
    events = [json.loads(line) for line in stream.body.decode().splitlines() if line.strip()]
    assert [int(e["sequence"]) for e in events] == [2, 3, 4]
    assert "agent_reply" in events[1] and "status_change" in events[2]

    stats = rest(mesh, "GET", "/v1/queue/stats")
    assert stats.status == 200 and len(stats.json()["partitions"]) == 4

    rest(mesh, "POST", "/v1/sessions", {})
    listed = rest(mesh, "GET", "/v1/sessions?page_size=1")
    assert listed.status == 200 and listed.json()["next_page_token"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("GET", f"/v1/sessions/{uuid.UUID(int=9)}", None, 404, 5),
        ("GET", "/v1/sessions/not-a-uuid", None, 400, 3),
        ("POST", f"/v1/sessions/{uuid.UUID(int=9)}/messages", {"content": "x"}, 404, 5),
        ("GET", "/v1/sessions?page_token=garbage", None, 400, 3),
        ("GET", "/v1/sessions?page_size=-4", None, 400, 3),
        ("POST", "/v1/sessions", {"agent": "Not Valid"}, 400, 3),
        ("GET", "/v1/sessions?no_such_param=1", None, 400, 3),
        ("GET", "/v1/no/such/path", None, 404, 5),
        ("DELETE", "/v1/sessions", None, 404, 5),
    ],
)
def test_bad_input_over_rest_is_json(mesh: MeshRunner, method, path, body, status, code) -> None:  # type: ignore[no-untyped-def]
    resp = rest(mesh, method, path, body)
    assert resp.status == status, resp.body
    assert resp.headers["content-type"].startswith("application/json"), resp.headers
    error = resp.json()
    assert error["code"] == code and error["message"], error
    assert resp.headers["x-api-version"] == "v1"


def test_message_size_limits_over_rest(mesh: MeshRunner) -> None:
    name = rest(mesh, "POST", "/v1/sessions", {}).json()["name"]
    too_long = rest(mesh, "POST", f"/v1/{name}/messages", {"content": "x" * (64 * 1024 + 1)})
    assert too_long.status == 400 and "limit" in too_long.json()["message"]
    huge = rest(mesh, "POST", f"/v1/{name}/messages", {"content": "x" * (2 * 1024 * 1024)})
    assert huge.status == 413, huge.body
    assert huge.headers["content-type"].startswith("application/json")
    assert huge.json()["message"]
    empty = rest(mesh, "POST", f"/v1/{name}/messages", {"content": ""})
    assert empty.status == 400 and "required" in empty.json()["message"]


def test_malformed_json_is_a_json_400(mesh: MeshRunner) -> None:
    resp = rest(mesh, "POST", "/v1/sessions", raw=b"{not json")
    assert resp.status == 400
    assert resp.headers["content-type"].startswith("application/json"), resp.body
    assert resp.json()["code"] == 3


def test_legacy_alias(mesh: MeshRunner) -> None:
    created = rest(mesh, "POST", "/sessions", {"display_name": "legacy"})
    assert created.status == 200, created.body
    name = created.json()["name"]
    assert rest(mesh, "GET", f"/{name}").json()["display_name"] == "legacy"
    health = rest(mesh, "GET", "/health")
    assert health.status == 200 and health.headers["x-api-version"] == "v1"


def test_session_lifecycle_over_grpc_web(mesh: MeshRunner) -> None:
    base = "/soma.gateway.v1.GatewayService"
    status, [raw], trailers = web(
        mesh,
        f"{base}/CreateSession",
        g.CreateSessionRequest(session=pb.Session(display_name="web")).SerializeToString(),
    )
    assert status == 200 and trailers["grpc-status"] == "0"
    session = pb.Session.FromString(raw)
    _, [raw], trailers = web(
        mesh,
        f"{base}/SendMessage",
        g.SendMessageRequest(
            parent=session.name, message=pb.Message(content="web hi")
        ).SerializeToString(),
    )
    assert trailers["grpc-status"] == "0" and pb.Message.FromString(raw).content == "web hi"
    wait_for_agent_reply(mesh, session.name)
    _, [raw], _ = web(
        mesh,
        f"{base}/CloseSession",
        g.CloseSessionRequest(name=session.name).SerializeToString(),
    )
    assert pb.Session.FromString(raw).state == pb.SESSION_STATE_CLOSED
    _, events, trailers = web(
        mesh,
        f"{base}/StreamSessionEvents",
        g.StreamSessionEventsRequest(
            session=session.name, stop_when_closed=True
        ).SerializeToString(),
    )
    assert trailers["grpc-status"] == "0"
    assert [pb.SessionEvent.FromString(e).sequence for e in events] == [1, 2, 3, 4]
    status, _, trailers = web(
        mesh,
        f"{base}/GetSession",
        g.GetSessionRequest(name=f"sessions/{uuid.UUID(int=3)}").SerializeToString(),
    )
    assert status == 200 and trailers["grpc-status"] == "5"


@pytest.fixture(scope="module")
def fresh_tenant_key(mesh: MeshRunner) -> str:
    """An admin of a tenant that has published, installed and registered nothing."""
    return mesh.create_key(tenant="rest-capsule-empty", roles=("admin",))


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/approvals", "approvals"),
        ("/v1/installations", "installations"),
        ("/v1/publisherKeys", "publisher_keys"),
    ],
)
def test_capsule_lists_of_a_new_tenant_are_empty_over_rest(
    mesh: MeshRunner, fresh_tenant_key: str, path: str, field: str
) -> None:
    resp = rest(mesh, "GET", path, headers={"x-api-key": fresh_tenant_key})
    assert resp.status == 200, resp.body
    assert resp.json() == {field: [], "next_page_token": ""}


def test_capsule_marketplace_shows_a_new_tenant_only_public_capsules(
    mesh: MeshRunner, fresh_tenant_key: str
) -> None:
    resp = rest(mesh, "GET", "/v1/capsules?page_size=500", headers={"x-api-key": fresh_tenant_key})
    assert resp.status == 200, resp.body
    capsules = resp.json()["capsules"]
    assert all(c["visibility"] == "CAPSULE_VISIBILITY_PUBLIC" for c in capsules), capsules
