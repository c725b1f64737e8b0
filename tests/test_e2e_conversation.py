"""Conversations and the knowledge base end to end: real daphne processes, the GPU worker, the CPU
worker that re-indexes documents, Redis, SQLite and the embedded Qdrant."""

from __future__ import annotations

import json
import subprocess
import time
from urllib.parse import quote

import httpx

from chatbot import contract
from tests.helpers import (
    BASE_INFO,
    FREE_TEXT,
    WebEndpoint,
    assert_one_terminal_last,
    assert_valid_answer,
    eventually,
    get_sse,
    parse_sse,
    ws_exchange,
)
from tests.stack import BIN, ROOT, free_port, launch_web

FOLLOW_UP = "다른 것도 추천해 주세요"


def _ask(client: httpx.Client, session: str, message: str) -> dict:
    stream = get_sse(client, FREE_TEXT, {"sessionId": session, "message": message})
    assert_one_terminal_last(stream)
    assert stream.terminal.event == "close", stream.terminal
    return stream.terminal.data["data"]


def _turns(client: httpx.Client, session: str) -> list[dict]:
    response = client.get(f"/ai/chatbot/sessions/{quote(session)}/messages")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == 200 and body["data"]["sessionId"] == session
    return body["data"]["turns"]


def test_a_follow_up_depends_on_the_previous_turn_and_survives_a_restart_of_daphne_and_the_worker(stack) -> None:
    topics = {
        "follow-vegan": ("고기를 줄이고 채식 식단을 해 보고 싶어요", "VEGAN"),
        "follow-digital": ("이메일이랑 클라우드를 정리하고 싶어요", "DIGITAL_CARBON"),
    }
    with httpx.Client(base_url=stack.base_url, timeout=60) as client:
        for session, (message, category) in topics.items():
            assert_valid_answer(_ask(client, session, message), category=category)
    stack.restart()
    with httpx.Client(base_url=stack.base_url, timeout=60) as client:
        for session, (message, category) in topics.items():
            # The same words in each session, answered on the earlier turn's topic.
            answer = _ask(client, session, FOLLOW_UP)
            assert_valid_answer(answer, category=category)
            turns = _turns(client, session)
            assert [t["userText"] for t in turns] == [message, FOLLOW_UP]
            assert [t["finishReason"] for t in turns] == ["stop", "stop"] and turns[1]["answer"] == answer
            assert turns[0]["historyTurns"] == 0 and turns[1]["historyTurns"] == 1
            assert turns[1]["promptVersion"] and "demo model" in turns[1]["model"] and turns[1]["ttftMs"] > 0


def test_two_daphne_processes_serve_one_session_consistently(stack) -> None:
    session = "two-webs"
    with launch_web(stack, "second", {}) as other, httpx.Client(base_url=stack.base_url, timeout=60) as first:
        params = {"sessionId": session, "location": "해안가", "workType": "현장직", "category": "플로깅"}
        assert get_sse(first, BASE_INFO, params).terminal.event == "close"
        # The follow-up goes to the other process, over the WebSocket: it sees the first turn.
        frames = ws_exchange(WebEndpoint(other), session, {"type": "chat.message", "message": FOLLOW_UP})
        done = [f for f in frames if f["type"] == "chat.done"]
        assert len(done) == 1, frames
        assert_valid_answer(done[0]["data"], category="PLOGGING")  # the base-info turn's topic
        with httpx.Client(base_url=other, timeout=60) as second:
            turns = _turns(second, session)
            assert [t["mode"] for t in turns] == ["base_info", "free_text"] and turns[1]["historyTurns"] == 1
            assert turns[1]["answer"] == done[0]["data"] and _turns(first, session) == turns
            body = first.get(f"/ai/chatbot/sessions/{session}/messages").json()["data"]
            assert body["baseInfo"] == {"location": "해안가", "workType": "현장직", "category": "PLOGGING"}
            assert first.delete(f"/ai/chatbot/sessions/{session}/messages").status_code == 204
            gone = second.get(f"/ai/chatbot/sessions/{session}/messages")
            assert gone.status_code == 404 and gone.json()["data"] is None
            assert second.delete(f"/ai/chatbot/sessions/{session}/messages").status_code == 404


