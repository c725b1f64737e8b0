"""Test helpers: a strict SSE wire parser and the checks every stream must pass."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import psutil
from websockets.sync.client import connect

from chatbot import seed
from inference.answer import DESCRIPTION_MAX_CHARS, RECOMMEND_MAX_CHARS, TITLE_MAX_CHARS
from inference.render import render_answer

LABELS = {c["code"]: c["label"] for c in seed.CATEGORIES}

TERMINAL = {"close", "error"}
BASE_INFO = "/ai/chatbot/recommendation/base-info"
FREE_TEXT = "/ai/chatbot/recommendation/free-text"


@dataclass
class SSEEvent:
    id: int
    event: str
    data: dict[str, Any]


@dataclass
class SSEStream:
    status_code: int
    headers: httpx.Headers
    raw: bytes
    blocks: list[SSEEvent | None]  # None is a `: ping` comment

    @property
    def events(self) -> list[SSEEvent]:
        return [b for b in self.blocks if b is not None]

    @property
    def pings(self) -> int:
        return sum(b is None for b in self.blocks)

    @property
    def terminal(self) -> SSEEvent:
        return self.events[-1]

    @property
    def text(self) -> str:
        return "".join(e.data["data"] for e in self.events if e.event == "challenge")


def parse_sse(raw: bytes) -> list[SSEEvent | None]:
    """Parse a complete SSE body strictly: every block is `: ping` or exactly id/event/data lines.

    Raises AssertionError on anything else (so a malformed stream fails the test).
    """
    text = raw.decode("utf-8")
    assert text.endswith("\n\n"), f"stream does not end with a blank line: {text[-80:]!r}"
    blocks: list[SSEEvent | None] = []
    for block in text[:-2].split("\n\n"):
        if block == ": ping":
            blocks.append(None)
            continue
        lines = block.split("\n")
        assert len(lines) == 3, f"an event must be id/event/data lines: {block!r}"
        assert lines[0].startswith("id: ") and lines[1].startswith("event: ") and lines[2].startswith("data: "), block
        event = lines[1][len("event: ") :]
        assert event, "empty event name"
        data = json.loads(lines[2][len("data: ") :])
        assert set(data) == {"status", "message", "data"}, data
        blocks.append(SSEEvent(int(lines[0][len("id: ") :]), event, data))
    return blocks


def get_sse(client: httpx.Client, url: str, params: dict[str, str] | None) -> SSEStream:
    """GET an SSE endpoint and read the body to its end."""
    with client.stream("GET", url, params=params) as response:
        raw = b"".join(response.iter_raw())
    blocks = parse_sse(raw) if response.status_code == 200 else []
    return SSEStream(response.status_code, response.headers, raw, blocks)


def assert_one_terminal_last(stream: SSEStream) -> None:
    """Exactly one terminal event, last, with nothing (no ping, no bytes) after it."""
    kinds = [e.event for e in stream.events]
    assert sum(k in TERMINAL for k in kinds) == 1, kinds
    last = stream.blocks[-1]
    assert last is not None and last.event in TERMINAL, "the stream must end with its terminal event (no ping after it)"
    ids = [e.id for e in stream.events]
    assert ids == sorted(set(ids)), f"event ids must increase: {ids}"


def assert_valid_answer(answer: dict[str, Any], *, category: str | None = None) -> None:
    """The close payload: a recommendation and three challenges with a seeded category code, its
    Korean label, and texts within their bounds."""
    assert isinstance(answer["recommend"], str) and answer["recommend"].strip()
    assert len(answer["recommend"]) <= RECOMMEND_MAX_CHARS + 1
    assert len(answer["challenges"]) == 3
    for challenge in answer["challenges"]:
        assert set(challenge) == {"title", "description", "category", "label"}, challenge
        assert challenge["title"].strip() and challenge["description"].strip()
        assert len(challenge["title"]) <= TITLE_MAX_CHARS + 1 and len(challenge["description"]) <= DESCRIPTION_MAX_CHARS + 1
        assert challenge["label"] == LABELS.get(challenge["category"]), challenge
        if category is not None:
            assert challenge["category"] == category


def assert_deltas_render_answer(text: str, answer: dict[str, Any]) -> None:
    """The concatenated deltas are the human-readable rendering, never JSON syntax."""
    assert text == render_answer(answer)
    for syntax in ('{"', '":"', '"}', '","', "[{"):
        assert syntax not in text, f"JSON syntax {syntax!r} in the streamed text"


@dataclass
class WebEndpoint:
    """A daphne's WebSocket address for `ws_exchange`, from its base URL (e.g. a `launch_web` one)."""

    base_url: str

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://", 1)

    @property
    def origin(self) -> str:
        return self.base_url


