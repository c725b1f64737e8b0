"""The Spring contract and the WebSocket protocol against the live stack (daphne + Celery worker + Redis)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from chatbot import contract
from tests.helpers import (
    BASE_INFO,
    FREE_TEXT,
    SSEStream,
    assert_deltas_render_answer,
    assert_one_terminal_last,
    assert_valid_answer,
    get_sse,
    parse_sse,
    widget_browser,
    ws_exchange,
)

KOREAN_BASE_INFO = {"sessionId": "e2e-base", "location": "해안가", "workType": "사무직", "category": "제로웨이스트"}


@pytest.fixture
def client(stack):
    with httpx.Client(base_url=stack.base_url, timeout=60) as c:
        yield c


def test_healthz_and_page_answer(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    page = client.get("/")
    assert page.status_code == 200
    assert "친환경 챌린지" in page.text and "제로웨이스트" in page.text


def test_base_info_sse_streams_text_then_one_close(client: httpx.Client) -> None:
    stream = get_sse(client, BASE_INFO, KOREAN_BASE_INFO)
    assert stream.status_code == 200
    assert stream.headers["content-type"] == "text/event-stream"
    assert stream.headers["cache-control"] == "no-cache"
    assert stream.headers["x-accel-buffering"] == "no"
    assert "content-encoding" not in stream.headers
    assert len(stream.headers["x-request-id"]) == 32
    assert_one_terminal_last(stream)
    close = stream.terminal
    assert close.event == "close"
    assert close.data["status"] == 200 and close.data["message"] == "모든 챌린지 추천 완료"
    answer = close.data["data"]
    assert_valid_answer(answer, category="ZERO_WASTE")
    assert {c["label"] for c in answer["challenges"]} == {"제로웨이스트"}
    challenges = [e for e in stream.events if e.event == "challenge"]
    assert challenges, "no challenge deltas before close"
    assert all(e.data["status"] == 200 and e.data["message"] == "토큰 생성" for e in challenges)
    assert_deltas_render_answer(stream.text, answer)
    assert "\\u" not in stream.raw.decode(), "Korean must not be \\u-escaped on the wire"


def test_percent_encoded_korean_query_is_understood(client: httpx.Client) -> None:
    query = "&".join(f"{k}={quote(v)}" for k, v in {**KOREAN_BASE_INFO, "category": "비건"}.items())
    stream = get_sse(client, f"{BASE_INFO}?{query}", None)
    assert stream.terminal.event == "close"
    assert_valid_answer(stream.terminal.data["data"], category="VEGAN")
    assert stream.terminal.data["data"]["challenges"][0]["label"] == "비건"


def test_category_code_is_accepted_as_well_as_label(client: httpx.Client) -> None:
    stream = get_sse(client, BASE_INFO, {**KOREAN_BASE_INFO, "category": "PLOGGING"})
    assert stream.terminal.event == "close"
    assert_valid_answer(stream.terminal.data["data"], category="PLOGGING")


def test_free_text_sse_completes_with_categories_the_model_chose(client: httpx.Client) -> None:
    stream = get_sse(
        client, FREE_TEXT, {"sessionId": "e2e-free", "message": "요즘 전기 요금이 너무 많이 나와서 에너지를 아끼고 싶어요"}
    )
    assert_one_terminal_last(stream)
    assert stream.terminal.event == "close"
    answer = stream.terminal.data["data"]
    assert_valid_answer(answer)  # each category one of the active ones, with its label
    assert_deltas_render_answer(stream.text, answer)


@pytest.mark.parametrize(
    ("message", "reply"),
    [("비트코인 시세 알려 주세요", contract.REPLY_OFF_TOPIC), ("이 병신 같은 챗봇", contract.REPLY_ABUSE)],
    ids=["off-topic", "abuse"],
)
def test_off_topic_and_abusive_free_text_gets_a_polite_completed_answer(client: httpx.Client, message: str, reply: str) -> None:
    stream = get_sse(client, FREE_TEXT, {"sessionId": "e2e-moderation", "message": message})
    assert_one_terminal_last(stream)
    assert stream.terminal.event == "close" and stream.terminal.data["status"] == 200
    assert stream.terminal.data["data"] == {"recommend": reply, "challenges": []}
    assert stream.text == reply
    posted = client.post(FREE_TEXT, json={"sessionId": "e2e-moderation", "message": message}).json()
    assert posted["data"] == {"recommend": reply, "challenges": []}


def test_post_answers_one_json_document(client: httpx.Client) -> None:
    response = client.post(BASE_INFO, json=KOREAN_BASE_INFO)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["status"] == 200 and body["message"] == "모든 챌린지 추천 완료"
    assert_valid_answer(body["data"], category="ZERO_WASTE")
    free = client.post(FREE_TEXT, json={"sessionId": "e2e-post", "message": "일회용품을 줄이고 싶어요"})
    assert free.status_code == 200
    assert_valid_answer(free.json()["data"])


@pytest.mark.parametrize(
    ("path", "params", "invalid"),
    [
        (BASE_INFO, {"sessionId": "s", "location": "도시", "workType": "사무직"}, ["category"]),
        (BASE_INFO, {"sessionId": "", "location": "도시", "workType": "사무직", "category": "비건"}, ["sessionId"]),
        (BASE_INFO, {"sessionId": "s", "location": "   ", "workType": "사무직", "category": "비건"}, ["location"]),
        (BASE_INFO, {"sessionId": "s", "location": "도" * 51, "workType": "사무직", "category": "비건"}, ["location"]),
        (BASE_INFO, {"sessionId": "s", "location": "도시", "workType": "사무직", "category": "우주여행"}, ["category"]),
        (BASE_INFO, {}, ["sessionId", "location", "workType", "category"]),
        (FREE_TEXT, {"sessionId": "s"}, ["message"]),
        (FREE_TEXT, {"sessionId": "s", "message": "가" * 501}, ["message"]),
        (FREE_TEXT, {"sessionId": "s", "message": "안녕\x00하세요"}, ["message"]),
    ],
)
def test_bad_input_is_a_400_before_any_stream(client: httpx.Client, path: str, params: dict, invalid: list[str]) -> None:
    for response in (client.get(path, params=params), client.post(path, json=params)):
        assert response.status_code == 400
        assert response.headers["content-type"].startswith("application/json")
        body = response.json()
        assert body["status"] == 400 and body["message"]
        assert body["data"] == {"invalidFields": invalid}


def test_other_methods_get_a_json_405(client: httpx.Client) -> None:
    for path in (BASE_INFO, FREE_TEXT):
        response = client.put(path, json=KOREAN_BASE_INFO)
        assert response.status_code == 405 and response.headers["allow"] == "GET, POST"
        assert response.json()["status"] == 405 and response.json()["data"] is None


def test_post_with_a_body_that_is_not_a_json_object_is_a_400(client: httpx.Client) -> None:
    for content in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        response = client.post(BASE_INFO, content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400
        assert response.json()["data"] == {"invalidFields": ["body"]}


def test_six_concurrent_streams_each_end_with_exactly_one_terminal_event(client: httpx.Client, stack) -> None:
    def sse(i: int):
        if i % 2:
            return get_sse(client, FREE_TEXT, {"sessionId": f"c{i}", "message": f"플라스틱 쓰레기를 줄이고 싶어요 {i}"})
        return get_sse(client, BASE_INFO, {**KOREAN_BASE_INFO, "sessionId": f"c{i}"})

    def ws(i: int) -> list[dict]:
        return ws_exchange(stack, f"w{i}", {"type": "chat.message", "message": "고기를 줄여 보고 싶어요"})

    with ThreadPoolExecutor(max_workers=8) as pool:
        sse_futures = [pool.submit(sse, i) for i in range(4)]
        ws_futures = [pool.submit(ws, i) for i in range(2)]
        streams = [f.result(timeout=120) for f in sse_futures]
        frames = [f.result(timeout=120) for f in ws_futures]
    for stream in streams:
        assert_one_terminal_last(stream)
        assert stream.terminal.event == "close"
        assert_deltas_render_answer(stream.text, stream.terminal.data["data"])
    assert sum(s.pings for s in streams) > 0, "no `: ping` while waiting between coalesced events"
    for received in frames:
        terminal = [f for f in received if f["type"] in ("chat.done", "chat.error")]
        assert len(terminal) == 1 and received[-1] is terminal[0]
        assert terminal[0]["type"] == "chat.done"


def test_websocket_sends_each_challenge_card_as_soon_as_it_is_complete(stack) -> None:
    received = ws_exchange(stack, "ws-cards", {"type": "chat.message", "message": "분리배출을 제대로 하고 싶어요"})
    assert received[-1]["type"] == "chat.done"
    answer = received[-1]["data"]
    cards = [m for m in received if m["type"] == "chat.challenge"]
    assert [c["index"] for c in cards] == [0, 1, 2]
    assert [c["challenge"] for c in cards] == answer["challenges"]
    types = [m["type"] for m in received]
    # The first two cards arrive while the answer is still streaming (before its last text).
    last_token = max(i for i, t in enumerate(types) if t == "chat.token")
    assert types.index("chat.challenge") < last_token
    abuse = ws_exchange(stack, "ws-cards", {"type": "chat.message", "message": "닥쳐"})
    assert [m["type"] for m in abuse] == ["chat.token", "chat.done"]
    assert abuse[-1]["data"] == {"recommend": contract.REPLY_ABUSE, "challenges": []}


def test_websocket_base_info_streams_tokens_then_done(stack) -> None:
    received = ws_exchange(
        stack, "ws-base", {"type": "chat.base_info", "location": "산", "workType": "현장직", "category": "플로깅"}
    )
    types = [m["type"] for m in received]
    assert types[0] == "chat.queued" and received[0]["position"] >= 0 and len(received[0]["requestId"]) == 32
    assert types[-1] == "chat.done" and types.count("chat.done") == 1
    tokens = [m for m in received if m["type"] == "chat.token"]
    assert tokens and [t["seq"] for t in tokens] == sorted({t["seq"] for t in tokens})
    answer = received[-1]["data"]
    assert_valid_answer(answer, category="PLOGGING")
    assert_deltas_render_answer("".join(t["text"] for t in tokens), answer)


def test_websocket_bad_frames_get_400_and_the_socket_stays_usable(stack) -> None:
    received = ws_exchange(
        stack,
        "ws-bad",
        "{not json",
        json.dumps(["a", "list"]),
        {"type": "chat.dance"},
        {"type": "chat.base_info", "location": "도시", "workType": "사무직", "category": "없는카테고리"},
        {"type": "chat.message", "message": ""},
        {"type": "chat.message", "message": "자전거로 출퇴근하고 싶어요"},
        until=6,
    )
    errors = [m for m in received if m["type"] == "chat.error"]
    assert [e["status"] for e in errors] == [400, 400, 400, 400, 400]
    assert errors[3]["invalidFields"] == ["category"] and errors[4]["invalidFields"] == ["message"]
    assert all(e["message"] for e in errors)
    assert received[-1]["type"] == "chat.done", "the socket must still serve a valid request"


def test_websocket_second_request_while_one_runs_gets_409(stack) -> None:
    message = {"type": "chat.message", "message": "채식을 시작하고 싶어요"}
    received = ws_exchange(stack, "ws-busy", message, message, until=2)
    terminal = [m for m in received if m["type"] in ("chat.done", "chat.error")]
    assert [m.get("status") for m in terminal if m["type"] == "chat.error"] == [409]
    assert [m["type"] for m in terminal].count("chat.done") == 1


def test_websocket_stop_ends_the_request_with_one_499_and_nothing_after(stack) -> None:
    received = ws_exchange(
        stack, "ws-stop", {"type": "chat.message", "message": "텀블러를 쓰고 싶어요"}, {"type": "chat.stop"}, until=1
    )
    terminal = [m for m in received if m["type"] in ("chat.done", "chat.error")]
    assert len(terminal) == 1
    assert received[-1] is terminal[0], "nothing may follow the terminal frame (0.3 s watched)"
    assert terminal[0]["type"] == "chat.error" and terminal[0]["status"] == 499
    # The socket still serves the next request.
    again = ws_exchange(stack, "ws-stop", {"type": "chat.message", "message": "텀블러를 쓰고 싶어요"})
    assert again[-1]["type"] == "chat.done"


def test_websocket_rejects_a_foreign_origin(stack) -> None:
    with pytest.raises(Exception) as excinfo:
        with connect(f"{stack.ws_url}/ws/chat/x/", origin="http://evil.example", open_timeout=10):
            pass
    assert "403" in str(excinfo.value)


def test_a_widget_session_is_joined_only_from_the_browser_it_belongs_to(stack) -> None:
    """A `web-…` chat session is bound to the Django session of the browser that was given it."""
    session_id, headers = widget_browser(stack.base_url)
    with connect(f"{stack.ws_url}/ws/chat/{session_id}/", origin=stack.origin, open_timeout=10) as stranger:
        refused = json.loads(stranger.recv(timeout=10))
        assert (refused["type"], refused["status"]) == ("chat.error", 403)
        with pytest.raises(ConnectionClosed) as closed:
            stranger.recv(timeout=10)
        assert closed.value.rcvd.code == 4403
    with connect(f"{stack.ws_url}/ws/chat/{session_id}/", origin=stack.origin, additional_headers=headers) as own:
        own.send(json.dumps({"type": "chat.message", "message": "텀블러를 쓰고 싶어요"}))
        frames = [json.loads(own.recv(timeout=60))]
        while frames[-1]["type"] not in ("chat.done", "chat.error"):
            frames.append(json.loads(own.recv(timeout=60)))
    assert frames[-1]["type"] == "chat.done"


def test_a_slow_reader_loses_no_token(stack) -> None:
    """A client that reads 64 bytes every 50 ms still gets every delta: the text equals the answer's rendering."""
    params = {"sessionId": "slow-reader", "message": "텀블러를 쓰고 싶어요"}
    raw = b""
    with httpx.stream("GET", stack.base_url + FREE_TEXT, params=params, timeout=60) as response:
        for chunk in response.iter_raw(chunk_size=64):
            raw += chunk
            time.sleep(0.05)
    stream = SSEStream(response.status_code, response.headers, raw, parse_sse(raw))
    assert_one_terminal_last(stream)
    assert stream.terminal.event == "close"
    assert_deltas_render_answer(stream.text, stream.terminal.data["data"])


