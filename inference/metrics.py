"""The engine's Prometheus metrics, kept in the worker's own registry.

The worker publishes this registry's text exposition with its heartbeat; the web process's
`/metrics` merges every live worker's families with its own (chatbot.metrics). Every sample carries
a `worker` label, so several workers never collide. Names follow vLLM's serving metrics
(`vllm:time_to_first_token_seconds` and friends), with the `leafresh_` prefix.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from inference.types import FinishReason

# Seconds. Time to first token spans queueing and prefill; inter-token latency is one decode step.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class EngineMetrics:
    """Histograms, gauges and counters of one worker's engine. Thread-safe (prometheus_client locks)."""

    def __init__(self, worker: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.worker = worker
        labels = ["worker"]
        self.ttft = Histogram(
            "leafresh_time_to_first_token_seconds",
            "Seconds from the request's creation to its first generated token.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        ).labels(worker)
        self.itl = Histogram(
            "leafresh_inter_token_latency_seconds",
            "Seconds between two generated tokens of one request.",
            labels,
            buckets=ITL_BUCKETS,
            registry=self.registry,
        ).labels(worker)
        self.e2e = Histogram(
            "leafresh_e2e_request_latency_seconds",
            "Seconds from the request's creation to its end, whatever the finish reason.",
            labels,
            buckets=E2E_BUCKETS,
            registry=self.registry,
        ).labels(worker)
        self.running = Gauge(
            "leafresh_requests_running", "Requests in the running batch.", labels, registry=self.registry
        ).labels(worker)
        self.waiting = Gauge(
            "leafresh_requests_waiting", "Requests waiting to join the batch.", labels, registry=self.registry
        ).labels(worker)
        self.tokens = Counter(
            "leafresh_generation_tokens", "Generated (completion) tokens.", labels, registry=self.registry
        ).labels(worker)
        self.steps = Counter(
            "leafresh_decode_steps",
            "Decode steps (one forward pass for the whole running batch each); tokens / steps = mean batch size.",
            labels,
            registry=self.registry,
        ).labels(worker)
        self._finished = Counter(
            "leafresh_request_finished",
            "Requests that ended, by finish reason.",
            ["worker", "reason"],
            registry=self.registry,
        )
        for reason in FinishReason:  # export zeros, so rates work from the first scrape
            self._finished.labels(worker, reason.value)

    def finished(self, reason: FinishReason, e2e_s: float) -> None:
        """Count one ended request and observe its end-to-end latency (seconds)."""
        self._finished.labels(self.worker, reason.value).inc()
        self.e2e.observe(e2e_s)

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
