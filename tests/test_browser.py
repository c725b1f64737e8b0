"""The chat widget and the admin's "try it" page in a real browser: Debian's Chromium, headless,
driven by Playwright, against the live stack (daphne, the GPU worker, Redis).

Screenshots are saved under var/test/artifacts/browser/ (one at the end of every test, and more at
the moments a test names). `make browser` (part of `make test`) installs Chromium when missing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from websockets.sync.client import connect

from inference.engine import MESSAGE_BUSY as ENGINE_BUSY
from tests.helpers import cancelled_in_engine, eventually
from tests.stack import BIN, ROOT, Stack

CHROMIUM = os.environ.get("LEAFRESH_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "var" / "test" / "artifacts" / "browser"
# Headless as root, with none of Chromium's own network traffic (this machine has no internet).
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CATEGORY_LABELS = {"제로웨이스트", "플로깅", "탄소발자국", "에너지 절약", "업사이클", "문화 공유", "디지털 탄소", "비건"}
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}

# Records, on every change to the newest answer, its text length and its number of cards.
WATCH_GROWTH = """() => {
  window.__growth = [];
  const log = document.getElementById("log");
  new MutationObserver(() => {
    const answers = document.querySelectorAll("[data-testid=assistant-message]");
    const last = answers[answers.length - 1];
    if (!last) return;
    const cards = last.parentElement.querySelectorAll("[data-testid=challenge-card]").length;
    window.__growth.push([last.textContent.length, cards]);
  }).observe(log, { subtree: true, childList: true, characterData: true });
}"""
LAST_ANSWER_DONE = """(n) => {
  const answers = document.querySelectorAll("[data-testid=assistant-message]");
  const last = answers[answers.length - 1];
  return !!last && last.parentElement.querySelectorAll("[data-testid=challenge-card]").length === n
    && document.querySelector("[data-testid=chat-stop]").disabled;
}"""


def shot(page: Page, name: str) -> Path:
    """Save a full-page screenshot as a test artefact; returns its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}.png"
    page.screenshot(path=str(path), full_page=True, animations="disabled")
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium for these tests")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def new_page(browser: Browser, request: pytest.FixtureRequest) -> Iterator:
    """Opens pages in fresh browser contexts (own cookies, so own Django session); every page's
    uncaught script errors fail the test, and each gets a screenshot at the end."""
    opened: list[tuple[Page, list[str]]] = []

    def open_page(url: str, **context_options) -> Page:
        context = browser.new_context(locale="ko-KR", **({"viewport": {"width": 1000, "height": 800}} | context_options))
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        opened.append((page, errors))
        return page

    yield open_page
    for index, (page, errors) in enumerate(opened):
        shot(page, f"{request.node.name}-end-{index}")
        page.context.close()
        assert errors == [], f"script errors on the page: {errors}"


def connected(page: Page) -> Page:
    expect(page.locator("#conn")).to_have_attribute("data-state", "open", timeout=20_000)
    return page


def widget_session(page: Page) -> str:
    return page.evaluate("JSON.parse(document.getElementById('widget-data').textContent).sessionId")


def send_message(page: Page, text: str) -> None:
    page.get_by_test_id("chat-input").fill(text)
    page.get_by_test_id("chat-send").click()


