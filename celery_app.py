"""The Celery app. The GPU worker is `celery -A celery_app worker -P solo -Q gpu`.

A worker that consumes the `gpu` queue loads the model once, before it takes any task, and runs
the generation engine in its own thread (inference.worker.WorkerRuntime). Other workers (CPU
queues, later) never load the model. Under the solo pool Celery's time limits and revoke do
nothing; deadlines and cancellation live in the engine loop.
"""

from __future__ import annotations

import logging
import os

from celery import Celery
from celery.signals import celeryd_after_setup, celeryd_init, setup_logging, worker_shutdown

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "leafresh.settings")

app = Celery("leafresh")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["chatbot"])

logger = logging.getLogger(__name__)
GPU_QUEUE = "gpu"


@setup_logging.connect
def configure_logging(**kwargs: object) -> None:
    """Log as daphne does (settings.LOGGING: JSON lines unless LEAFRESH_LOG_FORMAT=plain). With a
    receiver on this signal Celery installs no handlers or formats of its own."""
    from django.conf import settings

    from leafresh.logs import logging_configure

    logging_configure(settings.LOGGING)


@celeryd_init.connect
def configure_worker_output(sender: str, instance: object, **kwargs: object) -> None:
    """Before the worker checks its privileges (a warning as root): log in our format from here on.
    With JSON logs, leave out Celery's start-up banner (printed, not logged); the worker still logs
    "<name> ready." when it starts consuming."""
    from django.conf import settings

    configure_logging()
    if settings.LEAFRESH_LOG_FORMAT == "json":
        instance.quiet = True  # type: ignore[attr-defined]


@celeryd_after_setup.connect
def start_gpu_runtime(sender: str, instance: object, **kwargs: object) -> None:
    """Load the model and start the engine when this worker consumes the `gpu` queue."""
    queues = set(instance.app.amqp.queues.consume_from or {})  # type: ignore[attr-defined]
    if GPU_QUEUE not in queues:
        return
    from chatbot.runtime import runtime_start

    try:
        runtime_start()
    except Exception:  # Celery's signal dispatch would only log it and go on consuming tasks
        logger.critical("the GPU worker cannot start its engine; exiting", exc_info=True)
        logging.shutdown()
        os._exit(1)


@worker_shutdown.connect
def stop_gpu_runtime(**kwargs: object) -> None:
    """Stop the engine: in-flight requests end with an `error` event, the heartbeat is removed."""
    from chatbot.runtime import runtime_stop

    runtime_stop()
