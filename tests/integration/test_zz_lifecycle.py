"""Draining and restarting (runs last: it stops replicas and the whole shared mesh)."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import psutil
import pytest

from soma.gateway.v1 import gateway_pb2 as g
from soma.gateway.v1 import gateway_pb2_grpc
from soma.gateway.v1 import resources_pb2 as pb
from tests.integration.harness import MeshRunner, authed_channel

pytestmark = pytest.mark.integration


async def test_sigterm_drains_a_replica_without_failing_calls(mesh: MeshRunner) -> None:
    assert mesh.replicas >= 2
    victim = mesh.part("gateway-0")
    failures: list[str] = []
    done = 0
    stop = asyncio.Event()

    async def client(channel: grpc.aio.Channel) -> None:
        nonlocal done
        gw = gateway_pb2_grpc.GatewayServiceStub(channel)
        while not stop.is_set():
            try:
                session = await gw.CreateSession(g.CreateSessionRequest(session=pb.Session()))
                await gw.GetSession(g.GetSessionRequest(name=session.name))
                done += 1
            except grpc.aio.AioRpcError as error:
                failures.append(f"{error.code().name}: {error.details()}")

    async with authed_channel(mesh.grpc_target, mesh.admin_key) as channel:
        # A stream open on the replica being drained ends cleanly and can be resumed.
        tasks = [asyncio.ensure_future(client(channel)) for _ in range(6)]
        await asyncio.sleep(1.0)
        os.kill(victim["pid"], signal.SIGTERM)
        await asyncio.sleep(6.0)
        stop.set()
        await asyncio.gather(*tasks)
    assert done > 50
    assert failures == [], failures[:5]
    await mesh.wait_restarted("gateway-0", victim["restarts"], within=60)


async def test_restart_keeps_sessions_and_leaves_no_process(mesh: MeshRunner) -> None:
    async with authed_channel(mesh.grpc_target, mesh.admin_key) as channel:
        gw = gateway_pb2_grpc.GatewayServiceStub(channel)
        session = await gw.CreateSession(
            g.CreateSessionRequest(session=pb.Session(display_name="keep"))
        )
        await gw.SendMessage(
            g.SendMessageRequest(parent=session.name, message=pb.Message(content="persist me"))
        )
        for _ in range(100):
            listed = await gw.ListMessages(g.ListMessagesRequest(parent=session.name))
            if len(listed.messages) == 2:
                break
            await asyncio.sleep(0.2)
        assert len(listed.messages) == 2

    pids = [p["pid"] for p in mesh.state()["parts"] if p.get("pid")]  # type: ignore[index]
    assert mesh.stop() == 0
    await asyncio.sleep(0.5)
    alive = [
        pid
        for pid in pids
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    assert alive == [], f"left running after stop: {alive}"

    mesh.start()
    async with authed_channel(mesh.grpc_target, mesh.admin_key) as channel:
        gw = gateway_pb2_grpc.GatewayServiceStub(channel)
        again = await gw.GetSession(g.GetSessionRequest(name=session.name))
        assert again.display_name == "keep" and again.message_count == 2
        listed = await gw.ListMessages(g.ListMessagesRequest(parent=session.name))
        assert [m.content for m in listed.messages] == ["persist me", "persist me"]
        # The queue picks up where it left off: a new message is answered.
        await gw.SendMessage(
            g.SendMessageRequest(parent=session.name, message=pb.Message(content="after restart"))
        )
        for _ in range(100):
            listed = await gw.ListMessages(g.ListMessagesRequest(parent=session.name))
            if len(listed.messages) == 4:
                break
            await asyncio.sleep(0.2)
        assert listed.messages[-1].content == "after restart"
    assert mesh.part("openbao")["status"] == "healthy"
