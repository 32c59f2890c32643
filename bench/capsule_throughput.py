"""Capsule publish and install throughput, and the capsule replica's peak memory.

    python bench/capsule_throughput.py [--sizes 1,50] [--rounds 3] [--replicas 1] [--json FILE]

Starts its own mesh (`soma-mesh up` in a temp dir, the integration tests' MeshRunner, one
replica per service by default), makes a tenant admin key, registers a publisher key, then for
each size builds `--rounds` capsules (versions 1.0.0, 1.0.1, ...) of incompressible random data
in ~1 MB files (so MB/s is not flattered by compression) with the real packer, signs them, and:

* publishes every version over gRPC through Envoy (1 MiB chunks read from the file, as the SDK
  does): MB/s = archive bytes / wall time of the call;
* then installs each through Envoy, reading the progress stream to DONE: MB/s = archive bytes
  (and extracted bytes) / wall time of the call; also the server's own Installation.duration;
  each is uninstalled again (not timed), so every install is a fresh one.

Memory, per phase (the publishes, then the installs): the capsule replica's high-water mark is
reset first (`echo 5 > /proc/<pid>/clear_refs`, Linux >= 4.0; root or the same user) and VmHWM
is read from /proc/<pid>/status at the end of the phase, so each peak is that phase's own; VmRSS
is also sampled every 10 ms as a cross-check. With `--replicas N` every capsule replica is
measured (the work runs on one of them). Prints a Markdown table; `--json` saves the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "gen" / "python")]

from soma.capsule.v1 import capsule_pb2 as c  # noqa: E402
from soma.capsule.v1 import resources_pb2 as pb  # noqa: E402
from tests.integration.capsules import (  # noqa: E402
    Built,
    Signer,
    build,
    channel_for,
    install,
    make_key,
    publish,
    register_key,
    stub,
    unique,
)
from tests.integration.harness import MeshRunner  # noqa: E402

MB = 1_000_000  # throughput in MB/s (10^6), sizes as the issue states them


@dataclass
class Round:
    publish_s: float
    install_s: float
    server_install_s: float
    phases: list[str]


@dataclass
class SizeResult:
    size_mb: int
    archive_bytes: int
    unpacked_bytes: int
    files: int
    rounds: list[Round] = field(default_factory=list)
    # replica -> {"before": VmRSS, "peak": VmHWM, "sampled": max VmRSS seen} in kB, per phase
    publish_memory: dict[str, dict[str, int]] = field(default_factory=dict)
    install_memory: dict[str, dict[str, int]] = field(default_factory=dict)

    def mbps(self, seconds: list[float], size: int) -> tuple[float, float, float]:
        rates = [size / s / MB for s in seconds]
        return statistics.median(rates), min(rates), max(rates)


def proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "VmPeak"):
            out[key] = int(value.split()[0])  # kB
    return out


def reset_peak(pid: int) -> bool:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Samples VmRSS of some processes every 10 ms in the background (a cross-check of VmHWM)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0)
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            for name, pid in self.pids.items():
                try:
                    self.peak[name] = max(self.peak[name], proc_status(pid)["VmRSS"])
                except (OSError, KeyError):
                    pass
            await asyncio.sleep(0.01)

    def __enter__(self) -> RssSampler:
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()


def capsule_replicas(mesh: MeshRunner) -> dict[str, int]:
    state = mesh.state() or {}
    return {
        p["name"]: p["pid"]
        for p in state.get("parts", [])
        if p["name"].startswith("capsule-") and p.get("pid")
    }


def build_sizes(work: Path, tenant: str, size_mb: int, rounds: int) -> list[Built]:
    name = unique(f"bench-{size_mb}mb")
    files = max(4, size_mb)  # ~1 MB per file: a realistic capsule, not one giant blob
    return [
        build(
            work,
            name,
            f"1.0.{i}",
            publisher=tenant,
            description=f"throughput bench, {size_mb} MB of random data",
            random_files=files,
            random_bytes=size_mb * MB,
        )
        for i in range(rounds)
    ]


class Memory:
    """The capsule replicas' memory over one phase of the bench: the RSS before, the peak
    (VmHWM after a reset, so it covers this phase only) and the largest sampled RSS."""

    def __init__(self, replicas: dict[str, int]) -> None:
        self.replicas = replicas
        self.before = {name: proc_status(pid)["VmRSS"] for name, pid in replicas.items()}
        self.peak: dict[str, int] = {}
        self.sampled: dict[str, int] = {}
        self._sampler = RssSampler(replicas)
        for name, pid in replicas.items():
            if not reset_peak(pid):
                print(f"  (cannot reset the peak of {name}: VmHWM is its lifetime peak)")

    def __enter__(self) -> Memory:
        self._sampler.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sampler.__exit__(*exc)
        self.sampled = dict(self._sampler.peak)
        self.peak = {name: proc_status(pid)["VmHWM"] for name, pid in self.replicas.items()}


async def bench_size(
    mesh: MeshRunner,
    secret: str,
    signer: Signer,
    work: Path,
    tenant: str,
    size_mb: int,
    rounds: int,
) -> SizeResult:
    print(f"building {rounds} x {size_mb} MB capsules ...", flush=True)
    builds = build_sizes(work, tenant, size_mb, rounds)
    replicas = capsule_replicas(mesh)
    async with channel_for(mesh, secret) as channel:
        cap = stub(channel)
        # Every publish first, then every install: each phase's peak memory is its own.
        publish_s: list[float] = []
        with Memory(replicas) as publishing:
            for built in builds:
                started = time.perf_counter()
                version = await publish(cap, built, signer, seconds=600)
                publish_s.append(time.perf_counter() - started)
        result = SizeResult(
            size_mb, builds[0].size, version.uncompressed_size_bytes, version.entry_count
        )
        result.publish_memory = asdict_memory(publishing)
        with Memory(replicas) as installing:
            for i, built in enumerate(builds):
                started = time.perf_counter()
                run = await install(cap, built.name, built.version, seconds=600)
                install_s = time.perf_counter() - started
                if run.code.name != "OK" or run.last.phase != pb.INSTALL_PHASE_DONE:
                    raise SystemExit(f"install failed: {run.describe()}")
                server_s = run.result.duration.ToTimedelta().total_seconds()
                phases = [pb.InstallPhase.Name(p) for p in run.phases]
                result.rounds.append(Round(publish_s[i], install_s, server_s, phases))
                print(
                    f"  round {i + 1}: publish {publish_s[i]:.2f}s, install {install_s:.2f}s "
                    f"(server {server_s:.2f}s)",
                    flush=True,
                )
                # Uninstalled (inside the window: it frees, it does not allocate much), so
                # every install is a fresh one.
                await cap.UninstallCapsule(c.UninstallCapsuleRequest(name=built.capsule))
        result.install_memory = asdict_memory(installing)
        return result


def asdict_memory(memory: Memory) -> dict[str, dict[str, int]]:
    """replica -> {before, peak, sampled} in kB."""
    return {
        name: {
            "before": memory.before[name],
            "peak": memory.peak[name],
            "sampled": memory.sampled.get(name, 0),
        }
        for name in memory.replicas
    }


def rate(stats: tuple[float, float, float]) -> str:
    return f"{stats[0]:.1f} ({stats[1]:.1f}-{stats[2]:.1f})"


def write_json(path: str, results: list[SizeResult]) -> None:
    Path(path).write_text(json.dumps([asdict(r) for r in results], indent=2))


def report(results: list[SizeResult]) -> str:
    lines = [
        "| capsule | archive | unpacked | files | publish MB/s | install MB/s (archive) "
        "| install MB/s (unpacked) | install s (server) |",
        "|---|---:|---:|---:|---|---|---|---:|",
    ]
    for r in results:
        pub = rate(r.mbps([x.publish_s for x in r.rounds], r.archive_bytes))
        ins = rate(r.mbps([x.install_s for x in r.rounds], r.archive_bytes))
        unp = rate(r.mbps([x.install_s for x in r.rounds], r.unpacked_bytes))
        server = statistics.median(x.server_install_s for x in r.rounds)
        lines.append(
            f"| {r.size_mb} MB | {r.archive_bytes / MB:.2f} MB | {r.unpacked_bytes / MB:.2f} MB "
            f"| {r.files} | {pub} | {ins} | {unp} | {server:.2f} |"
        )
    lines.append("")
    lines.append("capsule replica memory, kB (peak = VmHWM over the phase; sampled = max VmRSS")
    lines.append("seen every 10 ms):")
    for r in results:
        for phase, memory in (("publishes", r.publish_memory), ("installs", r.install_memory)):
            for name, m in sorted(memory.items()):
                lines.append(
                    f"  {r.size_mb} MB {phase}: {name}: before {m['before']}, peak {m['peak']} "
                    f"(+{m['peak'] - m['before']}), sampled {m['sampled']}"
                )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    base = Path(tempfile.mkdtemp(prefix="soma-bench-capsule-", dir="/tmp"))
    venv_bin = str(Path(sys.executable).parent)
    mesh = MeshRunner(
        base / "data",
        replicas=args.replicas,
        env={"PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", "")])},
    )
    ok = False
    try:
        print(f"starting a mesh in {base} ...", flush=True)
        mesh.start()
        tenant = unique("bench")
        secret = make_key(mesh, tenant, "admin")
        signer = Signer.new()
        async with channel_for(mesh, secret) as channel:
            await register_key(stub(channel), signer, "bench")
        work = base / "capsules-src"
        work.mkdir()
        results = []
        for size in args.sizes:
            results.append(await bench_size(mesh, secret, signer, work, tenant, size, args.rounds))
            shutil.rmtree(work)  # the sources are not needed any more
            work.mkdir()
        print()
        print(f"rounds: {args.rounds}, capsule replicas: {args.replicas}, CPUs: {os.cpu_count()}")
        print("MB/s: median (min-max) over the rounds; 1 MB = 10^6 bytes")
        print(report(results))
        if args.json:
            write_json(args.json, results)
        ok = True
        return 0
    finally:
        mesh.stop()
        if ok and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"kept {base} (logs: {mesh.log_file})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 50],
        help="capsule sizes in MB of random content, comma-separated (default 1,50)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="publishes + installs per size")
    parser.add_argument("--replicas", type=int, default=1, help="replicas per service")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (mesh, logs)")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
