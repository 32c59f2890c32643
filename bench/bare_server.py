"""The baseline: a bare grpc.aio server whose GetSession returns a constant Session.

No interceptors, health, reflection, database or NATS: what is left is grpcio itself, so the
runner can show how much of a Gateway read is the framework and how much is ours.

    python bench/bare_server.py [--host 127.0.0.1] [--port 0] [--session-b64 B64]

Prints one JSON line `{"address": "host:port"}` once it serves; stops on SIGTERM/SIGINT.
`--session-b64` is the serialized Session to answer with (the runner passes the real one, so
both servers send the same bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal
import sys
from pathlib import Path

from grpc import aio

try:
    from soma.gateway.v1 import gateway_pb2_grpc, resources_pb2
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "gen" / "python"))
    from soma.gateway.v1 import gateway_pb2_grpc, resources_pb2


def default_session() -> resources_pb2.Session:
    session = resources_pb2.Session(
        name="sessions/00000000-0000-4000-8000-000000000000",
        tenant="default",
        display_name="bench",
        agent="reference",
        state=resources_pb2.SESSION_STATE_ACTIVE,
        partition=3,
        last_event_sequence=1,
    )
    session.create_time.FromSeconds(1_700_000_000)
    session.update_time.FromSeconds(1_700_000_000)
    return session


class ConstantGateway(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, session: resources_pb2.Session) -> None:
        self.session = session

    async def GetSession(self, request, context):
        return self.session


async def serve(host: str, port: int, session: resources_pb2.Session) -> None:
    server = aio.server()
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(ConstantGateway(session), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    await server.start()
    print(json.dumps({"address": f"{host}:{bound}"}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--session-b64", default="", help="serialized Session to return")
    args = parser.parse_args(argv)
    session = default_session()
    if args.session_b64:
        session = resources_pb2.Session.FromString(base64.b64decode(args.session_b64))
    asyncio.run(serve(args.host, args.port, session))
    return 0


if __name__ == "__main__":
    sys.exit(main())
