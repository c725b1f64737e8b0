"""ASGI entry point: HTTP through Django, WebSocket through Channels (daphne serves both)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "leafresh.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402 - after Django is set up
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from chatbot.auth import api_keys_startup_check  # noqa: E402
from chatbot.knowledge.dense import warm_in_background  # noqa: E402
from chatbot.routing import websocket_urlpatterns  # noqa: E402

api_keys_startup_check()  # says whether /ai/ is protected; refuses to serve it open in production
warm_in_background()  # the first free-text request should not wait for torch's import

http_app = django_asgi_app
if settings.LEAFRESH_SERVE_STATIC:
    # Only paths under STATIC_URL go to the static handler; everything else straight to Django.
    http_app = ASGIStaticFilesHandler(django_asgi_app)

application = ProtocolTypeRouter(
    {
        "http": http_app,
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