def test_the_history_sent_to_the_model_respects_the_token_budget(stack, demo_model_dir) -> None:
    from transformers import AutoTokenizer

    from inference.history import chat_token_counter

    count = chat_token_counter(AutoTokenizer.from_pretrained(demo_model_dir))
    budget = 150
    session = "budget"
    messages = [
        "플라스틱을 너무 많이 써요",
        "자전거로 출퇴근하고 싶어요",
        "전기를 아끼고 싶어요",
        "채식 식단이 궁금해요",
        FOLLOW_UP,
    ]
    with (
        launch_web(stack, "budget", {"LEAFRESH_HISTORY_TOKEN_BUDGET": str(budget)}) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        for message in messages:
            _ask(client, session, message)
        turns = _turns(client, session)
    for n, turn in enumerate(turns):
        costs = [
            count([{"role": "user", "content": t["userText"]}, {"role": "assistant", "content": t["answerText"]}])
            for t in turns[:n]
        ]
        expected, used = 0, 0
        for cost in reversed(costs):  # the newest whole turns that fit
            if used + cost > budget:
                break
            expected, used = expected + 1, used + cost
        assert turn["historyTurns"] == expected, (n, costs)
    assert turns[-1]["historyTurns"] < len(turns) - 1, "the budget must have dropped the oldest turns"


def test_an_unreachable_qdrant_server_gives_a_clear_error_event_not_a_hang(stack) -> None:
    env = {"QDRANT_URL": f"http://127.0.0.1:{free_port()}", "LEAFRESH_QDRANT_TIMEOUT_S": "2"}
    with launch_web(stack, "no-qdrant", env) as url, httpx.Client(base_url=url, timeout=30) as client:
        started = time.monotonic()
        response = client.get(FREE_TEXT, params={"sessionId": "no-qdrant", "message": "텀블러를 쓰고 싶어요"})
        events = [b for b in parse_sse(response.content) if b is not None]
        assert response.status_code == 200 and [e.event for e in events] == ["error"]
        assert events[0].data == {"status": 503, "message": contract.MESSAGE_KNOWLEDGE_UNAVAILABLE, "data": None}
        assert time.monotonic() - started < 15  # the first request may wait for the embedding model to load
        started = time.monotonic()
        posted = client.post(FREE_TEXT, json={"sessionId": "no-qdrant", "message": "텀블러를 쓰고 싶어요"})
        assert posted.status_code == 503 and posted.json()["message"] == contract.MESSAGE_KNOWLEDGE_UNAVAILABLE
        assert time.monotonic() - started < 3
        # Base-info needs no retrieval and still answers.
        params = {"sessionId": "no-qdrant", "location": "도시", "workType": "사무직", "category": "비건"}
        assert get_sse(client, BASE_INFO, params).terminal.event == "close"
        frames = ws_exchange(WebEndpoint(url), "no-qdrant-ws", {"type": "chat.message", "message": "텀블러를 쓰고 싶어요"})
    assert frames[0] == {"type": "chat.error", "status": 503, "message": contract.MESSAGE_KNOWLEDGE_UNAVAILABLE}


def _manage(stack, *args: str) -> str:
    return subprocess.run(
        [str(BIN / "python"), "manage.py", *args],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        check=True,
        timeout=120,
        text=True,
    ).stdout


def _top_text(stack, query: str) -> str:
    """The text of the top sparse hit for `query`, as the search_knowledge command prints it."""
    hits = json.loads(_manage(stack, "search_knowledge", query, "--k", "1", "--mode", "sparse", "--json"))
    return hits[0]["text"] if hits else ""


def test_index_updates_follow_document_edits_through_the_cpu_worker(stack) -> None:
    """Saving a document in Django (here: `manage.py shell`) queues its re-indexing on the `cpu`
    queue; the CPU worker embeds it into the stack's index, where retrieval finds it."""
    marker = "무지개양말뜨개"
    model = "from chatbot.models import KnowledgeDocument as D; "
    title = "빈 잼병을 양념 보관통으로 쓰기"
    edit = f"d = D.objects.get(title='{title}'); d.text = '{marker} 모임에서 헌 양말로 인형을 떠요.'; d.save()"
    _manage(stack, "shell", "-c", model + edit)
    assert eventually(lambda: _top_text(stack, marker).startswith(marker), 90, 0.5), "the edit was not indexed"
    _manage(stack, "shell", "-c", model + f"d = D.objects.get(text__startswith='{marker}'); d.is_active = False; d.save()")
    assert eventually(lambda: not _top_text(stack, marker).startswith(marker), 90, 0.5), (
        "a deactivated document is still retrieved"
    )
