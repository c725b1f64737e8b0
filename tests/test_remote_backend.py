"""The remote generation backend (LEAFRESH_BACKEND=openai) against a real `transformers serve` on
loopback: the SSE/WS contract, the JSON-schema fallback, bounds, deadlines, cancel, and the server dying.

transformers 5.x `serve` takes `response_format` and `stream_options` and ignores them (it logs a
warning); transformers 4.x answered 422 "Unsupported fields in the request". The stack runs the real
5.x server (the prompt is unchanged, the answer is validated); the fallback is shown in-process
against the same CLI in 4.x's strict mode (STRICT_SERVE). Nothing constrains the demo model on the
server, so an answer may come out invalid: every stream must end with exactly one terminal event, and
a `close` must carry a valid answer whose deltas render it. Rates are printed (`pytest -s`): the demo
model (trained on the exact prompts) gives valid JSON as it is, and none once an instruction is added
to its prompt (the fallback), which a real instruction-following model would follow.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from chatbot import seed
from chatbot.prompts import build_messages
from inference.answer import answer_schema
from inference.remote import CONNECT_ATTEMPTS, RemoteEngine, RemoteSettings
from inference.types import FinishReason, GenerationRequest, SamplingParams
from tests.helpers import (
    BASE_INFO,
    FREE_TEXT,
    assert_deltas_render_answer,
    assert_one_terminal_last,
    assert_valid_answer,
    cancelled_in_engine,
    eventually,
    get_sse,
    stream_until_first_delta_then,
    ws_exchange,
)
from tests.stack import BIN, ROOT, _stop, free_port, launch_stack, worker_heartbeat

LABELS = {c["code"]: c["label"] for c in seed.CATEGORIES}
PROMPTS = {p["mode"]: p for p in seed.PROMPTS}
# `transformers serve` as transformers 4.x validated requests: fields it does not support are a 422.
STRICT_SERVE = """
import sys
from fastapi import HTTPException
from transformers.cli.serving import utils
from transformers.cli.transformers import main

lenient = utils.BaseHandler._validate_request

def strict(self, body):
    lenient(self, body)
    unused = set(body) & self._unused_fields
    if unused:
        raise HTTPException(status_code=422, detail=f"Unsupported fields in the request: {unused}")

