"""Soma Mesh client: the typed async SDK (`SomaClient`) and the `soma` CLI."""

from services.client._retry import RetryPolicy
from services.client.errors import ApiError, redact
from services.client.sdk import DEFAULT_TARGET, ClientConfig, SomaClient

__all__ = ["DEFAULT_TARGET", "ApiError", "ClientConfig", "RetryPolicy", "SomaClient", "redact"]