def transcript(stack: Stack, session_id: str) -> dict:
    response = httpx.get(f"{stack.base_url}/ai/chatbot/sessions/{session_id}/messages", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def cards_of_last_answer(page: Page) -> list[dict[str, str]]:
    return page.evaluate("""() => {
      const answers = document.querySelectorAll("[data-testid=assistant-message]");
      const row = answers[answers.length - 1].parentElement;
      return [...row.querySelectorAll("[data-testid=challenge-card]")].map((card) => ({
        label: card.querySelector(".badge").textContent, title: card.querySelector("h3").textContent,
        description: card.querySelector("p").textContent }));
    }""")


def test_a_free_text_message_streams_its_text_and_three_cards_appear_on_a_phone(stack, new_page) -> None:
    page = connected(new_page(stack.base_url + "/", **PHONE))
    shot(page, "widget-phone-empty")
    page.evaluate(WATCH_GROWTH)
    send_message(page, "플라스틱 쓰레기를 줄이고 싶어요")
    expect(page.locator(".msg.user .bubble").last).to_have_text("플라스틱 쓰레기를 줄이고 싶어요")
    page.wait_for_function(LAST_ANSWER_DONE, arg=3, timeout=60_000)
    shot(page, "widget-phone-free-text-answer")

    growth = page.evaluate("window.__growth")
    lengths = [length for length, _ in growth]
    final = page.get_by_test_id("assistant-message").last.text_content()
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), f"the text did not grow step by step: {lengths}"
    first_card_at = next(length for length, cards in growth if cards >= 1)
    assert first_card_at < len(final), "the first card should appear while the text is still streaming"
    cards = cards_of_last_answer(page)
    assert len(cards) == 3
    for card in cards:
        assert card["label"] in CATEGORY_LABELS and card["title"] and card["description"]
        assert card["title"] in final  # the streamed text renders the same challenges
    assert page.locator("[data-testid=chat-error]").count() == 0
    # Fits a phone: nothing wider than the screen.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_the_base_info_form_asks_for_challenges_of_the_chosen_category(stack, new_page) -> None:
    page = connected(new_page(stack.base_url + "/"))
    form = page.get_by_test_id("basic-info-form")
    labels = form.locator("select[name=category] option").all_text_contents()
    assert set(labels) == CATEGORY_LABELS  # the active categories
    form.locator("select[name=location]").select_option("해안가")
    form.locator("select[name=workType]").select_option("재택근무")
    form.locator("select[name=category]").select_option("플로깅")
    page.get_by_test_id("basic-info-send").click()
    expect(page.locator(".msg.user .bubble").last).to_have_text("해안가 · 재택근무 · 플로깅")
    page.wait_for_function(LAST_ANSWER_DONE, arg=3, timeout=60_000)
    shot(page, "widget-base-info-answer")
    assert [card["label"] for card in cards_of_last_answer(page)] == ["플로깅"] * 3
    turns = transcript(stack, widget_session(page))["turns"]
    assert [(t["mode"], t["inputs"]["category"], t["finishReason"]) for t in turns] == [("base_info", "플로깅", "stop")]


def test_after_a_reload_the_conversation_is_still_there_and_continues(stack, new_page) -> None:
    page = connected(new_page(stack.base_url + "/"))
    session_id = widget_session(page)
    send_message(page, "고기를 줄이고 채식 식단을 해 보고 싶어요")
    page.wait_for_function(LAST_ANSWER_DONE, arg=3, timeout=60_000)
    before = page.get_by_test_id("assistant-message").all_text_contents()
    titles = [card["title"] for card in cards_of_last_answer(page)]

    page.reload()
    connected(page)
    assert widget_session(page) == session_id  # bound to the browser's Django session, not to the page
    expect(page.locator(".msg.user .bubble")).to_have_text(["고기를 줄이고 채식 식단을 해 보고 싶어요"])
    assert page.get_by_test_id("assistant-message").all_text_contents() == before
    assert [card["title"] for card in cards_of_last_answer(page)] == titles
    shot(page, "widget-after-reload")

    send_message(page, "다른 것도 추천해 주세요")
    page.wait_for_function(LAST_ANSWER_DONE, arg=3, timeout=60_000)
    turns = transcript(stack, session_id)["turns"]
    assert [t["userText"] for t in turns] == ["고기를 줄이고 채식 식단을 해 보고 싶어요", "다른 것도 추천해 주세요"]
    assert turns[1]["historyTurns"] == 1  # the follow-up was answered with the first turn in its history

    # "새 대화" starts a new, empty conversation; another browser has a conversation of its own.
    page.get_by_test_id("chat-new").click()
    connected(page)
    assert widget_session(page) != session_id
    expect(page.get_by_test_id("assistant-message")).to_have_count(0)
    other = connected(new_page(stack.base_url + "/"))
    assert widget_session(other) not in (session_id, widget_session(page))


def test_model_and_user_text_is_shown_as_text_never_as_html(stack, new_page) -> None:
    page = connected(new_page(stack.base_url + "/"))
    hostile = '<img src=x onerror="window.__injected=1"><b>텀블러</b>를 쓰고 싶어요'
    send_message(page, hostile)
    page.wait_for_function(LAST_ANSWER_DONE, arg=3, timeout=60_000)
    expect(page.locator(".msg.user .bubble").last).to_have_text(hostile)
    assert page.locator("#log img, #log b").count() == 0
    assert page.evaluate("window.__injected") is None
    # Every bubble and card holds text nodes only.
    assert page.evaluate("[...document.querySelectorAll('.bubble, .card h3, .card p')].every(n => n.children.length === 0)")
    page.reload()  # and again when the history is drawn from the server
    connected(page)
    expect(page.locator(".msg.user .bubble").last).to_have_text(hostile)
    assert page.locator("#log img, #log b").count() == 0 and page.evaluate("window.__injected") is None


