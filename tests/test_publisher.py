"""The publisher against Channels' in-memory layer: coalescing, numbering, one terminal event, discard."""

from __future__ import annotations

import asyncio
import time

import pytest
from channels.layers import InMemoryChannelLayer

from inference.publisher import ChannelLayerPublisher, LoopThread
from inference.types import FinishReason, GenerationRequest

pytestmark = pytest.mark.no_database  # touches no database: run once, not again on PostgreSQL


@pytest.fixture
def setup():
    loop_thread = LoopThread("test-publisher")
    layer = InMemoryChannelLayer(capacity=1000)
    publisher = ChannelLayerPublisher(layer, loop_thread, flush_interval_s=0.05, worker="w1")
    channel = loop_thread.submit(layer.new_channel()).result(5)
    loop_thread.submit(layer.group_add("g", channel)).result(5)

    def received() -> list[dict]:
        publisher.drain()
        messages = []
        while True:
            try:
                messages.append(loop_thread.submit(asyncio.wait_for(layer.receive(channel), 0.05)).result(5))
            except TimeoutError:
                return messages

    yield publisher, received
    loop_thread.stop()


def _request(request_id: str) -> GenerationRequest:
    return GenerationRequest(request_id=request_id, group="g", messages=[], schema={})


def test_tokens_are_coalesced_numbered_and_end_with_one_terminal(setup) -> None:
    publisher, received = setup
    request = _request("r1")
    publisher.queued(request, 0)
    for piece in ["가", "나", "다", "라"]:
        publisher.token(request, piece)
    time.sleep(0.12)  # past one flush interval
    publisher.token(request, "마")
    publisher.done(request, {"recommend": "x", "challenges": []}, usage={}, timings={})
    publisher.token(request, "늦은 토큰")  # after the terminal event: dropped
    publisher.error(request, 500, "m", FinishReason.ERROR)  # a second terminal: dropped
    messages = received()
    assert [m["type"] for m in messages] == ["chat.queued", "chat.token", "chat.token", "chat.token", "chat.done"]
    assert [m["seq"] for m in messages] == [1, 2, 3, 4, 5]
    assert messages[0]["worker"] == "w1"
    # The first text goes out at once; the rest is coalesced per flush interval.
    assert [m["text"] for m in messages[1:4]] == ["가", "나다라", "마"]
    assert all(m["request_id"] == "r1" for m in messages)


def test_discard_drops_pending_tokens_and_everything_after(setup) -> None:
    publisher, received = setup
    request = _request("r2")
    publisher.token(request, "첫 텍스트")  # sent at once
    publisher.token(request, "보내지 않을 텍스트")  # pending when the request is discarded
    publisher.discard("r2")
    publisher.token(request, "늦은 텍스트")
    publisher.done(request, {"recommend": "x", "challenges": []}, usage={}, timings={})
    messages = received()
    assert [m.get("text") for m in messages] == ["첫 텍스트"]


def test_requests_are_numbered_independently(setup) -> None:
    publisher, received = setup
    a, b = _request("a"), _request("b")
    publisher.token(a, "1")
    publisher.token(b, "2")
    publisher.error(a, 504, "시간 초과", FinishReason.DEADLINE)
    publisher.done(b, {"recommend": "y", "challenges": []}, usage={}, timings={})
    messages = received()
    by_request = {rid: [m for m in messages if m["request_id"] == rid] for rid in ("a", "b")}
    assert [m["seq"] for m in by_request["a"]] == [1, 2] and by_request["a"][-1]["status"] == 504
    assert [m["seq"] for m in by_request["b"]] == [1, 2] and by_request["b"][-1]["type"] == "chat.done"


def test_events_published_right_after_start_are_not_lost() -> None:
    """The outbox exists before the sender task first runs (a worker restarting on a backlog)."""
    loop_thread = LoopThread("test-publisher-race")
    try:
        for attempt in range(30):
            layer = InMemoryChannelLayer(capacity=1000)
            channel = loop_thread.submit(layer.new_channel()).result(5)
            loop_thread.submit(layer.group_add("g", channel)).result(5)
            publisher = ChannelLayerPublisher(layer, loop_thread, flush_interval_s=0.05)
            request = _request(f"early-{attempt}")
            publisher.queued(request, 0)
            publisher.token(request, "텍스트")
            publisher.error(request, 503, "m", FinishReason.ERROR)
            publisher.drain()
            types = []
            for _ in range(3):
                types.append(loop_thread.submit(asyncio.wait_for(layer.receive(channel), 1)).result(5)["type"])
            assert types == ["chat.queued", "chat.token", "chat.error"], (attempt, types)
    finally:
        loop_thread.stop()
