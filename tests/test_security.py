"""Who gets in, and how often: API keys on `/ai/`, rate limits shared through Redis, the production
settings (`check --deploy`), and secrets that never reach logs, task messages or responses."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import threading

import httpx
import pytest
from websockets.sync.client import connect

from chatbot.auth import api_key_valid
from tests.helpers import BASE_INFO, FREE_TEXT, get_sse, widget_browser
from tests.stack import BIN, ROOT, launch_stack, launch_web

OFF_TOPIC = {"message": "비트코인 시세 알려줘"}  # a preset polite answer: no generation needed


def test_a_bearer_key_is_one_of_the_configured_keys() -> None:
    keys = ["key-one", "key-two"]
    assert api_key_valid("Bearer key-one", keys) and api_key_valid("bearer key-two", keys)
    for header in (None, "", "Bearer", "Bearer ", "Basic key-one", "Bearer key-three", "Bearer key-on", "key-one"):
        assert not api_key_valid(header, keys), header
    assert not api_key_valid("Bearer key-one", [])


def _check_deploy(**overrides: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "LEAFRESH_API_KEYS"))}
    for line in (ROOT / "deploy" / "production.env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name] = value
    env |= {"DJANGO_SECRET_KEY": "s" * 20 + "-Jq8v_Wm2kLx0PzR7tYb3nC5dF9gH1aE4", "LEAFRESH_API_KEYS": "k" * 32} | overrides
    command = [str(BIN / "python"), "manage.py", "check", "--deploy", "--fail-level", "WARNING"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)


def test_the_documented_production_settings_pass_check_deploy() -> None:
    passed = _check_deploy()
    assert passed.returncode == 0, passed.stdout + passed.stderr
    no_keys = _check_deploy(LEAFRESH_API_KEYS="")
    assert no_keys.returncode != 0 and "leafresh.E001" in no_keys.stderr
    development = _check_deploy(DJANGO_DEBUG="true")  # the development defaults are not fit to deploy
    assert development.returncode != 0 and "security.W018" in development.stderr


def test_without_keys_the_api_is_open_and_start_up_says_so(stack) -> None:
    assert "OPEN (development only)" in (stack.log_dir / "web.log").read_text(errors="replace")


def test_api_routes_need_one_of_the_keys_and_the_widget_does_not(stack) -> None:
    with launch_web(stack, "keys", {"LEAFRESH_API_KEYS": "key-one,key-two"}) as base_url:
        client = httpx.Client(base_url=base_url, timeout=30)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic key-one"}):
            refused = client.get(FREE_TEXT, params={"sessionId": "auth-1", **OFF_TOPIC}, headers=headers)
            assert refused.status_code == 401
            assert refused.headers["WWW-Authenticate"].startswith("Bearer")
            assert refused.json() == {"status": 401, "message": refused.json()["message"], "data": None}
            assert client.get("/ai/chatbot/sessions/auth-1/messages", headers=headers).status_code == 401
        for key in ("key-one", "key-two"):  # either key, while one is being rotated out
            response = client.post(
                FREE_TEXT, json={"sessionId": "auth-1", **OFF_TOPIC}, headers={"Authorization": f"Bearer {key}"}
            )
            assert response.status_code == 200 and response.json()["status"] == 200
        keyed = httpx.Client(base_url=base_url, timeout=60, headers={"Authorization": "Bearer key-one"})
        stream = get_sse(keyed, BASE_INFO, {"sessionId": "auth-2", "location": "도시", "workType": "사무직", "category": "비건"})
        assert stream.terminal.event == "close"
        assert client.get("/").status_code == 200 and client.get("/healthz").status_code == 200
        # A socket may use an arbitrary session id only with a key; the widget's own session needs none.
        ws_url = f"ws{base_url[4:]}/ws/chat"
        with connect(f"{ws_url}/auth-ws/", origin=base_url, open_timeout=10) as stranger:
            refused = json.loads(stranger.recv(timeout=10))
        assert (refused["type"], refused["status"]) == ("chat.error", 403)
        bearer = {"Authorization": "Bearer key-two"}
        with connect(f"{ws_url}/auth-ws/", origin=base_url, open_timeout=10, additional_headers=bearer) as socket:
            socket.send(json.dumps({"type": "chat.message", **OFF_TOPIC}))
            frames = [json.loads(socket.recv(timeout=30)) for _ in range(2)]
        assert frames[-1]["type"] == "chat.done"
        session_id, cookie = widget_browser(base_url)
        with connect(f"{ws_url}/{session_id}/", origin=base_url, open_timeout=10, additional_headers=cookie) as widget:
            widget.send(json.dumps({"type": "chat.message", **OFF_TOPIC}))
            frames = [json.loads(widget.recv(timeout=30)) for _ in range(2)]
        assert frames[-1]["type"] == "chat.done"
    log = (stack.log_dir / "web-keys.log").read_text(errors="replace")
    assert "require one of 2 API keys" in log


def test_rate_limits_per_session_and_address_are_shared_by_every_web_process(stack) -> None:
    limits = {"LEAFRESH_RATE_LIMIT_SESSION": "2/minute", "LEAFRESH_RATE_LIMIT_ADDRESS": "3/minute"}
    with launch_web(stack, "limit-a", limits) as one, launch_web(stack, "limit-b", limits) as two:
        a, b = httpx.Client(base_url=one, timeout=30), httpx.Client(base_url=two, timeout=30)
        assert a.post(FREE_TEXT, json={"sessionId": "rl-1", **OFF_TOPIC}).status_code == 200
        assert b.post(FREE_TEXT, json={"sessionId": "rl-1", **OFF_TOPIC}).status_code == 200
        limited = a.get(FREE_TEXT, params={"sessionId": "rl-1", **OFF_TOPIC})  # the session's third, on either process
        assert limited.status_code == 429 and 1 <= int(limited.headers["Retry-After"]) <= 60
        assert limited.json()["status"] == 429 and "초 후에 다시 시도해 주세요" in limited.json()["message"]
        # The address: 3 a minute whatever the session (the request refused above was not counted by the address).
        assert b.post(FREE_TEXT, json={"sessionId": "rl-2", **OFF_TOPIC}).status_code == 200
        assert a.post(FREE_TEXT, json={"sessionId": "rl-3", **OFF_TOPIC}).status_code == 429
        with connect(f"ws{one[4:]}/ws/chat/rl-4/", origin=one, open_timeout=10) as socket:
            socket.send(json.dumps({"type": "chat.message", **OFF_TOPIC}))
            refused = json.loads(socket.recv(timeout=30))
        assert (refused["type"], refused["status"]) == ("chat.error", 429)


def test_an_api_key_holder_is_limited_per_session_not_per_address(stack) -> None:
    env = {"LEAFRESH_API_KEYS": "spring", "LEAFRESH_RATE_LIMIT_SESSION": "2/minute", "LEAFRESH_RATE_LIMIT_ADDRESS": "1/minute"}
    with launch_web(stack, "limit-keys", env) as base_url:
        client = httpx.Client(base_url=base_url, timeout=30, headers={"Authorization": "Bearer spring"})
        statuses = [client.post(FREE_TEXT, json={"sessionId": f"spring-{n}", **OFF_TOPIC}).status_code for n in range(4)]
        assert statuses == [200] * 4  # every user's requests come from the backend's one address
        statuses = [client.post(FREE_TEXT, json={"sessionId": "spring-0", **OFF_TOPIC}).status_code for _ in range(2)]
        assert statuses == [200, 429]


CANARIES = {
    "HF_TOKEN": "hf_canaryHFtoken7c1e",
    "DJANGO_SECRET_KEY": "canary-secret-key-5d0b-" + "x" * 40,
    "LEAFRESH_API_KEYS": "canary-api-key-91af",
    "QDRANT_API_KEY": "canary-qdrant-key-3b2d",
}


def _leaks(text: str) -> list[str]:
    found = [name for name, value in CANARIES.items() if value in text]
    # Task messages carry their body base64-encoded: decode every such body too.
    for body in re.findall(r'\\?"body\\?": ?\\?"([A-Za-z0-9+/=]{16,})', text):
        try:
            decoded = base64.b64decode(body).decode("utf-8", "replace")
        except ValueError:
            continue
        found += [name for name, value in CANARIES.items() if value in decoded]
    return found


def test_secrets_never_reach_logs_task_messages_or_responses(demo_model_dir) -> None:
    with launch_stack("canary", dict(CANARIES)) as stack:
        seen: list[str] = []
        stop = threading.Event()

        def watch() -> None:
            with stack.redis.monitor() as monitor:
                for command in monitor.listen():
                    seen.append(str(command.get("command", "")))
                    if stop.is_set():
                        return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        bearer = {"Authorization": f"Bearer {CANARIES['LEAFRESH_API_KEYS']}"}
        keyed = httpx.Client(base_url=stack.base_url, timeout=60, headers=bearer)
        bodies = [get_sse(keyed, FREE_TEXT, {"sessionId": "canary-1", "message": "텀블러를 쓰고 싶어요"}).raw.decode()]
        bodies.append(keyed.get(FREE_TEXT, params={"sessionId": "canary-1"}).text)  # 400
        bodies.append(keyed.get("/ai/chatbot/sessions/canary-1/messages").text)
        bodies.append(httpx.get(stack.base_url + FREE_TEXT, headers={"Authorization": "Bearer canary-api-key-91ag"}).text)
        with connect(
            f"{stack.ws_url}/ws/chat/canary-ws/", origin=stack.origin, open_timeout=10, additional_headers=bearer
        ) as socket:
            socket.send(json.dumps({"type": "chat.message", "message": "텀블러를 쓰고 싶어요"}))
            while (frame := json.loads(socket.recv(timeout=60)))["type"] not in ("chat.done", "chat.error"):
                bodies.append(json.dumps(frame, ensure_ascii=False))
        stop.set()
        keyed.get("/healthz")  # one more command, so the monitor wakes and stops
        watcher.join(timeout=10)
        assert any("gpu" in command for command in seen), "the monitor saw no task being sent"
        assert _leaks("\n".join(seen)) == []
        assert _leaks("\n".join(bodies)) == []
    logs = {path.name: path.read_text(errors="replace") for path in stack.log_dir.glob("*.log")}
    assert {"web.log", "worker.log", "cpu-worker.log"} <= set(logs)
    assert {name: _leaks(text) for name, text in logs.items() if _leaks(text)} == {}


@pytest.mark.parametrize("name", sorted(CANARIES))
def test_the_canary_check_finds_a_leak(name: str) -> None:
    """The leak finder itself: a planted secret is found, plain or inside a task body."""
    assert _leaks(f"log line {CANARIES[name]} end") == [name]
    body = base64.b64encode(json.dumps([{"token": CANARIES[name]}]).encode()).decode()
    assert _leaks(f'"LPUSH" "q" "{{\\"body\\": \\"{body}\\"}}"') == [name]
