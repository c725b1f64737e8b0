"""The widget page and the "try it" stream's gate, through Django's test client: the chat session
is bound to the browser's Django session, a refresh brings the conversation back, a new
conversation needs the CSRF token, and only staff with the view permission may try a prompt."""

from __future__ import annotations

import json
import time

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth.models import Permission, User
from django.test import Client

from chatbot.auth import trial_permitted
from chatbot.conversation import TurnDraft, TurnOutcome, turn_record
from chatbot.models import Category, PromptTemplate
from chatbot.seed import LOCATIONS, WORK_TYPES
from tests.helpers import widget_data as page_widget_data

pytestmark = pytest.mark.django_db


def widget_data(client: Client) -> dict:
    response = client.get("/")
    assert response.status_code == 200
    assert "no-cache" in response["Cache-Control"]  # the history must not come from a cache
    return page_widget_data(response.content.decode())


def test_each_browser_gets_its_own_chat_session_kept_in_its_django_session() -> None:
    browser, other = Client(), Client()
    first = widget_data(browser)
    assert first["sessionId"].startswith("web-") and len(first["sessionId"]) == 4 + 22
    assert widget_data(browser)["sessionId"] == first["sessionId"]
    assert widget_data(other)["sessionId"] != first["sessionId"]


def test_the_page_brings_back_the_conversation_and_offers_the_active_choices() -> None:
    browser = Client()
    session_id = widget_data(browser)["sessionId"]
    draft = TurnDraft(session_id=session_id, mode="free_text", user_text="<b>텀블러</b>", inputs={"message": "<b>텀블러</b>"})
    card = {"title": "t", "description": "d", "category": "ZERO_WASTE", "label": "제로웨이스트"}
    answer = {"recommend": "좋아요", "challenges": [card]}
    shown = "좋아요\n\n1. t — d"
    outcome = TurnOutcome(finish_reason="stop", answer_text=shown, started_at=time.time(), duration_s=0.5, answer=answer)
    turn_record(draft=draft, request_id="r1", outcome=outcome)
    vegan = Category.objects.get(code="VEGAN")
    vegan.is_active = False
    vegan.save()  # as an editor does: the cached categories are dropped

    data = widget_data(browser)
    assert [(t["userText"], t["answerText"], t["answer"]) for t in data["turns"]] == [("<b>텀블러</b>", shown, answer)]
    assert "VEGAN" not in {c["code"] for c in data["categories"]} and len(data["categories"]) == 7
    html = browser.get("/").content.decode()
    assert "<b>텀블러</b>" not in html  # json_script escapes it; the page draws it as text
    for value in [*LOCATIONS, *WORK_TYPES]:
        assert f"<option>{value}</option>" in html
    assert 'data-testid="basic-info-form"' in html and 'name="workType"' in html


def test_a_new_conversation_needs_the_csrf_token_and_gives_a_new_session() -> None:
    browser = Client(enforce_csrf_checks=True)
    old = widget_data(browser)["sessionId"]
    assert browser.post("/conversation/new").status_code == 403
    assert widget_data(browser)["sessionId"] == old
    token = browser.cookies["csrftoken"].value
    response = browser.post("/conversation/new", {"csrfmiddlewaretoken": token})
    assert (response.status_code, response["Location"]) == (302, "/")
    assert widget_data(browser)["sessionId"] not in (old, "")


async def _read(stream) -> bytes:
    return b"".join([chunk async for chunk in stream])


def refusal(client: Client, url: str, **headers: str) -> tuple[str, int]:
    """A refused trial stream: one `error` event (EventSource cannot read an HTTP error's body)."""
    response = client.get(url, {"message": "텀블러"}, **headers)
    assert response.status_code == 200 and response["Content-Type"] == "text/event-stream"
    body = async_to_sync(_read)(response.streaming_content).decode()
    event, data = (line.split(": ", 1)[1] for line in body.splitlines() if line.startswith(("event:", "data:")))
    return event, json.loads(data)["status"]


def staff(name: str, *permissions: str) -> Client:
    user = User.objects.create_user(name, password="pw-123456", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=permissions))
    client = Client()
    assert client.login(username=name, password="pw-123456")
    return client


def test_only_staff_who_may_see_prompts_may_try_them(admin_client) -> None:
    prompt = PromptTemplate.objects.get(mode="free_text", is_active=True)
    stream = f"/admin/chatbot/prompttemplate/{prompt.pk}/try/stream"
    page = f"/admin/chatbot/prompttemplate/{prompt.pk}/try/"
    anonymous = Client()
    assert refusal(anonymous, stream) == ("error", 403)
    assert anonymous.get(page).status_code == 302  # to the admin login
    clerk = staff("clerk")  # staff without a permission on prompts
    assert refusal(clerk, stream) == ("error", 403)
    assert clerk.get(page).status_code == 403
    for name, permission in (("viewer", "view_prompttemplate"), ("editor", "change_prompttemplate")):
        user = staff(name, permission)
        assert trial_permitted(User.objects.get(username=name))
        assert user.get(page).status_code == 200
    # A trial runs a generation: a request another site made the browser send is refused.
    assert refusal(admin_client, stream, HTTP_SEC_FETCH_SITE="cross-site") == ("error", 403)
    assert refusal(admin_client, f"/admin/chatbot/prompttemplate/{prompt.pk + 1000}/try/stream") == ("error", 404)
    body = admin_client.get(page).content.decode()
    assert 'data-testid="try-run"' in body and 'name="message"' in body and prompt.system[:20] in body
