"""The Capsule service's settings, read once at start from the environment.

variable                         default                    meaning
SOMA_CAPSULE_DIR                 <SOMA_DATA_DIR>/capsules   blobs, installs, temporary files
SOMA_CAPSULE_MAX_BYTES           100MiB                     largest archive PublishCapsule takes
SOMA_CAPSULE_MAX_ENTRIES         10000                      entries per archive
SOMA_CAPSULE_MAX_UNPACKED_BYTES  1GiB                       total size of an archive's files
SOMA_CAPSULE_MAX_RATIO           200                        unpacked / compressed size
SOMA_CAPSULE_APPROVAL_TTL        24h                        how long an approval waits
SOMA_CAPSULE_POLICY_FILE         policy/capsule.rego        the approval policy (Rego)
SOMA_CAPSULE_POLL_SECONDS        1                          how often waiting installs and
                                                            attached streams read the database
                                                            when no NATS nudge came

Sizes are bytes, optionally with a binary suffix (`50MiB`, `1GiB`, `64KiB`); durations are
seconds, optionally with a unit (`90s`, `30m`, `24h`, `7d`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from services.capsule.archive import Limits
from services.common.config import Config, ConfigError
from services.common.envparse import positive_float

DEFAULT_POLICY_FILE = Path(__file__).resolve().parents[2] / "policy" / "capsule.rego"
DEFAULT_MAX_BYTES = 100 << 20

_SIZE = re.compile(r"^(\d+)\s*(b|kib|mib|gib|k|m|g)?$", re.I)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20}
_SIZE_UNITS |= {"g": 1 << 30, "gib": 1 << 30}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)?$", re.I)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class CapsuleSettings:
    root: Path  # the capsules directory
    replica: str  # this replica's name: its own temporary directory and its installs
    max_bytes: int
    limits: Limits
    approval_ttl: timedelta
    policy_file: Path
    poll_seconds: float


def _size(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    match = _SIZE.match(raw)
    if match is None:
        raise ConfigError(f"{name}={raw!r} is not a size; use bytes or e.g. 50MiB, 1GiB")
    value = int(match[1]) * _SIZE_UNITS[(match[2] or "").lower()]
    if value <= 0:
        raise ConfigError(f"{name} must be positive")
    return value


def _duration(env: Mapping[str, str], name: str, default: timedelta) -> timedelta:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    match = _DURATION.match(raw)
    if match is None:
        raise ConfigError(f"{name}={raw!r} is not a duration; use e.g. 3600, 90m, 24h, 7d")
    seconds = float(match[1]) * _DURATION_UNITS[(match[2] or "").lower()]
    if seconds <= 0:
        raise ConfigError(f"{name} must be positive")
    return timedelta(seconds=seconds)


def load_settings(config: Config, env: Mapping[str, str]) -> CapsuleSettings:
    root = env.get("SOMA_CAPSULE_DIR", "").strip()
    defaults = Limits()
    limits = Limits(
        max_entries=_size(env, "SOMA_CAPSULE_MAX_ENTRIES", defaults.max_entries),
        max_unpacked_bytes=_size(
            env, "SOMA_CAPSULE_MAX_UNPACKED_BYTES", defaults.max_unpacked_bytes
        ),
        max_ratio=positive_float(env, "SOMA_CAPSULE_MAX_RATIO", defaults.max_ratio),
        max_manifest_bytes=defaults.max_manifest_bytes,
    )
    return CapsuleSettings(
        root=(Path(root) if root else config.data_dir / "capsules").resolve(),
        replica=config.server.replica,
        max_bytes=_size(env, "SOMA_CAPSULE_MAX_BYTES", DEFAULT_MAX_BYTES),
        limits=limits,
        approval_ttl=_duration(env, "SOMA_CAPSULE_APPROVAL_TTL", timedelta(hours=24)),
        policy_file=Path(env.get("SOMA_CAPSULE_POLICY_FILE", "").strip() or DEFAULT_POLICY_FILE),
        poll_seconds=positive_float(env, "SOMA_CAPSULE_POLL_SECONDS", 1.0),
    )
