"""Synthetic training conversations for the demo model, generated from the project's seed data.

Every example is a production-shaped prompt (the seeded prompt templates, rendered by
`build_messages`; free text with retrieved passages, and sometimes the session's base-info and an
earlier turn) and a compact JSON completion built from the seeded challenge bank.
"""

from __future__ import annotations

import json
import random

from chatbot import seed
from chatbot.prompts import (
    build_messages,
    category_list_text,
    context_text,
    conversation_query,
    hint_ranks,
    profile_text,
    rank_by_keywords,
)
from inference.demo_model import DemoExample
from inference.render import render_answer

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


def _keyword_lists() -> list[list[str]]:
    return [[c["label"], *c["keywords"]] for c in seed.CATEGORIES]


def seed_messages(
    mode: str,
    fields: dict[str, str],
    *,
    history: list[dict[str, str]] | None = None,
    passages: list[seed.KnowledgeSeed] | None = None,
    base_info: dict[str, str] | None = None,
) -> list[dict[str, str]]:
    """Chat messages of the seeded prompt of `mode` (base_info: location, workType, category label;
    free_text: message), shaped as the server shapes them (chatbot.services): free text lists the
    seeded categories ranked by the conversation's query with the passages' categories breaking
    ties, puts `passages` before the message as context and `base_info` (location, work_type,
    category label) in the system message, and `history` (past turns' messages) after the system."""
    prompt = next(p for p in seed.PROMPTS if p["mode"] == mode)
    profile = context = ""
    if mode == "free_text":
        passages = passages or []
        previous = [m["content"] for m in history or [] if m["role"] == "user"]
        keyword_lists = _keyword_lists()
        query = conversation_query(fields["message"], previous, keyword_lists)
        hints = hint_ranks([c["code"] for c in seed.CATEGORIES], [p["category"] for p in passages])
        ranked = [seed.CATEGORIES[i] for i in rank_by_keywords(query, keyword_lists, hints)]
        fields = {**fields, "categories": category_list_text([c["label"] for c in ranked])}
        labels = {c["code"]: c["label"] for c in seed.CATEGORIES}
        context = context_text([(labels[p["category"]], p["title"], p["text"]) for p in passages])
        profile = profile_text(base_info)
    messages = build_messages(
        system=prompt["system"], user_template=prompt["user_template"], fields=fields, profile=profile, context=context
    )
    return [messages[0], *(history or []), *messages[1:]]


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


# Follow-ups that name no category: the server reads them together with the previous user text.
FOLLOW_UPS = [
    "다른 것도 추천해 주세요",
    "좀 더 쉬운 걸로 알려 주세요",
    "하나 더 해 볼 만한 게 있을까요?",
    "회사에서도 할 수 있는 걸로요",
    "주말에 해 볼 만한 걸로 알려 주세요",
    "그거 말고 다른 방법도 궁금해요",
]


def free_text_messages(rng: random.Random) -> list[tuple[str, str]]:
    """(category code, message) pairs for training: the seeded messages and keyword-template
    messages, kept only where the category alone leads the keyword ranking (as the server ranks)."""
    keyword_lists = _keyword_lists()
    pairs = [(code, m) for code, messages in seed.FREE_TEXT_MESSAGES.items() for m in messages]
    for category in seed.CATEGORIES:
        for keyword in category["keywords"]:
            pairs += [(category["code"], t.format(keyword=keyword)) for t in rng.sample(FREE_TEXT_TEMPLATES, 2)]
    return [(code, message) for code, message in pairs if _leader(message, keyword_lists) == code]


def _leader(message: str, keyword_lists: list[list[str]]) -> str | None:
    """The code of the category whose keywords occur most in the message, when it is the only one."""
    lowered = message.lower()
    scores = [sum(lowered.count(k.lower()) for k in keywords) for keywords in keyword_lists]
    best = max(scores)
    return seed.CATEGORIES[scores.index(best)]["code"] if best > 0 and scores.count(best) == 1 else None


class _Passages:
    """Passages as retrieval would give them for a category: two of its documents and one of
    another, in random order; every document comes round in turn, so all of them are seen.
    (Zero to three of the category instead, to make the model follow the list rather than the
    passages, measured worse in `make eval`: free text in the keyword-suggested category 67% -> 62%.)"""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.by_category: dict[str, list[seed.KnowledgeSeed]] = {}
        for doc in seed.knowledge_documents():
            self.by_category.setdefault(doc["category"], []).append(doc)
        for docs in self.by_category.values():
            rng.shuffle(docs)
        self.next = dict.fromkeys(self.by_category, 0)

    def _take(self, code: str) -> seed.KnowledgeSeed:
        docs = self.by_category[code]
        doc = docs[self.next[code] % len(docs)]
        self.next[code] += 1
        return doc

    def for_category(self, code: str) -> list[seed.KnowledgeSeed]:
        other = self.rng.choice([c for c in self.by_category if c != code])
        picks = [self._take(code), self._take(code), self._take(other)]
        self.rng.shuffle(picks)
        return picks


def demo_examples(*, seed_value: int = 1234, per_combination: int = 3, free_text_repeats: int = 2) -> list[DemoExample]:
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
    passages = _Passages(rng)
    for _ in range(free_text_repeats):
        for code, message in free_text:
            # As the server builds them: retrieved passages always, and on a third a follow-up that
            # names no category after this message's turn. Not the session's base-info line: with a
            # place in it that the answer does not name, this small model learned to ignore the place
            # in base-info prompts too (the place named: 100% -> 29-75% in `make eval`).
            history: list[dict[str, str]] = []
            if rng.random() < 1 / 3:
                previous = _completion(rng, rng.choice(FREE_TEXT_OPENERS).format(label=labels[code]), code, with_category=True)
                history = [
                    {"role": "user", "content": message},
                    {"role": "assistant", "content": render_answer(json.loads(previous))},
                ]
                message = rng.choice(FOLLOW_UPS)
            messages = seed_messages("free_text", {"message": message}, history=history, passages=passages.for_category(code))
            opener = rng.choice(FREE_TEXT_OPENERS).format(label=labels[code])
            examples.append(DemoExample(messages, _completion(rng, opener, code, with_category=True)))
    return examples
