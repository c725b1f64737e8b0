"""Unit tests: incremental detokenisation of Korean, and progressive rendering of the JSON answer."""

from __future__ import annotations

import json

import pytest

from inference.answer import DESCRIPTION_MAX_CHARS, TITLE_MAX_CHARS, answer_schema, bound, finalize_answer
from inference.detokenize import IncrementalDetokenizer
from inference.render import ProgressiveRenderer, render_answer
from inference.structured import GrammarFactory

pytestmark = pytest.mark.no_database  # touches no database: run once, not again on PostgreSQL

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


def _stream(completion: str, *, default_category: str | None, labels: dict[str, str]) -> tuple[list[str], list, dict]:
    """Feed a completion char by char: (deltas, [(index, card) in report order, with the text length
    streamed when each was reported], final answer)."""
    renderer = ProgressiveRenderer()
    deltas: list[str] = []
    cards: list = []
    for ch in completion:
        deltas.append(renderer.feed(ch))
        cards += [(index, item, len("".join(deltas))) for index, item in renderer.completed()]
    final = finalize_answer(completion, default_category=default_category, category_labels=labels)
    tail, remaining = renderer.finish(final)
    deltas.append(tail)
    cards += [(index, final["challenges"][index], len("".join(deltas))) for index in remaining]
    return deltas, cards, final


def test_renderer_deltas_equal_the_final_rendering_char_by_char() -> None:
    completion = json.dumps(ANSWER, ensure_ascii=False, separators=(",", ":"))
    deltas, _, final = _stream(completion, default_category="PLOGGING", labels={"PLOGGING": "플로깅"})
    text = "".join(deltas)
    assert text == render_answer(ANSWER) == render_answer(final)
    assert text.startswith(ANSWER["recommend"] + '\n\n1. 해변 플로깅 — 주말에 "해변"을')
    assert "\n\n2. 텀블러 — " in text and "\n\n3. 장바구니 — " in text
    for syntax in ('{"', '":"', '"}', "[{"):
        assert syntax not in text


def test_each_challenge_is_reported_once_as_soon_as_the_next_begins() -> None:
    completion = json.dumps(ANSWER, ensure_ascii=False, separators=(",", ":"))
    deltas, cards, final = _stream(completion, default_category="PLOGGING", labels={"PLOGGING": "플로깅"})
    assert [index for index, _, _ in cards] == [0, 1, 2]
    text = "".join(deltas)
    for index, item, streamed in cards[:2]:
        # Reported while the next challenge's block is being streamed, before the answer ends.
        assert text.index(f"\n\n{index + 2}. ") <= streamed < len(text)
        card = {**item, "category": "PLOGGING", "label": "플로깅"}
        assert card == final["challenges"][index]
    assert cards[2][1] == final["challenges"][2]


def test_long_texts_are_cut_at_a_character_in_the_stream_and_the_close_payload_alike() -> None:
    long_title = "해변을 따라 걸으며 쓰레기를 줍는 아주 긴 플로깅 챌린지 제목입니다 정말 깁니다"
    long_description = "주말마다 가까운 해변에 나가 한 시간 동안 걸으며 쓰레기를 주워요. " * 6
    answer = {**ANSWER, "challenges": [{"title": long_title, "description": long_description}, *ANSWER["challenges"][1:]]}
    assert len(long_title) > TITLE_MAX_CHARS and len(long_description) > DESCRIPTION_MAX_CHARS
    completion = json.dumps(answer, ensure_ascii=False, separators=(",", ":"))
    deltas, cards, final = _stream(completion, default_category="PLOGGING", labels={"PLOGGING": "플로깅"})
    first = final["challenges"][0]
    assert first["title"] == long_title[:TITLE_MAX_CHARS] + "…"
    assert first["description"] == long_description[:DESCRIPTION_MAX_CHARS] + "…"
    assert "".join(deltas) == render_answer(final)
    assert cards[0][1]["title"] == long_title, "cards are reported as generated; the engine bounds them"
    assert bound(bound(long_title, TITLE_MAX_CHARS), TITLE_MAX_CHARS) == first["title"], "bounding is idempotent"


def test_free_text_schema_lets_the_model_choose_only_listed_categories(loaded_demo) -> None:
    schema = answer_schema(category_labels=["비건", "플로깅"])
    item = schema["properties"]["challenges"]["items"]
    assert list(item["properties"]) == ["category", "title", "description"], "the category is chosen first"
    assert item["properties"]["category"]["enum"] == ["비건", "플로깅"]
    factory = GrammarFactory(loaded_demo.tokenizer, vocab_size=loaded_demo.model.config.vocab_size)
    start = '{"recommend":"좋아요.","challenges":[{"category":"'
    listed = factory.matcher(schema)
    assert listed.accept_string(start + '비건","title":"')
    unlisted = factory.matcher(schema)
    assert not unlisted.accept_string(start + '제로웨이스트"')
    with pytest.raises(ValueError):
        answer_schema(category_labels=[])


def test_finalize_answer_maps_the_generated_label_to_its_code() -> None:
    generated = {**ANSWER, "challenges": [{"category": "비건", **c} for c in ANSWER["challenges"]]}
    answer = finalize_answer(
        json.dumps(generated, ensure_ascii=False), default_category=None, category_labels={"VEGAN": "비건", "MEDIA": "문화 공유"}
    )
    assert {(c["category"], c["label"]) for c in answer["challenges"]} == {("VEGAN", "비건")}
    with pytest.raises(ValueError, match="unknown category"):
        finalize_answer(json.dumps(generated, ensure_ascii=False), default_category=None, category_labels={"MEDIA": "문화 공유"})


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


def test_the_recommendation_must_be_a_sentence_not_a_bare_title(loaded_demo) -> None:
    factory = GrammarFactory(loaded_demo.tokenizer, vocab_size=loaded_demo.model.config.vocab_size)
    assert factory.matcher(answer_schema()).accept_string('{"recommend":"텀블러를 써 보세요.","challenges":[{"title":"')
    bare = factory.matcher(answer_schema())
    assert bare.accept_string('{"recommend":"텀블러 사용하기')
    assert not bare.accept_string('","'), "a recommendation without sentence-final punctuation was accepted"
