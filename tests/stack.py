"""Starting the whole stack as real processes (Redis, a solo-pool Celery GPU worker, a CPU worker,
daphne) the way the Procfile does, for the end-to-end tests and the benchmark. Each stack is
isolated by its own Redis key prefix, SQLite file, knowledge index and port.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
import redis

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    """A running stack; `worker` may be replaced by a test that restarts it."""

    base_url: str
    ws_url: str
    origin: str
    env: dict[str, str]
    redis: redis.Redis
    worker: subprocess.Popen[bytes]
    web: subprocess.Popen[bytes]
    log_dir: Path
    prefix: str
    tag: str = ""
    port: int = 0
    web_log: Path | None = None  # the running daphne's log (a restart writes a new one)

    def worker_alive(self) -> bool:
        return any(True for _ in self.redis.scan_iter(match=f"{self.prefix}:worker:*"))

    def stop_web(self) -> None:
        """Stop daphne (SIGTERM; SIGKILL after 15 s)."""
        _stop(self.web)

    def restart_web(self) -> None:
        """Stop daphne (if it still runs) and start a new one on the same port; return once it answers."""
        _stop(self.web)
        self.web_log = self._next_log("web-restarted")
        self.web = _start_web(self.port, self.env, self.web_log)
        _wait(lambda: _web_up(self.base_url), 60, "the restarted daphne", [self.worker, self.web], self.log_dir)

    def _next_log(self, stem: str) -> Path:
        """A log file name not used yet in this stack's folder (restarts keep the earlier logs)."""
        n = 1
        while (self.log_dir / f"{stem}-{n}.log").exists():
            n += 1
        return self.log_dir / f"{stem}-{n}.log"

    def restart(self) -> None:
        """Stop daphne and the GPU worker (SIGTERM) and start new ones on the same port, database,
        Redis prefix and knowledge index; return once both answer again."""
        _stop(self.web)
        _stop(self.worker)
        _wait(lambda: not self.worker_alive(), 15, "the old worker's heartbeat to go", [], self.log_dir)
        self.worker = _start_worker(self.tag, self.env, self.log_dir)
        self.restart_web()
        _wait(self.worker_alive, 120, "the restarted worker's heartbeat", [self.worker, self.web], self.log_dir)


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


def _wait(predicate, timeout: float, what: str, procs: list[subprocess.Popen[bytes]], log_dir: Path) -> None:
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


def _start_worker(tag: str, env: dict[str, str], log_dir: Path, name: str = "") -> subprocess.Popen[bytes]:
    """The GPU worker, as the Procfile starts it, appending to the stack's worker.log (a `name`d
    extra worker: its own Celery node name and worker-<name>.log)."""
    node, log = (f"{tag}-{name}", f"worker-{name}.log") if name else (tag, "worker.log")
    cmd = [str(BIN / "celery"), "-A", "celery_app", "worker", "-P", "solo", "-Q", "gpu", "--loglevel", "INFO"]
    cmd += ["-n", f"{node}-{os.getpid()}@%h", "--without-mingle", "--without-gossip", "--without-heartbeat"]
    handle = (log_dir / log).open("ab")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def worker_name(worker: subprocess.Popen[bytes]) -> str:
    """The name a GPU worker started here runs under (its heartbeat key's end, `chat.queued`'s
    `worker`): `<host>:<pid>`, as inference.worker.WorkerRuntime names itself."""
    return f"{socket.gethostname()}:{worker.pid}"


def worker_heartbeat(stack: Stack, worker: subprocess.Popen[bytes]) -> dict | None:
    """The worker's live heartbeat (`{"name", "model", "running", "waiting", "at"}`), or None once it expired."""
    for key in stack.redis.scan_iter(match=f"{stack.prefix}:worker:*:{worker_name(worker)}"):
        value = stack.redis.get(key)
        if value is not None:
            return json.loads(value)
    return None


@contextmanager
def launch_gpu_worker(stack: Stack, name: str) -> Iterator[subprocess.Popen[bytes]]:
    """Another GPU worker beside `stack`'s, on the same Redis prefix, database and queue, logging to
    worker-<name>.log; yields it once its heartbeat is up and stops it after (SIGTERM, then SIGKILL)."""
    worker = _start_worker(stack.tag, stack.env, stack.log_dir, name)
    try:
        _wait(
            lambda: worker_heartbeat(stack, worker) is not None,
            120,
            f"the {name} GPU worker's heartbeat",
            [worker],
            stack.log_dir,
        )
        yield worker
    finally:
        _stop(worker)


