"""Fuzzing the HTTP routes and the WebSocket with hypothesis, against the live stack: never a 5xx,
never a hang, always the documented answer (a 400 with invalidFields, a stream that ends with
exactly one terminal event, `chat.error` 400 on a socket that stays open)."""

from __future__ import annotations

import json
import urllib.parse

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from chatbot import contract
from inference.engine import MESSAGE_LENGTH
from tests.helpers import BASE_INFO, FREE_TEXT, SSEStream, assert_one_terminal_last, parse_sse

FIELDS = ["sessionId", "location", "workType", "category", "message"]
# Text as a client can send it (UTF-8 encodable: no lone surrogates).
TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
VALUES = st.one_of(
    TEXT,
    st.text(alphabet=st.characters(codec="utf-8"), min_size=490, max_size=530),  # around the 500-character limit
    st.sampled_from(
        ["도시", "해안가", "사무직", "재택근무", "제로웨이스트", "플로깅", "VEGAN", "텀블러를 쓰고 싶어요", "비트코인"]
    ),
    st.text(alphabet=st.sampled_from(list("\x00\x01\x1b\x7f\u200b\u2028 \n\t가")), max_size=6),
)
# Any text without control characters (what passes the field checks when short enough).
PRINTABLE = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1, max_size=60)
# Arbitrary field sets, and complete ones with one fuzzed value, so that many requests reach the model.
PARAMS = st.one_of(
    st.dictionaries(st.sampled_from([*FIELDS, "junk"]), VALUES, max_size=6),
    st.fixed_dictionaries({"sessionId": st.just("fuzz"), "message": PRINTABLE}),
    st.fixed_dictionaries({"sessionId": st.just("fuzz"), "location": PRINTABLE, "workType": PRINTABLE, "category": VALUES}),
)
JSON_VALUES = st.one_of(VALUES, st.integers(), st.none(), st.booleans(), st.lists(TEXT, max_size=2))
FUZZ = settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
TIMEOUT = httpx.Timeout(60.0, connect=10.0)  # "never a hang": every answer ends well within this


def _check_answer(response: httpx.Response, raw: bytes) -> None:
    event(f"HTTP {response.status_code}")  # `pytest --hypothesis-show-statistics` shows the mix
    assert response.status_code < 500, raw[:300]
    if response.status_code == 400:
        body = json.loads(raw)
        assert body["status"] == 400 and body["message"] and body["data"]["invalidFields"]
        return
    assert response.status_code == 200, (response.status_code, raw[:300])
    if response.headers["content-type"].startswith("text/event-stream"):
        stream = SSEStream(200, response.headers, raw, parse_sse(raw))
        assert_one_terminal_last(stream)
        terminal = stream.terminal
        if terminal.event == "error":  # a documented in-stream error, never an internal failure
            assert terminal.data["message"] != contract.MESSAGE_INTERNAL, terminal.data
    else:
        assert json.loads(raw)["status"] == 200


# twisted.web.http.HTTPChannel.totalHeadersSize: daphne's HTTP layer answers a plain 400, or drops
# the connection, when the request line and headers exceed it, before the application sees them.
HTTP_HEADERS_LIMIT = 16_384


def _get(client: httpx.Client, path: str, query: str) -> None:
    url = f"{path}?{query}"
    if len(url) > HTTP_HEADERS_LIMIT - 512:  # at or past the HTTP server's limit (headers take the rest)
        event("past the HTTP server's request-line limit")
        try:
            response = client.get(url)
        except httpx.RemoteProtocolError:
            return  # dropped by the HTTP server: no 5xx, no hang
        assert response.status_code == 400, response.status_code
        return
    with client.stream("GET", url) as response:
        _check_answer(response, response.read())


@pytest.fixture(scope="module")
def http(stack) -> httpx.Client:
    return httpx.Client(base_url=stack.base_url, timeout=TIMEOUT)


@FUZZ
@given(path=st.sampled_from([BASE_INFO, FREE_TEXT]), params=PARAMS)
def test_any_query_gets_a_400_or_a_stream_with_one_terminal_event(http: httpx.Client, path: str, params: dict) -> None:
    _get(http, path, urllib.parse.urlencode(params))


@FUZZ
@given(path=st.sampled_from([BASE_INFO, FREE_TEXT]), session=st.binary(max_size=24), message=st.binary(max_size=48))
def test_percent_encoded_bytes_that_are_not_utf8_get_a_clear_400(
    http: httpx.Client, path: str, session: bytes, message: bytes
) -> None:
    query = f"sessionId={urllib.parse.quote_from_bytes(session)}&message={urllib.parse.quote_from_bytes(message)}"
    try:
        session.decode("utf-8")
        message.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    with http.stream("GET", f"{path}?{query}") as response:
        raw = response.read()
    _check_answer(response, raw)
    if not valid:
        assert response.status_code == 400 and json.loads(raw)["data"]["invalidFields"] == ["query"]


@FUZZ
@given(
    path=st.sampled_from([BASE_INFO, FREE_TEXT]),
    body=st.one_of(
        st.binary(max_size=120),
        st.dictionaries(st.sampled_from([*FIELDS, "junk"]), JSON_VALUES, max_size=6).map(lambda d: json.dumps(d).encode()),
        PARAMS.map(lambda d: json.dumps(d).encode()),
        JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    ),
)
def test_any_post_body_gets_a_400_or_one_json_answer(http: httpx.Client, path: str, body: bytes) -> None:
    response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    _check_answer(response, response.content)


FRAME_TYPES = st.sampled_from(["chat.base_info", "chat.message", "chat.stop", "chat.unknown", "", None, 3])
FRAMES = st.one_of(
    st.text(max_size=60),
    st.binary(max_size=60),
    st.fixed_dictionaries({"type": FRAME_TYPES}, optional={name: JSON_VALUES for name in FIELDS}).map(json.dumps),
    st.text(max_size=20).map(lambda text: text + "가" * 8200),  # over the 8 KiB frame limit
)


@FUZZ
@given(frame=FRAMES)
def test_any_websocket_frame_gets_the_documented_answer_and_the_socket_stays_open(stack, frame: str | bytes) -> None:
    with connect(f"{stack.ws_url}/ws/chat/fuzz/", origin=stack.origin, open_timeout=10, max_size=None) as socket:
        socket.send(frame)
        try:
            kind = json.loads(frame).get("type") if isinstance(frame, str) else None
        except (ValueError, AttributeError):
            kind = None
        if kind != "chat.stop":  # a stop with nothing running has nothing to answer
            while True:
                reply = json.loads(socket.recv(timeout=60))
                if reply["type"] in ("chat.done", "chat.error"):
                    break
            if reply["type"] == "chat.error":  # a client error, or the model running out of its budget
                assert 400 <= reply["status"] < 500 or reply["message"] == MESSAGE_LENGTH, reply
                assert reply["message"]
        socket.send("{not json")  # still open and answering
        assert json.loads(socket.recv(timeout=10)) == {"type": "chat.error", "status": 400, "message": contract.MESSAGE_BAD_FRAME}
