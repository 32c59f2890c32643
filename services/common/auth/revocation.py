"""Key change notices over core NATS: every process drops a changed key from its cache at once.

The Keys service publishes `keys.revoked`, `keys.rotated` or `keys.updated` with
`{"key_id": "..."}` after committing the change (`publish_key_change`). Core NATS is
at-most-once, so a process that was disconnected may have missed notices: it clears its whole
cache when it notices a reconnect (the `reconnects` counter moved), and the cache TTL is the
last backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from services.common.events import Bus

log = logging.getLogger(__name__)

KEY_REVOKED = "keys.revoked"
KEY_ROTATED = "keys.rotated"
KEY_UPDATED = "keys.updated"
KEY_SUBJECTS = (KEY_REVOKED, KEY_ROTATED, KEY_UPDATED)

# Local listeners (the process's Authenticator) told synchronously on publish, so the
# publishing replica refuses a revoked key even before NATS echoes the notice back.
_local_listeners: list[Callable[[str], None]] = []


def add_local_listener(listener: Callable[[str], None]) -> None:
    _local_listeners.append(listener)


def remove_local_listener(listener: Callable[[str], None]) -> None:
    with contextlib.suppress(ValueError):
        _local_listeners.remove(listener)


async def publish_key_change(bus: Bus, subject: str, key_id: str) -> None:
    """Tell every replica that `key_id` changed. Call after the database commit."""
    if subject not in KEY_SUBJECTS:
        raise ValueError(f"subject must be one of {', '.join(KEY_SUBJECTS)}")
    for listener in list(_local_listeners):
        listener(key_id)
    await bus.nc.publish(subject, json.dumps({"key_id": key_id}).encode())
    try:
        await asyncio.wait_for(bus.nc.flush(), 2.0)  # out of our buffer before we answer
    except Exception as error:  # the change is committed; the cache TTL covers a lost notice
        log.warning("could not flush %s for key %s: %s", subject, key_id, error)


class KeyChangeListener:
    """Subscribes to the key subjects and calls `on_change(key_id)`; `check_reconnect()` calls
    `on_reset()` once per NATS reconnect (cheap: call it on every authentication)."""

    def __init__(
        self, bus: Bus, on_change: Callable[[str], None], on_reset: Callable[[], None]
    ) -> None:
        self._bus = bus
        self._on_change = on_change
        self._on_reset = on_reset
        self._subscriptions: list[Any] = []
        self._reconnects = self._reconnect_count()

    def _reconnect_count(self) -> int:
        stats = getattr(self._bus.nc, "stats", None) or {}
        return int(stats.get("reconnects", 0))

    @property
    def connected(self) -> bool:
        return bool(self._bus.nc.is_connected)

    async def start(self) -> None:
        async def handle(msg: Any) -> None:
            try:
                key_id = json.loads(msg.data)["key_id"]
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring malformed %s notice", msg.subject)
                return
            if isinstance(key_id, str):
                log.debug("%s: dropping key %s from the cache", msg.subject, key_id)
                self._on_change(key_id)

        for subject in KEY_SUBJECTS:
            self._subscriptions.append(await self._bus.nc.subscribe(subject, cb=handle))
        await self._bus.nc.flush()  # subscribed on the server before we serve

    def check_reconnect(self) -> None:
        count = self._reconnect_count()
        if count != self._reconnects:
            self._reconnects = count
            log.info("NATS reconnected: clearing the API key cache (notices may be lost)")
            self._on_reset()

    async def close(self) -> None:
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        self._subscriptions.clear()
