"""`make soak`: many concurrent streams for a long while against one daphne and one GPU worker, on
loopback, to show that nothing hangs, nothing leaks and every stream ends.

Each of `--clients` clients (half SSE, half WebSocket, each with its own chat session; a WebSocket
client keeps its socket across requests, as the widget does) sends free-text requests one after
another until `--duration-s` is over or `--max-requests` were sent; a
`--disconnect-share` of the requests is abandoned right after its first text (the client closes the
connection, which must cancel the generation). Every request ends as one of:
- completed: the answer's terminal `close` / `chat.done`;
- failed: an `error` / `chat.error`, a transport error, or no end within `--request-timeout-s`
  (a hang);
- cancelled: the client went away on purpose.

Reported: the counts, time to first text p50/p95 (request sent -> first `challenge` / `chat.token`),
and the web and worker processes' resident memory and open files idle before the load, under load
after the warm-up, and idle again at the end.
Writes bench/results/soak.json (and prints the same figures). Bounded: it stops at the duration or
the request count, whichever comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.sse import aiter_events, percentile  # noqa: E402
from tests.helpers import FREE_TEXT  # noqa: E402
from tests.stack import launch_stack  # noqa: E402

MESSAGES = [
    "텀블러를 쓰고 싶어요",
    "플라스틱 쓰레기를 줄이고 싶어요",
    "고기를 줄이고 채식 식단을 해 보고 싶어요",
    "이메일이랑 클라우드를 정리하고 싶어요",
    "집에서 전기를 아끼고 싶어요",
    "바닷가에서 쓰레기를 줍고 싶어요",
]


@dataclass
class Tally:
    """Outcomes and times to first text (seconds) of every request."""

    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    hung: int = 0
    first_text_s: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)

    def fail(self, why: str) -> None:
        self.failed += 1
        self.failures[why] = self.failures.get(why, 0) + 1


@dataclass(frozen=True)
class Plan:
    base_url: str
    ws_url: str
    origin: str
    deadline: float
    max_requests: int
    disconnect_share: float
    request_timeout_s: float


class Budget:
    """The run's request count, shared by the clients."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


async def _follow(events: AsyncIterator[tuple[str, str]], tally: Tally, started: float, abandon: bool) -> bool:
    """Count one request from its events, `("text" | "done" | "error", detail)`. Returns True when
    the client abandons it after its first text (the caller then closes the connection)."""
    seen_text = False
    async for kind, detail in events:
        if kind == "text":
            if not seen_text:
                seen_text = True
                tally.first_text_s.append(time.monotonic() - started)
            if abandon:
                tally.cancelled += 1
                return True
        elif kind == "done":
            tally.completed += 1
            return False
        elif kind == "error":
            tally.fail(detail)
            return False
    tally.fail("the stream ended without a terminal event")
    return False


async def _sse_request(client: httpx.AsyncClient, plan: Plan, session: str, tally: Tally, abandon: bool) -> None:
    started = time.monotonic()
    params = {"sessionId": session, "message": random.choice(MESSAGES)}
    async with client.stream("GET", plan.base_url + FREE_TEXT, params=params) as response:
        if response.status_code != 200:
            tally.fail(f"HTTP {response.status_code}")
            return

        async def events() -> AsyncIterator[tuple[str, str]]:
            kinds = {"challenge": "text", "close": "done", "error": "error"}
            async for event, data in aiter_events(response):
                yield kinds.get(event, ""), f"error {data.get('status')}: {data.get('message')}"

        await _follow(events(), tally, started, abandon)  # leaving the block closes the connection


class WidgetSocket:
    """A WebSocket client as the widget keeps one: one socket for its requests, a new one after it
    abandoned an answer (closing the socket is how it leaves)."""

    def __init__(self, plan: Plan, session: str) -> None:
        self.url = f"{plan.ws_url}/ws/chat/{session}/"
        self.origin = plan.origin
        self.socket: Any = None

    async def request(self, tally: Tally, abandon: bool) -> None:
        if self.socket is None:
            self.socket = await websockets.connect(self.url, origin=self.origin, open_timeout=30)
        started = time.monotonic()
        socket = self.socket

        async def events() -> AsyncIterator[tuple[str, str]]:
            kinds = {"chat.token": "text", "chat.done": "done", "chat.error": "error"}
            async for raw in socket:
                frame = json.loads(raw)
                yield kinds.get(frame.get("type"), ""), f"chat.error {frame.get('status')}: {frame.get('message')}"
            self.socket = None  # the server closed it: the next request opens another

        try:
            await socket.send(json.dumps({"type": "chat.message", "message": random.choice(MESSAGES)}))
            if await _follow(events(), tally, started, abandon):
                await self.close()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self.socket is not None:
            socket, self.socket = self.socket, None
            await socket.close()


