"""The engine in-process with the demo model: schema-constrained generation, limits and sampling guards."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import pytest
import torch
import xgrammar as xgr

from chatbot import seed
from chatbot.prompts import build_messages
from inference.answer import answer_schema
from inference.engine import ANSWER_RESERVE_TOKENS, Engine
from inference.render import render_answer
from inference.sampling import GenerationError, RowSampling, sample_batch, sample_token
from inference.types import FinishReason, GenerationRequest, SamplingParams
from tests.helpers import assert_deltas_render_answer, assert_valid_answer

pytestmark = pytest.mark.no_database  # touches no database: run once, not again on PostgreSQL

LABELS = {c["code"]: c["label"] for c in seed.CATEGORIES}
PROMPTS = {p["mode"]: p for p in seed.PROMPTS}


class ListSink:
    """Collects engine events; `wait(n)` blocks until n requests have ended."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []
        self._ended = threading.Condition()
        self.ended = 0

    def _end(self) -> None:
        with self._ended:
            self.ended += 1
            self._ended.notify_all()

    def queued(self, request: GenerationRequest, position: int) -> None:
        self.events.append(("queued", request.request_id, position))

    def token(self, request: GenerationRequest, text: str) -> None:
        self.events.append(("token", request.request_id, text))

    def challenge(self, request: GenerationRequest, index: int, card: dict[str, str]) -> None:
        self.events.append(("challenge", request.request_id, (index, card)))

    def done(self, request: GenerationRequest, answer: dict, *, usage: dict, timings: dict, model: str = "") -> None:
        self.events.append(("done", request.request_id, {"answer": answer, "usage": usage, "timings": timings}))
        self._end()

    def error(self, request: GenerationRequest, status: int, message: str, finish_reason: FinishReason) -> None:
        self.events.append(("error", request.request_id, {"status": status, "message": message, "reason": finish_reason}))
        self._end()

    def discard(self, request_id: str) -> None:
        self.events.append(("discard", request_id, None))

    def wait(self, n: int, timeout: float = 60) -> None:
        with self._ended:
            assert self._ended.wait_for(lambda: self.ended >= n, timeout), f"{self.ended}/{n} requests ended"

    def of(self, request_id: str) -> list[tuple[str, str, Any]]:
        return [e for e in self.events if e[1] == request_id]


def base_info_request(request_id: str, code: str, **sampling: Any) -> GenerationRequest:
    fields = {"location": "도시", "workType": "사무직", "category": LABELS[code]}
    messages = build_messages(
        system=PROMPTS["base_info"]["system"], user_template=PROMPTS["base_info"]["user_template"], fields=fields
    )
    return GenerationRequest(
        request_id=request_id,
        group="g",
        messages=messages,
        schema=answer_schema(),
        sampling=SamplingParams(**sampling),
        default_category=code,
        category_labels=LABELS,
        created_at=time.time(),
    )


@pytest.fixture
def engine(loaded_demo):
    sink = ListSink()
    engine = Engine(loaded_demo, sink, max_running=4)
    engine.start()
    yield engine, sink
    engine.stop()


def test_constrained_generation_gives_a_valid_answer_whose_deltas_render_it(engine) -> None:
    engine_, sink = engine
    engine_.submit(base_info_request("a", "VEGAN", temperature=0.0))
    sink.wait(1)
    events = sink.of("a")
    assert events[0] == ("queued", "a", 0)
    kind, _, payload = events[-1]
    assert kind == "done"
    assert_valid_answer(payload["answer"], category="VEGAN")
    assert {c["label"] for c in payload["answer"]["challenges"]} == {"비건"}
    text = "".join(e[2] for e in events if e[0] == "token")
    assert_deltas_render_answer(text, payload["answer"])
    assert payload["usage"]["completion_tokens"] > 10 and payload["timings"]["ttft_s"] >= 0


