"""System checks of the deployment (`python manage.py check --deploy`)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, Tags, register


@register(Tags.security, deploy=True)
def api_keys_configured(app_configs: Any, **kwargs: Any) -> list[Error]:
    """leafresh.E001: the API routes need at least one key in production (chatbot.auth)."""
    if settings.LEAFRESH_API_KEYS:
        return []
    return [Error("LEAFRESH_API_KEYS is empty: /ai/ would be open to anyone.", hint="Set one or more keys.", id="leafresh.E001")]
