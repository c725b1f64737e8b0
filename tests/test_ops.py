"""Operations against live stacks: `/readyz` (a live worker, Redis and the database; 503 with the
reasons otherwise, quickly), the request metrics the first version exported, and JSON log lines
(daphne's request line with the generation's id, the hashed session and timings; the workers' too)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import signal
import socket
import time
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from leafresh.logs import RequestIdFilter, json_formatter, request_context_end, request_context_start, request_id_bind
from tests.helpers import FREE_TEXT, assert_one_terminal_last, get_sse
from tests.stack import free_port, launch_stack, launch_web

FREE_TEXT_ROUTE = FREE_TEXT.lstrip("/")
READY_CHECKS = {"redis", "database", "worker"}


def _hashed(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()[:16]


def _eventually(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


# Printed, not logged, by Celery's signal handler when a test restarts the stack's worker (README "Logs").
NOT_LOGGED = {"worker: Warm shutdown (MainProcess)"}


def _json_lines(path: Path) -> list[dict]:
    """Every line of a log file, each parsed as one JSON object (fails on any other line but NOT_LOGGED)."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.strip() in NOT_LOGGED:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"{path.name}:{number} is not a JSON object: {line[:300]!r}") from None
        assert isinstance(record, dict) and {"time", "level", "logger", "message"} <= set(record), line
        records.append(record)
    return records


