"""Fixtures: the demo model, and the live stack (Redis, a solo-pool Celery GPU worker, daphne).

The stack is real processes started the way the Procfile starts them, isolated from a running
`make run` by its own Redis database, channel prefix, SQLite file and port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The demo model directory, trained first when it is missing or out of date."""
    from django.conf import settings
    from django.core.management import call_command

    call_command("train_demo_model", no_progress_bar=True)
    return Path(settings.LEAFRESH_DEMO_MODEL_DIR)


@pytest.fixture(scope="session")
def loaded_demo(demo_model_dir: Path):  # noqa: ANN201 - inference.loading.LoadedModel
    """The demo model loaded in this process (CPU)."""
    from inference.loading import ModelSettings, load_model

    return load_model(ModelSettings(source=str(demo_model_dir), cache_dir=demo_model_dir.parent / "hf", device="cpu"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _redis_url() -> str:
    """Redis for the tests: database 15 of REDIS_URL's server (started if none answers)."""
    base = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    return base.rsplit("/", 1)[0] + "/15" if base.count("/") >= 3 else base + "/15"


@dataclass
class Stack:
    base_url: str
    ws_url: str
    origin: str
    env: dict[str, str]
    redis: redis.Redis
    worker: subprocess.Popen[bytes]
    web: subprocess.Popen[bytes]
    log_dir: Path

    def worker_alive(self) -> bool:
        return any(True for _ in self.redis.scan_iter(match="leafresh:worker:*"))


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("wb")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def _wait(predicate, timeout: float, what: str, procs: list[subprocess.Popen[bytes]], log_dir: Path) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for proc in procs:
            if proc.poll() is not None:
                logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in log_dir.glob("*.log"))
                raise RuntimeError(f"a stack process exited while waiting for {what}:\n{logs}")
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.fixture(scope="session")
def stack(demo_model_dir: Path) -> Iterator[Stack]:
    """The whole stack on a free port, the way `make run` starts it."""
    log_dir = ROOT / "var" / "test" / f"stack-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    redis_url = _redis_url()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "DATABASE_URL": f"sqlite:///{log_dir / 'db.sqlite3'}",
        "LEAFRESH_CHANNEL_PREFIX": f"leafresh-test-{os.getpid()}",
        "LEAFRESH_MODEL": "",
        "LEAFRESH_DEVICE": "cpu",
        # Pings every 10 ms, so the 40 ms gaps between coalesced token events always carry some.
        "LEAFRESH_PING_INTERVAL_S": "0.01",
        "LEAFRESH_HEARTBEAT_TTL_S": "3",
        "PYTHONUNBUFFERED": "1",
    }
    subprocess.run([str(BIN / "python"), "manage.py", "ensure_redis"], cwd=ROOT, env=env, check=True)
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match="leafresh:worker:*"):
        client.delete(key)
    subprocess.run([str(BIN / "python"), "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)
    worker = _start(
        [str(BIN / "celery"), "-A", "celery_app", "worker", "-P", "solo", "-Q", "gpu", "--loglevel", "INFO",
         "-n", f"test-{os.getpid()}@%h", "--without-mingle", "--without-gossip"],
        env,
        log_dir / "worker.log",
    )
    web = _start([str(BIN / "daphne"), "-b", "127.0.0.1", "-p", str(port), "leafresh.asgi:application"], env, log_dir / "web.log")
    base_url = f"http://127.0.0.1:{port}"

    def web_up() -> bool:
        try:
            return httpx.get(base_url + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    stack = Stack(base_url, f"ws://127.0.0.1:{port}", base_url, env, client, worker, web, log_dir)
    try:
        _wait(web_up, 60, "daphne /healthz", [worker, web], log_dir)
        _wait(stack.worker_alive, 120, "the GPU worker's heartbeat", [worker, web], log_dir)
        yield stack
    finally:
        _stop(web)
        _stop(worker)
