"""The supervisor: start every part in order, keep them alive, stop them in order.

    async with Mesh(MeshOptions(data_dir=tmp, port=0, admin_port=0)) as mesh:
        mesh.state.listener  # "127.0.0.1:PORT"

Start order: postgres, nats, openbao (in parallel) -> service replicas (in parallel) -> worker ->
envoy. Stop order: service replicas (they drain) -> envoy -> worker -> nats -> openbao -> postgres.
If start-up fails half-way, whatever was started is stopped again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from services.common.config import ConfigError, VaultConfig
from services.common.tracing import load_trace_settings
from services.mesh import envoy, nats, openbao, postgres, pyparts
from services.mesh.errors import MeshError
from services.mesh.lock import MeshLock
from services.mesh.ports import PortAllocator, port_is_free
from services.mesh.process import ManagedProcess
from services.mesh.state import MeshState, PartState, read_state, state_path, write_state
from services.mesh.topology import Endpoint, Topology

if TYPE_CHECKING:
    from services.mesh.bootstrap import CreatedKey

logger = logging.getLogger(__name__)

DEFAULT_DRAIN_DELAY_SECONDS = 3.0  # services.common.config's default

LOOPBACK = "127.0.0.1"  # every internal part binds here; only Envoy's listener follows --host


@dataclass(frozen=True)
class MeshOptions:
    data_dir: Path = Path(".soma")
    host: str = "127.0.0.1"  # Envoy's public listener only; everything else stays on loopback
    port: int = 8080  # Envoy's public listener; 0 = a free port
    admin_port: int = 9901  # Envoy admin; 0 = a free port
    replicas: int = 1
    partitions: int = 4
    grace_seconds: float = 10.0  # SOMA_GRACE_SECONDS handed to the services
    startup_timeout: float = 60.0  # per part
    modules: Mapping[str, str] | None = None  # part -> module overrides (see pyparts)
    environ: Mapping[str, str] | None = None  # parent environment (default os.environ)
    python: str = sys.executable
    with_envoy: bool = True
    # The built-in minimal Envoy bootstrap instead of envoy_config.write_envoy_config
    # (None: SOMA_MESH_ENVOY_CONFIG=minimal in the environment decides).
    minimal_envoy_config: bool | None = None
    # Create tenant `default` + an admin key when the database has no API key (None:
    # SOMA_MESH_BOOTSTRAP=0 in the environment turns it off).
    bootstrap: bool | None = None
    # Give every Python part a loopback /metrics port and render <data>/prometheus.yml (None:
    # SOMA_MESH_METRICS=0 in the environment turns it off, e.g. to benchmark without metrics).
    metrics: bool | None = None


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname or ''}"
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def reap_previous(data_dir: Path) -> None:
    """Stop parts left running by a previous supervisor that was kill -9'd.

    Children normally die with the supervisor (PR_SET_PDEATHSIG); this covers what did not.
    A pid only counts if its start time matches the one recorded, so reused pids are spared.
    """
    previous = read_state(state_path(data_dir))
    if not previous:
        return
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return
    for part in previous.get("parts", []):
        pid, created = part.get("pid"), part.get("create_time")
        if not pid or created is None or part.get("external"):
            continue
        try:
            proc = psutil.Process(int(pid))
            if abs(proc.create_time() - float(created)) > 0.5:
                continue
        except (psutil.Error, ValueError):
            continue
        logger.warning("stopping %s (pid %s) left over from a previous run", part.get("name"), pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(int(part.get("pgid") or pid), signal.SIGTERM)
        try:
            proc.wait(10)
        except psutil.Error:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(int(part.get("pgid") or pid), signal.SIGKILL)


@dataclass
class _Running:
    infra: list[ManagedProcess] = field(default_factory=list)  # postgres, nats, openbao
    services: list[ManagedProcess] = field(default_factory=list)
    worker: ManagedProcess | None = None
    envoy: ManagedProcess | None = None


class Mesh:
    def __init__(self, options: MeshOptions | None = None) -> None:
        self.options = options or MeshOptions()
        self.data_dir = self.options.data_dir.expanduser().resolve()
        self.run_dir = self.data_dir / "run"
        self.log_dir = self.data_dir / "logs"
        self.state = MeshState(data_dir=str(self.data_dir), host=self.options.host)
        self.environ: dict[str, str] = dict(
            os.environ if self.options.environ is None else self.options.environ
        )
        self.vault_token = ""
        self._lock = MeshLock(self.run_dir / "mesh.lock")
        self._running = _Running()
        self._started = False
        self._stopped = False
        self._pgdata: Path | None = None
        self.bootstrap_key: CreatedKey | None = None  # for the ready banner only; never stored

    # -- public -------------------------------------------------------------------------------

    @property
    def parts(self) -> list[ManagedProcess]:
        r = self._running
        return [
            *r.infra,
            *r.services,
            *([r.worker] if r.worker else []),
            *([r.envoy] if r.envoy else []),
        ]

    def part(self, name: str) -> ManagedProcess | None:
        return next((p for p in self.parts if p.name == name), None)

    @property
    def state_file(self) -> Path:
        return state_path(self.data_dir)

    async def start(self) -> None:
        """Start everything; on any failure (or cancellation) stop what was started and raise."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()  # raises LockHeldError at once
        try:
            reap_previous(self.data_dir)
            self._write()
            await self._start_all()
            await self._bootstrap()
        except BaseException as exc:
            self.state.status = "failed"
            self.state.error = (
                str(exc) if not isinstance(exc, asyncio.CancelledError) else "cancelled"
            )
            self._write()
            with contextlib.suppress(Exception):
                await asyncio.shield(self._shutdown(final_status="failed"))
            raise
        self._started = True
        self.state.status = "ready"
        self._write()

    async def stop(self) -> None:
        await self._shutdown(final_status="stopped")

    async def __aenter__(self) -> Mesh:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def urls(self) -> dict[str, str]:
        return dict(self.state.urls)

    # -- start --------------------------------------------------------------------------------

    async def _start_all(self) -> None:
        opts = self.options
        try:  # checked before anything starts: every part would refuse the same setting
            tracing = load_trace_settings(self.environ)
        except ConfigError as error:
            raise MeshError(str(error)) from None
        ports = PortAllocator(LOOPBACK)
        listener_port = self._fixed_port(ports, opts.host, opts.port, "--port")
        admin_port = self._fixed_port(ports, LOOPBACK, opts.admin_port, "--admin-port")
        self.state.listener = f"{opts.host}:{listener_port}"
        self.state.admin = f"{LOOPBACK}:{admin_port}"

        await asyncio.gather(
            self._start_postgres(), self._start_nats(ports), self._start_openbao(ports)
        )

        modules = pyparts.resolve_modules(
            opts.modules
            if opts.modules is not None
            else pyparts.parse_modules(self.environ.get("SOMA_MESH_MODULES"))
        )
        env = self._service_env()
        replicas: dict[str, tuple[Endpoint, ...]] = {}
        services: list[ManagedProcess] = []
        for svc in pyparts.SERVICE_PARTS:
            if svc not in modules:
                continue
            endpoints = []
            for i in range(opts.replicas):
                port = ports.take()
                endpoints.append(Endpoint(LOOPBACK, port))
                services.append(
                    self._python_part(
                        f"{svc}-{i}", "service", modules[svc], port, env, self._metrics_port(ports)
                    )
                )
            replicas[svc] = tuple(endpoints)
        self._running.services = services
        await self._start_group(services)

        if "worker" in modules:
            worker = self._python_part(
                "worker", "worker", modules["worker"], ports.take(), env, self._metrics_port(ports)
            )
            self._running.worker = worker
            await self._start_group([worker])

        if opts.with_envoy:
            topology = Topology(
                listener=Endpoint(opts.host, listener_port),
                admin=Endpoint(LOOPBACK, admin_port),
                replicas=replicas,
                descriptor_set=pyparts.REPO_ROOT / "gen" / "soma.binpb",
                openapi_document=pyparts.REPO_ROOT / "gen" / "openapi" / "soma.openapi.json",
                gateway_config_dir=pyparts.REPO_ROOT / "gateway-config",
                run_dir=self.run_dir,
                otlp_endpoint=tracing.endpoint,  # the Python parts read OTEL_* themselves
                trace_sample=tracing.sample,
            )
            self.run_dir.mkdir(parents=True, exist_ok=True)
            minimal = opts.minimal_envoy_config
            if minimal is None:
                minimal = self.environ.get("SOMA_MESH_ENVOY_CONFIG") == "minimal"
            eplan = await asyncio.to_thread(
                envoy.plan, topology, self.log_dir / "envoy.log", minimal
            )
            proc = self._managed(eplan.spec)
            self._running.envoy = proc
            await self._start_group([proc])
        self._fill_urls()
        self._write_prometheus_config()

    async def _bootstrap(self) -> None:
        enabled = self.options.bootstrap
        if enabled is None:
            enabled = self.environ.get("SOMA_MESH_BOOTSTRAP", "1") != "0"
        if not enabled:
            return
        from services.mesh import bootstrap

        connection = bootstrap.Connection(
            self.environ.get("DATABASE_URL") or self.state.database_url,
            VaultConfig(self.state.vault_addr, self.vault_token),
        )
        env = self.environ.get("SOMA_ENV", "dev").strip().lower() or "dev"
        self.bootstrap_key = await bootstrap.bootstrap(connection, env)

    def _fixed_port(self, ports: PortAllocator, host: str, port: int, flag: str) -> int:
        if port == 0:
            return ports.take() if host == LOOPBACK else PortAllocator(host).take()
        if not port_is_free(host, port):
            raise MeshError(
                f"{host}:{port} is already in use; choose another {flag} (0 = any free port)"
            )
        return ports.reserve(port)

    def _managed(self, spec: object) -> ManagedProcess:
        from services.mesh.process import ProcessSpec

        assert isinstance(spec, ProcessSpec)
        proc = ManagedProcess(spec, on_change=self._on_part_change)
        self.state.parts.append(proc.state)
        return proc

    async def _start_group(self, procs: list[ManagedProcess]) -> None:
        names = ", ".join(p.name for p in procs)
        logger.info("starting %s", names)
        t0 = time.monotonic()
        results = await asyncio.gather(*(p.start() for p in procs), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        logger.info("healthy: %s (%.1fs)", names, time.monotonic() - t0)

    async def _start_postgres(self) -> None:
        external = self.environ.get("DATABASE_URL")
        if external:
            self.state.database_url = redact_url(external)
            self._external("postgres", redact_url(external))
            return
        pgdata = self.data_dir / "postgres"
        logger.info("starting postgres (%s)", pgdata)
        socket_dir = await asyncio.to_thread(postgres.prepare_pgdata, pgdata)
        pplan = postgres.plan(pgdata, socket_dir, self.log_dir / "postgres.log")
        postgres.register_handle(pgdata, os.getpid())
        self._pgdata = pgdata
        self.state.database_url = pplan.database_url
        proc = self._managed(pplan.spec)
        self._running.infra.append(proc)
        await proc.start()
        logger.info("healthy: postgres")

    async def _start_nats(self, ports: PortAllocator) -> None:
        external = self.environ.get("NATS_URL")
        if external:
            self.state.nats_url = redact_url(external)
            self._external("nats", redact_url(external))
            return
        nplan = nats.plan(
            self.data_dir / "nats", LOOPBACK, ports.take(), ports.take(), self.log_dir / "nats.log"
        )
        self.state.nats_url = nplan.url
        logger.info("starting nats (%s)", nplan.url)
        proc = self._managed(nplan.spec)
        proc.state.extra["monitor_url"] = nplan.monitor_url
        self._running.infra.append(proc)
        await proc.start()
        logger.info("healthy: nats")

    async def _start_openbao(self, ports: PortAllocator) -> None:
        external = self.environ.get("VAULT_ADDR")
        if external:
            self.state.vault_addr = external
            self.vault_token = self.environ.get("VAULT_TOKEN", "")
            self._external("openbao", external)
            return
        bao_dir = self.data_dir / "openbao"
        bao_dir.mkdir(parents=True, exist_ok=True)
        api, cluster = openbao.load_ports(bao_dir)
        bplan = openbao.plan(
            bao_dir,
            LOOPBACK,
            ports.take_preferred(api),
            ports.take_preferred(cluster),
            self.log_dir / "openbao.log",
        )
        self.state.vault_addr = bplan.addr
        logger.info("starting openbao (%s)", bplan.addr)
        proc = self._managed(bplan.spec)
        proc.state.extra["init_file"] = str(bplan.init_file)
        self._running.infra.append(proc)
        await proc.start()
        logger.info("healthy: openbao (unsealed)")
        self.vault_token = openbao.root_token(bplan.init_file)

    def _external(self, name: str, address: str) -> None:
        self.state.parts.append(
            PartState(name=name, kind=name, address=address, status="external", external=True)
        )
        logger.info("%s: using %s from the environment", name, address)

    def _service_env(self) -> dict[str, str]:
        env = dict(self.environ)
        env.update(
            {
                "DATABASE_URL": self.environ.get("DATABASE_URL") or self.state.database_url,
                "NATS_URL": self.environ.get("NATS_URL") or self.state.nats_url,
                "VAULT_ADDR": self.state.vault_addr,
                "VAULT_TOKEN": self.vault_token,
                "SOMA_DATA_DIR": str(self.data_dir),
                "SOMA_PARTITIONS": str(self.options.partitions),
            }
        )
        env.setdefault("SOMA_GRACE_SECONDS", f"{self.options.grace_seconds:g}")
        return env

    def _metrics_port(self, ports: PortAllocator) -> int:
        enabled = self.options.metrics
        if enabled is None:
            enabled = self.environ.get("SOMA_MESH_METRICS", "1") != "0"
        return ports.take() if enabled else 0

    def _write_prometheus_config(self) -> None:
        """<data>/prometheus.yml for the parts serving metrics (a replica keeps its metrics
        port across restarts, so the file stays valid while the mesh runs)."""
        from services.mesh.prometheus import write_prometheus_config

        targets: dict[str, list[tuple[str, str]]] = {}
        for part in self.state.parts:
            if "metrics" in part.extra:
                kind = str(part.extra["service"])
                targets.setdefault(kind, []).append((part.name, str(part.extra["metrics"])))
        if not targets:
            return
        envoy_admin = self.state.admin if self.options.with_envoy else None
        try:
            path = write_prometheus_config(self.data_dir / "prometheus.yml", targets, envoy_admin)
        except (MeshError, OSError) as error:  # monitoring config only: the mesh still runs
            logger.warning("prometheus.yml not written: %s", error)
            return
        self.state.urls["prometheus_config"] = str(path)

    def _python_part(
        self,
        name: str,
        kind: str,
        module: str,
        port: int,
        env: Mapping[str, str],
        metrics_port: int = 0,
    ) -> ManagedProcess:
        if metrics_port:
            env = {**env, "SOMA_METRICS_PORT": str(metrics_port)}
        # A replica first stays NOT_SERVING for its drain delay (so Envoy moves away), then
        # drains in-flight calls for its grace period: wait for both before killing it.
        grace = float(env.get("SOMA_GRACE_SECONDS", self.options.grace_seconds)) + float(
            env.get("SOMA_DRAIN_DELAY_SECONDS", DEFAULT_DRAIN_DELAY_SECONDS)
        )
        spec = pyparts.spec(
            name=name,
            kind=kind,
            module=module,
            host=LOOPBACK,
            port=port,
            env=env,
            log_path=self.log_dir / f"{name}.log",
            grace_seconds=grace,
            startup_timeout=self.options.startup_timeout,
            python=self.options.python,
        )
        proc = self._managed(spec)
        proc.state.extra["module"] = module
        if metrics_port:
            proc.state.extra["metrics"] = f"{LOOPBACK}:{metrics_port}"
            # the Prometheus job: the service of a replica named <service>-<n>, or "worker"
            proc.state.extra["service"] = name.rpartition("-")[0] if kind == "service" else kind
        return proc

    def _fill_urls(self) -> None:
        s = self.state
        urls = {
            "grpc": s.listener,
            "rest": f"http://{s.listener}/v1/",
            "grpc_web": f"http://{s.listener}",
            "openapi": f"http://{s.listener}/openapi.json",
            "envoy_admin": f"http://{s.admin}",
            "metrics": f"http://{s.admin}/stats/prometheus",
            "postgres": s.database_url,
            "nats": s.nats_url,
            "openbao": s.vault_addr,
        }
        nats_part = s.part("nats")
        if nats_part and "monitor_url" in nats_part.extra:
            urls["nats_monitor"] = str(nats_part.extra["monitor_url"])
        bao = s.part("openbao")
        if bao and "init_file" in bao.extra:
            urls["openbao_token_file"] = str(bao.extra["init_file"])
        if not self.options.with_envoy:
            for key in ("grpc", "rest", "grpc_web", "openapi", "envoy_admin", "metrics"):
                urls.pop(key)
        s.urls = urls

    # -- state --------------------------------------------------------------------------------

    def _on_part_change(self) -> None:
        if self.state.status in ("ready", "degraded"):
            managed = [p for p in self.state.parts if not p.external]
            degraded = any(p.status != "healthy" for p in managed)
            self.state.status = "degraded" if degraded else "ready"
        self._write()

    def _write(self) -> None:
        self.state.pid = os.getpid()
        try:
            write_state(self.state_file, self.state)
        except OSError:
            logger.exception("could not write %s", self.state_file)

    # -- stop ---------------------------------------------------------------------------------

    async def _shutdown(self, final_status: str) -> None:
        if self._stopped or not self._lock.held:
            return
        self._stopped = True
        if final_status != "failed":
            self.state.status = "stopping"
        self._write()
        r = self._running
        stages: list[list[ManagedProcess]] = [
            r.services,
            [r.envoy] if r.envoy else [],
            [r.worker] if r.worker else [],
            *([p] for p in r.infra if p.name == "nats"),
            *([p] for p in r.infra if p.name == "openbao"),
            *([p] for p in r.infra if p.name == "postgres"),
        ]
        for stage in stages:
            if not stage:
                continue
            logger.info("stopping %s", ", ".join(p.name for p in stage))
            await asyncio.gather(*(p.stop() for p in stage), return_exceptions=True)
        if self._pgdata is not None:
            with contextlib.suppress(OSError):
                postgres.unregister_handle(self._pgdata, os.getpid())
        self.state.status = final_status
        self._write()
        self._lock.release()
        logger.info("mesh stopped")


async def start_mesh(options: MeshOptions) -> Mesh:
    """Start a mesh and return it running; call `await mesh.stop()` when done."""
    mesh = Mesh(options)
    await mesh.start()
    return mesh