def test_cards_are_sent_only_when_asked_each_once_before_the_end(engine) -> None:
    engine_, sink = engine
    plain = base_info_request("plain", "PLOGGING", temperature=0.0)
    engine_.submit(plain)
    engine_.submit(dataclasses.replace(plain, request_id="cards", challenge_cards=True))
    sink.wait(2)
    assert not [e for e in sink.of("plain") if e[0] == "challenge"]
    events = sink.of("cards")
    cards = [e[2] for e in events if e[0] == "challenge"]
    answer = events[-1][2]["answer"]
    assert [index for index, _ in cards] == [0, 1, 2]
    assert [card for _, card in cards] == answer["challenges"]
    kinds = [e[0] for e in events]
    assert kinds.index("challenge") < max(i for i, k in enumerate(kinds) if k == "token"), "the first card precedes the end"


def test_sampled_answers_stay_schema_valid_across_seeds_and_settings(engine) -> None:
    engine_, sink = engine
    settings = [
        {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": 1},
        {"temperature": 1.5, "top_p": 0.95, "top_k": 100, "seed": 2},
        {"temperature": 0.7, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.3, "seed": 3},
        {"temperature": 0.3, "seed": 4},
    ]
    codes = ["ZERO_WASTE", "PLOGGING", "MEDIA", "DIGITAL_CARBON"]
    for i, (code, kwargs) in enumerate(zip(codes, settings, strict=True)):
        engine_.submit(base_info_request(f"s{i}", code, max_new_tokens=1024, **kwargs))
    sink.wait(4)
    completed = 0
    for i, code in enumerate(codes):
        kind, _, payload = sink.of(f"s{i}")[-1]
        if kind == "error":  # a high temperature may run out of budget: then it must say so clearly
            assert payload["reason"] is FinishReason.LENGTH and payload["status"] == 500
            assert "done" not in [e[0] for e in sink.of(f"s{i}")]
            continue
        completed += 1
        assert_valid_answer(payload["answer"], category=code)
        text = "".join(e[2] for e in sink.of(f"s{i}") if e[0] == "token")
        assert text == render_answer(payload["answer"])
    assert completed >= 3, "sampling should rarely exhaust a 1024-token budget"


def test_greedy_generation_is_deterministic(engine) -> None:
    engine_, sink = engine
    engine_.submit(base_info_request("g1", "UPCYCLING", temperature=0.0))
    engine_.submit(base_info_request("g2", "UPCYCLING", temperature=0.0))
    sink.wait(2)
    assert sink.of("g1")[-1][2]["answer"] == sink.of("g2")[-1][2]["answer"]


def test_token_budget_running_out_is_an_error_never_a_broken_close(engine) -> None:
    engine_, sink = engine
    engine_.submit(base_info_request("short", "VEGAN", temperature=0.0, max_new_tokens=16))
    sink.wait(1)
    kinds = [e[0] for e in sink.of("short")]
    assert "done" not in kinds
    kind, _, payload = sink.of("short")[-1]
    assert kind == "error" and payload["status"] == 500 and payload["reason"] is FinishReason.LENGTH
    assert payload["message"]


def test_a_prompt_that_leaves_no_room_in_the_context_window_is_refused_with_400(engine) -> None:
    engine_, sink = engine
    window = engine_.context_tokens
    assert window == 1024  # the demo model's max_position_embeddings
    request = base_info_request("huge", "VEGAN", temperature=0.0)
    words = " ".join(f"낱말{n}" for n in range(window))  # well over the window in tokens
    huge = dataclasses.replace(request, messages=[*request.messages[:-1], {"role": "user", "content": words}])
    engine_.submit(huge)
    engine_.submit(base_info_request("next", "VEGAN", temperature=0.0, max_new_tokens=100_000))  # cut to the room left
    sink.wait(2)
    kind, _, payload = sink.of("huge")[-1]
    assert kind == "error" and payload["status"] == 400 and payload["reason"] is FinishReason.ERROR
    assert [e[0] for e in sink.of("huge")] == ["queued", "error"]  # refused before any token
    assert sink.of("next")[-1][0] == "done"  # and the engine goes on


def test_a_request_delivered_twice_is_answered_once(engine) -> None:
    engine_, sink = engine
    request = base_info_request("twice", "VEGAN", temperature=0.0)
    engine_.submit(request)
    engine_.submit(request)  # a broker redelivery of the same task
    engine_.submit(base_info_request("after-twice", "VEGAN", temperature=0.0))
    sink.wait(2)
    kinds = [e[0] for e in sink.of("twice")]
    assert kinds.count("queued") == 1 and kinds.count("done") == 1 and kinds[-1] == "done"
    assert sink.ended == 2  # nothing more ends later for the duplicate
    time.sleep(0.3)
    assert sink.ended == 2


def test_an_exception_inside_generation_mid_answer_is_an_error_within_a_second(engine, monkeypatch) -> None:
    engine_, sink = engine
    model = engine_._batch.model
    forward = model.forward
    broken = threading.Event()

    def flaky_forward(*args, **kwargs):
        if broken.is_set():
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        return forward(*args, **kwargs)

    token = sink.token
    failed_at: list[float] = []

    def token_then_break(request, text) -> None:  # runs on the engine thread: the next forward pass fails
        token(request, text)
        if not broken.is_set():
            failed_at.append(time.monotonic())
            broken.set()

    monkeypatch.setattr(model, "forward", flaky_forward)
    monkeypatch.setattr(sink, "token", token_then_break)
    engine_.submit(base_info_request("boom", "VEGAN", temperature=0.0, max_new_tokens=100_000))
    sink.wait(1, timeout=30)
    took = time.monotonic() - failed_at[0]
    kind, _, payload = sink.of("boom")[-1]
    assert kind == "error" and payload["status"] == 500 and payload["reason"] is FinishReason.ERROR
    assert took < 1.0, f"the error came {took:.2f} s after the failure"
    monkeypatch.setattr(sink, "token", token)
    broken.clear()  # the engine survives: the next request is answered
    engine_.submit(base_info_request("after-boom", "VEGAN", temperature=0.0))
    sink.wait(2)
    assert sink.of("after-boom")[-1][0] == "done"


def test_history_gives_way_before_the_answer_when_the_context_window_is_short(engine) -> None:
    engine_, sink = engine
    turns = []
    for n in range(40):
        turns += [{"role": "user", "content": f"{n}번째 질문: 텀블러와 장바구니를 쓰는 방법을 자세히 알려 주세요."}]
        turns += [{"role": "assistant", "content": f"{n}번째 답: 텀블러를 챙기고 장바구니를 들고 다니세요. " * 4}]
    request = base_info_request("long-history", "VEGAN", temperature=0.0, max_new_tokens=512)
    request = dataclasses.replace(request, history=turns, history_budget_tokens=100_000)
    engine_.submit(request)
    sink.wait(1)
    kind, _, payload = sink.of("long-history")[-1]
    assert kind == "done", payload  # older turns gave way, so the answer had its room
    usage = payload["usage"]
    assert 0 < usage["history_turns"] < 40
    assert usage["prompt_tokens"] + ANSWER_RESERVE_TOKENS <= engine_.context_tokens


def test_cancel_stops_a_request_and_publishes_nothing_more(engine) -> None:
    engine_, sink = engine
    engine_.cancel("early")  # a cancel that arrives before its request
    engine_.submit(base_info_request("early", "VEGAN"))
    engine_.submit(base_info_request("after", "VEGAN", temperature=0.0))
    sink.wait(1)
    assert sink.of("early") == []
    assert sink.of("after")[-1][0] == "done"


def test_expired_request_is_a_deadline_error(engine) -> None:
    engine_, sink = engine
    request = base_info_request("late", "VEGAN")
    late = dataclasses.replace(request, created_at=time.time() - 3600)
    engine_.submit(late)
    sink.wait(1)
    kind, _, payload = sink.of("late")[-1]
    assert kind == "error" and payload["status"] == 504 and payload["reason"] is FinishReason.DEADLINE


def test_sample_token_guards_nan_and_inf_logits() -> None:
    logits = torch.tensor([float("nan"), 1.0, float("inf"), 0.5])
    assert (
        sample_token(logits, bitmask=None, seen_ids=None, temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0, rng=None)
        == 2
    )
    logits = torch.tensor([float("nan"), 1.0, float("nan"), 0.5])
    picks = {
        sample_token(
            logits,
            bitmask=None,
            seen_ids=None,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            repetition_penalty=1.0,
            rng=torch.Generator().manual_seed(s),
        )
        for s in range(20)
    }
    assert picks <= {1, 3}


def test_sample_token_respects_the_grammar_bitmask() -> None:
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0])
    bitmask = xgr.allocate_token_bitmask(1, 4)
    bitmask.fill_(0)
    bitmask[0, 0] = 1 << 3  # only token 3 allowed
    assert (
        sample_token(
            logits, bitmask=bitmask, seen_ids=None, temperature=0.8, top_k=2, top_p=0.5, repetition_penalty=1.0, rng=None
        )
        == 3
    )


