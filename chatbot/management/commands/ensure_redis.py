"""`python manage.py ensure_redis`: make sure Redis answers at REDIS_URL.

When nothing answers and REDIS_URL points at this machine, start a local `redis-server` bound to
loopback, with its files under the data dir, and wait until it answers.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from urllib.parse import urlparse

import redis
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def redis_answers(url: str) -> bool:
    """True when a PING to `url` succeeds within a second."""
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


class Command(BaseCommand):
    help = "Make sure Redis answers at REDIS_URL; start a local redis-server on loopback if none does."

    def handle(self, *args: object, **options: object) -> None:
        url = settings.REDIS_URL
        if redis_answers(url):
            self.stdout.write(f"Redis answers at {url}")
            return
        parsed = urlparse(url)
        host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
        if host not in LOCAL_HOSTS:
            raise CommandError(f"Redis does not answer at {url}, and it is not on this machine")
        server = shutil.which("redis-server")
        if server is None:
            raise CommandError("Redis does not answer and redis-server is not installed (apt-get install redis-server)")
        directory = settings.DATA_DIR / "redis"
        directory.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                server,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--daemonize",
                "yes",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(directory),
                "--logfile",
                str(directory / "redis.log"),
                "--pidfile",
                str(directory / "redis.pid"),
            ],
            check=True,
        )
        for _ in range(50):
            if redis_answers(url):
                self.stdout.write(f"started redis-server on 127.0.0.1:{port} (files in {directory})")
                return
            time.sleep(0.1)
        raise CommandError(f"started redis-server but it does not answer at {url}; see {directory / 'redis.log'}")
