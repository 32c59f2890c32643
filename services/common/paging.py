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
from collections.abc import Mapping
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
