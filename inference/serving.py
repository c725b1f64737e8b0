"""What every generation backend shares: the Korean outcome messages, request bookkeeping (recent
request ids, queue positions, deadlines) and the answer stream (a completion's JSON text turned into
rendered deltas, challenge cards, the validated final answer and its timings).

The local engine (inference.engine) and the remote one (inference.remote) both use these, so the
SSE/WS contract is the same whichever generates. No torch here.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

from inference.answer import challenge_card, finalize_answer
from inference.render import ProgressiveRenderer
from inference.types import FinishReason, GenerationRequest

logger = logging.getLogger(__name__)

# Korean messages, safe to show to a person; statuses follow HTTP meaning.
MESSAGE_LENGTH = "답변이 너무 길어져 완성하지 못했습니다. 다시 시도해 주세요."
MESSAGE_DEADLINE = "응답 시간이 초과되었습니다. 잠시 후 다시 시도해 주세요."
MESSAGE_ERROR = "추천을 생성하는 중 오류가 발생했습니다. 잠시 후 다시 시도해 주세요."
MESSAGE_BUSY = "지금은 요청이 많아 처리할 수 없습니다. 잠시 후 다시 시도해 주세요."
MESSAGE_TOO_LONG = "메시지와 대화가 너무 길어 답할 수 없습니다. 더 짧게 보내 주세요."
SEEN_REQUESTS = 10_000  # request ids remembered to drop a redelivered task (ids are random UUIDs)
RENDER_INTERVAL_S = 0.02  # how often a request's growing JSON is re-rendered (half the publisher's flush)


class RecentIds:
    """The last `limit` request ids added (oldest forgotten first). Not thread-safe."""

    def __init__(self, limit: int = SEEN_REQUESTS) -> None:
        self.limit = limit
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids

    def add(self, request_id: str) -> None:
        """Remember `request_id` (forgetting the oldest past `limit`)."""
        self._ids[request_id] = None
        while len(self._ids) > self.limit:
            self._ids.popitem(last=False)

    def pop(self, request_id: str) -> bool:
        """Forget `request_id`; True if it was remembered."""
        return self._ids.pop(request_id, 0) is None


def queue_positions(waiting: Iterable[GenerationRequest], *, running: int, max_running: int) -> dict[str, int]:
    """Each waiting request's place in line (request id -> position), in arrival order.

    Position 0: it starts at the next chance (a free slot); n: n-th in line for a free slot.
    """
    return {r.request_id: max(0, running + index + 1 - max_running) for index, r in enumerate(waiting)}


class WaitingLine:
    """The requests waiting for a running slot (`requests`, in arrival order) and the door both
    backends share (inference.engine.Engine, inference.remote.RemoteEngine).

    A request id seen among the last SEEN_REQUESTS is a redelivered task: ignored. A cancel may come
    before its request: the request is then dropped at the door. Each waiting request is told its
    place (`sink.queued`, position 0 = it starts at the next free slot) whenever it changes.
    `running()` is the backend's count of running requests. Not thread-safe: the backend's loop only.
    """

    def __init__(self, sink: Any, metrics: Any, *, max_running: int, max_waiting: int, running: Callable[[], int]) -> None:
        self.requests: deque[GenerationRequest] = deque()
        self.sink = sink
        self.metrics = metrics
        self.max_running = max_running
        self.max_waiting = max_waiting
        self._running = running
        self._positions: dict[str, int] = {}  # the last position announced to each waiting request
        self._cancelled = RecentIds()  # cancels that came before their request
        self._seen = RecentIds()  # recent request ids: a redelivered task is ignored

    def screen(self, request: GenerationRequest) -> bool:
        """Whether a request at the door is to be answered: False for a redelivered one (logged) and
        for one cancelled before it came (counted as cancelled)."""
        if request.request_id in self._seen:
            logger.warning("request %s was delivered again: ignored", request.request_id)
            return False
        self._seen.add(request.request_id)
        if self._cancelled.pop(request.request_id):
            self.metrics.finished(FinishReason.CANCELLED, time.time() - request.created_at)
            return False
        return True

    def full(self) -> bool:
        """Whether `max_running + max_waiting` requests are already running or waiting (the backend
        then refuses the next with 503)."""
        return self._running() + len(self.requests) >= self.max_running + self.max_waiting

    def push(self, request: GenerationRequest) -> None:
        """Put a request at the end of the line and tell it (and any other that moved) its place."""
        self.requests.append(request)
        self.announce()

    def announce(self) -> None:
        """Send `queued` to each waiting request whose place in line changed (queue_positions)."""
        positions = queue_positions(self.requests, running=self._running(), max_running=self.max_running)
        for request in self.requests:
            if self._positions.get(request.request_id) != positions[request.request_id]:
                self.sink.queued(request, positions[request.request_id])
        self._positions = positions  # only requests still waiting

    def cancel(self, request_id: str) -> bool:
        """Take a waiting request out of line (counted as cancelled; `sink.discard`): True. Not
        waiting: remember the cancel for a request still to come: False."""
        for request in self.requests:
            if request.request_id == request_id:
                self.requests.remove(request)
                self.metrics.finished(FinishReason.CANCELLED, time.time() - request.created_at)
                self.sink.discard(request_id)
                self.announce()
                return True
        self._cancelled.add(request_id)
        return False

    def expire(self, now: float) -> list[GenerationRequest]:
        """Take out the requests that waited past their first-token deadline (`now`: Unix seconds);
        the backend answers them with 504."""
        expired = [r for r in self.requests if now > r.created_at + r.ttft_timeout_s]
        for request in expired:
            self.requests.remove(request)
        if expired:
            self.announce()
        return expired


def request_seed(request: GenerationRequest) -> int:
    """The request's sampling seed: its own, or one derived from its id (reproducible per request)."""
    seed = request.sampling.seed
    return int.from_bytes(request.request_id.encode()[:8], "little") if seed is None else seed


