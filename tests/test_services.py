"""Services and selectors against the test database (seeded by the data migration)."""

from __future__ import annotations

import pytest

from chatbot import contract
from chatbot.contract import ContractError, check_base_info, check_free_text
from chatbot.knowledge.store import Hit
from chatbot.models import Category, ModerationTerm, PromptTemplate
from chatbot.prompts import PromptTemplateError, build_messages
from chatbot.services import (
    PresetAnswer,
    Recommendation,
    recommendation_build_base_info,
    recommendation_build_free_text,
    recommendation_plan_free_text,
    session_group_name,
)
from inference.types import GenerationRequest

pytestmark = pytest.mark.django_db


def _free_text(message: str, session_id: str = "s", passages: tuple[Hit, ...] = ()) -> GenerationRequest | PresetAnswer:
    """The free-text request the service builds for `message` with these retrieved passages."""
    plan = recommendation_plan_free_text(checked=check_free_text({"sessionId": session_id, "message": message}))
    built = plan if isinstance(plan, Recommendation) else recommendation_build_free_text(plan=plan, passages=list(passages))
    return built.item


def test_migration_seeds_eight_categories_and_two_active_prompts() -> None:
    assert list(Category.objects.values_list("code", "label")) == [
        ("ZERO_WASTE", "제로웨이스트"),
        ("PLOGGING", "플로깅"),
        ("CARBON_FOOTPRINT", "탄소발자국"),
        ("ENERGY_SAVING", "에너지 절약"),
        ("UPCYCLING", "업사이클"),
        ("MEDIA", "문화 공유"),
        ("DIGITAL_CARBON", "디지털 탄소"),
        ("VEGAN", "비건"),
    ]
    assert sorted(PromptTemplate.objects.filter(is_active=True).values_list("mode", flat=True)) == ["base_info", "free_text"]


def test_base_info_request_carries_the_prompt_category_and_sampling() -> None:
    request = recommendation_build_base_info(
        checked=check_base_info({"sessionId": "s1", "location": "농촌", "workType": "현장직", "category": "업사이클"})
    ).item
    assert isinstance(request, GenerationRequest)
    assert request.default_category == "UPCYCLING" and request.category_labels["UPCYCLING"] == "업사이클"
    assert [m["role"] for m in request.messages] == ["system", "user"]
    assert "농촌" in request.messages[1]["content"] and "업사이클" in request.messages[1]["content"]
    assert request.group == session_group_name("s1") and request.group.isascii() and len(request.group) < 100
    assert request.sampling.max_new_tokens == 512


def test_an_inactive_category_is_rejected_without_a_restart() -> None:
    fields = {"sessionId": "s", "location": "도시", "workType": "사무직", "category": "비건"}
    recommendation_build_base_info(checked=check_base_info(fields))  # cached as active
    vegan = Category.objects.get(code="VEGAN")
    vegan.is_active = False
    vegan.save()  # as the admin does: the process's cached configuration is dropped
    with pytest.raises(ContractError) as excinfo:
        recommendation_build_base_info(checked=check_base_info(fields))
    assert excinfo.value.invalid_fields == ["category"]


def test_free_text_lets_the_model_choose_among_the_active_categories_keyword_matches_listed_first() -> None:
    request = _free_text("이메일이랑 클라우드 정리를 하고 싶어요")
    assert isinstance(request, GenerationRequest) and request.default_category is None
    enum = request.schema["properties"]["challenges"]["items"]["properties"]["category"]["enum"]
    assert enum == list(Category.objects.filter(is_active=True).values_list("label", flat=True))
    user = request.messages[1]["content"]
    assert "이메일이랑" in user and "카테고리 목록: 디지털 탄소, 제로웨이스트, 플로깅" in user
    # Deactivating a category takes it out of the enum, the prompt and the labels, without a restart.
    vegan = Category.objects.get(code="VEGAN")
    vegan.is_active = False
    vegan.save()
    request = _free_text("채식 식단")
    assert "비건" not in request.schema["properties"]["challenges"]["items"]["properties"]["category"]["enum"]
    assert "비건" not in request.messages[1]["content"] and "VEGAN" not in request.category_labels
    Category.objects.create(code="WATER", label="물 절약", order=99)
    request = _free_text("샤워 시간을 줄이고 싶어요")
    assert "물 절약" in request.schema["properties"]["challenges"]["items"]["properties"]["category"]["enum"]
    assert request.category_labels["WATER"] == "물 절약" and "물 절약" in request.messages[1]["content"]


@pytest.mark.parametrize(
    ("message", "reason", "reply"),
    [
        ("비트코인 지금 사도 될까요?", "off_topic", contract.REPLY_OFF_TOPIC),
        ("이 병신 같은 챗봇", "abuse", contract.REPLY_ABUSE),
        ("FUCK 환경", "abuse", contract.REPLY_ABUSE),
        ("비트코인을 사도 될까요", "off_topic", contract.REPLY_OFF_TOPIC),  # a particle after the term
    ],
)
def test_off_topic_and_abusive_messages_get_a_polite_preset_answer(message: str, reason: str, reply: str) -> None:
    answer = _free_text(message)
    assert isinstance(answer, PresetAnswer) and answer.reason == reason
    assert answer.answer == {"recommend": reply, "challenges": []}


@pytest.mark.parametrize(
    "message",
    [
        "집에 불이 꺼져 있어도 대기전력이 나가나요?",
        "유리병 신문지 분리배출 방법",
        "페트병 신발 업사이클 해 보고 싶어요",
        "환경 운동의 시발점이 궁금해요",
        "도서관에서 책을 대출해서 읽고 싶어요",
        "선거 현수막을 재활용할 수 있을까요?",
    ],
)
def test_ordinary_eco_messages_are_not_mistaken_for_abuse_or_off_topic(message: str) -> None:
    assert isinstance(_free_text(message), GenerationRequest)


def test_moderation_terms_are_edited_in_the_database_without_a_restart() -> None:
    message = "점심 메뉴 추천해 주세요"
    assert isinstance(_free_text(message), GenerationRequest)
    term = ModerationTerm.objects.create(kind="off_topic", term="점심 메뉴")
    assert _free_text(message).reason == "off_topic"
    term.is_active = False
    term.save()
    assert isinstance(_free_text(message), GenerationRequest)


def test_user_text_is_substituted_as_text_not_as_template_syntax() -> None:
    messages = build_messages(system="s", user_template="메시지: {message}", fields={"message": "{location} {0} }{"})
    assert messages[1]["content"] == "메시지: {location} {0} }{"
    with pytest.raises(PromptTemplateError):
        build_messages(system="s", user_template="{unknown}", fields={"message": "x"})
