"""A real local mesh for integration tests: `soma-mesh up` as a subprocess on free ports.

Everything is real (pgserver, NATS JetStream, OpenBao, Envoy, the services and the worker);
the harness only picks free loopback ports and a temporary data directory, waits until the
supervisor reports "ready" in state.json, and stops it by its PID at the end.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services.client._interceptors import interceptors

READY_TIMEOUT = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MeshRunner:
    data_dir: Path
    replicas: int = 2
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    # every credential the tests made: none of them may appear in any log line
    secrets: list[str] = field(default_factory=list)
    admin_key: str = ""  # an admin key of tenant `default`, made once the mesh is ready
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every part

    @property
    def state_file(self) -> Path:
        return self.data_dir / "run" / "state.json"

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-supervisor.log"

    def start(self) -> dict[str, Any]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.state_file.unlink(missing_ok=True)
        log = self.log_file.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.mesh",
                "up",
                "--data-dir",
                str(self.data_dir),
                "--port",
                str(self.port),
                "--admin-port",
                str(self.admin_port),
                "--replicas",
                str(self.replicas),
                "--partitions",
                "4",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "SOMA_GRACE_SECONDS": "5", **self.env},
            start_new_session=True,
        )
        return self.wait_ready()

    def wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"soma-mesh up exited {self.process.returncode}:\n{self.tail()}")
            state = self.state()
            if state and state.get("status") == "ready":
                return state
            time.sleep(0.25)
        raise RuntimeError(f"mesh not ready after {READY_TIMEOUT}s:\n{self.tail()}")

    def state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None

    def part(self, name: str) -> dict[str, Any]:
        state = self.state() or {}
        return next(p for p in state["parts"] if p["name"] == name)

    async def wait_restarted(self, name: str, restarts: int, within: float) -> None:
        """Returns once the supervisor restarted part `name` (it had `restarts` restarts before)
        and it is healthy again; fails after `within` seconds."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            part = self.part(name)
            if part["restarts"] > restarts and part["status"] == "healthy":
                return
            await asyncio.sleep(0.25)
        raise AssertionError(f"{name} was not restarted: {self.part(name)}")

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no supervisor log)"

    def stop(self, timeout: float = 90.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired as error:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            raise RuntimeError(
                f"soma-mesh did not stop within {timeout}s:\n{self.tail()}"
            ) from error

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def create_key(
        self,
        tenant: str = "default",
        roles: tuple[str, ...] = ("admin",),
        *,
        owner: str = "",
        name: str = "",
    ) -> str:
        """A new API key secret, made the way an operator does: `soma-mesh admin create-key`
        (`owner` and `name` left out take the command's defaults)."""
        args = [
            sys.executable,
            "-m",
            "services.mesh",
            "admin",
            "create-key",
            "--json",
            "--data-dir",
            str(self.data_dir),
            "--tenant",
            tenant,
        ]
        if owner:
            args += ["--owner", owner]
        if name:
            args += ["--name", name]
        for role in roles:
            args += ["--role", role]
        out = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"create-key failed ({out.returncode}): {out.stderr[-2000:]}")
        secret = str(json.loads(out.stdout)["secret"])
        self.secrets.append(secret)
        return secret


def thread_states(pid: int) -> list[str]:
    """The state letter of every thread of `pid`, from /proc/<pid>/task/<tid>/stat."""
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
        except (OSError, IndexError):
            continue  # the thread ended meanwhile
    return states


def wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Returns once every thread of `pid` is stopped. kill(SIGSTOP) returns before that: a call
    made at once could still be answered by a thread that has not stopped yet."""
    deadline = time.monotonic() + timeout
    while True:
        states = thread_states(pid)
        if states and all(state in ("T", "t") for state in states):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} did not stop within {timeout}s: {states}")
        time.sleep(0.005)


def freeze(pid: int) -> None:
    """SIGSTOP `pid` and wait until it is really stopped (hung, not dead)."""
    os.kill(pid, signal.SIGSTOP)
    wait_stopped(pid)


def authed_channel(target: str, secret: str) -> grpc.aio.Channel:
    """A channel whose calls carry `authorization: Bearer <secret>` (the SDK's interceptors;
    a credential a call sets itself wins)."""
    return grpc.aio.insecure_channel(
        target, interceptors=interceptors([("authorization", f"Bearer {secret}")], None)
    )


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    timeout: float = 15.0,
) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = {"content-type": "application/json"} if data is not None else {}
        hdrs.update(headers or {})
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def grpc_web_call(
    port: int, path: str, message: bytes, secret: str | None = None
) -> tuple[int, list[bytes], dict[str, str]]:
    """One unary/server-streaming gRPC-Web call (binary framing); returns the HTTP status,
    the response messages and the trailers."""
    frame = b"\x00" + struct.pack(">I", len(message)) + message
    resp = http_request(
        port,
        "POST",
        path,
        raw=frame,
        headers={
            "content-type": "application/grpc-web+proto",
            "x-grpc-web": "1",
            **({"authorization": f"Bearer {secret}"} if secret else {}),
        },
    )
    messages, trailers, body = [], {}, resp.body
    while body:
        flag, length = body[0], struct.unpack(">I", body[1:5])[0]
        payload, body = body[5 : 5 + length], body[5 + length :]
        if flag & 0x80:
            for line in payload.decode().strip().split("\r\n"):
                key, _, value = line.partition(":")
                trailers[key.strip().lower()] = value.strip()
        else:
            messages.append(payload)
    for key in ("grpc-status", "grpc-message"):  # trailers-only responses put them in headers
        if key in resp.headers and key not in trailers:
            trailers[key] = resp.headers[key]
    return resp.status, messages, trailers
