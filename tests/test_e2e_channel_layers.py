"""Both channel-layer backends end to end, and what keeps a web process and a worker on different
layers from waiting on each other.

The Pub/Sub layer (the default) runs every other e2e test; here the list-based `core` layer serves
the same SSE and WebSocket exchanges, listeners are shown to leave no subscription behind, and a
web process on the other layer answers 503 at once instead of waiting for an acceptance that
cannot arrive.
"""

from __future__ import annotations

import time

import httpx

from tests.helpers import (
    BASE_INFO,
    FREE_TEXT,
    assert_deltas_render_answer,
    assert_one_terminal_last,
    assert_valid_answer,
    get_sse,
    ws_exchange,
)
from tests.stack import launch_stack, launch_web

PARAMS = {"sessionId": "layers", "location": "도시", "workType": "영업직", "category": "제로웨이스트"}


def _pubsub_channels(stack) -> set[str]:
    return {name.decode() for name in stack.redis.pubsub_channels(f"{stack.prefix}:asgi:*")}


def test_core_layer_serves_sse_and_websocket_requests(demo_model_dir) -> None:
    with launch_stack("core", {"LEAFRESH_CHANNEL_BACKEND": "core"}) as stack:
        with httpx.Client(base_url=stack.base_url, timeout=60) as client:
            stream = get_sse(client, BASE_INFO, PARAMS)
        assert_one_terminal_last(stream)
        assert stream.terminal.event == "close"
        assert_valid_answer(stream.terminal.data["data"], category="ZERO_WASTE")
        assert_deltas_render_answer(stream.text, stream.terminal.data["data"])
        done = ws_exchange(stack, "layers-ws", {"type": "chat.message", "message": "자전거로 출퇴근하고 싶어요"})
        assert [m["type"] for m in done].count("chat.done") == 1 and done[-1]["type"] == "chat.done"
        message = {"type": "chat.message", "message": "텀블러를 쓰고 싶어요"}
        stopped = ws_exchange(stack, "layers-ws", message, {"type": "chat.stop"})
        terminal = [m for m in stopped if m["type"] in ("chat.done", "chat.error")]
        assert len(terminal) == 1 and stopped[-1] is terminal[0]
        assert terminal[0]["type"] == "chat.error" and terminal[0]["status"] == 499


def test_pubsub_listeners_leave_no_subscription_behind(stack) -> None:
    with httpx.Client(base_url=stack.base_url, timeout=60) as client:
        assert get_sse(client, BASE_INFO, PARAMS).terminal.event == "close"  # the web process is warm
        before = _pubsub_channels(stack)
        standing = {name for name in before if ":asgi:standing." in name}
        assert len(standing) == 1, f"the web process holds one standing subscription: {sorted(before)}"
        for i in range(3):
            stream = get_sse(client, FREE_TEXT, {"sessionId": f"leak-{i}", "message": "분리수거를 잘하고 싶어요"})
            assert stream.terminal.event == "close"
        ws_exchange(stack, "leak-ws", {"type": "chat.message", "message": "채식을 시작하고 싶어요"}, {"type": "chat.stop"})
    deadline = time.monotonic() + 5
    while _pubsub_channels(stack) != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _pubsub_channels(stack) == before, "a finished listener is still subscribed"


def test_a_web_process_on_the_other_layer_sees_no_worker_and_answers_503_at_once(stack) -> None:
    # Were the worker's heartbeat visible to it, this web process would wait the full minute for an
    # acceptance that cannot arrive on its layer.
    other_layer = {"LEAFRESH_CHANNEL_BACKEND": "core", "LEAFRESH_ACCEPT_TIMEOUT_S": "60"}
    with launch_web(stack, "core", other_layer) as base_url:
        with httpx.Client(base_url=base_url, timeout=120) as client:
            started = time.monotonic()
            stream = get_sse(client, BASE_INFO, PARAMS)
            took = time.monotonic() - started
    assert_one_terminal_last(stream)
    assert stream.terminal.event == "error" and stream.terminal.data["status"] == 503
    assert took < 30, f"the 503 took {took:.1f} s: the web process waited for an acceptance"