def test_a_reconnect_with_last_event_id_replays_what_was_missed(stack) -> None:
    params = {"sessionId": "resume-replay", "message": "텀블러를 쓰고 싶어요"}
    with httpx.stream("GET", stack.base_url + FREE_TEXT, params=params, timeout=60) as response:
        received = b""
        for chunk in response.iter_raw():
            received += chunk
            if b"event: challenge" in received:
                break  # the connection drops after the first delta
    complete = received[: received.rindex(b"\n\n") + 2]  # whole blocks only (pings and events)
    first = next(e for e in parse_sse(complete) if e is not None and e.event == "challenge")
    time.sleep(1.0)  # the answer goes on (and here ends) while the client is away
    with httpx.stream("GET", stack.base_url + FREE_TEXT, params=params, headers={"Last-Event-ID": str(first.id)}) as again:
        raw = again.read()
    resumed = SSEStream(again.status_code, again.headers, raw, parse_sse(raw))
    assert resumed.status_code == 200
    assert_one_terminal_last(resumed)
    assert resumed.events[0].id > first.id and resumed.terminal.event == "close"
    # Nothing lost, nothing twice: the first delta and the replayed ones make up the whole answer.
    assert_deltas_render_answer(first.data["data"] + resumed.text, resumed.terminal.data["data"])
    # After the terminal event there is nothing to resume: 204, and EventSource stops reconnecting.
    done = httpx.get(stack.base_url + FREE_TEXT, params=params, headers={"Last-Event-ID": str(resumed.terminal.id)})
    assert done.status_code == 204 and done.content == b""
    unknown = httpx.get(stack.base_url + FREE_TEXT, params={**params, "sessionId": "never-seen"}, headers={"Last-Event-ID": "3"})
    assert unknown.status_code == 204
    bad = httpx.get(stack.base_url + FREE_TEXT, params=params, headers={"Last-Event-ID": "three"})
    assert bad.status_code == 400 and bad.json()["data"]["invalidFields"] == ["Last-Event-ID"]


