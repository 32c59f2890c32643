"""Authorization: the shipped Rego policy over every method of the contract x every role, scope
narrowing, the decision cache, reloads, broken policies, and the interceptor on a real server.

The expected matrix below is written from the role intent in the issue-3 plan, independently of
policy/authz.rego, so that a policy edit that changes who may call what fails here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.rpc import error_details_pb2, status_pb2
from grpc import aio

from services.common.auth.authz import (
    DEFAULT_POLICY_FILE,
    AuthzInterceptor,
    PolicyEngine,
    PolicyError,
    is_read,
    policy_file,
    policy_input,
    split_method,
)
from services.common.auth.principal import ROLES, Principal, current_principal
from services.common.auth.public import is_public
from services.common.config import load_config
from services.common.contract import SERVICES, load_contract
from services.common.interceptors import STATUS_DETAILS_KEY, build_interceptors
from services.common.server import RunningServer, create_server
from soma.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from soma.gateway.v1 import resources_pb2 as gw

# --- the intended matrix, by hand -------------------------------------------------------------
GATEWAY_READ = {
    "GetSession",
    "ListSessions",
    "ListMessages",
    "StreamSessionEvents",
    "GetQueueStats",
}
GATEWAY_WRITE = {"CreateSession", "CloseSession", "SendMessage"}
KEYS_READ = {
    "GetApiKey", "ListApiKeys", "GetTenant", "ListTenants", "GetRoleBinding", "ListRoleBindings"
}  # fmt: skip
KEYS_SELF_SERVICE = {"CreateApiKey", "UpdateApiKey", "RevokeApiKey", "RotateApiKey"}
KEYS_TENANT_ADMIN = {"UpdateTenant", "CreateRoleBinding", "DeleteRoleBinding"}
KEYS_PLATFORM = {"CreateTenant"}
AUDIT_READ = {
    "GetAuditEvent", "ListAuditEvents", "GetRetentionPolicy", "TailAuditEvents",
    "VerifyAuditChain", "ExportAuditEvents",
}  # fmt: skip
AUDIT_ADMIN = {"UpdateRetentionPolicy"}
CAPSULE_READ = {
    "GetCapsule", "ListCapsules", "GetCapsuleVersion", "ListCapsuleVersions", "GetPublisherKey",
    "ListPublisherKeys", "GetInstallation", "ListInstallations", "GetApproval", "ListApprovals",
    "VerifyCapsuleVersion",
}  # fmt: skip
CAPSULE_USE = {"InstallCapsule", "UninstallCapsule"}
CAPSULE_APPROVE = {"ApproveCapsule", "RejectCapsule"}
CAPSULE_ADMIN = {
    "RegisterPublisherKey",
    "RevokePublisherKey",
    "PublishCapsule",
    "YankCapsuleVersion",
}


def _paths(service: str, verbs: set[str]) -> set[str]:
    return {f"/{SERVICES[service]}/{verb}" for verb in verbs}


GROUPS = {
    "gateway_read": _paths("gateway", GATEWAY_READ),
    "gateway_write": _paths("gateway", GATEWAY_WRITE),
    "keys_read": _paths("keys", KEYS_READ),
    "keys_self_service": _paths("keys", KEYS_SELF_SERVICE),
    "keys_tenant_admin": _paths("keys", KEYS_TENANT_ADMIN),
    "keys_platform": _paths("keys", KEYS_PLATFORM),
    "audit_read": _paths("audit", AUDIT_READ),
    "audit_admin": _paths("audit", AUDIT_ADMIN),
    "capsule_read": _paths("capsule", CAPSULE_READ),
    "capsule_use": _paths("capsule", CAPSULE_USE),
    "capsule_approve": _paths("capsule", CAPSULE_APPROVE),
    "capsule_admin": _paths("capsule", CAPSULE_ADMIN),
}
ALL = set().union(*GROUPS.values())
MEMBER = set().union(
    *(GROUPS[g] for g in ("gateway_read", "gateway_write", "keys_read", "keys_self_service",
                          "capsule_read", "capsule_use"))
)  # fmt: skip
EXPECTED: dict[str, set[str]] = {
    "platform_admin": ALL,
    "admin": ALL - GROUPS["keys_platform"],
    "member": MEMBER,
    "approver": MEMBER | GROUPS["capsule_approve"],
    "auditor": set().union(
        *(GROUPS[g] for g in ("gateway_read", "keys_read", "audit_read", "capsule_read"))
    ),
    "": set(),  # a credential with no roles
}
READ_METHODS = set().union(
    *(GROUPS[g] for g in ("gateway_read", "keys_read", "audit_read", "capsule_read"))
)


def contract_methods() -> list[str]:
    load_contract()
    pool = descriptor_pool.Default()
    return sorted(
        f"/{full}/{m.name}"
        for full in SERVICES.values()
        for m in pool.FindServiceByName(full).methods
    )


PROTECTED = [m for m in contract_methods() if not is_public(m)]


def principal(
    roles: set[str] | frozenset[str] = frozenset(),
    scopes: set[str] | frozenset[str] = frozenset({"*"}),
    subject: str = "key:abc",
    tenant: str = "acme",
) -> Principal:
    return Principal(subject, tenant, frozenset(roles), frozenset(scopes), "api_key")


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine(DEFAULT_POLICY_FILE, reload_interval=3600)


# --- the matrix ---------------------------------------------------------------------------------
def test_matrix_covers_exactly_the_protected_methods() -> None:
    assert set(PROTECTED) == ALL, "a method was added or removed: decide who may call it"
    assert {m for m in PROTECTED if is_read(split_method(m)[1])} == READ_METHODS
    public = set(contract_methods()) - set(PROTECTED)
    assert {split_method(m)[1] for m in public} == {
        "GetHealth", "GetVersion", "IssueToken", "GetJwks"
    }  # fmt: skip


@pytest.mark.parametrize("role", sorted(EXPECTED))
@pytest.mark.parametrize("method", PROTECTED)
def test_every_method_for_every_role(engine: PolicyEngine, method: str, role: str) -> None:
    decision = engine.decide(principal({role} if role else set()), method)
    assert decision.allow == (method in EXPECTED[role]), decision.reason
    if not decision.allow:  # actionable: names the method and what it needs
        assert method.lstrip("/") in decision.reason and "needs" in decision.reason


def test_role_set_is_the_union_of_its_roles(engine: PolicyEngine) -> None:
    both = EXPECTED["auditor"] | EXPECTED["member"]
    for method in PROTECTED:
        assert engine.decide(principal({"auditor", "member"}), method).allow == (method in both)


def test_reason_reads_like_the_plan(engine: PolicyEngine) -> None:
    decision = engine.decide(principal({"member"}), "/soma.audit.v1.AuditService/ListAuditEvents")
    assert decision.reason == (
        "role member may not call soma.audit.v1.AuditService/ListAuditEvents; "
        "it needs admin or auditor"
    )
    tenant = engine.decide(principal({"admin"}), "/soma.keys.v1.KeysService/CreateTenant")
    assert tenant.reason.endswith("it needs platform_admin")
    assert ROLES == ("platform_admin", "admin", "member", "approver", "auditor")


# --- scopes -------------------------------------------------------------------------------------
GET = "/soma.gateway.v1.GatewayService/GetSession"
SEND = "/soma.gateway.v1.GatewayService/SendMessage"
AUDIT_LIST = "/soma.audit.v1.AuditService/ListAuditEvents"


@pytest.mark.parametrize(
    ("scopes", "get", "send"),
    [
        ({"*"}, True, True),
        (set(), True, True),  # no scopes: everything the roles allow (ApiKey.scopes)
        ({"gateway:read"}, True, False),
        ({"gateway:write"}, False, True),  # write does not imply read
        ({"gateway:read", "gateway:write"}, True, True),
        ({"gateway.read"}, True, False),  # the contract's spelling
        ({"keys:read", "keys:write"}, False, False),
        ({"gateway:admin"}, False, False),
    ],
)
def test_scopes_narrow(engine: PolicyEngine, scopes: set[str], get: bool, send: bool) -> None:
    member = principal({"member"}, scopes)
    assert engine.decide(member, GET).allow is get
    sent = engine.decide(member, SEND)
    assert sent.allow is send
    if not send and "gateway:admin" in scopes:
        assert "needs scope gateway:write (or *)" in sent.reason


def test_scopes_never_widen_roles(engine: PolicyEngine) -> None:
    auditor = principal({"auditor"}, {"gateway:write", "*"})
    assert not engine.decide(auditor, SEND).allow
    member = principal({"member"}, {"audit:read"})
    assert "needs admin or auditor" in engine.decide(member, AUDIT_LIST).reason


def test_input_document() -> None:
    data = policy_input(principal({"member", "approver"}, {"b", "a"}), GET)
    assert data == {
        "subject": "key:abc",
        "tenant": "acme",
        "roles": ["approver", "member"],
        "scopes": ["a", "b"],
        "method": GET,
        "service": "gateway",
        "verb": "GetSession",
        "read": True,
    }
    assert split_method("/grpc.health.v1.Health/Check") == ("grpc.health.v1.Health", "Check")


def test_unlisted_method_is_denied_with_a_hint(engine: PolicyEngine) -> None:
    decision = engine.decide(principal({"platform_admin"}), "/soma.gateway.v1.GatewayService/Nuke")
    assert not decision.allow
    assert "not listed in the authorization policy" in decision.reason


def test_malformed_scope_is_a_denial_not_a_crash(engine: PolicyEngine) -> None:
    # rego-cpp leaves the quote unescaped in its JSON output: the engine must deny, not raise.
    decision = engine.decide(principal({"member"}, {'gate"way'}), GET)
    assert not decision.allow


# --- engine behaviour ---------------------------------------------------------------------------
def test_cache_hit(engine: PolicyEngine) -> None:
    engine.clear_cache()
    first = engine.decide(principal({"member"}), GET)
    second = engine.decide(principal({"member"}), GET)
    assert (first.cached, second.cached) == (False, True)
    assert (first.allow, first.reason) == (second.allow, second.reason)
    # the cache key is (method, roles, scopes): another subject of the same kind shares it
    assert engine.decide(principal({"member"}, subject="key:other"), GET).cached
    assert not engine.decide(principal({"member"}, {"gateway:read"}), GET).cached


def test_cache_is_bounded() -> None:
    small = PolicyEngine(DEFAULT_POLICY_FILE, cache_size=3)
    for method in PROTECTED[:10]:
        small.decide(principal({"admin"}), method)
    assert len(small._cache) == 3


POLICY_V1 = """package soma.authz
import rego.v1
default decision := {"allow": false, "reason": "v1 says no"}
decision := {"allow": true, "reason": "v1"} if input.verb == "GetSession"
"""
POLICY_V2 = POLICY_V1.replace("v1", "v2").replace("GetSession", "SendMessage")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _write(path: Path, text: str, bump: int) -> None:
    path.write_text(text)
    stat = path.stat()  # a distinct mtime even within the filesystem's timestamp granularity
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + bump * 1_000_000_000))


@pytest.fixture
def policy_path(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "authz.rego"
    _write(path, POLICY_V1, 0)
    yield path


def test_reload_on_file_change(policy_path: Path) -> None:
    clock = Clock()
    engine = PolicyEngine(policy_path, reload_interval=2.0, clock=clock)
    assert engine.decide(principal({"member"}), GET).allow
    _write(policy_path, POLICY_V2, 1)
    clock.now += 1.0  # not yet time to look at the file: the cached decision stands
    assert engine.decide(principal({"member"}), GET).cached
    clock.now += 1.5
    decision = engine.decide(principal({"member"}), GET)
    assert (decision.allow, decision.reason, decision.cached) == (False, "v2 says no", False)
    assert engine.decide(principal({"member"}), SEND).allow


def test_broken_policy_at_runtime_keeps_the_last_good_one(
    policy_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    engine = PolicyEngine(policy_path, reload_interval=2.0, clock=clock)
    _write(policy_path, POLICY_V1 + "\nbroken := if\n", 1)
    clock.now += 3
    with caplog.at_level(logging.ERROR, logger="services.common.auth.authz"):
        assert engine.decide(principal({"member"}), GET).allow
    assert str(policy_path) in caplog.text and "keeping the last good policy" in caplog.text
    caplog.clear()
    clock.now += 3  # the same broken file is not recompiled (nor logged) again
    with caplog.at_level(logging.ERROR, logger="services.common.auth.authz"):
        assert not engine.reload_if_changed()
    assert caplog.text == ""
    _write(policy_path, POLICY_V2, 2)
    assert engine.reload_if_changed()
    assert engine.decide(principal({"member"}), SEND).allow


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (POLICY_V1 + "\nbroken := if\n", "does not compile"),
        (POLICY_V1.replace("package soma.authz", "package other"), "defines no decision"),
        (POLICY_V1.replace("decision", "allow"), "defines no decision"),
    ],
)
def test_broken_policy_at_startup_names_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.rego"
    path.write_text(text)
    with pytest.raises(PolicyError) as raised:
        PolicyEngine(path)
    assert str(path) in str(raised.value) and message in str(raised.value)
    with pytest.raises(PolicyError, match="cannot read"):
        PolicyEngine(tmp_path / "missing.rego")


def test_undefined_decision_is_a_denial(tmp_path: Path) -> None:
    path = tmp_path / "nodefault.rego"  # no default: undefined for anything but GetSession
    path.write_text(
        POLICY_V1.replace('default decision := {"allow": false, "reason": "v1 says no"}', "")
    )
    engine = PolicyEngine(path)
    assert engine.decide(principal({"member"}), GET).allow
    decision = engine.decide(principal({"admin"}), SEND)
    assert not decision.allow and "gave no decision" in decision.reason


def test_identity_reading_policy_caches_per_subject(tmp_path: Path) -> None:
    path = tmp_path / "subject.rego"
    path.write_text(POLICY_V1.replace('input.verb == "GetSession"', 'input.subject == "key:vip"'))
    engine = PolicyEngine(path)
    assert engine.decide(principal({"member"}, subject="key:vip"), GET).allow
    assert not engine.decide(principal({"member"}, subject="key:nobody"), GET).allow


def test_policy_file_from_environment() -> None:
    assert policy_file({}) == DEFAULT_POLICY_FILE
    assert policy_file({"SOMA_POLICY_FILE": "/etc/soma/authz.rego"}) == Path("/etc/soma/authz.rego")


# --- the interceptor on a real server -------------------------------------------------------------
class FakeAuthn(aio.ServerInterceptor):
    """Stands in for authentication: `x-test-roles: admin,member` becomes the principal."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        roles = dict(details.invocation_metadata or ()).get("x-test-roles")
        current_principal.set(None if roles is None else principal(set(roles.split(",")) - {""}))
        return await continuation(details)


