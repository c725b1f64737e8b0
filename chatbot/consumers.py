"""The WebSocket adapter: `ws://HOST/ws/chat/<sessionId>/`, JSON text frames (DESIGN.md protocol).

client -> server: `chat.base_info` {location, workType, category}, `chat.message` {message},
`chat.stop`. server -> client: `chat.queued` {position, requestId}, `chat.token` {seq, text}, `chat.done`
{data}, `chat.error` {status, message[, invalidFields]}. One request in flight per socket: a second
one gets `chat.error` 409. `chat.stop` cancels generation and answers `chat.error` 499. Bad JSON
or an unknown type gets `chat.error` 400 and the socket stays open. A widget session (`web-…`)
may be joined only from the browser whose Django session holds it; any other session id only with
an API key (`Authorization: Bearer`, chatbot.auth) once keys are configured. Otherwise `chat.error`
403 and close code 4403.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from chatbot import contract
from chatbot.auth import api_key_valid
from chatbot.contract import ContractError
from chatbot.conversation import WIDGET_SESSION_PREFIX, widget_session_allowed
from chatbot.ratelimit import RateLimited, rate_limit_check
from chatbot.services import Recommendation, prepare_failure, recommendation_cancel, recommendation_prepare
from chatbot.streaming import Ping, answer_events

logger = logging.getLogger(__name__)
MAX_FRAME_CHARS = 8 * 1024
STATUS_STOPPED = 499  # "client closed request", as nginx names it
STOP_WAIT_S = 2.0  # how long `chat.stop` waits for the relay to wind down before answering 499


class ClientGone(Exception):
    """A frame could not be sent: the client has closed the socket."""


@dataclass
class _Active:
    """The socket's request in flight. `done` is set once its terminal frame is decided (sent by the
    relay, or taken over by stop/disconnect); after that the relay sends nothing more."""

    request_id: str
    task: asyncio.Task[None] | None = None
    done: bool = False


class ChatConsumer(AsyncWebsocketConsumer):
    """One socket of the chat widget; a protocol adapter over chatbot.services and chatbot.streaming."""

    async def connect(self) -> None:
        self.session_id = self.scope["url_route"]["kwargs"]["session_id"]
        self.active: _Active | None = None
        self.refused = False  # the session was refused: the socket is closing, frames are ignored
        await self.accept()
        if contract.clean_field(self.session_id, contract.LIMITS["sessionId"]) is None:
            await self._error(400, f"{contract.MESSAGE_INVALID} 확인할 항목: sessionId", invalid_fields=["sessionId"])
            self.refused = True
            await self.close(code=4400)
        elif not await self._session_allowed():
            await self._error(403, contract.MESSAGE_NOT_YOUR_SESSION)
            self.refused = True
            await self.close(code=4403)

    async def _session_allowed(self) -> bool:
        """A `web-…` session: only from its browser (Django session). Another id: anyone while no
        API key is configured (development), else only a holder of one."""
        if self.session_id.startswith(WIDGET_SESSION_PREFIX):
            return await database_sync_to_async(widget_session_allowed)(self.scope.get("session"), self.session_id)
        if not settings.LEAFRESH_API_KEYS:
            return True
        headers = dict(self.scope.get("headers") or [])
        header = headers.get(b"authorization", b"").decode("latin-1")
        return api_key_valid(header, settings.LEAFRESH_API_KEYS)

    async def disconnect(self, code: int) -> None:
        active = self.active
        if active is not None and not active.done:
            active.done = True
            if active.task is not None:
                active.task.cancel()
            # Explicitly, too: a cancel can be swallowed inside a Redis command (redis-py 8, Python 3.11).
            await recommendation_cancel(request_id=active.request_id)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.refused:
            return
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
        if self.active is not None and not self.active.done:
            await self._error(409, contract.MESSAGE_BUSY)
            return
        try:
            client = self.scope.get("client") or [None]
            await rate_limit_check(session_id=self.session_id, address=client[0])
        except RateLimited as exc:
            await self._error(429, exc.message)
            return
        if kind == "chat.base_info":
            mode, params = "base_info", {k: frame.get(k) for k in ("location", "workType", "category")}
        else:
            mode, params = "free_text", {"message": frame.get("message")}
        try:
            # Generated answers send a card as each challenge completes.
            generation = await recommendation_prepare(
                mode=mode, params={"sessionId": self.session_id, **params}, challenge_cards=True
            )
        except ContractError as exc:
            await self._error(exc.status, exc.message, invalid_fields=exc.invalid_fields)
            return
        except Exception as exc:  # noqa: BLE001 - prepare_failure logs it; one clear frame, the socket stays open
            await self._error(*prepare_failure(exc))
            return
        active = self.active = _Active(request_id=generation.request_id)
        active.task = asyncio.create_task(self._relay(generation, active))

    async def _relay(self, generation: Recommendation, active: _Active) -> None:
        try:
            async with aclosing(answer_events(generation)) as events:
                async for item in events:
                    if active.done:
                        return  # stopped: drop whatever still arrives
                    if isinstance(item, Ping):
                        continue
                    kind = item["type"]
                    if kind == "chat.queued":
                        payload = {"type": "chat.queued", "position": item["position"], "requestId": active.request_id}
                        await self._send(payload)
                    elif kind == "chat.token":
                        await self._send({"type": "chat.token", "seq": item["seq"], "text": item["text"]})
                    elif kind == "chat.challenge":
                        await self._send({"type": "chat.challenge", "index": item["index"], "challenge": item["challenge"]})
                    elif kind == "chat.done":
                        active.done = True  # before the send: a stop from now on has nothing to stop
                        await self._send({"type": "chat.done", "data": item["data"]})
                    elif kind == "chat.error":
                        active.done = True
                        await self._error(int(item["status"]), item["message"])
        except asyncio.CancelledError:
            raise
        except ClientGone:  # the socket closed under us: disconnect() cancels the generation
            logger.info("request %s: the socket closed while its answer was being sent", generation.request_id)
            active.done = True
        except Exception:  # end with one error frame, never a silent stall
            logger.exception("relay failed for request %s", generation.request_id)
            if not active.done:
                active.done = True
                try:
                    await self._error(500, contract.MESSAGE_INTERNAL)
                except ClientGone:
                    pass

    async def _stop(self) -> None:
        active = self.active
        if active is None or active.done:
            return
        active.done = True
        # Cancel in the engine directly; the relay's own cleanup may not run if its cancel is swallowed.
        await recommendation_cancel(request_id=active.request_id)
        if active.task is not None:
            active.task.cancel()
            await asyncio.wait({active.task}, timeout=STOP_WAIT_S)
        await self._error(STATUS_STOPPED, contract.MESSAGE_STOPPED)

    async def _send(self, payload: dict[str, Any]) -> None:
        """Send one JSON frame. Raises ClientGone when the socket can no longer take it."""
        try:
            await self.send(text_data=json.dumps(payload, ensure_ascii=False))
        except Exception as exc:  # the server refuses to send on a closed socket (autobahn's Disconnected)
            raise ClientGone(str(exc)) from exc

    async def _error(self, status: int, message: str, *, invalid_fields: list[str] | None = None) -> None:
        payload: dict[str, Any] = {"type": "chat.error", "status": status, "message": message}
        if invalid_fields is not None:
            payload["invalidFields"] = invalid_fields
        await self._send(payload)
