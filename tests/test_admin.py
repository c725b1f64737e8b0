"""The editors' admin through Django's test client (a logged-in superuser): prompt versions
(editing makes a new active version, diff, rollback, placeholder checks) and the read-only
sessions and turns with their filters."""

from __future__ import annotations

import time

import pytest

from chatbot.conversation import TurnDraft, TurnOutcome, turn_record
from chatbot.models import ChatSession, PromptTemplate, Turn
from chatbot.prompt_versions import prompt_diff

pytestmark = pytest.mark.django_db


def test_editing_a_prompt_makes_a_new_active_version_and_an_older_one_can_be_rolled_back(admin_client) -> None:
    first = PromptTemplate.objects.get(mode="base_info", is_active=True)
    url = f"/admin/chatbot/prompttemplate/{first.pk}/change/"
    page = admin_client.get(url)
    assert page.status_code == 200 and "(첫 버전)" in page.content.decode()
    edited = first.user_template + "\n지역 특색을 살려 주세요."
    response = admin_client.post(url, {"system": first.system, "user_template": edited})
    assert response.status_code == 302
    first.refresh_from_db()
    new = PromptTemplate.objects.get(mode="base_info", is_active=True)
    assert (new.version, new.user_template, first.is_active) == (first.version + 1, edited, False)
    assert first.user_template != edited  # the old version is kept as it was
    diff = prompt_diff(prompt=new)
    assert "+[user] 지역 특색을 살려 주세요." in diff
    assert "지역 특색을 살려 주세요." in admin_client.get(f"/admin/chatbot/prompttemplate/{new.pk}/change/").content.decode()
    # Rollback: make the first version active again.
    action = {"action": "make_active", "_selected_action": [str(first.pk)]}
    assert admin_client.post("/admin/chatbot/prompttemplate/", action).status_code == 302
    assert list(PromptTemplate.objects.filter(mode="base_info", is_active=True)) == [first]
    assert admin_client.post(f"/admin/chatbot/prompttemplate/{first.pk}/delete/", {"post": "yes"}).status_code == 403


def test_a_template_with_a_placeholder_its_mode_does_not_fill_is_refused(admin_client) -> None:
    prompt = PromptTemplate.objects.get(mode="free_text", is_active=True)
    before = PromptTemplate.objects.count()
    for template in ("메시지: {message} 지역: {location}", "메시지: {message"):
        page = admin_client.post(
            f"/admin/chatbot/prompttemplate/{prompt.pk}/change/", {"system": prompt.system, "user_template": template}
        )
        assert page.status_code == 200 and "errorlist" in page.content.decode()
    assert PromptTemplate.objects.count() == before


def _turn(session: str, mode: str, reason: str, category: str) -> None:
    answer = {"recommend": "r", "challenges": [{"title": "t", "description": "d", "category": category}]}
    inputs = {"category": "비건"} if mode == "base_info" else {"message": "m"}
    outcome = TurnOutcome(
        finish_reason=reason, answer_text="r", started_at=time.time(), duration_s=1.0, answer=answer if reason == "stop" else None
    )
    turn_record(
        draft=TurnDraft(session, mode, f"{session} 질문", inputs=inputs), request_id=f"{session}-{reason}", outcome=outcome
    )


def test_sessions_and_turns_are_read_only_searchable_and_filterable(admin_client) -> None:
    _turn("s-vegan", "base_info", "stop", "VEGAN")
    _turn("s-digital", "free_text", "stop", "DIGITAL_CARBON")
    _turn("s-digital", "free_text", "cancelled", "DIGITAL_CARBON")

    body = admin_client.get("/admin/chatbot/turn/?mode=free_text").content.decode()
    assert body.count("s-digital 질문") == 2 and "s-vegan 질문" not in body
    body = admin_client.get("/admin/chatbot/turn/?finish_reason=cancelled").content.decode()
    assert body.count("s-digital 질문") == 1 and "s-vegan 질문" not in body
    body = admin_client.get("/admin/chatbot/turn/?category=VEGAN").content.decode()
    assert "s-vegan 질문" in body and "s-digital 질문" not in body
    today = time.localtime()
    body = admin_client.get(f"/admin/chatbot/turn/?created_at__year={today.tm_year}").content.decode()
    assert body.count("s-digital 질문") == 2
    body = admin_client.get("/admin/chatbot/turn/?created_at__year=2001").content.decode()
    assert "s-digital 질문" not in body
    body = admin_client.get("/admin/chatbot/turn/?q=s-digital").content.decode()
    assert "s-digital 질문" in body and "s-vegan 질문" not in body
    session = ChatSession.objects.get(session_id="s-digital")
    page = admin_client.get(f"/admin/chatbot/chatsession/{session.pk}/change/").content.decode()
    assert page.count("s-digital 질문") == 2 and 'name="_save"' not in page  # the turns inline, nothing to save
    assert admin_client.get("/admin/chatbot/chatsession/add/").status_code == 403
    assert admin_client.post(f"/admin/chatbot/turn/{Turn.objects.first().pk}/delete/", {"post": "yes"}).status_code == 403
