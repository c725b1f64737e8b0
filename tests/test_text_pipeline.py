"""Unit tests: incremental detokenisation of Korean, and progressive rendering of the JSON answer."""

from __future__ import annotations

import json

from inference.answer import answer_schema, finalize_answer
from inference.detokenize import IncrementalDetokenizer
from inference.render import ProgressiveRenderer, render_answer

# Common words are whole tokens in the demo vocabulary; rare syllables (뷁, 꿿) fall apart into bytes.
KOREAN = "해안가에서 플로깅을 하며 쓰레기를 주워 보세요. 뷁꿿! 텀블러와 장바구니도 챙기세요."
ANSWER = {
    "recommend": "바다를 지키는 작은 실천을 추천해요.",
    "challenges": [
        {"title": "해변 플로깅", "description": '주말에 "해변"을 걸으며\n쓰레기를 주워요.'},
        {"title": "텀블러", "description": "일회용 컵 대신 텀블러를 써요."},
        {"title": "장바구니", "description": "비닐봉투 대신 장바구니를 챙겨요."},
    ],
}


def test_detokenizer_never_emits_half_a_korean_character(loaded_demo) -> None:
    tokenizer = loaded_demo.tokenizer
    ids = tokenizer(KOREAN, add_special_tokens=False)["input_ids"]
    # Make sure the case is exercised: some token alone decodes to an incomplete character.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "no token splits a Korean character"
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(i) for i in ids] + [detokenizer.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == KOREAN


def test_detokenizer_flush_drops_a_trailing_incomplete_character(loaded_demo) -> None:
    tokenizer = loaded_demo.tokenizer
    rare = "꿿"  # not in the demo vocabulary: three byte-level tokens
    assert len(tokenizer(rare, add_special_tokens=False)["input_ids"]) == 3
    ids = tokenizer("가나" + rare, add_special_tokens=False)["input_ids"]
    detokenizer = IncrementalDetokenizer(tokenizer)
    text = "".join(detokenizer.push(i) for i in ids[:-1]) + detokenizer.flush()
    assert text == "가나"


def test_renderer_deltas_equal_the_final_rendering_char_by_char() -> None:
    completion = json.dumps(ANSWER, ensure_ascii=False, separators=(",", ":"))
    renderer = ProgressiveRenderer()
    deltas = [renderer.feed(ch) for ch in completion]
    final = finalize_answer(completion, default_category="PLOGGING", category_labels={"PLOGGING": "플로깅"})
    deltas.append(renderer.finish(final))
    text = "".join(deltas)
    assert text == render_answer(ANSWER)
    assert text.startswith(ANSWER["recommend"] + '\n\n1. 해변 플로깅 — 주말에 "해변"을')
    assert "\n\n2. 텀블러 — " in text and "\n\n3. 장바구니 — " in text
    for syntax in ('{"', '":"', '"}', "[{"):
        assert syntax not in text


def test_finalize_answer_adds_category_and_label() -> None:
    completion = json.dumps(ANSWER, ensure_ascii=False)
    answer = finalize_answer(completion, default_category="VEGAN", category_labels={"VEGAN": "비건"})
    assert [c["category"] for c in answer["challenges"]] == ["VEGAN"] * 3
    assert [c["label"] for c in answer["challenges"]] == ["비건"] * 3


def test_answer_schema_requires_three_challenges() -> None:
    schema = answer_schema()
    challenges = schema["properties"]["challenges"]
    assert challenges["minItems"] == challenges["maxItems"] == 3
    assert schema["required"] == ["recommend", "challenges"]


def test_particle_euro_follows_the_final_consonant() -> None:
    from chatbot.demo_corpus import euro

    assert [euro(w) for w in ("사무직", "재택근무", "영업직", "현장직", "서울", "도시")] == [
        "으로",
        "로",
        "으로",
        "으로",
        "로",
        "로",
    ]
