"""The reference agent worker: `python -m services.gateway.worker`.

For every partition it serves (SOMA_WORKER_PARTITIONS, default all) it pulls user messages
from the partition's durable consumer, runs the requested tool, and publishes the reply. Tool
results are cached in the JetStream KV bucket `tool-cache`, keyed by (tenant, tool, hash of the
input). It is idempotent under redelivery: the reply is published with `Nats-Msg-Id =
reply-<message id>`, so a message redelivered after a crash yields one stored reply, and the
message is acknowledged only after JetStream acknowledged the reply.

It serves grpc.health.v1 (service `soma.gateway.v1.Worker`) so the supervisor and operators
check it like every other part.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import signal

from nats.aio.msg import Msg
from nats.js.errors import BucketNotFoundError, FetchTimeoutError, KeyNotFoundError
from nats.js.kv import KeyValue

from services.common import metrics, tracing
from services.common.config import Config, load_config
from services.common.events import Bus, connect
from services.common.logs import configure_logging
from services.common.server import create_server, setup_metrics
from services.gateway import queue
from services.gateway.tools import TOOLS

log = logging.getLogger(__name__)

HEALTH_NAME = "soma.gateway.v1.Worker"
CACHE_TTL_SECONDS = 24 * 3600
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_=-]")


def cache_key(tenant: str, tool: str, content: str) -> str:
    digest = hashlib.sha256(content.encode()).hexdigest()
    return f"{_KEY_UNSAFE.sub('_', tenant)}.{tool}.{digest}"


async def open_cache(bus: Bus) -> KeyValue:
    try:
        return await bus.js.key_value(queue.TOOL_CACHE_BUCKET)
    except BucketNotFoundError:
        return await bus.js.create_key_value(
            bucket=queue.TOOL_CACHE_BUCKET, history=1, ttl=CACHE_TTL_SECONDS
        )


async def answer(job: queue.Job, cache: KeyValue) -> queue.Reply:
    tool = TOOLS.get(job.tool)
    if tool is None:
        return queue.Reply(
            job.message_id,
            job.session_id,
            job.tenant,
            job.partition,
            job.tool,
            "",
            cache_hit=False,
            error=f"unknown tool {job.tool!r}",
        )
    key = cache_key(job.tenant, job.tool, job.content)
    try:
        entry = await cache.get(key)
        if entry.value is not None:
            metrics.cache_lookup("tool_result", True)
            return queue.Reply(
                job.message_id,
                job.session_id,
                job.tenant,
                job.partition,
                job.tool,
                entry.value.decode(),
                cache_hit=True,
            )
    except KeyNotFoundError:
        pass
    metrics.cache_lookup("tool_result", False)
    result = tool(job.content)
    await cache.put(key, result.encode())
    return queue.Reply(
        job.message_id, job.session_id, job.tenant, job.partition, job.tool, result, cache_hit=False
    )


async def serve_partition(bus: Bus, cache: KeyValue, partition: int, stop: asyncio.Event) -> None:
    consumer = queue.worker_consumer(partition)
    subscription = await bus.js.pull_subscribe_bind(durable=consumer, stream=queue.STREAM)
    log.info("serving partition %d", partition)
    while not stop.is_set():
        try:
            messages = await subscription.fetch(batch=20, timeout=1.0)
        except (FetchTimeoutError, TimeoutError):
            continue
        except Exception as error:  # NATS restarting: wait and fetch again
            log.warning("partition %d: fetch failed: %s", partition, error)
            await asyncio.sleep(0.5)
            continue
        for msg in messages:
            metrics.received(consumer, msg.reply)
            # Continues the Gateway's trace; the reply's traceparent points back here.
            with tracing.consume_span(consumer, msg.subject, msg.headers):
                await handle(bus, cache, msg)


async def handle(bus: Bus, cache: KeyValue, msg: Msg) -> None:
    """Answers one user message: reply published (deduplicated), then the message acked."""
    try:
        job = queue.Job.decode(msg.data)
    except (ValueError, TypeError) as error:
        log.error("terminating malformed message on %s: %s", msg.subject, error)
        await msg.term()
        return
    try:
        reply = await answer(job, cache)
        await bus.publish(
            queue.reply_subject(job.partition, job.session_id),
            reply.encode(),
            stream=queue.STREAM,
            msg_id=queue.reply_msg_id(job.message_id),
        )
        await msg.ack()
        metrics.acked(queue.worker_consumer(job.partition))
        log.info(
            "answered %s with %s (cache %s)",
            job.message_id,
            job.tool,
            "hit" if reply.cache_hit else "miss",
        )
    except Exception as error:
        # Not acknowledged: JetStream redelivers it after ack_wait; a NAK speeds that up.
        log.warning("message %s not answered yet: %s", job.message_id, error)
        with contextlib.suppress(Exception):
            await msg.nak(delay=1.0)


def assigned_partitions(config: Config, env: dict[str, str]) -> list[int]:
    raw = env.get("SOMA_WORKER_PARTITIONS", "").strip()
    if not raw:
        return list(range(config.partitions))
    return sorted({int(p) for p in raw.split(",")})


async def run(config: Config, partitions: list[int]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bus = await connect(config.nats, config.server.replica)
    await queue.ensure_queue(bus.js, config.partitions)
    cache = await open_cache(bus)
    setup_metrics(config)
    running = await create_server(config, [HEALTH_NAME], lambda server: None)
    tasks = [asyncio.create_task(serve_partition(bus, cache, p, stop)) for p in partitions]
    await running.set_serving(True)
    print(f"SOMA_READY worker {config.server.host}:{running.port}", flush=True)
    await stop.wait()
    await running.health.enter_graceful_shutdown()
    # Let in-flight messages finish (each fetch loop checks `stop` between batches).
    await asyncio.wait(tasks, timeout=config.server.grace_seconds)
    for task in tasks:
        task.cancel()
    await running.server.stop(1.0)
    await bus.close()
    log.info("stopped")


def main() -> None:
    env = dict(os.environ)
    config = load_config("worker", env)
    configure_logging(config.log, "worker", config.server.replica)
    tracing.setup_tracing("worker", config.server.replica, env)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run(config, assigned_partitions(config, env)))
    finally:
        tracing.shutdown_tracing()


if __name__ == "__main__":
    main()