def test_the_widget_reconnects_by_itself_when_the_server_comes_back(stack, new_page) -> None:
    page = connected(new_page(stack.base_url + "/"))
    stack.stop_web()
    try:
        expect(page.locator("#conn")).to_have_attribute("data-state", "closed", timeout=10_000)
        expect(page.locator("#conn")).to_contain_text("다시 연결합니다")
        shot(page, "widget-disconnected")
        send_message(page, "텀블러를 쓰고 싶어요")  # while down: a readable error, and the text is kept
        expect(page.get_by_test_id("chat-error").last).to_contain_text("서버에 연결되어 있지 않습니다")
        expect(page.get_by_test_id("chat-input")).to_have_value("텀블러를 쓰고 싶어요")
    finally:
        stack.restart_web()  # the other tests share this stack
    connected(page)  # by itself, within its back-off (at most 15 s)
    page.get_by_test_id("chat-send").click()
    page.wait_for_function(LAST_ANSWER_DONE, arg=3, timeout=60_000)


def test_the_admin_try_it_page_streams_a_prompt_version_with_its_figures(stack, new_page) -> None:
    env = {**stack.env, "DJANGO_SUPERUSER_PASSWORD": "editor-pass-1234"}
    command = [str(BIN / "python"), "manage.py", "createsuperuser", "--noinput", "--username", "editor", "--email", "e@x.org"]
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    page = new_page(stack.base_url + "/admin/")
    page.fill("#id_username", "editor")
    page.fill("#id_password", "editor-pass-1234")
    page.click("input[type=submit]")
    expect(page.locator("#user-tools")).to_contain_text("editor")
    # daphne serves the admin's stylesheets: the header has its colour, not the browser's default.
    assert httpx.get(stack.base_url + "/static/admin/css/base.css", timeout=10).status_code == 200
    assert page.evaluate("getComputedStyle(document.getElementById('header')).backgroundColor") != "rgba(0, 0, 0, 0)"

    try:
        # An editor saves a new free-text version (it becomes active), then tries the old one.
        page.goto(stack.base_url + "/admin/chatbot/prompttemplate/?mode__exact=free_text")
        page.locator("#result_list a", has_text="자유 대화 추천").first.click()
        template = page.locator("#id_user_template")
        template.fill(template.input_value() + "\n친근한 말투로 답해 주세요.")
        page.locator("input[name=_save]").click()
        expect(page.locator(".messagelist")).to_contain_text("v2")
        page.goto(stack.base_url + "/admin/chatbot/prompttemplate/?mode__exact=free_text")
        shot(page, "admin-prompt-versions")
        version_one = page.locator("#result_list tr", has=page.locator("td.field-version", has_text=re.compile(r"^1$")))
        version_one.get_by_test_id("prompt-try-link").click()  # v1, inactive now
        expect(page.locator("#content-main")).to_contain_text("비활성 버전")

        page.evaluate("""() => { window.__outputs = []; const output = document.querySelector("[data-testid=try-output]");
          new MutationObserver(() => window.__outputs.push(output.textContent.length))
            .observe(output, { subtree: true, childList: true, characterData: true }); }""")
        page.fill("#try-message", "일회용 컵 대신 텀블러를 쓰고 싶어요")
        page.get_by_test_id("try-run").click()
        expect(page.get_by_test_id("try-status")).to_have_text(re.compile("완료|오류|연결 끊김"), timeout=60_000)
        expect(page.get_by_test_id("try-error")).to_be_hidden()
        expect(page.get_by_test_id("try-status")).to_have_text("완료")
        shot(page, "admin-try-it")
        assert len(set(page.evaluate("window.__outputs"))) >= 3, "the answer should stream in, not arrive at once"
        answer = json.loads(page.get_by_test_id("try-answer").text_content())
        assert len(answer["challenges"]) == 3 and answer["recommend"]
        expect(page.get_by_test_id("try-card")).to_have_count(3)
        for figure, unit in (("try-ttft", "ms"), ("try-first-text", "ms"), ("try-tps", "tokens/s"), ("try-e2e-tps", "tokens/s")):
            expect(page.get_by_test_id(figure)).to_have_text(re.compile(rf"^\d+(\.\d+)? {unit}$"))
        turns = transcript(stack, page.get_by_test_id("try-session").text_content())["turns"]
        assert [(t["mode"], t["promptVersion"], t["finishReason"]) for t in turns] == [("free_text", 1, "stop")]

        # Roll back to v1 with the admin action, as the rest of the suite expects the seeded prompt.
        page.goto(stack.base_url + "/admin/chatbot/prompttemplate/?mode__exact=free_text")
        version_one.locator("input.action-select").check()
        page.select_option("select[name=action]", "make_active")
        page.locator("button[name=index]").click()
        expect(page.locator(".messagelist")).to_contain_text("v1")
    finally:
        # The rest of the suite shares this stack and expects the seeded prompt active, whatever happened here.
        activate = "from chatbot.models import PromptTemplate as P; from chatbot.prompt_versions import prompt_activate; "
        activate += "prompt_activate(prompt=P.objects.get(mode='free_text', version=1))"
        subprocess.run([str(BIN / "python"), "manage.py", "shell", "-c", activate], cwd=ROOT, env=stack.env, check=True)


