"""The answer's shape: the JSON schema generation is constrained to, and the final answer's checks.

No heavy imports: the web process builds schemas too.
"""

from __future__ import annotations

import json
from typing import Any

CHALLENGE_COUNT = 3


def answer_schema(*, challenge_count: int = CHALLENGE_COUNT) -> dict[str, Any]:
    """The JSON schema of a completion: `{"recommend": str, "challenges": [n x {"title", "description"}]}`.

    Property order is the generation order (xgrammar keeps it), so the recommendation sentence
    streams first. `category` and `label` are added by the server, not generated.
    """
    return {
        "type": "object",
        "properties": {
            "recommend": {"type": "string"},
            "challenges": {
                "type": "array",
                "minItems": challenge_count,
                "maxItems": challenge_count,
                "items": {
                    "type": "object",
                    "properties": {"title": {"type": "string"}, "description": {"type": "string"}},
                    "required": ["title", "description"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["recommend", "challenges"],
        "additionalProperties": False,
    }


def finalize_answer(completion: str, *, default_category: str | None, category_labels: dict[str, str]) -> dict[str, Any]:
    """Parse a complete constrained completion and add each challenge's `category` and `label`.

    Returns `{"recommend": str, "challenges": [{"title", "description", "category", "label"}]}`.
    Raises ValueError if the completion is not the JSON the schema describes or a category is unknown.
    """
    parsed = json.loads(completion)
    if not isinstance(parsed, dict) or not isinstance(parsed.get("challenges"), list):
        raise ValueError("completion is not an answer object")
    challenges = []
    for item in parsed["challenges"]:
        code = item.get("category") or default_category
        if code not in category_labels:
            raise ValueError(f"unknown category {code!r}")
        challenges.append(
            {"title": item["title"], "description": item["description"], "category": code, "label": category_labels[code]}
        )
    return {"recommend": parsed["recommend"], "challenges": challenges}
