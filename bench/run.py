"""`make bench`: throughput and latency of one GPU worker serving many sessions, in one run.

Measures, on this machine and the configured model (the demo model by default):
- `baseline_sequential_tokens_per_s`: the first version's way — in-process `model.generate` with a
  `TextIteratorStreamer` read by the caller, one request after another;
- `engine_in_process_tokens_per_s` for 1, 8 and 32 concurrent requests (the engine, no web stack);
- for 1, 8 and 32 concurrent sessions through the whole stack (daphne + Redis + the Celery worker,
  real HTTP clients reading SSE, staggered arrivals): `e2e_tokens_per_s` (the worker's generated
  tokens, from /metrics, over wall time), `ttft_ms_p50/p95` (request sent -> first `challenge`
  event), `itl_ms_p50/p95` (gap between successive `challenge` events as the client sees them; the
  publisher coalesces tokens every LEAFRESH_FLUSH_INTERVAL_S), `errors`, and `lost_tokens` (streams
  whose concatenated deltas differ from the close payload's rendering count the differing characters).

Writes bench/results/latest.json and bench/results/latest.png. Every session runs
`--requests-per-session` requests one after another (a closed loop), so each level is a steady load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "leafresh.settings")

import django  # noqa: E402

django.setup()

import httpx  # noqa: E402
import torch  # noqa: E402
from django.conf import settings  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.sse import aiter_events, percentile  # noqa: E402
from chatbot import seed  # noqa: E402
from chatbot.demo_corpus import seed_messages  # noqa: E402
from chatbot.knowledge.indexing import knowledge_search  # noqa: E402
from chatbot.runtime import model_settings  # noqa: E402
from inference.answer import answer_schema  # noqa: E402
from inference.engine import Engine  # noqa: E402
from inference.loading import LoadedModel, load_model  # noqa: E402
from inference.render import render_answer  # noqa: E402
from inference.types import FinishReason, GenerationRequest, SamplingParams  # noqa: E402
from tests.stack import launch_stack  # noqa: E402

LABELS = {c["code"]: c["label"] for c in seed.CATEGORIES}
SAMPLING = SamplingParams()  # the production defaults (GenerationSettings' defaults)


def workload(i: int) -> dict[str, str]:
    """The i-th request's fields: base-info and free-text alternate over categories, places and jobs."""
    code = seed.CATEGORIES[i % len(seed.CATEGORIES)]["code"]
    if i % 2:
        message = seed.FREE_TEXT_MESSAGES[code][i % len(seed.FREE_TEXT_MESSAGES[code])]
        return {"mode": "free_text", "code": code, "message": message}
    return {
        "mode": "base_info",
        "code": code,
        "location": seed.LOCATIONS[i % len(seed.LOCATIONS)],
        "workType": seed.WORK_TYPES[(i // 2) % len(seed.WORK_TYPES)],
        "category": LABELS[code],
    }


_passages: dict[str, list[dict[str, str]]] = {}


def messages_for(work: dict[str, str]) -> list[dict[str, str]]:
    """The prompt the server builds for this request in a fresh session: free text with the passages
    retrieved from the knowledge index (`make bench` builds it first), as chatbot.services does."""
    fields = {k: work[k] for k in ("location", "workType", "category", "message") if k in work}
    if work["mode"] != "free_text":
        return seed_messages(work["mode"], fields)
    message = work["message"]
    if message not in _passages:
        hits = knowledge_search(message, k=settings.LEAFRESH_RETRIEVAL_K)
        _passages[message] = [{"title": h.title, "text": h.text, "category": h.category} for h in hits]
    return seed_messages("free_text", fields, passages=_passages[message])  # type: ignore[arg-type]


def schema_for(work: dict[str, str]) -> dict[str, Any]:
    """Free text lets the model choose each challenge's category (as the server builds it)."""
    if work["mode"] == "free_text":
        return answer_schema(category_labels=[c["label"] for c in seed.CATEGORIES])
    return answer_schema()


def _generate_into(model: Any, kwargs: dict[str, Any], output: list[Any]) -> None:
    output.append(model.generate(**kwargs))


def baseline_sequential(loaded: LoadedModel, requests: int) -> dict[str, float]:
    """The first version's way: generate() in a thread with a TextIteratorStreamer, one request at a time."""
    from transformers import InfNanRemoveLogitsProcessor, LogitsProcessorList, TextIteratorStreamer

    tokenizer, model = loaded.tokenizer, loaded.model
    tokens = 0
    started = time.perf_counter()
    for i in tqdm(range(requests), desc="baseline (sequential generate)", leave=False):
        text = tokenizer.apply_chat_template(messages_for(workload(i)), tokenize=False, add_generation_prompt=True)
        inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt").to(loaded.device)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        output: list[Any] = []
        kwargs = dict(
            **inputs,
            streamer=streamer,
            max_new_tokens=SAMPLING.max_new_tokens,
            do_sample=True,
            temperature=SAMPLING.temperature,
            top_p=SAMPLING.top_p,
            top_k=SAMPLING.top_k,
            logits_processor=LogitsProcessorList([InfNanRemoveLogitsProcessor()]),
            pad_token_id=tokenizer.pad_token_id,
        )
        thread = threading.Thread(target=_generate_into, args=(model, kwargs, output))
        thread.start()
        for _ in streamer:
            pass
        thread.join()
        tokens += int(output[0].shape[1] - inputs["input_ids"].shape[1])
    elapsed = time.perf_counter() - started
    return {"tokens_per_s": tokens / elapsed, "tokens": tokens, "seconds": elapsed}


class CountingSink:
    """An EventSink that counts finished requests and completion tokens."""

    def __init__(self) -> None:
        self.ended = threading.Semaphore(0)
        self.tokens = 0
        self.errors = 0

    def queued(self, request: GenerationRequest, position: int) -> None:
        pass

    def token(self, request: GenerationRequest, text: str) -> None:
        pass

    def challenge(self, request: GenerationRequest, index: int, card: dict[str, str]) -> None:
        pass

    def done(self, request: GenerationRequest, answer: dict, *, usage: dict, timings: dict, model: str = "") -> None:
        self.tokens += usage["completion_tokens"]
        self.ended.release()

    def error(self, request: GenerationRequest, status: int, message: str, finish_reason: FinishReason) -> None:
        self.errors += 1
        self.ended.release()

    def discard(self, request_id: str) -> None:
        pass


def engine_in_process(loaded: LoadedModel, sessions: int, per_session: int) -> dict[str, float]:
    """`sessions` requests in flight at all times (closed loop) until sessions x per_session are done."""
    sink = CountingSink()
    engine = Engine(loaded, sink, max_running=max(sessions, 1))
    engine.start()
    total = sessions * per_session
    try:

        def request(i: int) -> GenerationRequest:
            work = workload(i)
            return GenerationRequest(
                request_id=f"bench-{sessions}-{i}",
                group="bench",
                messages=messages_for(work),
                schema=schema_for(work),
                sampling=SAMPLING,
                default_category=work["code"] if work["mode"] == "base_info" else None,
                category_labels=LABELS,
                created_at=time.time(),
            )

        started = time.perf_counter()
        for i in range(sessions):
            engine.submit(request(i))
        for i in range(sessions, total + sessions):
            sink.ended.acquire()
            if i < total:
                engine.submit(request(i))
        elapsed = time.perf_counter() - started
    finally:
        engine.stop()
    return {"tokens_per_s": sink.tokens / elapsed, "tokens": sink.tokens, "seconds": elapsed, "errors": sink.errors}


async def _one_stream(client: httpx.AsyncClient, i: int, session: str, stats: dict[str, Any]) -> None:
    work = workload(i)
    if work["mode"] == "base_info":
        path = "/ai/chatbot/recommendation/base-info"
        params = {"sessionId": session, "location": work["location"], "workType": work["workType"], "category": work["category"]}
    else:
        path = "/ai/chatbot/recommendation/free-text"
        params = {"sessionId": session, "message": work["message"]}
    sent = time.perf_counter()
    last_event: float | None = None
    text = ""
    terminal: dict[str, Any] | None = None
    try:
        async with client.stream("GET", path, params=params) as response:
            async for event, data in aiter_events(response):
                now = time.perf_counter()
                if event == "challenge":
                    if last_event is None:
                        stats["ttft"].append(now - sent)
                    else:
                        stats["itl"].append(now - last_event)
                    last_event = now
                    text += data["data"]
                else:
                    terminal = {"event": event, "data": data}
    except httpx.HTTPError:
        stats["errors"] += 1
        return
    if terminal is None or terminal["event"] != "close":
        stats["errors"] += 1
        return
    final = render_answer(terminal["data"]["data"])
    if final != text:
        common = len(os.path.commonprefix([final, text]))  # noqa: RUF071 - character by character is what is meant
        stats["lost_tokens"] += max(len(final), len(text)) - common


async def _session(client: httpx.AsyncClient, index: int, sessions: int, per_session: int, stagger_s: float, stats: dict) -> None:
    await asyncio.sleep(index * stagger_s)
    for k in range(per_session):
        # A fresh session per request: every level sends the same prompts as the in-process runs
        # (no history, which would lengthen the prompts turn by turn).
        await _one_stream(client, index * per_session + k, f"bench-{sessions}-{index}-{k}", stats)


def _worker_tokens(base_url: str) -> float:
    text = httpx.get(base_url + "/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "leafresh_generation_tokens_total"
    )


def end_to_end(base_url: str, sessions: int, per_session: int, stagger_s: float, publish_wait_s: float) -> dict[str, Any]:
    """`sessions` concurrent SSE clients, each running `per_session` requests one after another."""
    stats: dict[str, Any] = {"ttft": [], "itl": [], "errors": 0, "lost_tokens": 0}
    before = _worker_tokens(base_url)

    async def run() -> float:
        limits = httpx.Limits(max_connections=sessions + 4, max_keepalive_connections=sessions + 4)
        async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
            started = time.perf_counter()
            await asyncio.gather(*(_session(client, i, sessions, per_session, stagger_s, stats) for i in range(sessions)))
            return time.perf_counter() - started

    elapsed = asyncio.run(run())
    time.sleep(publish_wait_s)  # the worker publishes its counters with each heartbeat
    tokens = _worker_tokens(base_url) - before
    return {
        "e2e_tokens_per_s": round(tokens / elapsed, 1),
        "tokens": int(tokens),
        "seconds": round(elapsed, 3),
        "requests": sessions * per_session,
        "ttft_ms_p50": round(percentile(stats["ttft"], 50) * 1000, 1),
        "ttft_ms_p95": round(percentile(stats["ttft"], 95) * 1000, 1),
        "itl_ms_p50": round(percentile(stats["itl"], 50) * 1000, 1),
        "itl_ms_p95": round(percentile(stats["itl"], 95) * 1000, 1),
        "errors": stats["errors"],
        "lost_tokens": stats["lost_tokens"],
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted(results["sessions"], key=int)
    x = [int(level) for level in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(x, [results["engine_in_process_tokens_per_s"][lv] for lv in levels], "o-", label="engine in process")
    left.plot(x, [results["sessions"][lv]["e2e_tokens_per_s"] for lv in levels], "s-", label="whole stack (SSE)")
    left.axhline(results["baseline_sequential_tokens_per_s"], color="grey", linestyle="--", label="baseline: sequential generate")
    left.set(xscale="log", xticks=x, xticklabels=[str(v) for v in x], xlabel="concurrent sessions", ylabel="tokens / s")
    left.set_title("Throughput")
    left.legend()
    right.plot(x, [results["sessions"][lv]["ttft_ms_p50"] for lv in levels], "o-", label="TTFT p50")
    right.plot(x, [results["sessions"][lv]["ttft_ms_p95"] for lv in levels], "o--", label="TTFT p95")
    right.plot(x, [results["sessions"][lv]["itl_ms_p50"] for lv in levels], "s-", label="inter-event p50")
    right.plot(x, [results["sessions"][lv]["itl_ms_p95"] for lv in levels], "s--", label="inter-event p95")
    right.set(xscale="log", xticks=x, xticklabels=[str(v) for v in x], xlabel="concurrent sessions", ylabel="ms")
    right.set_title("Latency through the stack")
    right.legend()
    fig.suptitle(f"{results['model']} on {results['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", default="1,8,32", help="concurrency levels, comma-separated")
    parser.add_argument("--requests-per-session", type=int, default=16)
    parser.add_argument("--baseline-requests", type=int, default=16)
    parser.add_argument("--stagger-ms", type=float, default=20.0, help="delay between session arrivals")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    levels = [int(v) for v in args.sessions.split(",")]
    if settings.LEAFRESH_TORCH_THREADS > 0:
        torch.set_num_threads(settings.LEAFRESH_TORCH_THREADS)  # as the worker does
    loaded = load_model(model_settings())
    results: dict[str, Any] = {
        "model": loaded.name,
        "device": f"{loaded.device} ({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__})",
        "sampling": SAMPLING.__dict__,
        "requests_per_session": args.requests_per_session,
    }
    print(f"model: {loaded.name} on {loaded.device}")
    base = baseline_sequential(loaded, args.baseline_requests)
    results["baseline_sequential_tokens_per_s"] = round(base["tokens_per_s"], 1)
    print(f"baseline (sequential generate): {base['tokens_per_s']:.1f} tokens/s")
    results["engine_in_process_tokens_per_s"] = {}
    for level in levels:
        measured = engine_in_process(loaded, level, args.requests_per_session)
        results["engine_in_process_tokens_per_s"][str(level)] = round(measured["tokens_per_s"], 1)
        print(f"engine in process, {level:>2} concurrent: {measured['tokens_per_s']:.1f} tokens/s ({measured['errors']} errors)")
    del loaded
    env = {
        "LEAFRESH_MAX_RUNNING": str(max(levels)),
        "LEAFRESH_MAX_WAITING": str(4 * max(levels)),
        "LEAFRESH_PING_INTERVAL_S": "5",
        "LEAFRESH_HEARTBEAT_TTL_S": "3",
        "LEAFRESH_LOG_LEVEL": "WARNING",
    }
    if settings.LEAFRESH_MODEL:
        env["LEAFRESH_MODEL"] = settings.LEAFRESH_MODEL
    results["sessions"] = {}
    with launch_stack("bench", env) as stack:
        end_to_end(stack.base_url, 1, 1, 0, 0)  # warm-up: connections, first grammar compile
        for level in levels:
            measured = end_to_end(stack.base_url, level, args.requests_per_session, args.stagger_ms / 1000, 1.5)
            results["sessions"][str(level)] = measured
            print(
                f"whole stack, {level:>2} sessions: {measured['e2e_tokens_per_s']:.1f} tokens/s, "
                f"TTFT p50 {measured['ttft_ms_p50']} ms p95 {measured['ttft_ms_p95']} ms, "
                f"inter-event p50 {measured['itl_ms_p50']} ms p95 {measured['itl_ms_p95']} ms, "
                f"{measured['errors']} errors, {measured['lost_tokens']} lost"
            )
    baseline = results["baseline_sequential_tokens_per_s"]
    top, one = str(max(levels)), str(min(levels))
    results["targets"] = {
        f"e2e_{top}_over_baseline": round(results["sessions"][top]["e2e_tokens_per_s"] / baseline, 2),
        f"e2e_{one}_over_engine_{one}": round(
            results["sessions"][one]["e2e_tokens_per_s"] / results["engine_in_process_tokens_per_s"][one], 3
        ),
        "errors": sum(v["errors"] for v in results["sessions"].values()),
        "lost_tokens": sum(v["lost_tokens"] for v in results["sessions"].values()),
    }
    results["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n")
    plot(results, args.out / "latest.png")
    print(json.dumps(results["targets"], indent=2))
    print(f"wrote {args.out / 'latest.json'} and {args.out / 'latest.png'}")


if __name__ == "__main__":
    main()
