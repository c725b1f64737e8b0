"""More than one GPU worker: requests from any daphne spread over them; a worker killed mid-answer
ends its own streams with one 503 each while the other worker finishes its own; `make run
LEAFRESH_GPU_WORKERS=N` starts N named workers, and bin/gpu-worker pins each to one GPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from inference.serving import MESSAGE_LENGTH
from tests.helpers import (
    BASE_INFO,
    FREE_TEXT,
    SSEStream,
    assert_one_terminal_last,
    eventually,
    get_sse,
    gpu_worker_processes,
    parse_sse,
)
from tests.stack import (
    ROOT,
    Stack,
    free_port,
    launch_gpu_worker,
    launch_stack,
    launch_web,
    prepare_stack,
    worker_heartbeat,
)

MESSAGE = "일회용품을 줄이고 싶어요"
MAX_STREAMS = 8  # opened two at a time until both workers run some


@dataclass
class TwoWorkers:
    """A stack with two GPU workers (the stack's own, then `second`) and two daphnes."""

    stack: Stack
    workers: list[subprocess.Popen[bytes]]
    logs: list[Path]
    base_urls: list[str]

    def finished(self, index: int) -> set[str]:
        """Ids of the requests worker `index` logged as finished (any reason)."""
        return set(re.findall(r"request (\S+) finished: ", self.logs[index].read_text(errors="replace")))

    def running(self) -> list[int]:
        """Each worker's running requests, from its heartbeat (0 when it has none)."""
        return [(worker_heartbeat(self.stack, w) or {}).get("running", 0) for w in self.workers]


@pytest.fixture(scope="module")
def two_workers(slow_model_dir: Path) -> Iterator[TwoWorkers]:
    """The slow random model (answers run to their token budget) on two GPU workers and two daphnes."""
    env = {"LEAFRESH_MODEL": str(slow_model_dir), "LEAFRESH_HEARTBEAT_TTL_S": "2"}
    with launch_stack("gpu2", env) as stack, launch_gpu_worker(stack, "second") as second:
        with launch_web(stack, "second", {}) as other_web:
            logs = [stack.log_dir / "worker.log", stack.log_dir / "worker-second.log"]
            yield TwoWorkers(stack, [stack.worker, second], logs, [stack.base_url, other_web])


@dataclass
class LiveStream:
    """One free-text SSE stream read to its end in a thread of its own."""

    base_url: str
    session: str
    request_id: str = ""
    answering: threading.Event = field(default_factory=threading.Event)  # its first `challenge` arrived
    stream: SSEStream | None = None
    ended_at: float = 0.0
    failure: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> LiveStream:
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        return self

    def _read(self) -> None:
        try:
            with httpx.Client(base_url=self.base_url, timeout=120) as client:
                params = {"sessionId": self.session, "message": MESSAGE}
                with client.stream("GET", FREE_TEXT, params=params) as response:
                    self.request_id = response.headers["X-Request-ID"]
                    raw = b""
                    for chunk in response.iter_raw():
                        raw += chunk
                        if not self.answering.is_set() and b"event: challenge" in raw:
                            self.answering.set()
            self.ended_at = time.monotonic()
            self.stream = SSEStream(response.status_code, response.headers, raw, parse_sse(raw))
        except BaseException as exc:  # reported by finish()
            self.failure = exc
        finally:
            self.answering.set()

    def finish(self, timeout: float) -> SSEStream:
        """Wait for the stream's end; return it (raises what the reading thread raised)."""
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"stream {self.session} ({self.request_id}) did not end in {timeout} s"
        if self.failure is not None:
            raise self.failure
        assert self.stream is not None
        return self.stream


def _busy_on_both(setup: TwoWorkers, tag: str) -> tuple[list[LiveStream], list[int]]:
    """Open streams two at a time (one per daphne) until both workers are answering some; return
    them (all answering, none finished) and each worker's running count then."""
    streams: list[LiveStream] = []
    running = [0, 0]
    while len(streams) < MAX_STREAMS:
        pair = [LiveStream(url, f"{tag}-{len(streams) + i}").start() for i, url in enumerate(setup.base_urls)]
        streams += pair
        for live in pair:
            assert live.answering.wait(90), f"stream {live.session} never started answering"
            assert live.failure is None and live.stream is None, f"stream {live.session} ended early: {live.failure}"
        # Heartbeats refresh every 2/3 s: wait until they account for every stream.
        opened = len(streams)
        assert eventually(lambda n=opened: sum(setup.running()) == n, 10), (setup.running(), opened)
        running = setup.running()
        if all(running):
            return streams, running
    raise AssertionError(f"{len(streams)} streams all went to one worker: {running}")


def _completed(stream: SSEStream) -> bool:
    """The stream ended with its worker's own terminal event: `close`, or the engine's `error` 500 at
    the token budget (the slow random model rarely closes its strings, so it answers to the budget)."""
    terminal = stream.terminal
    return terminal.event == "close" or (terminal.event == "error" and terminal.data["message"] == MESSAGE_LENGTH)


def test_a_killed_worker_ends_its_own_streams_with_503_and_the_other_worker_finishes_its_own(two_workers: TwoWorkers) -> None:
    # Both workers answer streams that came through both daphnes.
    streams, (survivor_running, victim_running) = _busy_on_both(two_workers, "kill")
    os.killpg(two_workers.workers[1].pid, signal.SIGKILL)
    killed_at = time.monotonic()

    ended = [(live, live.finish(180)) for live in streams]
    for _, stream in ended:
        assert_one_terminal_last(stream)
    dropped = [(live, s) for live, s in ended if s.terminal.event == "error" and s.terminal.data["status"] == 503]
    completed = [(live, s) for live, s in ended if _completed(s)]
    assert len(dropped) + len(completed) == len(streams), [s.terminal for _, s in ended]
    assert (len(dropped), len(completed)) == (victim_running, survivor_running)
    for live, stream in dropped:
        assert stream.terminal.data["message"] and stream.terminal.data["data"] is None
        assert live.ended_at - killed_at < 15, f"{live.session} ended {live.ended_at - killed_at:.1f} s after the kill"
    survived = two_workers.finished(0)
    assert {live.request_id for live, _ in completed} <= survived, "a survivor's stream ended without its log line"
    assert not {live.request_id for live, _ in dropped} & survived, "a killed worker's request ran again elsewhere"

    # New requests, through either daphne, go to the survivor and complete.
    after = [LiveStream(url, f"after-{i}").start() for i, url in enumerate(two_workers.base_urls)]
    for live in after:
        stream = live.finish(180)
        assert_one_terminal_last(stream)
        assert _completed(stream), stream.terminal
        assert live.request_id in two_workers.finished(0)


BASE_INFO_PARAMS = {"location": "도시", "workType": "사무직", "category": "플로깅"}


def _finished_by_copy(honcho_output: str) -> dict[str, set[str]]:
    """The ids of the requests each honcho copy (`worker.1`, …) logged as finished."""
    served: dict[str, set[str]] = {}
    for copy, request_id in re.findall(r"^\S+ (worker\.\d+) +\|.*\brequest (\S+) finished: ", honcho_output, re.MULTILINE):
        served.setdefault(copy, set()).add(request_id)
    return served


def test_make_run_with_two_gpu_workers_starts_two_named_workers(demo_model_dir) -> None:
    prepared = prepare_stack("make-gpu2")
    port = free_port()
    # The test has set the stack up already: `-o setup` runs only `run`'s own recipe.
    env = {k: v for k, v in prepared.env.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    log = (prepared.log_dir / "make.log").open("wb")
    command = ["make", "-o", "setup", "run", f"PORT={port}", "LEAFRESH_GPU_WORKERS=2"]
    make = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def heartbeats() -> list[dict]:
        keys = prepared.redis.scan_iter(match=f"{prepared.prefix}:worker:*")
        return [json.loads(value) for key in keys if (value := prepared.redis.get(key)) is not None]

    try:
        assert eventually(lambda: len(heartbeats()) == 2, 120, 0.5), (prepared.log_dir / "make.log").read_text()[-3000:]
        names = {beat["name"] for beat in heartbeats()}
        assert len(names) == 2, names
        workers = gpu_worker_processes(psutil.Process(make.pid))
        assert {f"{w.pid}" for w in workers} == {name.rpartition(":")[2] for name in names}
        nodes = sorted(w.cmdline()[w.cmdline().index("-n") + 1] for w in workers)
        assert nodes == ["gpu1@%h", "gpu2@%h"]
        if "CUDA_VISIBLE_DEVICES" not in os.environ and shutil.which("nvidia-smi") is None:
            assert all("CUDA_VISIBLE_DEVICES" not in w.environ() for w in workers), "pinned to a GPU on a machine without one"
        # Concurrent requests are shared out over both workers (each logs the requests it finished).
        served: dict[str, set[str]] = {}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client, ThreadPoolExecutor(6) as pool:
            for attempt in range(3):
                sessions = [{**BASE_INFO_PARAMS, "sessionId": f"spread-{attempt}-{i}"} for i in range(6)]
                streams = list(pool.map(lambda params: get_sse(client, BASE_INFO, params), sessions))
                assert all(stream.terminal.event == "close" for stream in streams), [s.terminal for s in streams]
                served = _finished_by_copy((prepared.log_dir / "make.log").read_text(errors="replace"))
                if len(served) == 2:
                    break
        assert sorted(served) == ["worker.1", "worker.2"], served
        assert not served["worker.1"] & served["worker.2"]
    finally:
        started = psutil.Process(make.pid).children(recursive=True)
        os.killpg(make.pid, signal.SIGTERM)
        try:
            make.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(make.pid, signal.SIGKILL)
        _, left = psutil.wait_procs(started, timeout=15)
        for process in left:  # honcho starts each process in a session of its own
            process.kill()
        prepared.cleanup()


def _launch(copy: str | None, **env: str) -> tuple[str | None, list[str]]:
    """Run bin/gpu-worker as honcho's copy `copy` on a command that reports what it was given:
    (CUDA_VISIBLE_DEVICES, the arguments bin/gpu-worker added)."""
    report = "import json, os, sys; print(json.dumps([os.environ.get('CUDA_VISIBLE_DEVICES'), sys.argv[1:]]))"
    base = {
        k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "LEAFRESH_GPU_DEVICES", "LEAFRESH_GPU_WORKERS")
    }
    base.pop("HONCHO_PROCESS_NAME", None)
    if copy is not None:
        base["HONCHO_PROCESS_NAME"] = copy
    result = subprocess.run(
        ["sh", "bin/gpu-worker", sys.executable, "-c", report],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    device, added = json.loads(result.stdout)
    return device, added


@pytest.mark.no_database
def test_gpu_worker_launcher_names_each_copy_and_leaves_a_machine_without_gpus_alone(tmp_path: Path) -> None:
    assert _launch(None) == (None, ["-n", "gpu1@%h"])  # outside honcho: the first copy
    assert _launch("worker.3") == (None, ["-n", "gpu3@%h"])
    if shutil.which("nvidia-smi") is None:
        assert _launch("worker.2", LEAFRESH_GPU_WORKERS="2") == (None, ["-n", "gpu2@%h"])


@pytest.mark.no_database
def test_gpu_worker_launcher_pins_each_copy_to_one_gpu(tmp_path: Path) -> None:
    # LEAFRESH_GPU_DEVICES: copy i gets the i-th entry, round-robin past the end.
    listed = {"LEAFRESH_GPU_DEVICES": "5, 7"}
    assert [_launch(f"worker.{i}", **listed)[0] for i in (1, 2, 3)] == ["5", "7", "5"]
    # With several workers, the devices CUDA_VISIBLE_DEVICES already lists are shared out.
    visible = {"LEAFRESH_GPU_WORKERS": "2", "CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b"}
    assert [_launch(f"worker.{i}", **visible)[0] for i in (1, 2)] == ["GPU-a", "GPU-b"]
    assert _launch("worker.1", CUDA_VISIBLE_DEVICES="GPU-a,GPU-b")[0] == "GPU-a,GPU-b"  # one worker: as given
    # Otherwise the GPUs nvidia-smi lists (a stand-in here: this machine has no GPU).
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\nprintf '0\\n1\\n2\\n'\n")
    (fake / "nvidia-smi").chmod(0o755)
    path = {"PATH": f"{fake}:{os.environ['PATH']}"}
    assert [_launch(f"worker.{i}", LEAFRESH_GPU_WORKERS="3", **path)[0] for i in (1, 2, 3)] == ["0", "1", "2"]
    assert _launch("worker.1", **path)[0] is None  # one worker: left as today
