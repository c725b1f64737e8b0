"""Who may do what: API keys for the service-to-service routes (`/ai/`, `/v1/`): `Authorization: Bearer <key>`.

The keys are LEAFRESH_API_KEYS (several, so a key can be rotated: add the new one, move the
callers, drop the old one). A presented key is compared with every configured key in constant time
(`hmac.compare_digest`), so neither the match nor its position leaks through timing. With no key
configured the routes are open: allowed only while DEBUG is on (development), and said at start-up
(`api_keys_startup_check`). The widget's page, its WebSocket and the admin are not under these
prefixes: the widget is bound to the browser's Django session, the admin to its login (and the
admin's "try it" to `trial_permitted`).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, JsonResponse

from chatbot import contract

logger = logging.getLogger(__name__)
PROTECTED_PREFIXES = ("/ai/", "/v1/")
OPENAI_PREFIX = "/v1/"  # the OpenAI-compatible API answers errors in OpenAI's shape
MESSAGE_UNAUTHORIZED = "인증이 필요합니다. Authorization: Bearer <API 키> 헤더를 보내 주세요."


def api_key_valid(header: str | None, keys: list[str]) -> bool:
    """Whether an `Authorization` header value carries one of `keys` as a Bearer token.

    Every key is compared (no early exit), each with hmac.compare_digest.
    """
    scheme, _, token = (header or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return False
    presented = token.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key.encode())
    return matched


def api_keys_startup_check() -> None:
    """Say at start-up whether the API routes are protected; refuse to serve them open in production.

    Raises ImproperlyConfigured when DEBUG is off and LEAFRESH_API_KEYS is empty.
    """
    if settings.LEAFRESH_API_KEYS:
        logger.info("API routes %s require one of %d API keys", ", ".join(PROTECTED_PREFIXES), len(settings.LEAFRESH_API_KEYS))
        return
    if not settings.DEBUG:
        raise ImproperlyConfigured("LEAFRESH_API_KEYS is empty: set at least one key (DEBUG is off)")
    logger.warning("LEAFRESH_API_KEYS is empty: the API routes %s are OPEN (development only)", ", ".join(PROTECTED_PREFIXES))


class ApiKeyMiddleware:
    """Answer 401 (the JSON envelope, or under `/v1/` OpenAI's error object; `WWW-Authenticate:
    Bearer`) to a request under PROTECTED_PREFIXES without a valid key, when keys are configured.
    Sync and async capable."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def _refusal(self, request: HttpRequest) -> HttpResponse | None:
        keys = settings.LEAFRESH_API_KEYS
        if not keys or not request.path.startswith(PROTECTED_PREFIXES):
            return None
        if api_key_valid(request.headers.get("Authorization"), keys):
            request.api_client = True  # a trusted service caller: no per-address rate limit
            return None
        if request.path.startswith(OPENAI_PREFIX):  # OpenAI's error shape, which its clients read
            error = {"message": MESSAGE_UNAUTHORIZED, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}
            body = {"error": error}
        else:
            body = contract.envelope(401, MESSAGE_UNAUTHORIZED, None)
        response = JsonResponse(body, status=401, json_dumps_params={"ensure_ascii": False})
        response["WWW-Authenticate"] = 'Bearer realm="leafresh"'
        return response

    def __call__(self, request: HttpRequest):
        if self.is_async:
            return self.__acall__(request)
        return self._refusal(request) or self.get_response(request)

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        return self._refusal(request) or await self.get_response(request)


def trial_permitted(user: Any) -> bool:
    """Whether `user` may try prompts: active staff who may view or change prompt templates (the
    admin's own rule for seeing them). Reads permissions (blocking)."""
    if not (user.is_active and user.is_staff):
        return False
    return user.has_perm("chatbot.view_prompttemplate") or user.has_perm("chatbot.change_prompttemplate")
