"""Faults against a live stack serving a slow model: disconnect, stop, and a worker killed mid-answer.

Each answer of the slow random model streams for many seconds, so a test can act in the middle of
one. The worker-kill test runs last in this module (it leaves the stack without a worker).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import httpx
from websockets.sync.client import connect

from chatbot import contract
from tests.helpers import (
    FREE_TEXT,
    SSEStream,
    assert_one_terminal_last,
    cancelled_in_engine,
    eventually,
    parse_sse,
    stream_until_first_delta_then,
)
from tests.stack import BIN, ROOT, launch_web


def _inject(stack, session: str, event: dict) -> None:
    """Publish `event` to the session's group from another process, as a broken or lossy worker would."""
    code = (
        "import asyncio; from channels.layers import get_channel_layer; "
        "from chatbot.services import session_group_name; "
        f"asyncio.run(get_channel_layer().group_send(session_group_name({session!r}), {event!r}))"
    )
    subprocess.run([str(BIN / "python"), "manage.py", "shell", "-c", code], cwd=ROOT, env=stack.env, check=True)


def _stream_with_injected(stack, session: str, make_event) -> tuple[SSEStream, float, str]:
    """Open a stream, and once its first delta arrived inject `make_event(request_id)` into the
    session's group; return the stream, the seconds it took to end after the injection, its request id."""
    with httpx.Client(base_url=stack.base_url, timeout=60) as client:
        stream, ended_after = stream_until_first_delta_then(client, session, lambda rid: _inject(stack, session, make_event(rid)))
    return stream, ended_after, stream.headers["X-Request-ID"]


def test_a_malformed_event_mid_answer_ends_the_stream_with_one_error_within_a_second(slow_stack) -> None:
    stream, ended_after, request_id = _stream_with_injected(
        slow_stack, "inject-bad", lambda rid: {"type": "chat.token", "request_id": rid, "seq": "not-a-number", "text": "x"}
    )
    assert_one_terminal_last(stream)
    assert stream.terminal.event == "error" and stream.terminal.data["status"] == 500
    assert ended_after < 1.0, f"the stream ended {ended_after:.2f} s after the failure"
    assert eventually(lambda: cancelled_in_engine(slow_stack, request_id), 10), "the engine did not cancel the request"


def test_lost_events_end_the_stream_with_one_clear_error_never_a_silently_cut_text(slow_stack) -> None:
    stream, ended_after, request_id = _stream_with_injected(
        slow_stack, "inject-gap", lambda rid: {"type": "chat.token", "request_id": rid, "seq": 100_000, "text": "x"}
    )
    assert_one_terminal_last(stream)
    assert stream.terminal.event == "error" and stream.terminal.data["status"] == 502
    assert stream.terminal.data["message"] == contract.MESSAGE_EVENTS_LOST
    assert ended_after < 1.0
    assert eventually(lambda: cancelled_in_engine(slow_stack, request_id), 10), "the engine did not cancel the request"


def test_a_duplicate_event_mid_answer_is_dropped_and_the_answer_goes_on(slow_stack) -> None:
    params = {"sessionId": "inject-dup", "message": "자전거를 타고 싶어요"}
    with httpx.Client(base_url=slow_stack.base_url, timeout=60) as client:
        with client.stream("GET", FREE_TEXT, params=params) as response:
            request_id = response.headers["X-Request-ID"]
            chunks = response.iter_raw()
            received = b""
            injected = False
            for chunk in chunks:
                received += chunk
                if not injected and received.count(b"event: challenge") >= 2:
                    # Event 2 (the first delta) delivered again, with other text: the listener must drop it.
                    event = {"type": "chat.token", "request_id": request_id, "seq": 2, "text": "DUPLICATE"}
                    _inject(slow_stack, "inject-dup", event)
                    injected = True
                if received.count(b"event: challenge") >= 12:
                    break
    events = [e for e in parse_sse(received[: received.rindex(b"\n\n") + 2]) if e is not None]
    assert all(e.event == "challenge" for e in events), [e.event for e in events]
    assert "DUPLICATE" not in "".join(e.data["data"] for e in events)
    ids = [e.id for e in events]
    assert ids == sorted(set(ids)), ids