def test_sample_token_raises_when_nothing_is_allowed() -> None:
    bitmask = xgr.allocate_token_bitmask(1, 4)
    bitmask.fill_(0)
    with pytest.raises(GenerationError):
        sample_token(
            torch.zeros(4), bitmask=bitmask, seen_ids=None, temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.0, rng=None
        )


def test_repetition_penalty_follows_the_ctrl_rule() -> None:
    logits = torch.tensor([2.0, 1.9, -1.0])
    seen = torch.tensor([0])
    # 2.0 / 1.5 = 1.33 < 1.9: the seen token loses its lead.
    assert (
        sample_token(logits, bitmask=None, seen_ids=seen, temperature=0, top_k=0, top_p=1.0, repetition_penalty=1.5, rng=None)
        == 1
    )


def test_an_infinite_logit_with_a_low_temperature_never_draws_a_masked_token() -> None:
    logits = torch.tensor([float("inf"), 1.0, 5.0, 0.5])
    bitmask = xgr.allocate_token_bitmask(1, 4)
    bitmask.fill_(0)
    bitmask[0, 0] = 0b1011  # tokens 0, 1 and 3 allowed; 2 masked
    for draw in range(20):
        token = sample_token(
            logits,
            bitmask=bitmask,
            seen_ids=None,
            temperature=0.5,
            top_k=0,
            top_p=1.0,
            repetition_penalty=1.0,
            rng=torch.Generator().manual_seed(draw),
        )
        assert token == 0


