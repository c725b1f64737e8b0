"""The one SSE encoder. Nothing else in the project formats Server-Sent Events.

Format (WHATWG HTML, "Server-sent events"): `id:` line, `event:` line (never empty), one
`data:` line holding single-line JSON (`ensure_ascii=False`, so Korean stays readable), then a
blank line. Keep-alives are comment lines (`: ping`), which EventSource and the Spring backend
ignore. The OpenAI-compatible API's chunks are `data:`-only events (`encode_data`, then `DONE`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from django.http import StreamingHttpResponse

PING = b": ping\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CONTENT_TYPE = "text/event-stream"  # UTF-8 is the only encoding SSE allows


TERMINAL_EVENTS = ("close", "error")  # a stream ends with exactly one of these
REQUEST_ID_HEADER = "X-Request-ID"  # the generation's id, as the worker's logs and the request log line name it
DONE = b"data: [DONE]\n\n"  # the end of an OpenAI-compatible stream (chatbot.openai_api)


def decode_head(frame: bytes) -> tuple[int, str]:
    """The id and event name of one event as encode_event wrote it."""
    id_line, event_line, _ = frame.split(b"\n", 2)
    return int(id_line[len(b"id: ") :]), event_line[len(b"event: ") :].decode()


def encode_data(data: Mapping[str, Any]) -> bytes:
    """One unnamed SSE event with only a `data:` line (single-line JSON), as OpenAI's streaming API
    sends its chunks; the stream ends with DONE."""
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def encode_event(*, event_id: int, event: str, data: Mapping[str, Any]) -> bytes:
    """One SSE event as UTF-8 bytes.

    Raises ValueError when `event` is empty or contains a line break (it would corrupt the stream).
    json.dumps escapes line breaks inside strings, so `data` is always one line.
    """
    if not event or "\n" in event or "\r" in event:
        raise ValueError(f"invalid SSE event name {event!r}")
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"id: {event_id}\nevent: {event}\ndata: {payload}\n\n".encode()


def streaming_response(body: AsyncIterator[bytes], request_id: str | None = None) -> StreamingHttpResponse:
    """An event-stream response of encoded events, with HEADERS (no cache, no proxy buffering) and,
    when given, the generation's id in REQUEST_ID_HEADER."""
    response = StreamingHttpResponse(body, content_type=CONTENT_TYPE)
    for name, value in HEADERS.items():
        response[name] = value
    if request_id:
        response[REQUEST_ID_HEADER] = request_id
    return response