async def _client(index: int, plan: Plan, budget: Budget, tally: Tally, http: httpx.AsyncClient) -> None:
    session = f"soak-{index}"
    widget = None if index % 2 == 0 else WidgetSocket(plan, session)
    await asyncio.sleep(random.uniform(0, 5))  # staggered arrivals
    while time.monotonic() < plan.deadline and budget.take():
        abandon = random.random() < plan.disconnect_share
        try:
            request = _sse_request(http, plan, session, tally, abandon) if widget is None else widget.request(tally, abandon)
            await asyncio.wait_for(request, timeout=plan.request_timeout_s)
        except TimeoutError:
            tally.hung += 1
            tally.fail("no end within the request timeout")
        except Exception as exc:  # noqa: BLE001 - every transport failure is counted, the client goes on
            tally.fail(type(exc).__name__)
    if widget is not None:
        await widget.close()


def _process_figures(pid: int, redis_port: int = 6379) -> dict[str, Any]:
    """Resident memory (MiB) and open files of a process and its children, and its TCP connections
    by peer (Redis or a client) and state."""
    process = psutil.Process(pid)
    processes = [process, *process.children(recursive=True)]
    rss = sum(p.memory_info().rss for p in processes if p.is_running())
    files = sum(p.num_fds() for p in processes if p.is_running())
    sockets: dict[str, int] = {}
    for p in processes:
        for connection in p.net_connections(kind="tcp"):
            peer = "redis" if connection.raddr and connection.raddr.port == redis_port else "client"
            key = f"{peer} {connection.status}"
            sockets[key] = sockets.get(key, 0) + 1
    return {"rss_mib": round(rss / 2**20, 1), "open_files": files, "tcp": dict(sorted(sockets.items()))}


def _percentile_ms(values: list[float], q: int) -> float | None:
    """The q-th percentile of `values` (seconds) in milliseconds; None without values."""
    return round(percentile(values, q) * 1000, 1) if values else None


async def _run(plan: Plan, clients: int, warmup_s: float, web_pid: int, worker_pid: int) -> dict[str, Any]:
    tally = Tally()
    budget = Budget(plan.max_requests)
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients)
    idle = {"web": _process_figures(web_pid), "worker": _process_figures(worker_pid)}
    async with httpx.AsyncClient(timeout=httpx.Timeout(plan.request_timeout_s, connect=30), limits=limits) as http:
        tasks = [asyncio.create_task(_client(i, plan, budget, tally, http)) for i in range(clients)]
        await asyncio.sleep(warmup_s)
        start = {"web": _process_figures(web_pid), "worker": _process_figures(worker_pid)}
        start_at = time.monotonic()
        while not all(t.done() for t in tasks):
            await asyncio.sleep(5)
            done = tally.completed + tally.failed + tally.cancelled
            print(
                f"  {time.monotonic() - start_at:6.0f} s: {done} requests ended "
                f"({tally.completed} completed, {tally.failed} failed, {tally.cancelled} cancelled)",
                flush=True,
            )
        await asyncio.gather(*tasks)
    await asyncio.sleep(10)  # let abandoned generations and closing connections wind down before the last reading
    end = {"web": _process_figures(web_pid), "worker": _process_figures(worker_pid)}
    return {
        "completed": tally.completed,
        "failed": tally.failed,
        "cancelled": tally.cancelled,
        "hung": tally.hung,
        "failures": tally.failures,
        "first_text_ms_p50": _percentile_ms(tally.first_text_s, 50),
        "first_text_ms_p95": _percentile_ms(tally.first_text_s, 95),
        "processes_idle_before": idle,
        "processes_after_warmup": start,
        "processes_idle_at_end": end,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--duration-s", type=float, default=600)
    parser.add_argument("--max-requests", type=int, default=20_000)
    parser.add_argument("--disconnect-share", type=float, default=0.1)
    parser.add_argument("--request-timeout-s", type=float, default=120)
    parser.add_argument("--warmup-s", type=float, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    random.seed(1234)
    # Every request waits its turn instead of being refused: room for all clients in the queue.
    env = {"LEAFRESH_MAX_WAITING": str(args.clients * 2), "LEAFRESH_PING_INTERVAL_S": "5", "LEAFRESH_LOG_LEVEL": "WARNING"}
    with launch_stack("soak", env) as stack:
        plan = Plan(
            stack.base_url,
            stack.ws_url,
            stack.origin,
            time.monotonic() + args.duration_s,
            args.max_requests,
            args.disconnect_share,
            args.request_timeout_s,
        )
        print(
            f"soak: {args.clients} clients (half SSE, half WebSocket) for {args.duration_s:.0f} s "
            f"or {args.max_requests} requests, against {stack.base_url}",
            flush=True,
        )
        started = time.monotonic()
        report = asyncio.run(_run(plan, args.clients, args.warmup_s, stack.web.pid, stack.worker.pid))
        report |= {
            "clients": args.clients,
            "duration_s": round(time.monotonic() - started, 1),
            "disconnect_share": args.disconnect_share,
            "cpus": os.cpu_count(),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    print(json.dumps(report, ensure_ascii=False, indent=2))
    if report["hung"] or report["completed"] == 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
