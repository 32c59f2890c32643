"""AIP-158 pagination: page sizes and opaque, tamper-evident page tokens.

A token encodes the position after the last item returned plus a fingerprint of the query
(the filter fields), so a token reused with a different filter, or edited by hand, is refused
with INVALID_ARGUMENT instead of silently returning the wrong page.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from services.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidArgument(
            f"page_size must not be negative (got {requested}); use 0 for the default "
            f"of {DEFAULT_PAGE_SIZE}",
            field="page_size",
        )
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _fingerprint(query: Mapping[str, Any]) -> str:
    canonical = json.dumps(query, sort_keys=True, default=str).encode()
    return hashlib.sha256(canonical).hexdigest()[:16]


def encode_token(position: Mapping[str, Any], query: Mapping[str, Any]) -> str:
    body = json.dumps({"p": position, "q": _fingerprint(query)}, sort_keys=True).encode()
    return base64.urlsafe_b64encode(body).decode().rstrip("=")


def decode_token(token: str, query: Mapping[str, Any]) -> dict[str, Any] | None:
    """The position in `token`, or None for an empty token (the first page)."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw)
        position, fingerprint = body["p"], body["q"]
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidArgument(
            "page_token is not a token this API issued; pass the next_page_token of the "
            "previous response unchanged, or omit it for the first page",
            field="page_token",
        ) from None
    if fingerprint != _fingerprint(query) or not isinstance(position, dict):
        raise InvalidArgument(
            "page_token belongs to a different query; repeat the same filters as the call "
            "that returned it, or start again without a token",
            field="page_token",
        )
    return position


def split_page(rows: Sequence[Mapping[str, Any]], limit: int, key: str) -> tuple[list[Any], Any]:
    """A page fetched with `LIMIT limit + 1`: the first `limit` rows and the `key` of the last
    of them when there is a next page (the extra row), else None."""
    page = list(rows[:limit])
    return page, (page[-1][key] if len(rows) > limit else None)


def decode_pos(token: str, query: Mapping[str, Any]) -> int | None:
    """The `pos` a token of `encode_pos` carries (the position to continue from), or None for an
    empty token (the first page)."""
    position = decode_token(token, query)
    return int(position["pos"]) if position else None


def encode_pos(last_pos: int | None, query: Mapping[str, Any]) -> str:
    """The next page token after `last_pos`, or "" when there is no next page."""
    return encode_token({"pos": last_pos}, query) if last_pos is not None else ""