class Toy(gateway_pb2_grpc.GatewayServiceServicer):
    async def GetSession(self, request, context):  # type: ignore[no-untyped-def]
        return gw.Session(name=request.name)

    async def SendMessage(self, request, context):  # type: ignore[no-untyped-def]
        return gw.Message(text="sent")

    async def GetHealth(self, request, context):  # type: ignore[no-untyped-def]
        return gw.Health(status=gw.Health.STATUS_SERVING)

    async def StreamSessionEvents(self, request, context) -> AsyncIterator[gw.SessionEvent]:  # type: ignore[no-untyped-def]
        yield gw.SessionEvent(sequence=1)


@pytest.fixture
async def stub() -> AsyncIterator[gateway_pb2_grpc.GatewayServiceStub]:
    running: RunningServer = await create_server(
        load_config("gateway", {"SOMA_PORT": "0"}),
        [SERVICES["gateway"]],
        lambda s: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(Toy(), s),
        build_interceptors(authn=FakeAuthn(), authz=AuthzInterceptor(PolicyEngine())),
    )
    channel = aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield gateway_pb2_grpc.GatewayServiceStub(channel)
    await channel.close()
    await running.server.stop(0)


def _error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    raw = dict(error.trailing_metadata() or ())[STATUS_DETAILS_KEY]
    info = error_details_pb2.ErrorInfo()
    status_pb2.Status.FromString(raw).details[0].Unpack(info)
    return info


