"""Redis restarted mid-answer, on a Redis server of the test's own (the suite's shared one stays up):
the stream ends with one `error`, not a hang, and once Redis is back new requests are served
without restarting daphne or the worker."""

from __future__ import annotations

import contextlib
import itertools
import subprocess

import httpx
import redis

from tests.helpers import FREE_TEXT, assert_one_terminal_last, eventually, stream_until_first_delta_then
from tests.stack import BIN, ROOT, free_port, launch_stack

MESSAGE = {"message": "텀블러를 쓰고 싶어요"}


def _streams_tokens(base_url: str, session: str) -> bool:
    """A free-text request is accepted and streams text (read until the first delta, then closed)."""
    try:
        with httpx.stream("GET", base_url + FREE_TEXT, params={"sessionId": session, **MESSAGE}, timeout=10) as response:
            for line in response.iter_lines():
                if line == "event: challenge":
                    return True
                if line in ("event: error", "event: close"):
                    return False
    except httpx.HTTPError:
        return False
    return False


def test_redis_restarted_mid_answer_ends_the_stream_and_new_requests_are_served_after(slow_model_dir) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    env = {"REDIS_URL": url, "LEAFRESH_MODEL": str(slow_model_dir), "LEAFRESH_HEARTBEAT_TTL_S": "2"}
    server = redis.Redis.from_url(url)
    try:
        with launch_stack("redis-restart", env) as stack:
            with httpx.Client(base_url=stack.base_url, timeout=30) as client:
                stream, ended_after = stream_until_first_delta_then(
                    client, "rr-1", lambda _: _shut_down(server), MESSAGE["message"]
                )
            assert_one_terminal_last(stream)
            assert stream.terminal.event == "error" and stream.terminal.data["status"] >= 500
            assert ended_after < 15, f"the stream took {ended_after:.1f} s to end after Redis went away"

            subprocess.run([str(BIN / "python"), "manage.py", "ensure_redis"], cwd=ROOT, env=stack.env, check=True)
            attempts = itertools.count()
            served = eventually(lambda: _streams_tokens(stack.base_url, f"rr-after-{next(attempts)}"), 30, 0.5)
            assert served, "no request was served within 30 s of Redis coming back"
            assert stack.web.poll() is None and stack.worker.poll() is None  # nothing was restarted
    finally:
        _shut_down(server)


def _shut_down(server: redis.Redis) -> None:
    with contextlib.suppress(redis.ConnectionError):  # the server closes this very connection as it goes
        server.shutdown(nosave=True)
