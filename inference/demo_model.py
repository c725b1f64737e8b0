"""The embedded demo model: a tiny Mistral-architecture model and tokenizer trained on this machine.

No weights can be downloaded here, so when no `LEAFRESH_MODEL` is configured the worker serves
this locally built model. It is a demo, named as one everywhere it shows
(`DEMO_MODEL_NAME`), good only for exercising the whole chain on plausible Korean answers.

Build: a byte-level BPE tokenizer (so every byte of Korean input is encodable, and Korean
syllables really do split across tokens) trained on the synthetic corpus, then a
`MistralForCausalLM` trained for a fixed number of steps on the completions only. Deterministic
for a given seed and inputs; the artefact is saved with a fingerprint of those inputs and rebuilt
only when they change.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEMO_MODEL_NAME = "leafresh-demo-tiny-mistral (demo model, not for production)"
MARKER_FILE = "leafresh_demo.json"

# A Mistral-style template with a system block; the completion follows `[/INST]` directly.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}[SYS]{{ message['content'] }}[/SYS]"
    "{% elif message['role'] == 'user' %}[INST]{{ message['content'] }}[/INST]"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYS]", "[/SYS]"]


@dataclass(frozen=True)
class DemoTrainingConfig:
    """Sizes and schedule of the demo model. Changing any field changes the fingerprint."""

    vocab_size: int = 3000
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    steps: int = 1500
    batch_size: int = 8
    learning_rate: float = 3e-3
    seed: int = 1234
    format_version: int = 3  # 3: batches drawn within length quartiles


@dataclass(frozen=True)
class DemoExample:
    """One training conversation: prompt messages and the JSON completion (compact, no whitespace)."""

    messages: list[dict[str, str]]
    completion: str


def fingerprint(examples: Sequence[DemoExample], config: DemoTrainingConfig) -> str:
    """SHA-256 over the config and every example: the cache key of the built artefact."""
    digest = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    for example in examples:
        digest.update(json.dumps([example.messages, example.completion], ensure_ascii=False).encode())
    return digest.hexdigest()


def is_up_to_date(out_dir: Path, expected_fingerprint: str) -> bool:
    """True when `out_dir` holds a demo model built from exactly these inputs."""
    marker = out_dir / MARKER_FILE
    try:
        return json.loads(marker.read_text())["fingerprint"] == expected_fingerprint
    except (OSError, ValueError, KeyError):
        return False


def _train_tokenizer(texts: list[str], config: DemoTrainingConfig) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=config.max_position_embeddings,
    )


def _encode(tokenizer: Any, example: DemoExample) -> tuple[list[int], list[int]]:
    prompt = tokenizer.apply_chat_template(example.messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt_ids + completion_ids
    labels = [-100] * len(prompt_ids) + completion_ids
    return ids, labels


def train_demo_model(
    out_dir: Path,
    examples: Sequence[DemoExample],
    *,
    config: DemoTrainingConfig = DemoTrainingConfig(),
    progress: bool = True,
) -> Path:
    """Train the tokenizer and model on `examples` and save both to `out_dir` (replaced atomically).

    Returns `out_dir`. Takes about four and a half minutes on two CPU cores with the default config.
    Raises ValueError if `examples` is empty or an example exceeds max_position_embeddings.
    """
    import torch
    from tqdm import tqdm
    from transformers import MistralConfig, MistralForCausalLM

    if not examples:
        raise ValueError("no training examples")
    started = time.monotonic()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)

    texts = []
    for example in examples:
        texts.extend(message["content"] for message in example.messages)
        texts.append(example.completion)
    tokenizer = _train_tokenizer(texts, config)
    encoded = [_encode(tokenizer, example) for example in examples]
    longest = max(len(ids) for ids, _ in encoded)
    if longest > config.max_position_embeddings:
        raise ValueError(f"an example is {longest} tokens, over {config.max_position_embeddings}")

    model_config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        sliding_window=None,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = MistralForCausalLM(model_config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    warmup = max(1, config.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    bar = tqdm(total=config.steps, desc="training demo model", unit="step", disable=not progress)
    # Length buckets (quartiles), so short base-info prompts are not padded to the long free-text
    # ones: each batch is a random draw from the bucket of a random example. Drawn at random within
    # the bucket, not as a window of neighbours: neighbours in length share a place or a category,
    # and batches of one place taught the model the last batches' place.
    by_length = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    buckets = [chunk for chunk in (by_length[q * len(by_length) // 4 : (q + 1) * len(by_length) // 4] for q in range(4)) if chunk]
    weights = torch.tensor([len(b) for b in buckets], dtype=torch.float)
    for _step in range(config.steps):
        bucket = buckets[int(torch.multinomial(weights, 1, generator=generator))]
        picks = [bucket[i] for i in torch.randint(len(bucket), (config.batch_size,), generator=generator).tolist()]
        width = max(len(encoded[i][0]) for i in picks)
        input_ids = torch.full((len(picks), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(picks), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(picks), width), dtype=torch.long)
        for row, index in enumerate(picks):
            ids, labs = encoded[index]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(labs)] = torch.tensor(labs)
            attention_mask[row, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update(1)
    bar.close()

    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    staging = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    marker = {
        "name": DEMO_MODEL_NAME,
        "fingerprint": fingerprint(examples, config),
        "config": asdict(config),
        "examples": len(examples),
        "final_loss": round(float(loss.item()), 4),
        "train_seconds": round(time.monotonic() - started, 1),
    }
    (staging / MARKER_FILE).write_text(json.dumps(marker, ensure_ascii=False, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return out_dir
