"""Operator-edited Rego files evaluated in-process with regopy: compile, query, hot reload.

Shared by the authorization policy (services.common.auth.authz) and the capsule approval policy
(services.capsule.policy). A file is compiled once into a regopy bundle (a bundle query costs
tens of microseconds, a plain `query` ten times more). Its mtime and size are checked at most
every `reload_interval` seconds; a changed file is recompiled, and a file that no longer
compiles is logged and the last good version kept. At start-up a broken file is a
`PolicyError` naming it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regopy


class PolicyError(Exception):
    """A policy file cannot be used (missing, does not compile, no decision rule)."""


@dataclass(frozen=True)
class CompiledPolicy:
    interpreter: regopy.Interpreter
    bundle: regopy.Bundle
    signature: tuple[int, int]  # (mtime_ns, size) of the file it came from
    code: str  # the source without comments, for checks on what the policy reads


def file_signature(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


_DECISION_RULE = re.compile(r"^\s*(?:default\s+)?decision\s*(?::=|=|if\b|\{)", re.M)


def defines_decision(code: str, package: str) -> bool:
    """Whether `code` (a policy without its comments) is `package <package>` and has a
    `decision` rule: the entrypoint every soma policy is queried at."""
    declares = re.search(rf"^\s*package\s+{re.escape(package)}\s*$", code, re.M)
    return bool(declares and _DECISION_RULE.search(code))


# check(path, code) raises PolicyError when the compiled file lacks what its user needs (e.g.
# its package or decision rule: regopy compiles a module without the entrypoint rule and then
# answers undefined for every input).
Check = Callable[[Path, str], None]


def compile_file(
    path: Path, entrypoint: str, what: str, check: Check | None = None
) -> CompiledPolicy:
    """Reads and compiles `path`; raises PolicyError naming the file on any problem. `what`
    names the file in messages, e.g. "authorization policy"."""
    try:
        signature = file_signature(path)
        source = path.read_text()
    except OSError as error:
        raise PolicyError(f"{what} {path}: cannot read it: {error}") from error
    interpreter = regopy.Interpreter()
    try:
        interpreter.add_module(str(path), source)
        bundle = interpreter.build(None, [entrypoint])
    except regopy.RegoError as error:
        raise PolicyError(f"{what} {path} does not compile: {error}") from error
    if not bundle.ok():
        raise PolicyError(f"{what} {path} does not compile: {bundle.node}")
    code = re.sub(r"#.*", "", source)
    if check is not None:
        check(path, code)
    return CompiledPolicy(interpreter, bundle, signature, code)


class RegoFile:
    """One compiled Rego file and its entrypoint, reloaded when the file changes."""

    def __init__(
        self,
        path: Path | str,
        entrypoint: str,
        *,
        what: str,
        check: Check | None = None,
        reload_interval: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        log: logging.Logger | None = None,
    ) -> None:
        self.path = Path(path)
        self.entrypoint = entrypoint
        self.what = what
        self._check = check
        self._log = log or logging.getLogger(__name__)
        self.compiled = compile_file(self.path, entrypoint, what, check)
        self._reload_interval = reload_interval
        self._clock = clock
        self._next_check = clock() + reload_interval
        self._failed_signature: tuple[int, int] | None = None
        self._lock = threading.Lock()  # regopy's interpreter holds the input: one query at a time

    def due(self) -> bool:
        """Whether it is time to look at the file again."""
        return self._clock() >= self._next_check

    def query(self, data: Mapping[str, Any]) -> Any | None:
        """The entrypoint's value for input `data`; None when it is undefined or fails."""
        with self._lock:
            compiled = self.compiled
            compiled.interpreter.set_input(dict(data))
            try:
                output = compiled.interpreter.query_bundle_entrypoint(
                    compiled.bundle, self.entrypoint
                )
            except (regopy.RegoError, ValueError) as error:
                # ValueError: regopy could not parse the engine's output as JSON (rego-cpp
                # leaves quotes inside strings unescaped).
                self._log.warning("%s evaluation failed: %s", self.what, error)
                return None
        if not output.ok() or not output.results or not output.results[0].expressions:
            return None
        return output.results[0].expressions[0]

    def reload_if_changed(self) -> bool:
        """Recompiles a changed file (keeping the last good version if it is broken)."""
        self._next_check = self._clock() + self._reload_interval
        try:
            signature = file_signature(self.path)
        except OSError as error:
            if self._failed_signature != (-1, -1):
                self._log.error(
                    "%s %s: %s; keeping the last good policy", self.what, self.path, error
                )
                self._failed_signature = (-1, -1)
            return False
        if signature in (self.compiled.signature, self._failed_signature):
            return False
        try:
            compiled = compile_file(self.path, self.entrypoint, self.what, self._check)
        except PolicyError as error:
            self._log.error("%s; keeping the last good policy", error)
            self._failed_signature = signature
            return False
        with self._lock:
            self.compiled = compiled
        self._failed_signature = None
        self._log.info("%s reloaded from %s", self.what, self.path)
        return True
