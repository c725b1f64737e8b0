"""The stack as `make run` starts it (honcho and the Procfile): a GPU worker that dies is restarted,
and the next request completes, with nothing else restarted."""

from __future__ import annotations

import os
import signal
import subprocess

import httpx
import psutil

from tests.helpers import BASE_INFO, eventually, get_sse, gpu_worker_processes
from tests.stack import BIN, ROOT, free_port, prepare_stack


def test_make_run_restarts_a_gpu_worker_killed_with_sigkill(demo_model_dir) -> None:
    prepared = prepare_stack("procfile")
    env, log_dir = prepared.env, prepared.log_dir
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log = (log_dir / "honcho.log").open("wb")
    honcho = subprocess.Popen(
        [str(BIN / "honcho"), "start", "-f", "Procfile", "-p", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    params = {"sessionId": "procfile", "location": "도시", "workType": "사무직", "category": "플로깅"}
    try:
        http = httpx.Client(base_url=base_url, timeout=60)

        def answers() -> bool:
            try:
                return get_sse(http, BASE_INFO, params).terminal.event == "close"
            except httpx.HTTPError:
                return False

        assert eventually(answers, 120, 1.0), "the stack did not answer"
        parent = psutil.Process(honcho.pid)
        (worker,) = gpu_worker_processes(parent)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
        assert eventually(lambda: [w.pid for w in gpu_worker_processes(parent)] not in ([], [worker.pid]), 30)
        assert eventually(answers, 120, 1.0), "no answer after the worker was restarted"
        assert honcho.poll() is None, "honcho stopped the stack"
        assert "the GPU worker exited" in (log_dir / "honcho.log").read_text(errors="replace")
    finally:
        os.killpg(honcho.pid, signal.SIGTERM)
        try:
            honcho.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(honcho.pid, signal.SIGKILL)
        prepared.cleanup()