def _start_web(port: int, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    # As the Procfile: a WebSocket handshake may take longer than daphne's default 5 s under load;
    # verbosity 0 drops daphne's plain-text access log (leafresh.request logs each request as JSON).
    command = [str(BIN / "daphne"), "-b", "127.0.0.1", "-p", str(port), "--websocket_connect_timeout", "30"]
    command += ["--verbosity", "0"]
    return _start([*command, "leafresh.asgi:application"], env, log)


def _web_up(base_url: str) -> bool:
    try:
        return httpx.get(base_url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def launch_web(stack: Stack, tag: str, extra_env: dict[str, str]) -> Iterator[str]:
    """A second daphne beside `stack`'s, on the same Redis prefix and database with `extra_env` on
    top of the stack's environment; yields its base URL and stops it after."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    web = _start_web(port, {**stack.env, **extra_env}, stack.log_dir / f"web-{tag}.log")
    try:
        _wait(lambda: _web_up(base_url), 60, f"the {tag} daphne's /healthz", [web], stack.log_dir)
        yield base_url
    finally:
        _stop(web)


def _index_knowledge(env: dict[str, str], index_dir: Path) -> None:
    """Give the stack its own knowledge index (LEAFRESH_QDRANT_PATH) of the seeded documents.

    A fresh database gives the seeded documents the same ids every time, so the index is built once
    under var/test/qdrant-seed (incrementally: nothing is embedded when it is up to date) and copied.
    """
    seed = ROOT / "var" / "test" / "qdrant-seed"
    build = [str(BIN / "python"), "manage.py", "build_index", "--no-progress-bar"]
    subprocess.run(build, cwd=ROOT, env={**env, "LEAFRESH_QDRANT_PATH": str(seed)}, check=True, stdout=subprocess.DEVNULL)
    shutil.copytree(seed, index_dir, dirs_exist_ok=True)
    env["LEAFRESH_QDRANT_PATH"] = str(index_dir)


@dataclass
class PreparedStack:
    """What a stack's processes need: their environment, the stack's folder, a Redis client and the
    stack's Redis key prefix. `cleanup()` deletes the stack's Redis keys and its database."""

    env: dict[str, str]
    log_dir: Path
    redis: redis.Redis
    prefix: str
    drop_database: Callable[[], None]

    def cleanup(self) -> None:
        for key in self.redis.scan_iter(match=f"{self.prefix}:*"):
            self.redis.delete(key)
        self.drop_database()


def _stack_database(tag: str, log_dir: Path) -> tuple[str, Callable[[], None]]:
    """The stack's own database URL and how to drop it: a SQLite file in its folder, or, when the
    suite runs on PostgreSQL (DATABASE_URL postgres://…), a fresh database on that server."""
    base = os.environ.get("DATABASE_URL", "")
    if not base.startswith(("postgres://", "postgresql://")):
        return f"sqlite:///{log_dir / 'db.sqlite3'}", lambda: None
    import psycopg
    from psycopg import sql

    parsed = urlparse(base)
    name = re.sub(r"[^a-z0-9_]", "_", f"leafresh_{tag}_{os.getpid()}".lower())
    server = parsed._replace(path="/postgres").geturl()

    def drop() -> None:
        with psycopg.connect(server, autocommit=True) as connection:
            connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    drop()
    with psycopg.connect(server, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return parsed._replace(path=f"/{name}").geturl(), drop


def prepare_stack(tag: str, extra_env: dict[str, str] | None = None) -> PreparedStack:
    """A stack's environment, ready for its processes: Redis answering (started if needed), a fresh
    migrated database (SQLite, or PostgreSQL when the suite runs on it) and its own knowledge index,
    under var/test/<tag>-<pid>/."""
    log_dir = ROOT / "var" / "test" / f"{tag}-{os.getpid()}"
    log_dir.mkdir(parents=True, exist_ok=True)
    redis_url = (extra_env or {}).get("REDIS_URL") or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"leafresh-test-{tag}-{os.getpid()}"
    database_url, drop_database = _stack_database(tag, log_dir)
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "LEAFRESH_REDIS_PREFIX": prefix,
        "LEAFRESH_MODEL": "",
        "LEAFRESH_DEVICE": "cpu",
        # Pings every 10 ms in tests, so the 40 ms gaps between coalesced token events always carry some.
        "LEAFRESH_PING_INTERVAL_S": "0.01",
        "LEAFRESH_HEARTBEAT_TTL_S": "3",
        # Tests and the benchmark send many requests from one address: no rate limits unless a test sets them.
        "LEAFRESH_RATE_LIMIT_SESSION": "",
        "LEAFRESH_RATE_LIMIT_ADDRESS": "",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    subprocess.run([str(BIN / "python"), "manage.py", "ensure_redis"], cwd=ROOT, env=env, check=True)
    client = redis.Redis.from_url(redis_url)
    subprocess.run([str(BIN / "python"), "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)
    _index_knowledge(env, log_dir / "qdrant")
    return PreparedStack(env, log_dir, client, prefix, drop_database)


@contextmanager
def launch_stack(tag: str, extra_env: dict[str, str] | None = None) -> Iterator[Stack]:
    """Start Redis (if needed), migrate a fresh SQLite file, then the worker and daphne; stop them after.

    Every Redis key of the stack is under its own LEAFRESH_REDIS_PREFIX, so concurrent test runs and a
    running `make run` on the same Redis never see each other's tasks or events.
    """
    prepared = prepare_stack(tag, extra_env)
    env, log_dir, client, prefix = prepared.env, prepared.log_dir, prepared.redis, prepared.prefix
    port = free_port()
    cpu_worker = _start(
        [
            *[str(BIN / "celery"), "-A", "celery_app", "worker", "-P", "solo", "-Q", "cpu", "--loglevel", "INFO"],
            *["-n", f"cpu-{tag}-{os.getpid()}@%h", "--without-mingle", "--without-gossip", "--without-heartbeat"],
        ],
        env,
        log_dir / "cpu-worker.log",
    )
    worker = _start_worker(tag, env, log_dir)
    web = _start_web(port, env, log_dir / "web.log")
    base_url = f"http://127.0.0.1:{port}"
    stack = Stack(base_url, f"ws://127.0.0.1:{port}", base_url, env, client, worker, web, log_dir, prefix, tag, port)
    stack.web_log = log_dir / "web.log"
    try:
        _wait(lambda: _web_up(base_url), 60, "daphne /healthz", [worker, web], log_dir)
        _wait(stack.worker_alive, 120, "the GPU worker's heartbeat", [worker, web], log_dir)
        yield stack
    finally:
        _stop(stack.web)
        _stop(stack.worker)
        _stop(cpu_worker)
        prepared.cleanup()
