"""The contract the Spring backend and the widget depend on: field checks, limits and envelopes.

Checks (`check_*`) are separate from actions: they turn raw query/JSON/WebSocket fields into
validated inputs or raise `ContractError`, which every adapter answers the same way (HTTP 400
with `{"status":400,"message":...,"data":{"invalidFields":[...]}}`, or `chat.error` 400).
Messages are Korean and safe to show to a person. Paths and messages are kept from the first
version of the service (DESIGN.md).
"""

from __future__ import annotations

import unicodedata
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

MESSAGE_TOKEN = "토큰 생성"
MESSAGE_DONE = "모든 챌린지 추천 완료"
MESSAGE_INVALID = "요청 값이 올바르지 않습니다."
MESSAGE_NO_WORKER = "추천 서버가 준비되지 않았습니다. 잠시 후 다시 시도해 주세요."
MESSAGE_WORKER_LOST = "추천 서버와의 연결이 끊겼습니다. 다시 시도해 주세요."
MESSAGE_TIMEOUT = "응답 시간이 초과되었습니다. 잠시 후 다시 시도해 주세요."
MESSAGE_INTERNAL = "서버 내부 오류가 발생했습니다. 잠시 후 다시 시도해 주세요."
MESSAGE_BUSY = "이미 답변을 생성하고 있습니다. 끝난 뒤에 다시 보내 주세요."
MESSAGE_STOPPED = "답변 생성을 중단했습니다."
MESSAGE_BAD_FRAME = "메시지 형식이 올바르지 않습니다."
MESSAGE_KNOWLEDGE_UNAVAILABLE = "참고 자료 검색 서버에 연결할 수 없습니다. 잠시 후 다시 시도해 주세요."
MESSAGE_SESSION = "대화 기록 조회 완료"
MESSAGE_NO_SESSION = "대화 기록이 없습니다."
MESSAGE_RESUME_REPLACED = "이 대화에서 새 요청이 시작되어 이전 답변을 이어 받을 수 없습니다."
MESSAGE_EVENTS_LOST = "답변의 일부를 받지 못했습니다. 다시 시도해 주세요."
MESSAGE_NOT_YOUR_SESSION = "이 대화에 연결할 수 없습니다. 페이지를 새로고침해 주세요."
# Replies to free text that gets no recommendation (a completed answer with no challenges).
REPLY_OFF_TOPIC = (
    "저는 일상에서 실천할 수 있는 친환경 챌린지를 추천해 드리는 도우미예요. "
    "환경을 위해 해 보고 싶은 일이나 고민을 말씀해 주시면 알맞은 챌린지를 찾아 드릴게요."
)
REPLY_ABUSE = "서로 존중하는 대화를 부탁드려요. 환경을 위해 해 보고 싶은 일을 알려 주시면 알맞은 챌린지를 추천해 드릴게요."

# Maximum lengths in characters (Unicode code points), after trimming surrounding whitespace.
LIMITS: dict[str, int] = {"sessionId": 100, "location": 50, "workType": 50, "category": 30, "message": 500}
BASE_INFO_FIELDS = ("sessionId", "location", "workType", "category")
FREE_TEXT_FIELDS = ("sessionId", "message")


class ContractError(Exception):
    """Invalid input. `status` is the HTTP status, `invalid_fields` the offending field names."""

    def __init__(self, invalid_fields: list[str], message: str = MESSAGE_INVALID, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.invalid_fields = invalid_fields

    def envelope(self) -> dict[str, Any]:
        """`{"status": 400, "message": str, "data": {"invalidFields": [...]}}`."""
        return {"status": self.status, "message": self.message, "data": {"invalidFields": self.invalid_fields}}


@dataclass(frozen=True)
class BaseInfoInput:
    """Checked base-info fields: trimmed, non-empty, within LIMITS, no control characters."""

    session_id: str
    location: str
    work_type: str
    category: str  # as sent (label or code); resolved against the database by services


@dataclass(frozen=True)
class FreeTextInput:
    """Checked free-text fields (the message may hold line breaks)."""

    session_id: str
    message: str


def clean_field(value: Any, limit: int, *, multiline: bool = False) -> str | None:
    """The trimmed string, or None when missing, empty, too long or holding control characters."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not value or len(value) > limit:
        return None
    allowed = {"\n", "\t"} if multiline else set()
    if any(unicodedata.category(ch) in ("Cc", "Cs") and ch not in allowed for ch in value):
        return None
    return value


def _check(params: Mapping[str, Any], fields: tuple[str, ...]) -> dict[str, str]:
    cleaned: dict[str, str] = {}
    invalid: list[str] = []
    for name in fields:
        value = clean_field(params.get(name), LIMITS[name], multiline=name == "message")
        if value is None:
            invalid.append(name)
        else:
            cleaned[name] = value
    if invalid:
        raise ContractError(invalid, f"{MESSAGE_INVALID} 확인할 항목: {', '.join(invalid)}")
    return cleaned


def check_session_id(params: Mapping[str, Any]) -> str:
    """Validate just the sessionId (a `Last-Event-ID` reconnect needs nothing else). Raises ContractError."""
    return _check(params, ("sessionId",))["sessionId"]


def check_base_info(params: Mapping[str, Any]) -> BaseInfoInput:
    """Validate base-info fields (all required, bounded by LIMITS). Raises ContractError."""
    c = _check(params, BASE_INFO_FIELDS)
    return BaseInfoInput(session_id=c["sessionId"], location=c["location"], work_type=c["workType"], category=c["category"])


def check_free_text(params: Mapping[str, Any]) -> FreeTextInput:
    """Validate free-text fields (all required, bounded by LIMITS). Raises ContractError."""
    c = _check(params, FREE_TEXT_FIELDS)
    return FreeTextInput(session_id=c["sessionId"], message=c["message"])


MAX_QUERY_BYTES = 8 * 1024  # the same bound as a POST body


def query_params(raw: str) -> dict[str, str]:
    """A GET request's query string (as sent, percent-encoded) as a dict, the last value of a
    repeated name winning, as Django's `QueryDict.dict()`. Unlike Django, invalid UTF-8 is refused
    rather than replaced with U+FFFD. Raises ContractError (400) for that or a query over 8 KiB."""
    if len(raw) > MAX_QUERY_BYTES:
        raise ContractError(["query"], f"{MESSAGE_INVALID} 요청 주소가 너무 깁니다.")
    try:
        return dict(urllib.parse.parse_qsl(raw, keep_blank_values=True, encoding="utf-8", errors="strict"))
    except UnicodeDecodeError:
        raise ContractError(["query"], f"{MESSAGE_INVALID} 주소의 값은 UTF-8로 퍼센트 인코딩해 주세요.") from None


def envelope(status: int, message: str, data: Any) -> dict[str, Any]:
    """The JSON envelope every response and event carries: `{"status", "message", "data"}`."""
    return {"status": status, "message": message, "data": data}