def test_sse_parser_rejects_malformed_streams() -> None:
    with pytest.raises(AssertionError):
        parse_sse(b"event: challenge\ndata: {}\n\n")
    with pytest.raises(AssertionError):
        parse_sse(b'id: 1\nevent: close\ndata: {"status":200,"message":"m","data":null}\n')


def test_metrics_include_the_workers_engine_figures(client: httpx.Client) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    stream = get_sse(client, FREE_TEXT, {"sessionId": "metrics", "message": "텀블러를 쓰고 싶어요"})
    assert stream.terminal.event == "close"

    def samples() -> dict[str, float]:
        response = client.get("/metrics")
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(response.text):
            for sample in family.samples:
                if "worker" in sample.labels:
                    key = sample.name + "".join(
                        f",{k}={v}" for k, v in sorted(sample.labels.items()) if k not in ("worker", "le")
                    )
                    found[key] = found.get(key, 0.0) + sample.value
        return found

    deadline = time.monotonic() + 10
    found = samples()
    while found.get("leafresh_request_finished_total,reason=stop", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.5)  # the worker publishes its figures with each heartbeat
        found = samples()
    assert found["leafresh_request_finished_total,reason=stop"] >= 1
    for reason in ("length", "cancelled", "error", "deadline"):
        assert f"leafresh_request_finished_total,reason={reason}" in found
    assert found["leafresh_time_to_first_token_seconds_count"] >= 1
    assert found["leafresh_inter_token_latency_seconds_count"] >= 10
    assert found["leafresh_e2e_request_latency_seconds_count"] >= 1
    assert found["leafresh_generation_tokens_total"] >= found["leafresh_inter_token_latency_seconds_count"]
    assert "leafresh_requests_running" in found and "leafresh_requests_waiting" in found
