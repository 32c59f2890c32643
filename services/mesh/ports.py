"""Free loopback ports, picked by binding port 0 (never fixed well-known ports)."""

from __future__ import annotations

import socket


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As servers (Envoy, NATS, grpc) bind: a port whose old connections linger in
        # TIME_WAIT after a restart is free for them, and so it is for us.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class PortAllocator:
    """Hands out distinct free ports on one host for the lifetime of a mesh.

    The kernel may hand the same ephemeral port out twice between our bind-and-close calls,
    so we remember what we gave away.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._given: set[int] = set()

    def reserve(self, port: int) -> int:
        self._given.add(port)
        return port

    def take(self) -> int:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((self.host, 0))
                port = int(sock.getsockname()[1])
            if port not in self._given:
                self._given.add(port)
                return port
        raise RuntimeError(f"no free port found on {self.host}")

    def take_preferred(self, preferred: int | None) -> int:
        """`preferred` if it is still free (keeps addresses stable across restarts), else any."""
        if preferred and preferred not in self._given and port_is_free(self.host, preferred):
            return self.reserve(preferred)
        return self.take()