def test_sample_batch_draws_within_top_k_and_top_p_in_proportion() -> None:
    """Top-k then top-p as transformers orders them; each row's draw from its own generator."""
    logits = torch.linspace(6.0, -6.0, 300)  # token 0 best, strictly decreasing
    draws = 3000
    top_k = [RowSampling(1.0, 3, 1.0, rng=torch.Generator().manual_seed(i)) for i in range(draws)]
    tokens = sample_batch(logits.repeat(draws, 1), top_k)
    counts = torch.bincount(torch.tensor(tokens), minlength=300).float() / draws
    expected = logits[:3].softmax(dim=0)
    assert counts[3:].sum() == 0, "a token outside the top 3 was drawn"
    assert torch.allclose(counts[:3], expected, atol=0.03), (counts[:3], expected)
    # Nucleus: the smallest prefix whose mass reaches top_p, the token that crosses it included.
    probs = logits.softmax(dim=0)
    crossing = int((probs.cumsum(dim=0) >= 0.8).nonzero()[0])
    nucleus = [RowSampling(1.0, 0, 0.8, rng=torch.Generator().manual_seed(i)) for i in range(draws)]
    drawn = set(sample_batch(logits.repeat(draws, 1), nucleus))
    assert drawn == set(range(crossing + 1)), (sorted(drawn), crossing)
    # The same seed draws the same token whatever else is in the batch.
    alone = sample_batch(logits.repeat(1, 1), [RowSampling(1.0, 3, 1.0, rng=torch.Generator().manual_seed(7))])
    assert alone == [tokens[7]]
