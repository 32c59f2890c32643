"""Showing an install's progress stream (and a publish's upload) to a person or a program.

    view = install_view(out, as_json=False)   # rich bar on a terminal, else one line per phase
    async for progress in soma.install_capsule("hello"):
        view.update(progress)
    view.close()

Three views of the same `InstallProgress` messages:

    RichView    a terminal: a live bar (overall percent, files and bytes while extracting), and
                a line above it each time the phase changes
    PlainView   a pipe or a file: one line per phase, nothing else (logs stay readable)
    JsonView    --json: every message as one line of JSON (proto field names)
"""

from __future__ import annotations

import json
from typing import Any, Protocol, TextIO

from google.rpc import code_pb2

from services.client import render
from soma.capsule.v1 import capsule_pb2
from soma.capsule.v1 import resources_pb2 as pb

PHASES: dict[int, str] = {
    pb.INSTALL_PHASE_QUEUED: "queued",
    pb.INSTALL_PHASE_AWAITING_APPROVAL: "awaiting approval",
    pb.INSTALL_PHASE_VERIFYING_SIGNATURE: "verifying signature",
    pb.INSTALL_PHASE_EXTRACTING: "extracting",
    pb.INSTALL_PHASE_ACTIVATING: "activating",
    pb.INSTALL_PHASE_DONE: "done",
    pb.INSTALL_PHASE_FAILED: "failed",
}


def human_bytes(count: int) -> str:
    """1536 -> `1.5 KiB`; bytes below 1 KiB exactly."""
    if count < 1024:
        return f"{count} B"
    value = float(count)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def code_name(code: int) -> str:
    return str(code_pb2.Code.Name(code)) if code in code_pb2.Code.values() else str(code)


def phase_name(phase: int) -> str:
    return PHASES.get(phase, f"phase {phase}")


def describe(progress: capsule_pb2.InstallProgress) -> str:
    """What a phase means for a person, without the percent: `extracting 12 files, 4.0 KiB`."""
    phase = progress.phase
    name = phase_name(phase)
    if phase == pb.INSTALL_PHASE_QUEUED:
        return f"{name} {progress.installation}".rstrip()
    if phase == pb.INSTALL_PHASE_AWAITING_APPROVAL:
        if not progress.approval:
            return f"{name}: {progress.message}" if progress.message else name
        # The server's message usually just names the approval again: shown only if it does not.
        note = "" if progress.approval in progress.message else f" ({progress.message})"
        approval_id = progress.approval.rsplit("/", 1)[-1]
        return (
            f"{name} {progress.approval}{note}; an approver runs "
            f"`soma capsule approve {approval_id}`"
        )
    if phase == pb.INSTALL_PHASE_EXTRACTING and (progress.files_total or progress.bytes_total):
        return f"{name} {progress.files_total} files, {human_bytes(progress.bytes_total)}"
    if phase == pb.INSTALL_PHASE_DONE and progress.HasField("result"):
        done = progress.result
        seconds = done.duration.ToTimedelta().total_seconds()
        took = f", {seconds:.1f} s" if done.HasField("duration") else ""
        where = f" in {done.path}" if done.path else ""
        return (
            f"{name}: {done.capsule.removeprefix('capsules/')} {done.version}{where} "
            f"({done.file_count} files, {human_bytes(done.size_bytes)}{took})"
        )
    if phase == pb.INSTALL_PHASE_FAILED:
        if progress.HasField("error"):
            return f"{name}: {code_name(progress.error.code)}: {progress.error.message}"
        return f"{name}: {progress.message}" if progress.message else name
    return f"{name}: {progress.message}" if progress.message else name


class InstallView(Protocol):
    def update(self, progress: capsule_pb2.InstallProgress) -> None: ...

    def close(self) -> None: ...


class PlainView:
    """One line per phase (and per new approval), flushed at once: `[ 40%] extracting ...`."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._seen: tuple[int, str] | None = None
        self._percent = 0.0

    def update(self, progress: capsule_pb2.InstallProgress) -> None:
        self._percent = max(self._percent, progress.percent)  # a re-attach may replay older
        key = (progress.phase, progress.approval)
        if key == self._seen:
            return
        self._seen = key
        print(f"[{self._percent:3.0f}%] {describe(progress)}", file=self.out, flush=True)

    def close(self) -> None:
        pass


class JsonView:
    """Every message, one JSON object a line (what `--json` promises: nothing dropped)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def update(self, progress: capsule_pb2.InstallProgress) -> None:
        line = json.dumps(render.to_dict(progress), separators=(",", ":"), ensure_ascii=False)
        print(line, file=self.out, flush=True)

    def close(self) -> None:
        pass


class RichView:
    """A live bar on a terminal; phase changes are printed above it and stay on screen."""

    def __init__(self, out: TextIO, *, console: Any = None) -> None:
        # rich is imported only when a terminal shows it: plain and JSON output do not need it.
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        self.console = console or Console(file=out)
        self.bar = Progress(
            TextColumn("[bold]{task.description:<20}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[detail]}"),
            console=self.console,
            transient=False,
        )
        self.task = self.bar.add_task(phase_name(pb.INSTALL_PHASE_QUEUED), total=100, detail="")
        self.bar.start()
        self._seen: tuple[int, str] | None = None
        self._percent = 0.0

    def update(self, progress: capsule_pb2.InstallProgress) -> None:
        self._percent = max(self._percent, progress.percent)
        key = (progress.phase, progress.approval)
        if key != self._seen:
            self._seen = key
            mark = _MARKS.get(progress.phase, "[dim]•[/dim]")
            self.bar.console.print(f"{mark} {describe(progress)}", markup=True, highlight=False)
        self.bar.update(
            self.task,
            completed=self._percent,
            description=phase_name(progress.phase),
            detail=_detail(progress),
        )

    def close(self) -> None:
        self.bar.stop()


_MARKS: dict[int, str] = {
    pb.INSTALL_PHASE_DONE: "[green]✓[/green]",
    pb.INSTALL_PHASE_FAILED: "[red]✗[/red]",
}


def _detail(progress: capsule_pb2.InstallProgress) -> str:
    parts = []
    if progress.files_total:
        parts.append(f"{progress.files_done}/{progress.files_total} files")
    if progress.bytes_total:
        parts.append(f"{human_bytes(progress.bytes_done)}/{human_bytes(progress.bytes_total)}")
    return ", ".join(parts)


def install_view(out: TextIO, *, as_json: bool) -> InstallView:
    if as_json:
        return JsonView(out)
    if out.isatty():
        return RichView(out)
    return PlainView(out)


class UploadBar:
    """Bytes sent while publishing, on a terminal only (a pipe gets the final summary alone)."""

    def __init__(self, out: TextIO, total: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TransferSpeedColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]uploading"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            console=Console(file=out),
        )
        self.task = self.bar.add_task("upload", total=total)
        self.bar.start()

    def __call__(self, sent: int, total: int) -> None:
        self.bar.update(self.task, completed=sent, total=total)

    def close(self) -> None:
        self.bar.stop()


def upload_bar(out: TextIO, total: int, *, as_json: bool) -> UploadBar | None:
    return UploadBar(out, total) if out.isatty() and not as_json else None
