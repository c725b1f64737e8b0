"""Unit tests: the SSE encoder and the contract's field checks."""

from __future__ import annotations

import json

import pytest

from chatbot import contract, sse
from chatbot.contract import ContractError, check_base_info, check_free_text

pytestmark = pytest.mark.no_database  # touches no database: run once, not again on PostgreSQL


def test_encode_event_writes_id_event_and_one_line_of_json() -> None:
    data = contract.envelope(200, "토큰 생성", '첫 줄\n\n둘째 줄 "따옴표"')
    raw = sse.encode_event(event_id=7, event="challenge", data=data)
    text = raw.decode("utf-8")
    assert text.endswith("\n\n")
    lines = text[:-2].split("\n")
    assert lines[0] == "id: 7" and lines[1] == "event: challenge" and lines[2].startswith("data: ")
    assert len(lines) == 3, "data must stay on one line even when the text has line breaks"
    assert "토큰 생성" in lines[2], "Korean is written as UTF-8, not \\u escapes"
    assert json.loads(lines[2][6:]) == data


@pytest.mark.parametrize("name", ["", "two\nlines", "carriage\rreturn"])
def test_encode_event_refuses_an_empty_or_multiline_event_name(name: str) -> None:
    with pytest.raises(ValueError):
        sse.encode_event(event_id=1, event=name, data={})


def test_ping_is_a_comment() -> None:
    assert sse.PING == b": ping\n\n"


def test_check_base_info_trims_and_keeps_korean() -> None:
    checked = check_base_info({"sessionId": " s-1 ", "location": "해안가", "workType": "재택근무", "category": "비건"})
    assert (checked.session_id, checked.location, checked.work_type, checked.category) == ("s-1", "해안가", "재택근무", "비건")


def test_check_base_info_lists_every_invalid_field_in_order() -> None:
    with pytest.raises(ContractError) as excinfo:
        check_base_info({"sessionId": "s", "location": "", "workType": 3, "category": "가" * 31})
    assert excinfo.value.invalid_fields == ["location", "workType", "category"]
    assert excinfo.value.envelope() == {
        "status": 400,
        "message": excinfo.value.message,
        "data": {"invalidFields": ["location", "workType", "category"]},
    }


@pytest.mark.parametrize(
    "message",
    [None, "", "   ", "가" * 501, "제어\x07문자", "\ud800"],
)
def test_check_free_text_rejects_missing_empty_long_and_control_characters(message: object) -> None:
    with pytest.raises(ContractError) as excinfo:
        check_free_text({"sessionId": "s", "message": message})
    assert excinfo.value.invalid_fields == ["message"]


def test_check_free_text_allows_line_breaks_and_the_limit_exactly() -> None:
    assert check_free_text({"sessionId": "s", "message": "첫 줄\n둘째 줄"}).message == "첫 줄\n둘째 줄"
    assert len(check_free_text({"sessionId": "s", "message": "가" * 500}).message) == 500
