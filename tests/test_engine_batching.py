"""Continuous batching in the engine: batched equals unbatched, mixed grammars and sampling in one
batch, cancellation within two decode steps, backpressure and deadlines (in-process, CPU)."""

from __future__ import annotations

import time

import pytest

from inference.answer import answer_schema
from inference.engine import Engine
from inference.loading import ModelSettings, load_model
from inference.render import render_answer
from inference.types import FinishReason, GenerationRequest
from tests.helpers import assert_valid_answer
from tests.test_engine import ListSink, base_info_request

pytestmark = pytest.mark.no_database  # touches no database: run once, not again on PostgreSQL

CODES = ["ZERO_WASTE", "PLOGGING", "CARBON_FOOTPRINT", "ENERGY_SAVING", "UPCYCLING", "MEDIA"]


def _run(loaded, requests: list[GenerationRequest], **engine_kwargs) -> ListSink:
    sink = ListSink()
    engine = Engine(loaded, sink, **engine_kwargs)
    engine.start()
    try:
        for request in requests:
            engine.submit(request)
        sink.wait(len(requests), timeout=120)
    finally:
        engine.stop()
    return sink


def test_batched_greedy_results_equal_unbatched_ones(loaded_demo) -> None:
    def requests() -> list[GenerationRequest]:
        return [base_info_request(f"r{i}", code, temperature=0.0) for i, code in enumerate(CODES)]

    alone = _run(loaded_demo, requests(), max_running=1)
    together = _run(loaded_demo, requests(), max_running=8)
    for i in range(len(CODES)):
        a, b = alone.of(f"r{i}"), together.of(f"r{i}")
        assert a[-1][0] == b[-1][0] == "done"
        assert a[-1][2]["answer"] == b[-1][2]["answer"]
        assert a[-1][2]["usage"] == b[-1][2]["usage"]


def test_one_batch_mixes_grammars_and_sampling_settings(loaded_demo) -> None:
    two = base_info_request("two", "VEGAN", temperature=0.0)
    two = GenerationRequest(**{**two.__dict__, "schema": answer_schema(challenge_count=2)})
    three_hot = base_info_request("three-hot", "MEDIA", temperature=1.2, top_k=0, top_p=1.0, seed=7, max_new_tokens=1024)
    three = base_info_request("three", "PLOGGING", temperature=0.0)
    sink = _run(loaded_demo, [two, three_hot, three], max_running=8)
    answer_two = sink.of("two")[-1][2]["answer"]
    assert len(answer_two["challenges"]) == 2 and {c["category"] for c in answer_two["challenges"]} == {"VEGAN"}
    assert_valid_answer(sink.of("three")[-1][2]["answer"], category="PLOGGING")
    last = sink.of("three-hot")[-1]
    assert last[0] == "done", last
    assert_valid_answer(last[2]["answer"], category="MEDIA")
    for rid in ("two", "three-hot", "three"):
        text = "".join(e[2] for e in sink.of(rid) if e[0] == "token")
        assert text == render_answer(sink.of(rid)[-1][2]["answer"])


@pytest.fixture(scope="module")
def loaded_slow(slow_model_dir):
    return load_model(ModelSettings(source=str(slow_model_dir), cache_dir=slow_model_dir.parent / "hf", device="cpu"))


class StepSink(ListSink):
    """Records the engine's decode-step count when each request is discarded."""

    def __init__(self) -> None:
        super().__init__()
        self.engine: Engine | None = None
        self.discarded_at: dict[str, int] = {}

    def discard(self, request_id: str) -> None:
        assert self.engine is not None
        self.discarded_at[request_id] = self.engine.steps
        super().discard(request_id)


def test_cancel_takes_effect_within_two_decode_steps(loaded_slow) -> None:
    sink = StepSink()
    engine = sink.engine = Engine(loaded_slow, sink, max_running=4)
    engine.start()
    try:
        for rid in ("keep", "cancel-me"):
            engine.submit(base_info_request(rid, "VEGAN", max_new_tokens=400))
        deadline = time.monotonic() + 60
        while not [e for e in sink.of("cancel-me") if e[0] == "token"] and time.monotonic() < deadline:
            time.sleep(0.005)
        steps_at_cancel = engine.steps
        engine.cancel("cancel-me")
        while "cancel-me" not in sink.discarded_at and time.monotonic() < deadline:
            time.sleep(0.005)
        tokens_before = len([e for e in sink.of("cancel-me") if e[0] == "token"])
        time.sleep(0.3)
        assert sink.discarded_at["cancel-me"] - steps_at_cancel <= 2
        assert len([e for e in sink.of("cancel-me") if e[0] == "token"]) == tokens_before, "tokens after cancel"
        assert not [e for e in sink.of("cancel-me") if e[0] in ("done", "error")]
        assert engine.load[0] == 1, "the other request keeps running"
    finally:
        engine.stop()


def test_past_the_waiting_bound_a_request_is_refused_at_once_with_503(loaded_slow) -> None:
    sink = ListSink()
    engine = Engine(loaded_slow, sink, max_running=1, max_waiting=1)
    engine.start()
    try:
        started = time.monotonic()
        for rid in ("running", "waiting", "refused"):
            engine.submit(base_info_request(rid, "VEGAN", max_new_tokens=400))
        sink.wait(1, timeout=30)
        assert time.monotonic() - started < 5
        kind, _, payload = sink.of("refused")[-1]
        assert kind == "error" and payload["status"] == 503 and payload["message"]
        assert sink.of("waiting")[0] == ("queued", "waiting", 1)
        assert sink.of("running")[0] == ("queued", "running", 0)
    finally:
        engine.stop()


def test_a_running_request_past_its_total_deadline_ends_with_504(loaded_slow) -> None:
    request = base_info_request("slowpoke", "VEGAN", max_new_tokens=4000)
    request = GenerationRequest(**{**request.__dict__, "total_timeout_s": 1.0})
    sink = _run(loaded_slow, [request], max_running=2)
    events = sink.of("slowpoke")
    kind, _, payload = events[-1]
    assert kind == "error" and payload["status"] == 504 and payload["reason"] is FinishReason.DEADLINE
    assert [e for e in events if e[0] == "token"], "it had started streaming before the deadline"


def test_waiting_requests_hear_their_place_in_line_as_it_changes(loaded_slow) -> None:
    sink = ListSink()
    engine = Engine(loaded_slow, sink, max_running=1, max_waiting=4)
    engine.start()
    try:
        for rid in ("a", "b", "c"):
            engine.submit(base_info_request(rid, "VEGAN", max_new_tokens=3))
        sink.wait(3, timeout=60)
    finally:
        engine.stop()
    positions = {rid: [e[2] for e in sink.of(rid) if e[0] == "queued"] for rid in ("a", "b", "c")}
    assert positions == {"a": [0], "b": [1], "c": [2, 1]}