def test_sse_client_disconnect_cancels_the_generation(slow_stack) -> None:
    with httpx.Client(base_url=slow_stack.base_url, timeout=30) as client:
        with client.stream("GET", FREE_TEXT, params={"sessionId": "gone", "message": "일회용품을 줄이고 싶어요"}) as response:
            assert response.status_code == 200
            request_id = response.headers["x-request-id"]
            received = b""
            for chunk in response.iter_raw():
                received += chunk
                if b"event: challenge" in received:
                    break  # leave mid-answer: the connection closes here
    assert eventually(lambda: cancelled_in_engine(slow_stack, request_id), 10), "the engine did not cancel the request"


def _read_until(response: httpx.Response, count: int) -> bytes:
    """Read a stream until `count` `challenge` events arrived (then the caller leaves)."""
    received = b""
    for chunk in response.iter_raw():
        received += chunk
        if received.count(b"event: challenge") >= count:
            return received
    raise AssertionError("the stream ended early")


def test_a_reconnect_with_last_event_id_continues_a_live_answer_on_another_process(slow_stack) -> None:
    params = {"sessionId": "resume-live", "message": "일회용품을 줄이고 싶어요"}
    with httpx.Client(base_url=slow_stack.base_url, timeout=30) as client:
        with client.stream("GET", FREE_TEXT, params=params) as response:
            request_id = response.headers["x-request-id"]
            first = [e for e in parse_sse(_read_until(response, 3)) if e is not None and e.event == "challenge"][:3]
    seen = first[-1].id
    with launch_web(slow_stack, "resume", {}) as other:  # any web process may serve the reconnect
        with httpx.Client(base_url=other, timeout=60) as client:
            with client.stream("GET", FREE_TEXT, params=params, headers={"Last-Event-ID": str(seen)}) as response:
                assert response.status_code == 200 and response.headers["x-request-id"] == request_id
                rest = [e for e in parse_sse(_read_until(response, 20)) if e is not None]
        assert [e.id for e in rest] == sorted({e.id for e in rest}) and rest[0].id > seen
        # Live: it kept generating while nobody listened, and went on streaming to the new connection.
        assert len(rest) >= 20
        assert not cancelled_in_engine(slow_stack, request_id)
    # Both clients are gone now: after the grace period the generation is cancelled.
    assert eventually(lambda: cancelled_in_engine(slow_stack, request_id), 15), "the engine did not cancel the request"


def test_websocket_stop_mid_answer_cancels_the_generation(slow_stack) -> None:
    with connect(f"{slow_stack.ws_url}/ws/chat/stopper/", origin=slow_stack.origin, open_timeout=10) as socket:
        socket.send(json.dumps({"type": "chat.message", "message": "채식을 해 보고 싶어요"}))
        queued = json.loads(socket.recv(timeout=30))
        assert queued["type"] == "chat.queued"
        request_id = queued["requestId"]
        while json.loads(socket.recv(timeout=30))["type"] != "chat.token":
            pass
        socket.send(json.dumps({"type": "chat.stop"}))
        frames = []
        while not frames or frames[-1]["type"] not in ("chat.done", "chat.error"):
            frames.append(json.loads(socket.recv(timeout=10)))
        assert frames[-1] == {"type": "chat.error", "status": 499, "message": "답변 생성을 중단했습니다."}
        assert all(f["type"] == "chat.token" for f in frames[:-1])
        try:
            extra = socket.recv(timeout=1.0)
        except TimeoutError:
            extra = None
        assert extra is None, f"a frame arrived after the terminal one: {extra}"
    assert eventually(lambda: cancelled_in_engine(slow_stack, request_id), 10), "the engine did not cancel the request"
    shown = "".join(f["text"] for f in frames[:-1])
    turns = httpx.get(f"{slow_stack.base_url}/ai/chatbot/sessions/stopper/messages").json()["data"]["turns"]
    assert [(t["requestId"], t["finishReason"], t["answer"]) for t in turns] == [(request_id, "cancelled", None)]
    assert shown in turns[0]["answerText"] and turns[0]["answerText"]  # the text shown, kept in the history


def test_closing_the_socket_mid_answer_cancels_the_generation(slow_stack) -> None:
    with connect(f"{slow_stack.ws_url}/ws/chat/closer/", origin=slow_stack.origin, open_timeout=10) as socket:
        socket.send(json.dumps({"type": "chat.message", "message": "전기를 아끼고 싶어요"}))
        request_id = json.loads(socket.recv(timeout=30))["requestId"]
        while json.loads(socket.recv(timeout=30))["type"] != "chat.token":
            pass
    assert eventually(lambda: cancelled_in_engine(slow_stack, request_id), 10), "the engine did not cancel the request"