def ws_exchange(stack, session: str, *frames: dict, until: int = 1, timeout: float = 60) -> list[dict]:
    """Send frames, collect server frames until `until` terminal frames arrived, then 0.3 s more."""
    received: list[dict] = []
    with connect(f"{stack.ws_url}/ws/chat/{quote(session)}/", origin=stack.origin, open_timeout=10) as socket:
        for frame in frames:
            socket.send(frame if isinstance(frame, str) else json.dumps(frame, ensure_ascii=False))
        deadline = time.monotonic() + timeout
        terminals = 0
        while terminals < until and time.monotonic() < deadline:
            message = json.loads(socket.recv(timeout=deadline - time.monotonic()))
            received.append(message)
            terminals += message["type"] in ("chat.done", "chat.error")
        try:
            while True:
                received.append(json.loads(socket.recv(timeout=0.3)))
        except TimeoutError:
            pass
    return received


def eventually(predicate, timeout: float, interval: float = 0.1) -> bool:
    """Poll `predicate` until it holds (True) or `timeout` seconds pass (its last answer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def cancelled_in_engine(stack, request_id: str) -> bool:
    """The stack's GPU worker logged this request as cancelled."""
    return f"request {request_id} finished: cancelled" in (stack.log_dir / "worker.log").read_text(errors="replace")


def widget_data(html: str) -> dict[str, Any]:
    """The JSON the widget's page embeds (`json_script` "widget-data"): sessionId, categories, turns."""
    opening = '<script id="widget-data" type="application/json">'
    start = html.index(opening) + len(opening)
    return json.loads(html[start : html.index("</script>", start)])


def widget_browser(base_url: str) -> tuple[str, dict[str, str]]:
    """A browser's first visit to the widget: its chat session id and the cookie header that binds it."""
    browser = httpx.Client(base_url=base_url, timeout=10)
    session_id = widget_data(browser.get("/").text)["sessionId"]
    return session_id, {"Cookie": f"sessionid={browser.cookies['sessionid']}"}


def stream_until_first_delta_then(
    client: httpx.Client, session: str, act, message: str = "자전거를 타고 싶어요"
) -> tuple[SSEStream, float]:
    """Open a free-text SSE stream, call `act(request_id)` once its first `challenge` event arrived,
    read to the end; return the stream and the seconds it took to end after `act`."""
    with client.stream("GET", FREE_TEXT, params={"sessionId": session, "message": message}) as response:
        raw = b""
        chunks = response.iter_raw()
        for chunk in chunks:
            raw += chunk
            if b"event: challenge" in raw:
                break
        act(response.headers["X-Request-ID"])
        acted_at = time.monotonic()
        for chunk in chunks:
            raw += chunk
        ended_after = time.monotonic() - acted_at
    return SSEStream(response.status_code, response.headers, raw, parse_sse(raw)), ended_after


def gpu_worker_processes(root: psutil.Process) -> list[psutil.Process]:
    """The live `celery … -Q gpu` processes under `root` (honcho, or `make run`): the Procfile's GPU workers."""
    found = []
    for child in root.children(recursive=True):
        try:
            command = child.cmdline()
            if child.status() != psutil.STATUS_ZOMBIE and "celery" in " ".join(command[:2]) and "gpu" in command:
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found
