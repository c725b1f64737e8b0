"""The publisher: sends a request's events from the engine to its channel-layer group.

channels-redis `group_send` silently drops a message sent to a full channel, so tokens are
coalesced (one `chat.token` per request every `flush_interval_s`, 40 ms by default, stretched when
many streams are open so that they send at most `max_events_per_s` together), every event
is numbered (`seq`, from 1), and the terminal event carries the full answer. After a terminal
event or a `discard`, nothing more is sent for that request.

The publisher runs its own asyncio loop in a thread: the engine thread only enqueues and never
waits on Redis. Events are sent one at a time in the order they were produced.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import multiprocessing
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from tenacity import AsyncRetrying, stop_after_attempt, wait_exponential

from inference.types import (
    ChallengeEvent,
    DoneEvent,
    ErrorEvent,
    FinishReason,
    GenerationRequest,
    QueuedEvent,
    TokenEvent,
)

logger = logging.getLogger(__name__)
FINISHED_MEMORY = 10_000  # how many ended request ids are remembered to drop their late events
SEND_ATTEMPTS = 4  # a Redis hiccup (reconnect, failover) is retried for about 0.7 s before an event is dropped


def build_channel_layer(spec: dict[str, Any]) -> Any:
    """A channels layer from a Django CHANNEL_LAYERS entry (`{"BACKEND": dotted path, "CONFIG": {...}}`),
    without Django (the publisher's child process has none). Raises ImportError for a bad path."""
    module_name, _, class_name = spec["BACKEND"].rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)(**spec.get("CONFIG", {}))