utils.BaseHandler._validate_request = strict
sys.argv[0] = "transformers"
sys.exit(main())
"""


@contextmanager
def transformers_serve(model_dir: Path, log: Path, *, strict: bool = False) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`transformers serve <model_dir>` on a free loopback port, on the CPU, offline; yields its API
    root (`http://127.0.0.1:<port>/v1`) and process once GET /health answers; stops it after."""
    port = free_port()
    args = ["serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "info"]
    cmd = [str(BIN / "python"), "-c", STRICT_SERVE, *args] if strict else [str(BIN / "transformers"), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as handle:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"transformers serve exited: {log.read_text(errors='replace')[-3000:]}"
            assert time.monotonic() < deadline, "transformers serve did not answer /health in 120 s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/v1", proc
    finally:
        _stop(proc)  # SIGTERM to its process group, SIGKILL after 15 s


def _serve_log(name: str) -> Path:
    return ROOT / "var" / "test" / f"remote-{os.getpid()}" / f"serve-{name}.log"


class FlakyProxy:
    """A real HTTP server on loopback (threads of this process) in front of an OpenAI-compatible
    server: each POST is forwarded and the answer relayed line by line (chunked).

    `fail_next`: that many POSTs are answered 503 instead. `cut_after`: after that many content
    chunks the connection is broken mid-body (None = never). An upstream that cannot be reached or
    breaks off is passed on as a dropped connection. `posts` has one record per POST: status (None =
    no answer), chunks (content deltas relayed), finished (a finish_reason was relayed), broken.
    """

    def __init__(self, upstream_api: str) -> None:
        self.upstream = upstream_api.removesuffix("/v1")
        self.fail_next = 0
        self.cut_after: int | None = None
        self.posts: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                proxy._relay(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_port}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _relay(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
        record: dict[str, Any] = {"status": None, "chunks": 0, "finished": False, "broken": False}
        with self._lock:
            self.posts.append(record)
            fail, self.fail_next = self.fail_next > 0, max(self.fail_next - 1, 0)
            cut_after = self.cut_after
        handler.close_connection = True
        if fail:
            payload = json.dumps({"error": {"message": "overloaded", "type": "server_error"}}).encode()
            record["status"] = 503
            handler.send_response(503)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
            return
        try:
            timeout = httpx.Timeout(60, connect=2)
            headers = {"Content-Type": "application/json"}
            with httpx.stream("POST", self.upstream + handler.path, content=body, headers=headers, timeout=timeout) as response:
                record["status"] = response.status_code
                handler.send_response(response.status_code)
                handler.send_header("Content-Type", response.headers.get("content-type", "application/json"))
                handler.send_header("Transfer-Encoding", "chunked")
                handler.end_headers()
                for line in response.iter_lines():
                    data = f"{line}\n".encode()
                    if cut_after is not None and record["chunks"] >= cut_after:
                        handler.wfile.write(b"%x\r\n" % (len(data) + 100) + data)  # announced longer than sent
                        handler.wfile.flush()
                        record["broken"] = True
                        return
                    handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    handler.wfile.flush()
                    self._note(record, line)
                handler.wfile.write(b"0\r\n\r\n")
        except httpx.HTTPError:  # the server is down or died: the client sees the connection drop
            record["broken"] = True
        except OSError:  # the client left (a cancel)
            pass

    @staticmethod
    def _note(record: dict[str, Any], line: str) -> None:
        if not line.startswith("data: {"):
            return
        for choice in json.loads(line.removeprefix("data: ")).get("choices", []):
            if (choice.get("delta") or {}).get("content"):
                record["chunks"] += 1
            if choice.get("finish_reason"):
                record["finished"] = True


@pytest.fixture(scope="module")
def demo_server(demo_model_dir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """transformers serve (5.x, lenient) with the demo model; the last stack test kills it."""
    with transformers_serve(demo_model_dir, _serve_log("demo")) as running:
        yield running


@contextmanager
def hogging(base_url: str, model: str, tokens: int = 700) -> Iterator[None]:
    """Occupy the server's one generation thread (transformers serve generates one request at a
    time without continuous batching) with a `tokens`-long answer, so requests sent meanwhile wait
    at the server with their stream open; the hog is dropped on exit."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hog"}],
        "stream": True,
        "generation_config": json.dumps({"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False}),
    }
    started = threading.Event()

    def run() -> None:
        with httpx.stream("POST", f"{base_url}/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if '"content"' in line:
                    started.set()
                if stop.is_set():
                    return

    stop = threading.Event()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30), "the hog request did not start generating"
    try:
        yield
    finally:
        stop.set()
        thread.join(30)


@pytest.fixture(scope="module")
def stack_proxy(demo_server) -> Iterator[FlakyProxy]:
    """A pass-through FlakyProxy between the stack's worker and the demo server: it tells whether
    the server's answer was complete when the server was killed."""
    proxy = FlakyProxy(demo_server[0])
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def remote_stack(stack_proxy: FlakyProxy, demo_model_dir: Path):
    env = {
        "LEAFRESH_BACKEND": "openai",
        "LEAFRESH_OPENAI_BASE_URL": stack_proxy.base_url,
        # transformers serve lists the Hugging Face cache at GET /models, not the model it was started with
        "LEAFRESH_OPENAI_MODEL": str(demo_model_dir),
        "LEAFRESH_OPENAI_JSON_SCHEMA": "auto",
        "LEAFRESH_OPENAI_TIMEOUT_S": "10",
        "LEAFRESH_RESUME_GRACE_S": "0",  # a dropped SSE client is cancelled at once
    }
    with launch_stack("remote", env) as running:
        yield running


def _worker_log(stack) -> str:
    return (stack.log_dir / "worker.log").read_text(errors="replace")


def _check_stream(stream, *, category: str | None = None) -> bool:
    """One terminal event, last; a close carries a valid answer its deltas render. True if closed."""
    assert stream.status_code == 200
    assert_one_terminal_last(stream)
    if stream.terminal.event == "error":
        assert stream.terminal.data["status"] == 500 and stream.terminal.data["data"] is None, stream.terminal.data
        return False
    answer = stream.terminal.data["data"]
    assert_valid_answer(answer, category=category)
    assert_deltas_render_answer(stream.text, answer)
    return True


def test_the_worker_names_the_remote_model_and_loads_none(remote_stack, demo_model_dir: Path) -> None:
    beat = worker_heartbeat(remote_stack, remote_stack.worker)
    assert beat is not None and beat["model"] == str(demo_model_dir)
    assert "remote backend" in _worker_log(remote_stack)


def test_sse_streams_end_with_one_terminal_event_and_closes_are_valid(remote_stack) -> None:
    closes = 0
    cases = [
        (
            BASE_INFO,
            {"sessionId": "remote-b1", "location": "해안가", "workType": "사무직", "category": "제로웨이스트"},
            "ZERO_WASTE",
        ),
        (BASE_INFO, {"sessionId": "remote-b2", "location": "도시", "workType": "재택근무", "category": "비건"}, "VEGAN"),
        (BASE_INFO, {"sessionId": "remote-b3", "location": "농촌", "workType": "현장직", "category": "플로깅"}, "PLOGGING"),
        (FREE_TEXT, {"sessionId": "remote-f1", "message": "요즘 전기 요금이 너무 많이 나와서 에너지를 아끼고 싶어요"}, None),
        (FREE_TEXT, {"sessionId": "remote-f2", "message": "일회용품을 줄이고 싶어요"}, None),
        (FREE_TEXT, {"sessionId": "remote-f2", "message": "다른 방법도 알려 주세요"}, None),  # with history
    ]
    with httpx.Client(base_url=remote_stack.base_url, timeout=120) as client:
        for path, params, category in cases:
            closes += _check_stream(get_sse(client, path, params), category=category)
    print(f"\nremote backend, stack (transformers serve ignoring response_format): {closes}/{len(cases)} valid closes")
    assert "json schema fallback" not in _worker_log(remote_stack), "a server that takes the field silently did not reject it"
    assert closes >= 1, "no valid answer at all through the remote backend"


def test_websocket_contract_through_the_remote_backend(remote_stack) -> None:
    frames = ws_exchange(
        remote_stack,
        "remote-ws",
        {"type": "chat.base_info", "location": "도시", "workType": "사무직", "category": "에너지 절약"},
        timeout=120,
    )
    kinds = [f["type"] for f in frames]
    assert kinds[0] == "chat.queued" and frames[0]["position"] == 0
    assert sum(k in ("chat.done", "chat.error") for k in kinds) == 1 and kinds[-1] in ("chat.done", "chat.error"), kinds
    if kinds[-1] == "chat.done":
        answer = frames[-1]["data"]
        assert_valid_answer(answer, category="ENERGY_SAVING")
        text = "".join(f["text"] for f in frames if f["type"] == "chat.token")
        assert_deltas_render_answer(text, answer)
    else:
        assert frames[-1]["status"] == 500


def test_websocket_stop_and_sse_disconnect_close_the_remote_stream(remote_stack, demo_server, demo_model_dir: Path) -> None:
    with hogging(demo_server[0], str(demo_model_dir)):  # our requests wait at the server, their streams open
        with connect(f"{remote_stack.ws_url}/ws/chat/remote-stop/", origin=remote_stack.origin, open_timeout=10) as socket:
            socket.send(json.dumps({"type": "chat.message", "message": "채식을 해 보고 싶어요"}))
            queued = json.loads(socket.recv(timeout=30))
            assert queued["type"] == "chat.queued"
            stopped_id = queued["requestId"]
            time.sleep(0.3)  # the worker has opened the remote stream
            socket.send(json.dumps({"type": "chat.stop"}))
            frames = [json.loads(socket.recv(timeout=10))]
            while frames[-1]["type"] not in ("chat.done", "chat.error"):
                frames.append(json.loads(socket.recv(timeout=10)))
            assert frames[-1]["type"] == "chat.error" and frames[-1]["status"] == 499
        with httpx.Client(base_url=remote_stack.base_url, timeout=60) as client:
            with client.stream(
                "GET", FREE_TEXT, params={"sessionId": "remote-drop", "message": "자전거를 타고 싶어요"}
            ) as response:
                dropped_id = response.headers["X-Request-ID"]
                time.sleep(0.3)
            # dropped without reading: with no resume grace, the view cancels the generation
        for request_id in (stopped_id, dropped_id):
            assert eventually(lambda rid=request_id: cancelled_in_engine(remote_stack, rid), 10), (
                f"{request_id} was not cancelled"
            )
            assert f"request {request_id}: remote stream closed" in _worker_log(remote_stack)


# --- in-process: the engine against the lenient (5.x) server ---


class ListSink:
    """Collects RemoteEngine events; `wait(request_id)` blocks until that request ended."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []
        self._cond = threading.Condition()

    def _add(self, kind: str, request_id: str, value: Any) -> None:
        with self._cond:
            self.events.append((kind, request_id, value))
            self._cond.notify_all()

    def queued(self, request: GenerationRequest, position: int) -> None:
        self._add("queued", request.request_id, position)

    def token(self, request: GenerationRequest, text: str) -> None:
        self._add("token", request.request_id, text)

    def challenge(self, request: GenerationRequest, index: int, card: dict[str, str]) -> None:
        self._add("challenge", request.request_id, (index, card))

    def done(self, request: GenerationRequest, answer: dict, *, usage: dict, timings: dict, model: str = "") -> None:
        self._add("done", request.request_id, {"answer": answer, "usage": usage, "model": model})

    def error(self, request: GenerationRequest, status: int, message: str, finish_reason: FinishReason) -> None:
        self._add("error", request.request_id, {"status": status, "reason": finish_reason})

    def discard(self, request_id: str) -> None:
        self._add("discard", request_id, None)

    def of(self, request_id: str) -> list[tuple[str, Any]]:
        with self._cond:
            return [(kind, value) for kind, rid, value in self.events if rid == request_id]

    def wait(self, request_id: str, timeout: float = 120) -> list[tuple[str, Any]]:
        with self._cond:
            self._cond.wait_for(lambda: any(k in ("done", "error", "discard") for k, _ in self.of(request_id)), timeout)
        return self.of(request_id)


def _request(request_id: str, category: str = "ZERO_WASTE", **sampling: Any) -> GenerationRequest:
    prompt = PROMPTS["base_info"]
    fields = {"location": "도시", "workType": "사무직", "category": LABELS[category]}
    return GenerationRequest(
        request_id=request_id,
        group="g",
        messages=build_messages(system=prompt["system"], user_template=prompt["user_template"], fields=fields),
        schema=answer_schema(),
        sampling=SamplingParams(**sampling),
        default_category=category,
        category_labels=LABELS,
        created_at=time.time(),
        challenge_cards=True,
    )


def _engine(base_url: str, model: Path, *, max_running: int = 1, **kwargs: Any) -> tuple[RemoteEngine, ListSink]:
    sink = ListSink()
    settings = RemoteSettings(base_url=base_url, model=str(model), tokenizer_dir=str(model), timeout_s=10, **kwargs)
    engine = RemoteEngine(settings, sink, max_running=max_running, max_waiting=1)
    engine.start()
    return engine, sink


def _ended_once(events: list[tuple[str, Any]]) -> str:
    """The request got one `queued` first and exactly one terminal event, last; returns its kind."""
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "queued" and sum(k in ("done", "error") for k in kinds) == 1 and kinds[-1] in ("done", "error"), kinds
    return kinds[-1]


def test_engine_streams_text_cards_and_a_validated_answer_with_usage(demo_server, demo_model_dir: Path) -> None:
    engine, sink = _engine(demo_server[0], demo_model_dir)
    closes = 0
    categories = ["ZERO_WASTE", "VEGAN", "ENERGY_SAVING", "UPCYCLING"]
    try:
        for n, category in enumerate(categories):
            engine.submit(_request(f"lenient-{n}", category))
            events = sink.wait(f"lenient-{n}")
            if _ended_once(events) == "error":
                assert events[-1][1]["status"] == 500
                continue
            closes += 1
            answer = events[-1][1]["answer"]
            assert_valid_answer(answer, category=category)
            assert_deltas_render_answer("".join(v for k, v in events if k == "token"), answer)
            assert [v[0] for k, v in events if k == "challenge"] == [0, 1, 2]
            usage = events[-1][1]["usage"]
            assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
            assert events[-1][1]["model"] == str(demo_model_dir)
        assert engine.use_json_schema, "a server that takes the field silently has not rejected it"
    finally:
        engine.stop()
    print(f"\nremote backend, in-process (response_format ignored): {closes}/{len(categories)} valid closes")
    assert closes >= 1


@pytest.fixture(scope="module")
def strict_server(demo_model_dir: Path) -> Iterator[str]:
    """The demo model behind transformers serve in 4.x's strict mode (unsupported fields are a 422)."""
    with transformers_serve(demo_model_dir, _serve_log("strict"), strict=True) as (base_url, _):
        yield base_url


def test_a_server_rejecting_response_format_gets_the_format_in_the_prompt_and_answers_are_validated(
    strict_server: str, demo_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="inference.remote")
    engine, sink = _engine(strict_server, demo_model_dir)
    closes, count = 0, 4
    try:
        for n in range(count):
            engine.submit(_request(f"strict-{n}"))
            events = sink.wait(f"strict-{n}")
            if _ended_once(events) == "done":
                closes += 1
                assert_valid_answer(events[-1][1]["answer"], category="ZERO_WASTE")
            else:  # the completion was checked and refused: an invalid answer is never a close
                assert events[-1][1] == {"status": 500, "reason": FinishReason.ERROR}
        assert not engine.use_json_schema and not engine.use_stream_options
    finally:
        engine.stop()
    fallbacks = [r.getMessage() for r in caplog.records if "json schema fallback" in r.getMessage()]
    assert len(fallbacks) == 1 and "response_format" in fallbacks[0], "the rejection is learnt once, then remembered"
    print(f"\nremote backend, json schema fallback (format in the prompt): {closes}/{count} valid closes")

    assert not [r for r in caplog.records if "the server refused request" in r.getMessage()]
    assert all("Unsupported" not in r.getMessage() for r in caplog.records), (
        "the server's error text (which can repeat the user's message) is never logged"
    )

    always, sink = _engine(strict_server, demo_model_dir, json_schema="always")
    try:
        always.submit(_request("always-0"))
        assert sink.wait("always-0")[-1] == ("error", {"status": 500, "reason": FinishReason.ERROR})
        assert always.use_json_schema, "json_schema=always never falls back"
    finally:
        always.stop()


def _serve_posts(log: Path, status: int) -> int:
    """POSTs to /v1/chat/completions the server answered with `status`, from its uvicorn access log."""
    return sum(f'"POST /v1/chat/completions HTTP/1.1" {status}' in line for line in log.read_text(errors="replace").splitlines())


def test_concurrent_requests_all_fall_back_when_the_server_rejects_response_format(
    strict_server: str, demo_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests sent before the first rejection came back each get their own 422; each is sent
    again without the fields (none ends with the rejection's 500)."""
    caplog.set_level(logging.INFO, logger="inference.remote")
    count = 4
    rejected_before = _serve_posts(_serve_log("strict"), 422)
    engine, sink = _engine(strict_server, demo_model_dir, max_running=count)
    try:
        for n in range(count):
            engine.submit(_request(f"race-{n}"))
        ends = {f"race-{n}": sink.wait(f"race-{n}") for n in range(count)}
        assert not engine.use_json_schema and not engine.use_stream_options
    finally:
        engine.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("json schema fallback" in m for m in messages) == 1, "the rejection is learnt once"
    assert not [m for m in messages if "the server refused request" in m], "a 4xx ended a request"
    resent = [n for n in range(count) if f"request race-{n}: sent again without" in " ".join(messages)]
    rejected = _serve_posts(_serve_log("strict"), 422) - rejected_before
    assert rejected >= 2 and len(resent) == rejected, (rejected, resent, "the race did not happen")
    closes = 0
    for request_id, events in ends.items():
        if _ended_once(events) == "done":
            closes += 1
            continue
        # an error here is the answer failing validation, never the rejection (logged apart, above)
        assert events[-1][1] == {"status": 500, "reason": FinishReason.ERROR}
        assert f"completion of request {request_id} is not a valid answer" in messages
    print(f"\nremote backend, concurrent fallback: {rejected} requests rejected, {closes}/{count} valid closes")


def _tokens(engine: RemoteEngine) -> float:
    """Content chunks the engine received (its token counter)."""
    return engine.metrics.registry.get_sample_value("leafresh_generation_tokens_total", {"worker": "remote"}) or 0


@pytest.fixture
def flaky(demo_server) -> Iterator[FlakyProxy]:
    proxy = FlakyProxy(demo_server[0])
    yield proxy
    proxy.close()


def test_a_5xx_before_the_first_token_is_retried(flaky: FlakyProxy, demo_model_dir: Path) -> None:
    flaky.fail_next = 1
    engine, sink = _engine(flaky.base_url, demo_model_dir)
    try:
        engine.submit(_request("retry-5xx"))
        events = sink.wait("retry-5xx")
    finally:
        engine.stop()
    assert [p["status"] for p in flaky.posts] == [503, 200], flaky.posts
    kind = _ended_once(events)
    assert _tokens(engine) == flaky.posts[1]["chunks"] > 0, "the retried stream was read whole"
    assert kind == "done" or events[-1][1] == {"status": 500, "reason": FinishReason.ERROR}, events[-1]


def test_a_failure_after_the_first_token_is_not_retried(flaky: FlakyProxy, demo_model_dir: Path) -> None:
    flaky.cut_after = 3
    engine, sink = _engine(flaky.base_url, demo_model_dir)
    try:
        engine.submit(_request("cut-mid-answer"))
        events = sink.wait("cut-mid-answer")
    finally:
        engine.stop()
    assert len(flaky.posts) == 1 and flaky.posts[0]["broken"], flaky.posts
    assert _tokens(engine) == 3
    assert _ended_once(events) == "error" and events[-1][1] == {"status": 503, "reason": FinishReason.ERROR}


def test_stopping_ends_every_request_with_one_503(slow_server: str, slow_model_dir: Path) -> None:
    """A request arriving while stop() is under way is refused; a stream cancelled by the loop's own
    stop (not by stop() itself) still gets its terminal event."""
    engine, sink = _engine(slow_server, slow_model_dir)
    engine.submit(_request("stop-running", max_new_tokens=1000))
    assert eventually(lambda: _tokens(engine) >= 3, 60), "no tokens"

    async def stop_with_a_late_arrival() -> None:
        shutdown = asyncio.ensure_future(engine._shutdown())
        await asyncio.sleep(0)  # stop() has begun: the running streams were failed, it awaits their tasks
        engine._accept(_request("stop-late"))
        await shutdown

    assert engine._loop is not None
    engine._loop.submit(stop_with_a_late_arrival()).result(30)
    engine._loop.stop()
    for request_id in ("stop-running", "stop-late"):
        assert sink.wait(request_id, 10)[-1] == ("error", {"status": 503, "reason": FinishReason.ERROR})
        assert sum(k in ("done", "error") for k, _ in sink.of(request_id)) == 1, sink.of(request_id)

    engine, sink = _engine(slow_server, slow_model_dir)
    engine.submit(_request("loop-stopped", max_new_tokens=1000))
    assert eventually(lambda: _tokens(engine) >= 3, 60), "no tokens"
    assert engine._loop is not None
    engine._loop.stop()  # cancels the stream's task with nothing sent for it yet
    events = sink.wait("loop-stopped", 10)
    assert events[-1] == ("error", {"status": 503, "reason": FinishReason.ERROR})
    assert sum(k in ("done", "error") for k, _ in events) == 1, events


@pytest.fixture(scope="module")
def slow_server(slow_model_dir: Path) -> Iterator[str]:
    """A random-weight model behind transformers serve: answers run to their token budget, slowly."""
    with transformers_serve(slow_model_dir, _serve_log("slow")) as (base_url, _):
        yield base_url


def test_bounds_redelivery_deadline_and_a_cancel_that_frees_the_server(slow_server: str, slow_model_dir: Path) -> None:
    engine, sink = _engine(slow_server, slow_model_dir)
    try:
        first = _request("b-1", max_new_tokens=1000)  # a minute or more of the server's time
        engine.submit(first)
        engine.submit(first)  # a redelivered task: ignored
        engine.submit(_request("b-2"))
        engine.submit(_request("b-3"))  # past max_running 1 + max_waiting 1: refused at once
        assert sink.wait("b-3", 10)[-1] == ("error", {"status": 503, "reason": FinishReason.ERROR})
        assert sink.of("b-2") == [("queued", 1)]
        engine.cancel("b-2")  # waiting: dropped without a word
        assert sink.wait("b-2", 10)[-1] == ("discard", None)
        assert eventually(
            lambda: (
                (engine.metrics.registry.get_sample_value("leafresh_generation_tokens_total", {"worker": "remote"}) or 0) >= 3
            ),
            60,
        ), "the remote stream sent no tokens"
        engine.cancel("b-1")  # running: the remote stream is closed and the server stops generating
        cancelled_at = time.monotonic()
        events = sink.wait("b-1", 10)
        assert events == [("queued", 0), ("discard", None)], "nothing but the discard after the cancel"
        engine.submit(_request("b-4", max_new_tokens=3))  # the server's one generation thread must be free
        assert sink.wait("b-4", 30)[-1] == ("error", {"status": 500, "reason": FinishReason.LENGTH})  # 3 tokens, no answer
        assert time.monotonic() - cancelled_at < 15, "the server went on generating the cancelled answer"
        assert sink.of("b-1") == events and sum(k == "queued" for k, _ in events) == 1, "redelivery ignored, nothing late"

        late = dataclasses.replace(_request("b-5", max_new_tokens=1000), created_at=time.time(), total_timeout_s=1.5)
        engine.submit(late)
        assert sink.wait("b-5", 10)[-1] == ("error", {"status": 504, "reason": FinishReason.DEADLINE})
        assert eventually(lambda: engine.load == (0, 0), 5)
    finally:
        engine.stop()


def test_the_remote_server_dying_mid_answer_gives_one_error_event(remote_stack, demo_server, stack_proxy: FlakyProxy) -> None:
    _, server = demo_server
    with httpx.Client(base_url=remote_stack.base_url, timeout=60) as client:
        stream, ended_after = stream_until_first_delta_then(
            client, "remote-dies", lambda rid: os.killpg(server.pid, signal.SIGKILL), message="물을 아끼고 싶어요"
        )
        server.wait(timeout=10)
        assert_one_terminal_last(stream)
        relayed = stack_proxy.posts[-1]  # what reached the worker from the server before it died
        if relayed["finished"]:  # the whole answer had been sent before the kill landed
            print("\nremote backend, server killed: the answer was already complete")
            assert stream.terminal.event == "close" or stream.terminal.data["status"] == 500, stream.terminal.data
        else:
            assert relayed["broken"], relayed
            assert stream.terminal.event == "error" and stream.terminal.data["status"] == 503, stream.terminal.data
        assert ended_after < 10
        posts_before, started = len(stack_proxy.posts), time.monotonic()
        after = get_sse(client, FREE_TEXT, {"sessionId": "remote-dead", "message": "분리수거를 잘하고 싶어요"})
    assert_one_terminal_last(after)
    assert after.terminal.event == "error" and after.terminal.data["status"] == 503, after.terminal.data
    assert time.monotonic() - started < 10, "a dead server must fail fast (a few connect retries), not hang"
    assert len(stack_proxy.posts) - posts_before == CONNECT_ATTEMPTS, "tried again until the retries ran out"
