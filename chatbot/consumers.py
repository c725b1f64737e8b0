"""The WebSocket adapter: `ws://HOST/ws/chat/<sessionId>/`, JSON text frames (DESIGN.md protocol).

client -> server: `chat.base_info` {location, workType, category}, `chat.message` {message},
`chat.stop`. server -> client: `chat.queued` {position}, `chat.token` {seq, text}, `chat.done`
{data}, `chat.error` {status, message[, invalidFields]}. One request in flight per socket: a second
one gets `chat.error` 409. `chat.stop` cancels generation and answers `chat.error` 499. Bad JSON
or an unknown type gets `chat.error` 400 and the socket stays open.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from asgiref.sync import sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from chatbot import contract
from chatbot.contract import ContractError
from chatbot.selectors import NotConfiguredError
from chatbot.services import recommendation_build_base_info, recommendation_build_free_text
from chatbot.streaming import Ping, recommendation_events
from inference.types import GenerationRequest

logger = logging.getLogger(__name__)
MAX_FRAME_CHARS = 8 * 1024
STATUS_STOPPED = 499  # "client closed request", as nginx names it


def _build(kind: str, session_id: str, frame: dict[str, Any]) -> GenerationRequest:
    if kind == "chat.base_info":
        params = {"sessionId": session_id, **{k: frame.get(k) for k in ("location", "workType", "category")}}
        return recommendation_build_base_info(checked=contract.check_base_info(params))
    return recommendation_build_free_text(
        checked=contract.check_free_text({"sessionId": session_id, "message": frame.get("message")})
    )


class ChatConsumer(AsyncWebsocketConsumer):
    """One socket of the chat widget; a protocol adapter over chatbot.services and chatbot.streaming."""

    async def connect(self) -> None:
        self.session_id = self.scope["url_route"]["kwargs"]["session_id"]
        self.task: asyncio.Task[None] | None = None
        self.finished = True  # the current request has had its terminal frame (or there is none)
        await self.accept()
        if contract._clean(self.session_id, contract.LIMITS["sessionId"]) is None:
            await self._error(400, f"{contract.MESSAGE_INVALID} 확인할 항목: sessionId", invalid_fields=["sessionId"])
            await self.close(code=4400)

    async def disconnect(self, code: int) -> None:
        if self.task is not None and not self.task.done() and not self.finished:
            self.task.cancel()  # the listener's finally cancels the generation in the engine

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is None or len(text_data) > MAX_FRAME_CHARS:
            await self._error(400, contract.MESSAGE_BAD_FRAME)
            return
        try:
            frame = json.loads(text_data)
        except ValueError:
            await self._error(400, contract.MESSAGE_BAD_FRAME)
            return
        kind = frame.get("type") if isinstance(frame, dict) else None
        if kind == "chat.stop":
            await self._stop()
        elif kind in ("chat.base_info", "chat.message"):
            await self._start(kind, frame)
        else:
            await self._error(400, f"{contract.MESSAGE_BAD_FRAME} 알 수 없는 type입니다.")

    async def _start(self, kind: str, frame: dict[str, Any]) -> None:
        if not self.finished:
            await self._error(409, contract.MESSAGE_BUSY)
            return
        try:
            generation = await sync_to_async(_build)(kind, self.session_id, frame)
        except ContractError as exc:
            await self._error(exc.status, exc.message, invalid_fields=exc.invalid_fields)
            return
        except NotConfiguredError:
            logger.exception("recommendation is not configured")
            await self._error(503, contract.MESSAGE_NO_WORKER)
            return
        self.finished = False
        self.task = asyncio.create_task(self._relay(generation))

    async def _relay(self, generation: GenerationRequest) -> None:
        try:
            async for item in recommendation_events(generation):
                if isinstance(item, Ping):
                    continue
                kind = item["type"]
                if kind == "chat.queued":
                    await self._send({"type": "chat.queued", "position": item["position"]})
                elif kind == "chat.token":
                    await self._send({"type": "chat.token", "seq": item["seq"], "text": item["text"]})
                elif kind == "chat.done":
                    self.finished = True  # before the send: a stop from now on has nothing to stop
                    await self._send({"type": "chat.done", "data": item["data"]})
                elif kind == "chat.error":
                    self.finished = True
                    await self._error(int(item["status"]), item["message"])
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("relay failed for request %s", generation.request_id)
            if not self.finished:
                self.finished = True
                await self._error(500, contract.MESSAGE_INTERNAL)

    async def _stop(self) -> None:
        task = self.task
        if self.finished or task is None:
            return
        self.finished = True
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        await self._error(STATUS_STOPPED, contract.MESSAGE_STOPPED)

    async def _send(self, payload: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(payload, ensure_ascii=False))

    async def _error(self, status: int, message: str, *, invalid_fields: list[str] | None = None) -> None:
        payload: dict[str, Any] = {"type": "chat.error", "status": status, "message": message}
        if invalid_fields is not None:
            payload["invalidFields"] = invalid_fields
        await self._send(payload)
