"""ManagedProcess: one child process with start, health wait, restart backoff and stop.

Every child runs in its own session (so Ctrl-C in the terminal reaches only the supervisor, which
then stops the parts in order) and gets PR_SET_PDEATHSIG (so even a kill -9 of the supervisor
leaves no orphan behind). Its stdout/stderr go to `<data>/logs/<part>.log`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import pwd
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.mesh.backoff import Backoff, BackoffPolicy
from services.mesh.errors import PartFailedError
from services.mesh.health import ProbeResult
from services.mesh.state import PartState

logger = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[ProbeResult]]
Hook = Callable[["ManagedProcess"], Coroutine[Any, Any, None]]

_PR_SET_PDEATHSIG = 1
_prctl: Any = None
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: no parent-death signal
    pass


@dataclass(frozen=True)
class ProcessSpec:
    name: str  # unique part name, e.g. "gateway-0"
    kind: str  # see PartState.kind
    argv: tuple[str, ...]
    env: Mapping[str, str]
    log_path: Path
    probe: Probe  # healthy?
    host: str = "127.0.0.1"
    port: int = 0
    address: str = ""
    cwd: Path | None = None
    user: str | None = None  # run as this system user (postgres refuses to run as root)
    stop_signal: int = signal.SIGTERM
    stop_timeout: float = 10.0  # after the stop signal, before SIGKILL of the process group
    startup_timeout: float = 60.0
    prepare: Hook | None = None  # runs after spawn, before health polling (e.g. unseal OpenBao)
    before_spawn: Callable[[], None] | None = None  # runs before every (re)spawn
    health_interval: float = 5.0  # between probes once running (state.json status)
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)


def tail(path: Path, lines: int = 30, max_bytes: int = 16384) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _child_setup(user: str | None, death_signal: int) -> Callable[[], None]:
    """preexec_fn: switch user (if asked), then ask the kernel to signal us if the parent dies.

    The death signal must be set after the uid change: changing credentials clears it.
    """
    uid = gid = None
    if user is not None and os.geteuid() == 0:
        entry = pwd.getpwnam(user)
        uid, gid = entry.pw_uid, entry.pw_gid
    parent = os.getpid()

    def setup() -> None:
        if gid is not None and uid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)

    return setup


class ManagedProcess:
    def __init__(self, spec: ProcessSpec, on_change: Callable[[], None] | None = None) -> None:
        self.spec = spec
        self.state = PartState(
            name=spec.name,
            kind=spec.kind,
            address=spec.address or (f"{spec.host}:{spec.port}" if spec.port else ""),
            host=spec.host,
            port=spec.port,
            log=str(spec.log_path),
        )
        self._on_change = on_change or (lambda: None)
        self._proc: asyncio.subprocess.Process | None = None
        self._started_at = 0.0
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._backoff = Backoff(spec.backoff)

    # -- public -------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    async def start(self) -> None:
        """Spawn, wait until healthy (else PartFailedError), then supervise in the background."""
        await self._spawn_and_wait()
        self._tasks.append(asyncio.create_task(self._supervise(), name=f"supervise:{self.name}"))
        self._tasks.append(asyncio.create_task(self._watch_health(), name=f"health:{self.name}"))

    async def stop(self) -> None:
        """Stop signal, wait up to stop_timeout, then SIGKILL the whole process group."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        await self._terminate(self.spec.stop_signal, self.spec.stop_timeout)
        self.state.status = "stopped"
        self.state.pid = None
        self._on_change()

    async def probe(self) -> ProbeResult:
        return await self.spec.probe()

    # -- internals ----------------------------------------------------------------------------

    def _notify(self) -> None:
        try:
            self._on_change()
        except Exception:
            logger.exception("state update failed")

    async def _spawn(self) -> None:
        spec = self.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        if spec.before_spawn is not None:
            await asyncio.to_thread(spec.before_spawn)
        with spec.log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            command = " ".join(spec.argv)
            log.write(f"\n=== soma-mesh: starting {spec.name} at {stamp}: {command}\n".encode())
            log.flush()
            self._proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=dict(spec.env),
                cwd=str(spec.cwd) if spec.cwd else None,
                start_new_session=True,
                preexec_fn=_child_setup(spec.user, spec.stop_signal),
            )
        self._started_at = time.monotonic()
        pid = self._proc.pid
        self.state.pid = pid
        self.state.pgid = pid  # start_new_session: the child leads its own group
        self.state.create_time = _create_time(pid)
        self.state.status = "starting"
        logger.debug("%s: spawned pid %d", spec.name, pid)
        self._notify()

    def _failed(self, reason: str) -> PartFailedError:
        return PartFailedError(self.name, reason, str(self.spec.log_path), tail(self.spec.log_path))

    async def _spawn_and_wait(self) -> None:
        await self._spawn()
        try:
            await asyncio.wait_for(self._wait_ready(), self.spec.startup_timeout)
        except TimeoutError:
            detail = (await self._safe_probe()).detail
            await self._terminate(signal.SIGKILL, 2.0)
            raise self._failed(
                f"not healthy after {self.spec.startup_timeout:.0f}s (last probe: {detail})"
            ) from None
        except PartFailedError:
            await self._terminate(signal.SIGKILL, 2.0)
            raise
        except Exception as exc:
            await self._terminate(signal.SIGKILL, 2.0)
            raise self._failed(f"{type(exc).__name__}: {exc}") from exc
        self.state.status = "healthy"
        self._notify()

    async def _safe_probe(self) -> ProbeResult:
        try:
            return await asyncio.wait_for(self.spec.probe(), 5.0)
        except Exception as exc:
            return ProbeResult(False, f"probe error: {exc}")

    def _check_alive(self) -> None:
        assert self._proc is not None
        if self._proc.returncode is not None:
            self.state.last_exit_code = self._proc.returncode
            raise self._failed(f"exited with code {self._proc.returncode} during start-up")

    async def _wait_ready(self) -> None:
        assert self._proc is not None
        if self.spec.prepare is not None:
            prep: asyncio.Task[None] = asyncio.create_task(self.spec.prepare(self))
            died = asyncio.create_task(self._proc.wait())
            try:
                await asyncio.wait({prep, died}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                died.cancel()
                if not prep.done():
                    prep.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await prep
            if prep.cancelled():  # the process died first
                self._check_alive()
            prep.result()  # re-raise a failure of the hook
        delay = 0.05
        while True:
            self._check_alive()
            if (await self._safe_probe()).healthy:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    async def _supervise(self) -> None:
        """Restart the process whenever it dies, with exponential backoff."""
        while not self._stopping:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            uptime = time.monotonic() - self._started_at
            delay = self._backoff.next_delay(uptime)
            self.state.last_exit_code = code
            self.state.status = "restarting"
            self.state.pid = None
            logger.warning(
                "%s exited with code %s after %.1fs; restarting in %.1fs (restart #%d)",
                self.name,
                code,
                uptime,
                delay,
                self.state.restarts + 1,
            )
            await self._kill_group(signal.SIGKILL)  # leftovers of the dead process group
            self._notify()
            await asyncio.sleep(delay)
            self.state.restarts += 1
            try:
                await self._spawn_and_wait()
            except PartFailedError as exc:
                logger.error("%s: restart failed: %s", self.name, exc.reason)
                self.state.status = "restarting"
                self._notify()
                continue
            logger.info(
                "%s restarted (pid %s, restart #%d)", self.name, self.pid, self.state.restarts
            )

    async def _watch_health(self) -> None:
        """Keep `status` in state.json honest between restarts."""
        while not self._stopping:
            await asyncio.sleep(self.spec.health_interval)
            if self.state.status not in ("healthy", "unhealthy") or self.pid is None:
                continue
            result = await self._safe_probe()
            new = "healthy" if result.healthy else "unhealthy"
            current = self.state.status
            if self.pid is not None and new != current and current in ("healthy", "unhealthy"):
                logger.warning("%s is now %s (%s)", self.name, new, result.detail)
                self.state.status = new
                self._notify()

    async def _kill_group(self, sig: int) -> None:
        pgid = self.state.pgid
        if pgid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)

    async def _terminate(self, sig: int, wait_s: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                await asyncio.wait_for(proc.wait(), wait_s)
            except TimeoutError:
                logger.warning(
                    "%s did not stop within %.0fs; killing its process group", self.name, wait_s
                )
                await self._kill_group(signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 5.0)
        # Whatever is left in its group (e.g. children that outlived the leader) goes too.
        await self._kill_group(signal.SIGKILL)
        if proc.returncode is not None:
            self.state.last_exit_code = proc.returncode


def _create_time(pid: int) -> float | None:
    try:
        import psutil

        return float(psutil.Process(pid).create_time())
    except Exception:
        return None
