"""Synthetic training conversations for the demo model, generated from the project's seed data.

Every example is a production-shaped prompt (the seeded prompt templates, rendered by
`build_messages`) and a compact JSON completion built from the seeded challenge bank.
"""

from __future__ import annotations

import json
import random

from chatbot import seed
from chatbot.prompts import build_messages
from inference.demo_model import DemoExample

BASE_INFO_OPENERS = [
    "{location}에서 {workType}{euro} 일하시는 분께 어울리는 {label} 챌린지를 추천해 드릴게요.",
    "{workType}{euro} 일하며 {location}에 사시는 분이 바로 실천할 수 있는 {label} 챌린지예요.",
    "{location} 생활과 {workType} 일상에 맞춘 {label} 챌린지 세 가지를 골라 봤어요.",
]
FREE_TEXT_OPENERS = [
    "말씀하신 내용에 맞춰 {label} 챌린지를 추천해 드릴게요.",
    "좋은 고민이에요! 오늘부터 해 볼 수 있는 {label} 챌린지예요.",
    "작은 실천부터 시작해 보세요. {label} 챌린지 세 가지를 골라 봤어요.",
]


def euro(word: str) -> str:
    """The particle "으로" or "로" for a Korean word: "로" after a vowel or ㄹ, "으로" after other finals.

    Rule: 표준국어대사전, 조사 '으로'. The final consonant of a Hangul syllable is
    (code point - 0xAC00) % 28 (0 = none, 8 = ㄹ), per the Unicode Hangul syllable composition.
    """
    last = word[-1] if word else ""
    if not "가" <= last <= "힣":
        return "으로"
    final = (ord(last) - 0xAC00) % 28
    return "로" if final in (0, 8) else "으로"


def _completion(rng: random.Random, opener: str, code: str) -> str:
    picks = rng.sample(seed.CHALLENGE_BANK[code], 3)
    answer = {"recommend": opener, "challenges": [{"title": t, "description": d} for t, d in picks]}
    return json.dumps(answer, ensure_ascii=False, separators=(",", ":"))


def demo_examples(*, seed_value: int = 1234, per_combination: int = 2) -> list[DemoExample]:
    """Training examples: every location x work type x category (base-info) `per_combination`
    times, plus every seeded free-text message 6 times. Deterministic for a given seed."""
    rng = random.Random(seed_value)
    prompts = {p["mode"]: p for p in seed.PROMPTS}
    labels = {c["code"]: c["label"] for c in seed.CATEGORIES}
    examples: list[DemoExample] = []
    for _ in range(per_combination):
        for location in seed.LOCATIONS:
            for work_type in seed.WORK_TYPES:
                for code, label in labels.items():
                    fields = {"location": location, "workType": work_type, "category": label}
                    messages = build_messages(
                        system=prompts["base_info"]["system"], user_template=prompts["base_info"]["user_template"], fields=fields
                    )
                    opener = rng.choice(BASE_INFO_OPENERS).format(label=label, euro=euro(work_type), **fields)
                    examples.append(DemoExample(messages, _completion(rng, opener, code)))
    for _ in range(6):
        for code, messages_for_code in seed.FREE_TEXT_MESSAGES.items():
            for message in messages_for_code:
                messages = build_messages(
                    system=prompts["free_text"]["system"],
                    user_template=prompts["free_text"]["user_template"],
                    fields={"message": message},
                )
                opener = rng.choice(FREE_TEXT_OPENERS).format(label=labels[code])
                examples.append(DemoExample(messages, _completion(rng, opener, code)))
    return examples