def test_past_the_bounds_a_request_gets_503_at_once_and_a_waiting_socket_sees_its_position(slow_stack) -> None:
    # The slow stack runs 2 requests and lets 1 wait: fill the batch with two sockets, then a third waits.
    sockets = [connect(f"{slow_stack.ws_url}/ws/chat/fill-{i}/", origin=slow_stack.origin, open_timeout=10) for i in range(3)]
    try:
        positions = []
        for socket in sockets:
            socket.send(json.dumps({"type": "chat.message", "message": "쓰레기를 줄이고 싶어요"}))
            frame = json.loads(socket.recv(timeout=30))
            assert frame["type"] == "chat.queued"
            positions.append(frame["position"])
        assert positions == [0, 0, 1]
        with httpx.Client(base_url=slow_stack.base_url, timeout=30) as client:
            started = time.monotonic()
            response = client.get(FREE_TEXT, params={"sessionId": "one-too-many", "message": "쓰레기를 줄이고 싶어요"})
            events = [b for b in parse_sse(response.content) if b is not None]
            assert [e.event for e in events] == ["error"] and events[0].data["status"] == 503
            assert events[0].data["message"]
            assert time.monotonic() - started < 3, "a refused request must not wait"
    finally:
        for socket in sockets:
            socket.close()


def _publisher_of(worker_pid: int):
    """The worker's publisher process: its one live child that is not multiprocessing's resource
    tracker (short-lived children that have exited but are not reaped yet are skipped)."""
    import psutil

    live = []
    for child in psutil.Process(worker_pid).children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(child.cmdline()):
                live.append(child)
        except psutil.Error:  # gone, or turned zombie, meanwhile
            continue
    assert len(live) == 1, [c.pid for c in live]
    return live[0]


def test_the_publisher_process_dying_mid_answer_ends_the_stream_with_503(slow_model_dir) -> None:
    from tests.stack import launch_stack

    env = {"LEAFRESH_MODEL": str(slow_model_dir), "LEAFRESH_HEARTBEAT_TTL_S": "2"}
    with launch_stack("pubdeath", env) as stack, httpx.Client(base_url=stack.base_url, timeout=60) as client:

        def kill_publisher(request_id: str) -> None:
            _publisher_of(stack.worker.pid).kill()

        stream, ended_after = stream_until_first_delta_then(client, "orphan", kill_publisher)
        assert_one_terminal_last(stream)
        assert stream.terminal.event == "error" and stream.terminal.data["status"] == 503
        assert ended_after < 10, f"the stream took {ended_after:.1f} s to end after the publisher died"


def test_an_idle_worker_whose_publisher_dies_exits(demo_model_dir) -> None:
    from tests.stack import launch_stack

    with launch_stack("idledeath", {"LEAFRESH_HEARTBEAT_TTL_S": "2"}) as stack:
        _publisher_of(stack.worker.pid).kill()
        # The next heartbeat notices: the worker exits (EX_SOFTWARE) instead of refusing work forever.
        assert stack.worker.wait(timeout=15) == 70


def test_worker_killed_mid_answer_ends_the_stream_with_503_then_new_requests_fail_fast(slow_stack) -> None:
    with httpx.Client(base_url=slow_stack.base_url, timeout=60) as client:
        stream, ended_after = stream_until_first_delta_then(
            client, "victim", lambda _: os.killpg(slow_stack.worker.pid, signal.SIGKILL)
        )
        assert_one_terminal_last(stream)
        assert stream.terminal.event == "error" and stream.terminal.data["status"] == 503
        assert stream.terminal.data["message"] and stream.terminal.data["data"] is None
        assert ended_after < 10, f"the stream took {ended_after:.1f} s to end after the worker died"

        started = time.monotonic()
        again = client.get(FREE_TEXT, params={"sessionId": "after", "message": "자전거를 타고 싶어요"})
        events = [b for b in parse_sse(again.content) if b is not None]
        assert [e.event for e in events] == ["error"] and events[0].data["status"] == 503
        assert time.monotonic() - started < 2, "with no live worker a request must fail fast"
