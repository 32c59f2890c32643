"""Human durations for the CLI: `30d`, `24h`, `90m`, `45s`, `1h30m`, `2w`, `0s`."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_PART = re.compile(r"(\d+)([wdhms])")
_WHOLE = re.compile(r"^(?:\d+[wdhms])+$")


def parse_duration(text: str) -> timedelta:
    """`1h30m` -> 5400 s. Raises ValueError (with a usable message) for anything else."""
    value = text.strip().lower()
    if not _WHOLE.match(value):
        raise ValueError(
            f"invalid duration {text!r}: use a number and a unit (s, m, h, d, w), e.g. 30d or 1h30m"
        )
    seconds = sum(int(n) * _UNITS[unit] for n, unit in _PART.findall(value))
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta) -> str:
    """The inverse, for messages: 90061 s -> `1d1h1m1s`; zero -> `0s`."""
    seconds = int(delta.total_seconds())
    if seconds <= 0:
        return "0s"
    out = []
    for unit, size in _UNITS.items():
        if unit == "w":
            continue  # days read better than weeks in output
        count, seconds = divmod(seconds, size)
        if count:
            out.append(f"{count}{unit}")
    return "".join(out)
