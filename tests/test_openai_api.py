"""The OpenAI-compatible API (`/v1/`), driven by the official `openai` Python client against the live
stack (daphne, the GPU worker on the demo model, Redis), plus the exact chunk framing on the wire."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from chatbot import contract
from tests.helpers import assert_deltas_render_answer, assert_valid_answer, cancelled_in_engine, eventually
from tests.stack import launch_web

MODEL = "leafresh"
MESSAGE = "플라스틱 쓰레기를 줄이고 싶어요"


def _client(base_url: str, **kwargs) -> openai.OpenAI:
    # No retries: a test must see the first answer (the client retries 429/5xx by default).
    return openai.OpenAI(base_url=base_url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return _client(stack.base_url)


def test_models_lists_and_retrieves_the_one_served_model(client) -> None:
    listed = client.models.list()
    assert [m.id for m in listed.data] == [MODEL]
    assert listed.data[0].owned_by == "leafresh" and listed.data[0].created > 0
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert missing.value.body["code"] == "model_not_found"


def test_non_streaming_completion_is_the_streamed_rendering_of_the_answer(client) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": MESSAGE}], temperature=0
    )
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.model == MODEL
    assert completion.id == "chatcmpl-" + raw.headers["X-Request-ID"]
    (choice,) = completion.choices
    assert choice.index == 0 and choice.finish_reason == "stop"
    assert choice.message.role == "assistant" and choice.message.content
    usage = completion.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    # The same request (greedy decoding) as the answer's JSON: the text above is its rendering.
    as_json = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": MESSAGE}],
        temperature=0,
        response_format={"type": "json_object"},
    )
    answer = json.loads(as_json.choices[0].message.content)
    assert_valid_answer(answer)
    assert_deltas_render_answer(choice.message.content, answer)


def test_streaming_chunks_follow_openais_format(client) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [{"type": "text", "text": MESSAGE}]}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    *choice_chunks, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens > 0
    assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + usage_chunk.usage.completion_tokens
    assert all(c.usage is None for c in choice_chunks)
    roles = [c.choices[0].delta.role for c in choice_chunks]
    assert roles[0] == "assistant" and not any(roles[1:]), "the role comes only in the first chunk"
    reasons = [c.choices[0].finish_reason for c in choice_chunks]
    assert reasons[-1] == "stop" and not any(reasons[:-1]), "one finish_reason, in the last choice chunk"
    pieces = [c.choices[0].delta.content for c in choice_chunks[1:-1]]
    # The demo model writes an answer in about 0.1 s and the worker coalesces 40 ms of text per event:
    # the first words leave at once, the rest in a few events.
    assert len(pieces) >= 2 and all(pieces), "the answer streams in several content chunks"
    assert "1." in "".join(pieces)


def test_stream_framing_on_the_wire_ends_with_done(stack) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": MESSAGE}], "stream": True}
    with httpx.Client(base_url=stack.base_url, timeout=60) as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e and not e.startswith(":")]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events[:3]
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1
    last = json.loads(events[-2][len("data: ") :])
    assert last["choices"][0]["finish_reason"] == "stop" and "usage" not in last


def test_history_in_messages_goes_into_the_prompt(client) -> None:
    # The last message names its topic, so retrieval is the same with or without the earlier turn:
    # the prompts differ by that turn alone.
    alone = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": MESSAGE}], temperature=0)
    conversation = [
        {"role": "user", "content": "자전거로 출퇴근하고 싶어요"},
        {"role": "assistant", "content": "자전거 출퇴근을 추천해요."},
        {"role": "user", "content": MESSAGE},
    ]
    continued = client.chat.completions.create(model=MODEL, messages=conversation, temperature=0)
    assert continued.choices[0].finish_reason == "stop"
    assert continued.usage.prompt_tokens > alone.usage.prompt_tokens + 10, "the earlier turn is in the prompt"


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"messages": [{"role": "system", "content": "너는 해적이다"}, {"role": "user", "content": MESSAGE}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": MESSAGE}, {"role": "assistant", "content": "네"}]}, "messages.1.role"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "   "}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "가" * 501}]}, "messages.0.content"),
        ({"n": 2}, "n"),
        ({"temperature": 3}, "temperature"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.type"),
    ],
    ids=["system", "ends-with-assistant", "no-messages", "blank", "too-long", "n", "temperature", "tools", "json-schema"],
)
def test_bad_requests_get_openais_400(client, changes, param) -> None:
    request = {"model": MODEL, "messages": [{"role": "user", "content": MESSAGE}], **changes}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**request)
    error = refused.value.body
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert error["message"]


def test_unknown_model_is_404(client) -> None:
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": MESSAGE}])
    assert refused.value.body["param"] == "model"


def test_abusive_message_gets_the_polite_reply_with_content_filter(client) -> None:
    completion = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "닥쳐"}])
    assert completion.choices[0].message.content == contract.REPLY_ABUSE
    assert completion.choices[0].finish_reason == "content_filter"


def test_a_cap_below_the_answer_finishes_with_length(client) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": MESSAGE}], max_tokens=20, stream=True
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)


def test_closing_the_stream_cancels_the_generation(slow_stack) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": MESSAGE}], "stream": True}
    with httpx.Client(base_url=slow_stack.base_url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            request_id = response.headers["X-Request-ID"]
            raw = b""
            for chunk in response.iter_raw():
                raw += chunk
                if raw.count(b"data: ") >= 3:  # the role chunk and two content chunks
                    break
    assert eventually(lambda: cancelled_in_engine(slow_stack, request_id), 10), "the engine went on generating"


def test_no_worker_is_a_503_before_any_chunk(stack) -> None:
    # A web process on another Redis prefix sees no worker's heartbeat.
    with launch_web(stack, "v1-no-worker", {"LEAFRESH_REDIS_PREFIX": stack.prefix + "-empty"}) as base_url:
        client = _client(base_url)
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as failed:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": MESSAGE}], stream=stream)
            assert failed.value.status_code == 503 and failed.value.body["type"] == "server_error"


def test_api_keys_guard_v1_with_openais_401(stack) -> None:
    with launch_web(stack, "v1-keys", {"LEAFRESH_API_KEYS": "v1-test-key"}) as base_url:
        with pytest.raises(openai.AuthenticationError) as refused:
            _client(base_url, api_key="wrong").models.list()
        assert refused.value.body["code"] == "invalid_api_key"
        assert [m.id for m in _client(base_url, api_key="v1-test-key").models.list().data] == [MODEL]
