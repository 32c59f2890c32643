"""Numbers read from an environment mapping, with a ConfigError that names the variable.

A variable that is unset or blank takes the default; anything else must parse, so a typo stops
the service at start instead of quietly running with the default.
"""

from __future__ import annotations

from collections.abc import Mapping

from services.common.config import ConfigError


def _number(env: Mapping[str, str], name: str) -> tuple[str, float] | None:
    """`name`'s text and its value, or None when it is unset or blank."""
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return raw, float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None


def non_negative_float(env: Mapping[str, str], name: str, default: float) -> float:
    read = _number(env, name)
    if read is None:
        return default
    value = read[1]
    if value < 0:
        raise ConfigError(f"{name}={value} must not be negative")
    return value


def positive_float(env: Mapping[str, str], name: str, default: float) -> float:
    read = _number(env, name)
    if read is None:
        return default
    raw, value = read
    if value <= 0:
        raise ConfigError(f"{name}={raw!r} must be positive")
    return value
