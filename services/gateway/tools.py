"""The reference agent's tools: small, deterministic functions of a message's text.

Deterministic on purpose: the worker caches results by (tenant, tool, hash of the input), and
a redelivered message must produce the same reply.
"""

from __future__ import annotations

import json
from collections.abc import Callable


def echo(text: str) -> str:
    return text


def wordcount(text: str) -> str:
    return json.dumps(
        {"words": len(text.split()), "lines": len(text.splitlines()), "characters": len(text)},
        sort_keys=True,
    )


def reverse(text: str) -> str:
    return text[::-1]


TOOLS: dict[str, Callable[[str], str]] = {"echo": echo, "wordcount": wordcount, "reverse": reverse}
DEFAULT_TOOL = "echo"
