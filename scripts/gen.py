#!/usr/bin/env python3
"""The one regenerate command: everything in gen/ comes from proto/ through here.

    python scripts/gen.py                  regenerate gen/ in place
    python scripts/gen.py --check          regenerate into a temp copy; exit 1 if gen/ differs
    python scripts/gen.py --breaking[=REF] also run `buf breaking` against git REF (default
                                           HEAD~1); combine with --check in CI

Steps: (a) copy google/api + google/rpc .proto files from the installed googleapis-common-protos
into the git-ignored third_party/googleapis (buf's second module; offline, nothing downloaded);
(b) `buf lint`; (c) clear gen/python and gen/openapi, `buf generate` (local plugins, run with
this interpreter); (d) `buf build --path proto/soma --path <google/rpc/error_details.proto>
-o gen/soma.binpb`: our files, their imports, source info, plus the error detail types Envoy needs
for REST error bodies.

Breaking check: `buf breaking --against '.git#ref=...'` cannot work here, because the old commit
has no third_party/ (it is git-ignored) and so its imports do not resolve. Instead proto/ of REF
is read with `git archive` into a temp workspace next to today's buf.yaml and third_party, built
into an image, and the working tree is checked against that image. It is skipped, with a note,
when REF does not exist or has no proto/ (the first commit).
"""

from __future__ import annotations

import argparse
import difflib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# what a temp workspace needs to generate exactly what the repo would
WORKSPACE_FILES = ("buf.yaml", "buf.gen.yaml")
WORKSPACE_DIRS = ("proto", "scripts")
GENERATED_DIRS = ("gen/python", "gen/openapi")
DESCRIPTOR_SET = "gen/soma.binpb"
ERROR_DETAILS = "third_party/googleapis/google/rpc/error_details.proto"
IGNORED = ("__pycache__", ".pyc")
MAX_DIFF_LINES = 20


class GenError(Exception):
    """A step failed; the message says which and why."""


def log(message: str) -> None:
    print(f"gen: {message}", flush=True)


def tool_env() -> dict[str, str]:
    # buf.gen.yaml runs `python3 scripts/...`: make that the interpreter running us (the venv)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    return env


def run(args: Sequence[str], cwd: Path, what: str) -> str:
    buf = shutil.which(args[0], path=tool_env()["PATH"])
    if buf is None:
        raise GenError(f"{args[0]} not found; install the dev extras (pip install -e '.[dev]')")
    proc = subprocess.run(
        [buf, *args[1:]], cwd=cwd, env=tool_env(), capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()
        raise GenError(f"{what} failed (exit {proc.returncode}):\n{output}")
    return proc.stdout


# (a) third_party/googleapis -----------------------------------------------------------------


def googleapis_source() -> Path:
    """The site-packages dir holding google/api/*.proto (google.api is a namespace package)."""
    try:
        import google.api.annotations_pb2 as annotations
    except ImportError as exc:
        raise GenError("googleapis-common-protos is not installed in this Python") from exc
    return Path(annotations.__file__).resolve().parent.parent.parent


def sync_third_party(root: Path) -> int:
    """Mirror google/{api,rpc}/*.proto into root/third_party/googleapis; returns the count."""
    source = googleapis_source()
    count = 0
    for package in ("api", "rpc"):
        src_dir = source / "google" / package
        dst_dir = root / "third_party" / "googleapis" / "google" / package
        dst_dir.mkdir(parents=True, exist_ok=True)
        wanted = {p.name: p for p in src_dir.glob("*.proto")}
        # update in place (no rmtree): someone may be running buf on this tree right now
        for stale in dst_dir.iterdir():
            if stale.name not in wanted:
                if stale.is_dir():
                    shutil.rmtree(stale)
                else:
                    stale.unlink()
        for name, proto in sorted(wanted.items()):
            target = dst_dir / name
            if not target.exists() or target.read_bytes() != proto.read_bytes():
                shutil.copyfile(proto, target)
        count += len(wanted)
    if count == 0:
        raise GenError(f"no .proto files under {source}/google/api: wrong googleapis package?")
    return count


# (b)-(d) lint, generate, build ----------------------------------------------------------------


def generate(root: Path) -> None:
    """Run every step in `root` (the repo, or a temp copy of it for --check)."""
    count = sync_third_party(root)
    log(f"third_party/googleapis: {count} .proto files from googleapis-common-protos")
    run(["buf", "lint"], root, "buf lint")
    log("buf lint: ok")
    for rel in GENERATED_DIRS:
        shutil.rmtree(root / rel, ignore_errors=True)
    run(["buf", "generate"], root, "buf generate")
    for rel in GENERATED_DIRS:
        files = [p for p in (root / rel).rglob("*") if p.is_file()]
        log(f"buf generate: {rel}/ ({len(files)} file{'s' if len(files) != 1 else ''})")
    (root / "gen").mkdir(exist_ok=True)
    # error_details.proto is not imported by the contract, but Envoy's transcoder must know
    # ErrorInfo/BadRequest/RetryInfo to turn `grpc-status-details-bin` into the JSON error body
    # of REST callers (without it the body is empty).
    paths = ["--path", "proto/soma", "--path", ERROR_DETAILS]
    run(["buf", "build", *paths, "-o", DESCRIPTOR_SET], root, "buf build")
    log(f"buf build: {DESCRIPTOR_SET} ({(root / DESCRIPTOR_SET).stat().st_size} bytes)")


# --check ---------------------------------------------------------------------------------------


def copy_workspace(root: Path, dest: Path) -> None:
    for name in WORKSPACE_FILES:
        shutil.copy2(root / name, dest / name)
    for name in WORKSPACE_DIRS:
        shutil.copytree(root / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))