def _samples(base_url: str, family: str) -> dict[tuple[str, str, str], float]:
    """`family`'s samples on /metrics by (method, endpoint, status), e.g. `api_requests_total`."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    found: dict[tuple[str, str, str], float] = {}
    for metric in text_string_to_metric_families(text):
        for sample in metric.samples:
            if sample.name == family:
                labels = sample.labels
                found[(labels["method"], labels["endpoint"], labels["status"])] = sample.value
    return found


@pytest.mark.no_database
def test_the_json_formatter_writes_one_line_with_the_request_id_and_readable_korean() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(json_formatter())
    handler.addFilter(RequestIdFilter())
    log = logging.getLogger("tests.ops.formatter")
    log.addHandler(handler)
    log.propagate = False
    try:
        context, token = request_context_start()
        fresh_id = context.request_id
        log.warning("첫 줄\n둘째 줄", extra={"status": 400})
        request_id_bind("generation-7")
        log.warning("after the generation's id")
        request_context_end(token)
        log.warning("outside a request")
    finally:
        log.removeHandler(handler)
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "첫 줄\n둘째 줄" and "첫 줄" in stream.getvalue(), "Korean is not \\u-escaped"
    assert first["request_id"] == fresh_id != "generation-7" and first["status"] == 400
    assert (first["level"], first["logger"]) == ("WARNING", "tests.ops.formatter") and first["time"].endswith("+00:00")
    assert second["request_id"] == "generation-7"
    assert "request_id" not in third


def test_readyz_is_200_with_the_live_worker_listed(stack) -> None:
    response = httpx.get(stack.base_url + "/readyz", timeout=10)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready" and body["failed"] == []
    assert set(body["checks"]) == READY_CHECKS and all(check["ok"] for check in body["checks"].values())
    assert body["workers"], "the live worker is listed"
    for worker in body["workers"]:
        assert set(worker) == {"name", "model", "running", "waiting", "age_s"}
        assert worker["model"] and worker["running"] >= 0 and worker["waiting"] >= 0
        assert 0 <= worker["age_s"] <= float(stack.env["LEAFRESH_HEARTBEAT_TTL_S"])
    assert "no-store" in response.headers["Cache-Control"], "a probe answer is never cached"
    assert httpx.get(stack.base_url + "/healthz", timeout=10).json() == {"status": "ok"}


def test_readyz_is_503_with_the_reason_once_the_worker_is_gone(demo_model_dir) -> None:
    with launch_stack("ops-stop") as own:
        assert httpx.get(own.base_url + "/readyz", timeout=10).status_code == 200
        os.killpg(own.worker.pid, signal.SIGKILL)  # no goodbye: its heartbeat has to expire
        killed_at = time.monotonic()

        def not_ready() -> httpx.Response | None:
            response = httpx.get(own.base_url + "/readyz", timeout=10)
            return response if response.status_code == 503 else None

        response = _eventually(not_ready, 20, "/readyz to turn 503")
        assert time.monotonic() - killed_at < float(own.env["LEAFRESH_HEARTBEAT_TTL_S"]) + 5
        body = response.json()
        assert body["status"] == "not_ready" and body["failed"] == ["worker"] and body["workers"] == []
        assert body["checks"]["worker"]["reason"] == "no_live_worker"
        assert "heartbeat" in body["checks"]["worker"]["detail"]
        assert body["checks"]["redis"]["ok"] and body["checks"]["database"]["ok"]


def test_readyz_is_503_at_once_when_redis_refuses_or_hangs(stack) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with launch_web(stack, "dead-redis", {"REDIS_URL": dead}) as base_url:
        started = time.monotonic()
        response = httpx.get(base_url + "/readyz", timeout=30)
        assert time.monotonic() - started < 3
        assert response.status_code == 503
        body = response.json()
        assert body["status"] == "not_ready" and set(body["failed"]) == {"redis", "worker"}
        assert body["checks"]["redis"]["reason"] == "unreachable" and body["checks"]["database"]["ok"]
        assert "Redis" in body["checks"]["redis"]["detail"]
    with socket.create_server(("127.0.0.1", 0), backlog=64) as silent:  # accepts connections, never answers
        hung = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        with launch_web(stack, "hung-redis", {"REDIS_URL": hung, "LEAFRESH_READY_TIMEOUT_S": "1"}) as base_url:
            started = time.monotonic()
            response = httpx.get(base_url + "/readyz", timeout=30)
            assert time.monotonic() - started < 3, "a hung Redis must not hang the probe"
            assert response.status_code == 503
            checks = response.json()["checks"]
            assert checks["redis"]["reason"] == "timeout" and checks["worker"]["reason"] == "timeout"


def test_metrics_count_and_time_requests_by_route_and_status(stack) -> None:
    before = _samples(stack.base_url, "http_request_duration_seconds_sum")
    client = httpx.Client(base_url=stack.base_url, timeout=60)
    session = f"ops-metrics-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    stream = get_sse(client, FREE_TEXT, {"sessionId": session, "message": "텀블러를 쓰고 싶어요"})
    streamed_s = time.monotonic() - started
    assert_one_terminal_last(stream)
    assert client.get(FREE_TEXT, params={"sessionId": session}).status_code == 400  # no message
    assert client.get(f"/ai/chatbot/sessions/{session}/messages").status_code == 200

    counts = _samples(stack.base_url, "api_requests_total")
    durations = _samples(stack.base_url, "http_request_duration_seconds_count")
    sums = _samples(stack.base_url, "http_request_duration_seconds_sum")
    for key in (("GET", FREE_TEXT_ROUTE, "200"), ("GET", FREE_TEXT_ROUTE, "400")):
        assert counts.get(key, 0) >= 1 and durations.get(key, 0) >= 1, (key, counts)
    assert ("GET", "ai/chatbot/sessions/<str:session_id>/messages", "200") in counts
    assert not [key for key in counts if session in key[1]], "the endpoint label is the route, never the raw path"
    # A stream is timed to its last byte, not to the moment the view returned its response.
    stream_s = sums[("GET", FREE_TEXT_ROUTE, "200")] - before.get(("GET", FREE_TEXT_ROUTE, "200"), 0.0)
    assert streamed_s * 0.5 <= stream_s <= streamed_s + 0.5, (stream_s, streamed_s)
    text = httpx.get(stack.base_url + "/metrics", timeout=10).text
    assert "# TYPE api_requests_total counter" in text and "# TYPE http_request_duration_seconds histogram" in text
    assert "leafresh_time_to_first_token_seconds_bucket" in text, "the workers' engine metrics are merged in"


def test_daphne_logs_json_lines_and_one_request_line_per_request(stack) -> None:
    client = httpx.Client(base_url=stack.base_url, timeout=60)
    session = f"ops-log-{uuid.uuid4().hex[:8]}"
    stream = get_sse(client, FREE_TEXT, {"sessionId": session, "message": "자전거로 출근하고 싶어요"})
    assert_one_terminal_last(stream)
    request_id = stream.headers["X-Request-ID"]
    refused = client.post(FREE_TEXT, json={"sessionId": session})  # 400: no message
    assert refused.status_code == 400
    log = stack.web_log

    def request_lines() -> list[dict]:
        lines = [r for r in _json_lines(log) if r["logger"] == "leafresh.request" and r.get("session") == _hashed(session)]
        return lines if len(lines) >= 2 else []

    streamed, posted = _eventually(request_lines, 10, "the request lines")
    assert streamed["request_id"] == request_id
    assert (streamed["method"], streamed["endpoint"], streamed["status"]) == ("GET", FREE_TEXT_ROUTE, 200)
    assert streamed["stream"] is True and streamed["aborted"] is False
    assert 0 < streamed["ttfb_ms"] <= streamed["first_event_ms"] <= streamed["duration_ms"]
    assert streamed["client"] == "127.0.0.1" and streamed["level"] == "INFO"
    assert (posted["method"], posted["status"]) == ("POST", 400) and posted["request_id"] != request_id
    assert posted["duration_ms"] > 0 and "stream" not in posted
    text = log.read_text(encoding="utf-8")
    assert session not in text, "the raw session id never reaches the log"
    assert "자전거로" not in text, "message text never reaches the log"


def test_the_workers_log_json_lines(stack) -> None:
    records = _json_lines(stack.log_dir / "worker.log")
    assert any("ready with" in r["message"] for r in records), "the GPU worker's start-up line"
    assert any(r["logger"].startswith("celery") for r in records)
    _json_lines(stack.log_dir / "cpu-worker.log")
