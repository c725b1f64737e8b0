"""Synthetic training conversations for the demo model, generated from the project's seed data.

Every example is a production-shaped prompt (the seeded prompt templates, rendered by
`build_messages`) and a compact JSON completion built from the seeded challenge bank.
"""

from __future__ import annotations

import json
import random

from chatbot import seed
from chatbot.prompts import build_messages, category_list_text, rank_by_keywords
from inference.demo_model import DemoExample

# The place opens the sentence: the first answer token is the one this small model conditions on the
# prompt reliably (measured: the place 100%, a work type in second position no better than chance),
# so the demo names the place and the category and does not guess at the work type.
BASE_INFO_OPENERS = [
    "{location}에서 실천하기 좋은 {label} 챌린지를 추천해 드릴게요.",
    "{location} 생활에 맞춘 {label} 챌린지 세 가지를 골라 봤어요.",
    "{location}에 사시는 분이 바로 실천할 수 있는 {label} 챌린지예요.",
]
FREE_TEXT_OPENERS = [
    "말씀하신 내용에 맞춰 {label} 챌린지를 추천해 드릴게요.",
    "좋은 고민이에요! 오늘부터 해 볼 수 있는 {label} 챌린지예요.",
    "작은 실천부터 시작해 보세요. {label} 챌린지 세 가지를 골라 봤어요.",
]


def seed_messages(mode: str, fields: dict[str, str]) -> list[dict[str, str]]:
    """Chat messages of the seeded prompt of `mode` (base_info: location, workType, category label;
    free_text: message). Free text lists the seeded categories as the server lists the active ones:
    those whose keywords occur in the message first (chatbot.selectors.categories_for_message)."""
    prompt = next(p for p in seed.PROMPTS if p["mode"] == mode)
    if mode == "free_text":
        ranked = [seed.CATEGORIES[i] for i in rank_by_keywords(fields["message"], [c["keywords"] for c in seed.CATEGORIES])]
        fields = {**fields, "categories": category_list_text([(c["code"], c["label"]) for c in ranked])}
    return build_messages(system=prompt["system"], user_template=prompt["user_template"], fields=fields)


def _completion(rng: random.Random, opener: str, code: str, *, with_category: bool) -> str:
    """The compact JSON answer: three challenges of `code` from the bank; free text (`with_category`)
    names the category (its label) first, as the free-text schema orders it."""
    bank = seed.CHALLENGE_BANK[code]
    # In bank order: the next challenge always comes later in the bank, so none is repeated.
    picks = [bank[i] for i in sorted(rng.sample(range(len(bank)), 3))]
    label = next(c["label"] for c in seed.CATEGORIES if c["code"] == code)
    challenges = [({"category": label} if with_category else {}) | {"title": t, "description": d} for t, d in picks]
    return json.dumps({"recommend": opener, "challenges": challenges}, ensure_ascii=False, separators=(",", ":"))


# Free-text messages synthesised from a category's keywords, so that the keyword-ranked category
# list in the prompt always starts with the answer's category: the demo model learns to follow it.
FREE_TEXT_TEMPLATES = [
    "{keyword} 때문에 고민이에요",
    "요즘 {keyword} 쪽에 관심이 많아요",
    "{keyword} 관련해서 환경을 위해 할 수 있는 일이 있을까요?",
    "{keyword} 이야기를 들으니 뭔가 해 보고 싶어요",
]


def free_text_messages(rng: random.Random) -> list[tuple[str, str]]:
    """(category code, message) pairs for training: the seeded messages and keyword-template
    messages, kept only where the category leads the keyword ranking (as the server ranks)."""
    keyword_lists = [c["keywords"] for c in seed.CATEGORIES]
    pairs = [(code, m) for code, messages in seed.FREE_TEXT_MESSAGES.items() for m in messages]
    for category in seed.CATEGORIES:
        for keyword in category["keywords"]:
            pairs += [(category["code"], t.format(keyword=keyword)) for t in rng.sample(FREE_TEXT_TEMPLATES, 2)]
    return [
        (code, message) for code, message in pairs if seed.CATEGORIES[rank_by_keywords(message, keyword_lists)[0]]["code"] == code
    ]


def demo_examples(*, seed_value: int = 1234, per_combination: int = 2, free_text_repeats: int = 2) -> list[DemoExample]:
    """Training examples: every location x work type x category (base-info) `per_combination`
    times, plus every free-text training message `free_text_repeats` times. Deterministic for a given seed."""
    rng = random.Random(seed_value)
    labels = {c["code"]: c["label"] for c in seed.CATEGORIES}
    examples: list[DemoExample] = []
    for _ in range(per_combination):
        for location in seed.LOCATIONS:
            for work_type in seed.WORK_TYPES:
                for code, label in labels.items():
                    fields = {"location": location, "workType": work_type, "category": label}
                    messages = seed_messages("base_info", fields)
                    opener = rng.choice(BASE_INFO_OPENERS).format(label=label, **fields)
                    examples.append(DemoExample(messages, _completion(rng, opener, code, with_category=False)))
    free_text = free_text_messages(rng)
    for _ in range(free_text_repeats):
        for code, message in free_text:
            messages = seed_messages("free_text", {"message": message})
            opener = rng.choice(FREE_TEXT_OPENERS).format(label=labels[code])
            examples.append(DemoExample(messages, _completion(rng, opener, code, with_category=True)))
    return examples