def past_deadline(request: GenerationRequest, now: float, *, first_token_at: float | None) -> bool:
    """A started request is late: past its total deadline, or past its time-to-first-token deadline
    without a token yet (`now`, `first_token_at`: Unix seconds)."""
    return now > request.created_at + request.total_timeout_s or (
        first_token_at is None and now > request.created_at + request.ttft_timeout_s
    )


def answer_timings(
    request: GenerationRequest, *, started_at: float, first_token_at: float | None, tokens: int
) -> dict[str, float]:
    """The done event's timings (seconds; Unix-time inputs): time queued, to the first token, in all,
    and the decode rate after the first of `tokens` completion tokens."""
    now = time.time()
    first = first_token_at or now
    return {
        "queue_s": round(started_at - request.created_at, 4),
        "ttft_s": round(first - request.created_at, 4),
        "total_s": round(now - request.created_at, 4),
        "decode_tokens_per_s": round((tokens - 1) / (now - first), 2) if now > first else 0.0,
    }


class AnswerStream:
    """One request's completion (JSON text) on its way to the sink.

    `add(delta)` renders the growing JSON (inference.render.ProgressiveRenderer) and sends the text
    deltas (`sink.token`) and, when the request asks for them, the challenge cards completed so far
    (`sink.challenge`). `finish()` validates the whole completion (inference.answer.finalize_answer)
    and sends the last delta and cards. `sink` is an inference.engine.EventSink.
    """

    def __init__(self, request: GenerationRequest, sink: Any) -> None:
        self.request = request
        self.sink = sink
        self.renderer = ProgressiveRenderer()
        self.completion = ""
        self.unrendered = ""  # completion text not yet fed to the renderer
        self.rendered_at = 0.0
        self.shown = False  # some rendered text was sent: from then on rendering is rate-limited

    def add(self, delta: str, *, force: bool = False) -> None:
        """Add completion text; render it (a partial-JSON parse) at most every RENDER_INTERVAL_S once
        some text was shown, and at every call before that, so the first words leave at once.

        The publisher coalesces deltas over a longer interval anyway, so a client sees no difference.
        """
        self.completion += delta
        self.unrendered += delta
        now = time.monotonic()
        if not self.unrendered or (not force and self.shown and now - self.rendered_at < RENDER_INTERVAL_S):
            return
        text = self.renderer.feed(self.unrendered)
        self.unrendered = ""
        self.rendered_at = now
        request = self.request
        if text:
            self.shown = True
            self.sink.token(request, text)
        if not request.challenge_cards:
            return
        for index, item in self.renderer.completed():
            card = challenge_card(item, default_category=request.default_category, category_labels=request.category_labels)
            self.sink.challenge(request, index, card)

    def finish(self) -> dict[str, Any]:
        """Validate the completion and send what the rendering still lacks; returns the answer
        (the close payload's `data`). Raises ValueError when the completion is not a valid answer
        (nothing is sent then)."""
        request = self.request
        self.add("", force=True)
        answer = finalize_answer(
            self.completion, default_category=request.default_category, category_labels=request.category_labels
        )
        tail, remaining = self.renderer.finish(answer)
        if tail:
            self.sink.token(request, tail)
        for index in remaining if request.challenge_cards else []:
            self.sink.challenge(request, index, answer["challenges"][index])
        return answer
