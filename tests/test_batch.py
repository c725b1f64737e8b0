"""The left-padded KV batch against the model run one sequence at a time (the demo model, CPU)."""

from __future__ import annotations

import pytest
import torch

from chatbot import seed
from inference import batch as batch_module
from inference.batch import KVBatch

pytestmark = pytest.mark.no_database  # touches no database: run once, not again on PostgreSQL

PROMPTS = [
    "[INST]거주 지역: 도시[/INST]",
    "[INST]사용자 메시지: 고기를 줄여 보고 싶어요. 아주 길게 말해 보는 메시지입니다.[/INST]",
    "[INST]카테고리: 비건[/INST]",
]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _alone(model, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """Next-token logits after the prompt and after each greedy token, decoding this sequence alone."""
    batch = KVBatch(model, torch.device("cpu"))
    batch.prefill([prompt])
    logits = [batch.logits[0].clone()]
    for _ in range(steps):
        batch.decode([int(batch.logits[0].argmax())])
        logits.append(batch.logits[0].clone())
    return logits


def test_prompts_prefilled_together_match_prompts_prefilled_alone(loaded_demo) -> None:
    model, tokenizer = loaded_demo.model, loaded_demo.tokenizer
    prompts = [_ids(tokenizer, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 3, "the prompts must differ in length to exercise padding"
    with torch.inference_mode():
        together = KVBatch(model, torch.device("cpu"))
        together.prefill(prompts)
        for row, prompt in enumerate(prompts):
            assert torch.allclose(together.logits[row], _alone(model, prompt, 0)[0], atol=1e-4)


@pytest.mark.parametrize("headroom", [batch_module.HEADROOM, 1], ids=["default-headroom", "headroom-of-one"])
def test_rows_joining_and_leaving_mid_flight_decode_as_if_alone(loaded_demo, monkeypatch, headroom: int) -> None:
    monkeypatch.setattr(batch_module, "HEADROOM", headroom)
    model, tokenizer = loaded_demo.model, loaded_demo.tokenizer
    prompts = [_ids(tokenizer, p) for p in PROMPTS]
    steps = 12
    expected = [_alone(model, prompt, steps) for prompt in prompts]
    with torch.inference_mode():
        batch = KVBatch(model, torch.device("cpu"))
        batch.prefill([prompts[0]])
        rows = [0]  # which prompt each batch row is
        seen = {0: 0}  # decode steps done per prompt
        for step in range(steps + 6):
            if step == 3:
                batch.prefill([prompts[1], prompts[2]])  # two join together, while row 0 is mid-answer
                rows += [1, 2]
                seen.update({1: 0, 2: 0})
            for row, prompt_index in enumerate(rows):
                assert torch.allclose(batch.logits[row], expected[prompt_index][seen[prompt_index]], atol=1e-4)
            keep = [
                row
                for row, prompt_index in enumerate(rows)
                if seen[prompt_index] < steps and not (step == 7 and prompt_index == 1)
            ]
            tokens = [int(batch.logits[row].argmax()) for row in keep]
            rows = [rows[row] for row in keep]
            batch.keep(keep)  # prompt 1 leaves early at step 7; the others when done
            if not rows:
                break
            batch.decode(tokens)
            for prompt_index in rows:
                seen[prompt_index] += 1
        assert seen[0] == steps and seen[2] == steps and seen[1] < steps


def test_prompts_sharing_a_cached_prefix_decode_as_if_prefilled_whole(loaded_demo) -> None:
    model, tokenizer = loaded_demo.model, loaded_demo.tokenizer
    system = f"[SYS]{seed.PROMPTS[0]['system']}[/SYS]"
    prompts = [_ids(tokenizer, system + p) for p in PROMPTS]
    other = _ids(tokenizer, "[INST]공유하는 앞부분이 없는 프롬프트[/INST]")
    steps = 6
    expected = [_alone(model, prompt, steps) for prompt in [*prompts, other]]
    with torch.inference_mode():
        batch = KVBatch(model, torch.device("cpu"))
        batch.prefill([prompts[0]])  # nothing to compare with yet: the whole prompt runs
        assert not batch.prefixes.entries
        batch.prefill([prompts[1], other])  # prompts[1] shares the system prompt with prompts[0]
        (prefix,) = batch.prefixes.entries
        assert len(prefix) >= batch.prefixes.min_tokens and all(p[: len(prefix)] == list(prefix) for p in prompts)
        batch.keep([0, 2])  # prompts[1] leaves; prompts[2] joins and reuses the prefix
        assert batch.prefixes.match(prompts[2])[0] == len(prefix)
        batch.prefill([prompts[2]])
        rows = [0, 3, 2]  # index into `expected` per batch row
        for step in range(steps):
            for row, index in enumerate(rows):
                assert torch.allclose(batch.logits[row], expected[index][step], atol=1e-4), (step, index)
            batch.decode([int(batch.logits[row].argmax()) for row in range(len(rows))])
