"""The answer's shape: the JSON schema generation is constrained to, length bounds, and the final
answer's checks.

No heavy imports: the web process builds schemas too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

CHALLENGE_COUNT = 3
# Character bounds applied after parsing, to the stream's rendering and the close payload alike
# (not in the grammar: xgrammar's maxLength is very slow and blocks escapes). Sized for the
# widget's cards and the Spring backend's columns: a title is a short phrase, a description one
# or two sentences.
RECOMMEND_MAX_CHARS = 300
TITLE_MAX_CHARS = 40
DESCRIPTION_MAX_CHARS = 200
ELLIPSIS = "…"
# The recommendation is one sentence: it must end with sentence-final punctuation (a bare title or
# code is not an answer). No quote, backslash or line break inside, so no JSON escape is needed.
SENTENCE_PATTERN = r"^[^\"\\\n]*[.!?]$"


def bound(text: str, limit: int) -> str:
    """`text` cut to `limit` characters (code points: never inside a Hangul syllable), plus "…" when cut.

    Prefix-stable: for a growing string, the bounded form of every prefix is a prefix of the
    bounded form of the whole, so text streamed while the string grows never has to be taken back.
    """
    return text if len(text) <= limit else text[:limit] + ELLIPSIS


def answer_schema(*, challenge_count: int = CHALLENGE_COUNT, category_labels: Sequence[str] | None = None) -> dict[str, Any]:
    """The JSON schema of a completion: `{"recommend": str, "challenges": [n x {"title", "description"}]}`.

    With `category_labels` (free text), every challenge starts with `"category"`, one of those Korean
    labels (an enum, so the model can only choose an active category, by the name the prompt lists
    it under); the server maps it back to the code. Otherwise (base-info) the server adds the
    requested category. Property order is the generation order (xgrammar keeps it): the
    recommendation sentence streams first, and a challenge's category is chosen before its text.
    Raises ValueError for an empty `category_labels`.
    """
    properties: dict[str, Any] = {"title": {"type": "string"}, "description": {"type": "string"}}
    if category_labels is not None:
        if not category_labels:
            raise ValueError("at least one category is needed")
        properties = {"category": {"type": "string", "enum": list(category_labels)}, **properties}
    return {
        "type": "object",
        "properties": {
            "recommend": {"type": "string", "pattern": SENTENCE_PATTERN},
            "challenges": {
                "type": "array",
                "minItems": challenge_count,
                "maxItems": challenge_count,
                "items": {
                    "type": "object",
                    "properties": properties,
                    "required": list(properties),
                    "additionalProperties": False,
                },
            },
        },
        "required": ["recommend", "challenges"],
        "additionalProperties": False,
    }


def challenge_card(item: dict[str, Any], *, default_category: str | None, category_labels: dict[str, str]) -> dict[str, str]:
    """One complete generated challenge as the client gets it: bounded `title` and `description`,
    `category` (the code of the generated label, else `default_category`) and its Korean `label`.

    `category_labels` maps codes to labels. Raises ValueError if a field is missing or the
    category is unknown.
    """
    generated = item.get("category")
    codes = {label: code for code, label in category_labels.items()}
    code = codes.get(generated, generated) if generated else default_category
    if code not in category_labels:
        raise ValueError(f"unknown category {generated or default_category!r}")
    if not isinstance(item.get("title"), str) or not isinstance(item.get("description"), str):
        raise ValueError("a challenge needs a title and a description")
    return {
        "title": bound(item["title"], TITLE_MAX_CHARS),
        "description": bound(item["description"], DESCRIPTION_MAX_CHARS),
        "category": code,
        "label": category_labels[code],
    }


def finalize_answer(completion: str, *, default_category: str | None, category_labels: dict[str, str]) -> dict[str, Any]:
    """Parse a complete constrained completion into the close payload's `data`.

    Returns `{"recommend": str, "challenges": [{"title", "description", "category", "label"}]}`,
    texts bounded (`bound`). Raises ValueError if the completion is not the JSON the schema
    describes or a category is unknown.
    """
    parsed = json.loads(completion)
    if not isinstance(parsed, dict) or not isinstance(parsed.get("challenges"), list):
        raise ValueError("completion is not an answer object")
    if not isinstance(parsed.get("recommend"), str):
        raise ValueError("completion has no recommendation sentence")
    challenges = [
        challenge_card(item, default_category=default_category, category_labels=category_labels) for item in parsed["challenges"]
    ]
    return {"recommend": bound(parsed["recommend"], RECOMMEND_MAX_CHARS), "challenges": challenges}