async def test_interceptor_allows_and_denies(stub: gateway_pb2_grpc.GatewayServiceStub) -> None:
    auditor = (("x-test-roles", "auditor"),)
    session = await stub.GetSession(
        gateway_pb2.GetSessionRequest(name="sessions/x"), metadata=auditor
    )
    assert session.name == "sessions/x"
    events = stub.StreamSessionEvents(gateway_pb2.StreamSessionEventsRequest(), metadata=auditor)
    assert [e.sequence async for e in events] == [1]

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.SendMessage(gateway_pb2.SendMessageRequest(), metadata=auditor)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert raised.value.details() == (
        "role auditor may not call soma.gateway.v1.GatewayService/SendMessage; "
        "it needs admin or approver or member"
    )
    info = _error_info(raised.value)
    assert info.reason == "POLICY_DENIED"
    assert info.metadata["method"] == "/soma.gateway.v1.GatewayService/SendMessage"

    no_roles = stub.StreamSessionEvents(
        gateway_pb2.StreamSessionEventsRequest(), metadata=(("x-test-roles", ""),)
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        [e async for e in no_roles]
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_public_methods_skip_it_and_missing_principal_is_unauthenticated(
    stub: gateway_pb2_grpc.GatewayServiceStub,
) -> None:
    health = await stub.GetHealth(gateway_pb2.GetHealthRequest())
    assert health.status == gw.Health.STATUS_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetSession(gateway_pb2.GetSessionRequest(name="sessions/x"))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