def _occupy(stack: Stack, session: str) -> object:
    """A WebSocket whose request is generating (its first token arrived): it holds a running slot."""
    socket = connect(f"{stack.ws_url}/ws/chat/{session}/", origin=stack.origin, open_timeout=10)
    socket.send(json.dumps({"type": "chat.message", "message": "텀블러를 쓰고 싶어요"}))
    while json.loads(socket.recv(timeout=60))["type"] != "chat.token":
        pass
    return socket


def test_stop_ends_the_generation_mid_answer(slow_stack, new_page) -> None:
    page = connected(new_page(slow_stack.base_url + "/"))
    send_message(page, "텀블러를 쓰고 싶어요")
    page.wait_for_function("() => document.querySelector('[data-testid=assistant-message]')?.textContent.length > 0")
    page.get_by_test_id("chat-stop").click()
    expect(page.get_by_test_id("chat-stopped")).to_be_visible()
    expect(page.get_by_test_id("chat-stop")).to_be_disabled()
    shown = page.get_by_test_id("assistant-message").text_content()
    time.sleep(1.0)
    assert page.get_by_test_id("assistant-message").text_content() == shown, "text kept arriving after stop"
    turns = transcript(slow_stack, widget_session(page))["turns"]
    assert [t["finishReason"] for t in turns] == ["cancelled"]
    assert shown and turns[0]["answerText"].startswith(shown)  # recorded: the text shown (and what was in flight)
    request_id = turns[0]["requestId"]
    assert eventually(lambda: cancelled_in_engine(slow_stack, request_id), 10), "the engine did not cancel the request"
    shot(page, "widget-stopped")


def test_the_queue_position_shows_and_an_overload_is_a_readable_error(slow_stack, new_page) -> None:
    # The slow stack runs two requests at a time and lets one wait (LEAFRESH_MAX_RUNNING=2, _WAITING=1).
    held: list = []
    try:
        for n in range(2):
            held.append(_occupy(slow_stack, f"hold-{n}"))
        waiting = connected(new_page(slow_stack.base_url + "/"))
        send_message(waiting, "텀블러를 쓰고 싶어요")
        expect(waiting.locator("#status")).to_have_text("대기 중입니다 (1번째 순서)", timeout=20_000)
        shot(waiting, "widget-queued")
        refused = connected(new_page(slow_stack.base_url + "/"))
        send_message(refused, "텀블러를 쓰고 싶어요")
        expect(refused.get_by_test_id("chat-error")).to_have_text(ENGINE_BUSY)
        expect(refused.get_by_test_id("chat-send")).to_be_enabled()
        shot(refused, "widget-overloaded")
    finally:
        for socket in held:
            socket.close()
    # Slots free: the waiting request is answered (here, to its token budget), and no longer shows as waiting.
    waiting.wait_for_function("() => document.querySelector('[data-testid=assistant-message]')?.textContent.length > 0")
    expect(waiting.locator("#status")).not_to_contain_text("대기 중")