class LoopThread:
    """An asyncio event loop running in a daemon thread.

    `call(fn, *args)` schedules a plain function on the loop from any thread;
    `submit(coro)` schedules a coroutine and returns a concurrent.futures.Future.
    """

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` on the loop soon (FIFO with other calls); returns at once."""
        self.loop.call_soon_threadsafe(fn, *args)

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run a coroutine on the loop; returns a concurrent.futures.Future of its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the loop's tasks, stop it, join the thread and close the loop."""

        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            try:
                self.submit(_cancel_all()).result(timeout)
            except Exception:
                logger.warning("tasks did not stop in time", exc_info=True)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()


@dataclass
class _Stream:
    request_id: str
    group: str
    seq: int = 0
    pending: str = ""
    tokens_sent: int = 0
    flush_handle: asyncio.TimerHandle | None = None


class EventTuples:
    """An EventSink that turns each event into a plain, picklable message for `put`:
    `("queued", request_id, group, position)`, `("token", request_id, group, text)`,
    `("challenge", request_id, group, index, card)`, `("terminal", request_id, group, event)`,
    `("discard", request_id)`."""

    def put(self, item: tuple[Any, ...]) -> None:
        """Deliver one message (subclasses: onto a loop, or down a pipe)."""
        raise NotImplementedError

    def queued(self, request: GenerationRequest, position: int) -> None:
        self.put(("queued", request.request_id, request.group, position))

    def token(self, request: GenerationRequest, text: str) -> None:
        self.put(("token", request.request_id, request.group, text))

    def challenge(self, request: GenerationRequest, index: int, card: dict[str, str]) -> None:
        self.put(("challenge", request.request_id, request.group, index, card))

    def done(
        self,
        request: GenerationRequest,
        answer: dict[str, Any],
        *,
        usage: dict[str, int],
        timings: dict[str, float],
        model: str = "",
    ) -> None:
        event = {
            "type": "chat.done",
            "data": answer,
            "finish_reason": FinishReason.STOP.value,
            "usage": usage,
            "timings": timings,
            "model": model,
        }
        self.put(("terminal", request.request_id, request.group, event))

    def error(self, request: GenerationRequest, status: int, message: str, finish_reason: FinishReason) -> None:
        event = {"type": "chat.error", "status": status, "message": message, "finish_reason": finish_reason.value}
        self.put(("terminal", request.request_id, request.group, event))

    def discard(self, request_id: str) -> None:
        self.put(("discard", request_id))


class ChannelLayerPublisher(EventTuples):
    """An `EventSink` that publishes to a channels layer (see inference.engine.EventSink).

    `layer` is a channels layer (e.g. channels_redis RedisChannelLayer) used only from the
    publisher's loop. `worker` names this worker in `chat.queued`, so a listener can watch that
    worker's heartbeat. Thread-safe: every public method may be called from the engine thread.
    """

    def __init__(
        self,
        layer: Any,
        loop_thread: LoopThread,
        *,
        flush_interval_s: float = 0.04,
        max_events_per_s: float = 400.0,
        worker: str = "",
    ) -> None:
        self.layer = layer
        self.max_events_per_s = max_events_per_s
        self.worker = worker
        self.loop_thread = loop_thread
        self.flush_interval_s = flush_interval_s
        self._streams: dict[str, _Stream] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()  # recently ended requests: drop late events
        # Created here, not in the sender task: messages handled before that task first runs must not be lost.
        self._outbox: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self._sender = loop_thread.submit(self._send_forever())
        self._handlers = {  # built once: `put` runs for every token message
            "queued": self._queued,
            "token": self._token,
            "challenge": self._challenge,
            "terminal": self._terminal,
            "discard": self._discard,
        }

    # --- messages (any thread) ---
    def put(self, item: tuple[Any, ...]) -> None:
        """Handle one message from `EventTuples` on the publisher's loop."""
        kind, *args = item
        self.loop_thread.call(self._handlers[kind], *args)

    def drain(self, timeout: float = 5.0) -> None:
        """Block until every event published so far has been sent (used at shutdown and in tests)."""

        async def _wait() -> None:
            for stream in list(self._streams.values()):
                self._flush_stream(stream)
            await self._outbox.join()

        self.loop_thread.submit(_wait()).result(timeout)

    @property
    def flush_interval(self) -> float:
        """Seconds a stream's tokens are held: `flush_interval_s`, stretched so that all open streams
        together send at most `max_events_per_s` token events (each costs Redis and web CPU)."""
        return max(self.flush_interval_s, len(self._streams) / self.max_events_per_s)

    # --- the loop ---
    def _stream(self, request_id: str, group: str) -> _Stream | None:
        """The request's open stream, created on first use; None once it has ended (terminal or discard)."""
        if request_id in self._finished:
            return None
        stream = self._streams.get(request_id)
        if stream is None:
            stream = self._streams[request_id] = _Stream(request_id=request_id, group=group)
        return stream

    def _end(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None and stream.flush_handle is not None:
            stream.flush_handle.cancel()
        self._finished[request_id] = None
        while len(self._finished) > FINISHED_MEMORY:
            self._finished.popitem(last=False)

    def _enqueue(self, stream: _Stream, event: dict[str, Any]) -> None:
        stream.seq += 1
        event.update(request_id=stream.request_id, seq=stream.seq)
        self._outbox.put_nowait((stream.group, event))

    def _queued(self, request_id: str, group: str, position: int) -> None:
        stream = self._stream(request_id, group)
        if stream is not None:
            event: QueuedEvent = {
                "type": "chat.queued",
                "request_id": request_id,
                "seq": 0,
                "position": position,
                "worker": self.worker,
            }
            self._enqueue(stream, dict(event))

    def _token(self, request_id: str, group: str, text: str) -> None:
        stream = self._stream(request_id, group)
        if stream is None:
            return
        stream.pending += text
        if not stream.tokens_sent:
            self._flush_stream(stream)  # the first text goes out at once: time to first token is what people feel
        elif stream.flush_handle is None:
            stream.flush_handle = self.loop_thread.loop.call_later(self.flush_interval, self._flush, request_id)

    def _flush(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            self._flush_stream(stream)

    def _flush_stream(self, stream: _Stream) -> None:
        if stream.flush_handle is not None:
            stream.flush_handle.cancel()
            stream.flush_handle = None
        if stream.pending:
            event: TokenEvent = {"type": "chat.token", "request_id": stream.request_id, "seq": 0, "text": stream.pending}
            stream.pending = ""
            stream.tokens_sent += 1
            self._enqueue(stream, dict(event))

    def _challenge(self, request_id: str, group: str, index: int, card: dict[str, str]) -> None:
        stream = self._stream(request_id, group)
        if stream is None:
            return
        self._flush_stream(stream)  # the card follows the text it completes
        event: ChallengeEvent = {"type": "chat.challenge", "request_id": request_id, "seq": 0, "index": index, "challenge": card}
        self._enqueue(stream, dict(event))

    def _terminal(self, request_id: str, group: str, event: dict[str, Any]) -> None:
        stream = self._stream(request_id, group)
        if stream is None:
            return
        self._flush_stream(stream)
        typed: DoneEvent | ErrorEvent = event  # type: ignore[assignment]
        self._enqueue(stream, dict(typed))
        self._end(request_id)

    def _discard(self, request_id: str) -> None:
        self._end(request_id)

    async def _send_forever(self) -> None:
        while True:
            group, event = await self._outbox.get()
            try:
                async for attempt in AsyncRetrying(
                    stop=stop_after_attempt(SEND_ATTEMPTS), wait=wait_exponential(multiplier=0.1, max=1.0), reraise=True
                ):
                    with attempt:
                        await self.layer.group_send(group, event)
            except Exception:  # a lost Redis must not kill the publisher
                # The listener's stall watchdog ends a stream whose events stop arriving.
                logger.exception("could not publish %s for request %s", event["type"], event["request_id"])
            finally:
                self._outbox.task_done()


class PublisherProcess(EventTuples):
    """An EventSink that runs the publisher in a child process, off the engine's GIL.

    The engine thread only pickles each message onto a pipe (microseconds); the child coalesces and
    sends to the channel layer (channels-redis costs about 0.3 ms of CPU per event, which in-process
    would compete with the engine for the GIL). The child is started with `spawn`, so it imports
    neither torch nor Django; it exits when the pipe closes (the worker died) or on `stop()`.
    If the child dies, `on_broken` is called once (the worker exits: its listeners end with 503 when
    its heartbeat expires, rather than waiting on events that would never come).
    """

    def __init__(
        self,
        layer_config: dict[str, Any],
        *,
        flush_interval_s: float,
        max_events_per_s: float,
        worker: str,
        on_broken: Callable[[], None] | None = None,
    ) -> None:
        self._on_broken = on_broken
        context = multiprocessing.get_context("spawn")
        receiver, self._sender = context.Pipe(duplex=False)
        self._acks, ack_sender = context.Pipe(duplex=False)
        self._lock = threading.Lock()  # the engine thread and a shutdown or drain may send at once
        self._drain_lock = threading.Lock()  # numbering drains never waits behind a blocked send
        self._drains = 0
        self._broken = False
        self.closing = False  # stop() has begun: a closed pipe is expected, not a failure
        self.process = context.Process(
            target=_publisher_main,
            args=(receiver, ack_sender, layer_config, flush_interval_s, max_events_per_s, worker),
            name="leafresh-publisher",
            daemon=True,
        )
        self.process.start()
        receiver.close()
        ack_sender.close()

    def put(self, item: tuple[Any, ...]) -> None:
        """Send one message to the child. Never raises into the engine: if the child is gone, the
        message is dropped (the heartbeat stops, so listeners end with 503)."""
        if self._broken:
            return
        try:
            with self._lock:
                self._sender.send(item)
        except (OSError, ValueError):  # BrokenPipeError is an OSError; ValueError: the pipe was closed
            self._broken = True
            if self.closing:
                return  # a late event during shutdown: the worker is stopping anyway
            logger.critical("the publisher process is gone; events are dropped from now on")
            if self._on_broken is not None:
                self._on_broken()

    def alive(self) -> bool:
        """Whether the child process is running and reachable."""
        return not self._broken and self.process.is_alive()

    def drain(self, timeout: float = 5.0) -> bool:
        """Block until every message sent so far has gone to the channel layer; False on timeout."""
        if not self.alive():
            return False
        with self._drain_lock:
            self._drains += 1
            marker = self._drains
        self.put(("drain", marker))
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self._acks.poll(max(0.0, deadline - time.monotonic())) and self._acks.recv() >= marker:
                    return True
        except (EOFError, OSError):  # the child died while draining
            return False
        return False

    def stop(self, timeout: float = 5.0) -> None:
        """Send what is pending, then end the child process."""
        self.closing = True
        if self.alive():
            self.drain(timeout)
            self.put(("stop",))
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()  # it ignores SIGTERM (see _publisher_main)
        self._sender.close()


def _publisher_main(
    receiver: Any, acks: Any, layer_config: dict[str, Any], flush_interval_s: float, max_events_per_s: float, worker: str
) -> None:
    """The child process: read messages from the pipe and publish them until `stop` or EOF.

    Ctrl-C and a supervisor's SIGTERM reach the whole process group; the child ignores them, so the
    worker's own shutdown sends the last events and stops it (or its end closes the pipe: EOF).
    Otherwise the worker would see its publisher die first and exit as if it had crashed.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from leafresh.logs import logging_configure_from_env  # Django-free: the worker's own log format

    logging_configure_from_env()
    loop_thread = LoopThread("leafresh-publisher")
    publisher = ChannelLayerPublisher(
        build_channel_layer(layer_config),
        loop_thread,
        flush_interval_s=flush_interval_s,
        max_events_per_s=max_events_per_s,
        worker=worker,
    )
    try:
        while True:
            try:
                item = receiver.recv()
            except (EOFError, OSError):
                break  # the worker is gone
            if item[0] == "stop":
                break
            if item[0] == "drain":
                try:
                    publisher.drain()
                except Exception:  # a slow Redis: answer anyway, the events keep going out
                    logging.getLogger(__name__).warning("drain timed out", exc_info=True)
                acks.send(item[1])
                continue
            publisher.put(item)
    finally:
        try:
            publisher.drain()
        except Exception:  # a slow or lost Redis: what could not be sent is lost with the process
            logging.getLogger(__name__).warning("publisher exiting with unsent events", exc_info=True)
        finally:
            loop_thread.stop()
