"""A pull consumer fed through a core-NATS subscription callback.

nats-py's `fetch()` waits for each message of a batch with its own `wait_for` (a task per
message), which costs more than everything else the writer does per event. Here one pull
request at a time stays open on the durable consumer (`$JS.API.CONSUMER.MSG.NEXT.<stream>.
<consumer>`, replies to a private inbox): delivered messages are decoded in the subscription's
callback and buffered; `take()` hands the writer whatever is buffered. The window bounds the
messages requested but not yet released (acked or abandoned) by the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

T = TypeVar("T")

_DONE_STATUSES = {"404", "408", "409"}  # no messages / request expired / conflict: pull again


class PullFeed(Generic[T]):
    def __init__(
        self,
        nc: Client,
        stream: str,
        consumer: str,
        decode: Callable[[Msg], Awaitable[T | None]],
        *,
        window: int = 4000,
        expires: float = 2.0,
    ) -> None:
        self.nc = nc
        self.subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.decode = decode  # None: the message was dealt with (e.g. terminated)
        self.window = window
        self.expires = expires
        self._buffer: list[tuple[T, Msg]] = []
        self._held = 0  # taken by the writer, not yet released
        self._requested = 0  # of the open pull request, not yet delivered
        self._ready = asyncio.Event()
        self._inbox = ""
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self._inbox, cb=self._on_msg)
        await self._pull()

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _pull(self) -> None:
        credit = self.window - len(self._buffer) - self._held
        if self._requested or credit < self.window // 4:
            return  # a request is open, or too little room to be worth one
        request = {"batch": credit, "expires": int(self.expires * 1e9)}
        self._requested = credit
        try:
            await self.nc.publish(self.subject, json.dumps(request).encode(), reply=self._inbox)
        except Exception as error:  # disconnected: take() pulls again after its timeout
            self._requested = 0
            log.debug("pull request not sent: %s", error)

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        if headers and not msg.data and "Status" in headers:
            if headers["Status"] in _DONE_STATUSES:
                self._requested = 0
                if headers["Status"] == "409":
                    log.warning("pull request refused: %s", headers.get("Description", ""))
                    await asyncio.sleep(0.5)
                await self._pull()
            return  # 100: heartbeat / flow control
        self._requested = max(self._requested - 1, 0)
        item = await self.decode(msg)
        if item is not None:
            self._buffer.append((item, msg))
            self._ready.set()
        if not self._requested:
            await self._pull()

    async def take(self, limit: int) -> list[tuple[T, Msg]]:
        """Waits for at least one message; returns up to `limit`, which the caller must
        `release` once it acked (or gave up on) them."""
        while not self._buffer:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), self.expires + 1.0)
            except TimeoutError:
                # The open request should have expired with a 408 by now: it was lost (NATS
                # restarted or we reconnected), so ask again.
                self._requested = 0
                await self._pull()
        taken, self._buffer = self._buffer[:limit], self._buffer[limit:]
        self._held += len(taken)
        return taken

    async def release(self, count: int) -> None:
        self._held -= count
        await self._pull()