def tree_files(base: Path) -> dict[str, Path]:
    if not base.exists():
        return {}
    return {
        str(p.relative_to(base)): p
        for p in sorted(base.rglob("*"))
        if p.is_file() and not any(part.endswith(IGNORED) for part in p.parts)
    }


def describe_change(rel: str, old: Path, new: Path) -> list[str]:
    if rel.endswith(".binpb"):
        return [f"  {rel}: descriptor set differs ({descriptor_diff(old, new)})"]
    try:
        old_lines = old.read_text().splitlines()
        new_lines = new.read_text().splitlines()
    except UnicodeDecodeError:
        return [f"  {rel}: binary content differs"]
    diff = list(difflib.unified_diff(old_lines, new_lines, rel, "fresh", lineterm=""))
    shown = [f"    {line}" for line in diff[:MAX_DIFF_LINES]]
    more = len(diff) - MAX_DIFF_LINES
    return [f"  {rel}:", *shown, *([f"    ... {more} more diff lines"] if more > 0 else [])]


def descriptor_diff(old: Path, new: Path) -> str:
    from google.protobuf import descriptor_pb2

    try:
        a = {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(old.read_bytes()).file}
        b = {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(new.read_bytes()).file}
    except Exception:
        return "unreadable"
    names = sorted(n for n in a.keys() | b.keys() if a.get(n) != b.get(n))
    return "files: " + (", ".join(names) if names else "same files, different bytes")


def compare(committed: Path, fresh: Path) -> list[str]:
    old, new = tree_files(committed), tree_files(fresh)
    lines = [f"  gen/{rel}: missing" for rel in sorted(new.keys() - old.keys())]
    lines += [f"  gen/{rel}: no longer generated" for rel in sorted(old.keys() - new.keys())]
    for rel in sorted(old.keys() & new.keys()):
        if old[rel].read_bytes() != new[rel].read_bytes():
            lines += describe_change(f"gen/{rel}", old[rel], new[rel])
    return lines


def check(root: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="soma-gen-check-") as tmp:
        work = Path(tmp)
        log(f"--check: regenerating into {work}")
        copy_workspace(root, work)
        generate(work)
        problems = compare(root / "gen", work / "gen")
    if problems:
        raise GenError(
            "gen/ is stale; run `python scripts/gen.py` and commit the result:\n"
            + "\n".join(problems)
        )
    log("gen/ is fresh")


# --breaking -------------------------------------------------------------------------------------


def git(root: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, check=False)


def has_proto_at(root: Path, ref: str) -> bool:
    if git(root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").returncode != 0:
        return False
    listing = git(root, "ls-tree", "--name-only", ref, "proto")
    return listing.returncode == 0 and bool(listing.stdout.strip())


def extract_proto(root: Path, ref: str, dest: Path) -> None:
    archive = dest / "old.tar"
    proc = git(root, "archive", "--format=tar", "-o", str(archive), ref, "proto")
    if proc.returncode != 0:
        raise GenError(f"git archive {ref} proto failed: {proc.stderr.decode().strip()}")
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    archive.unlink()


def breaking(root: Path, ref: str) -> None:
    if not has_proto_at(root, ref):
        log(f"buf breaking: skipped, no commit {ref} with proto/ (first commit?)")
        return
    with tempfile.TemporaryDirectory(prefix="soma-gen-breaking-") as tmp:
        old = Path(tmp)
        extract_proto(root, ref, old)
        shutil.copy2(root / "buf.yaml", old / "buf.yaml")
        sync_third_party(old)
        sync_third_party(root)
        image = old / "against.binpb"
        run(["buf", "build", "proto", "-o", str(image)], old, f"buf build of {ref}")
        try:
            run(["buf", "breaking", "proto", "--against", str(image)], root, "buf breaking")
        except GenError as exc:
            raise GenError(f"breaking change against {ref}:\n{exc}") from None
    log(f"buf breaking: no breaking change against {ref}")


# -------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Regenerate (or check) everything in gen/.")
    parser.add_argument(
        "--check", action="store_true", help="regenerate into a temp copy; fail if gen/ differs"
    )
    parser.add_argument(
        "--breaking",
        nargs="?",
        const="HEAD~1",
        metavar="REF",
        help="also run buf breaking against git REF (default HEAD~1)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.check:
            check(ROOT)
        else:
            generate(ROOT)
        if args.breaking:
            breaking(ROOT, args.breaking)
    except GenError as exc:
        print(f"gen: FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
