"""The generation engine: one thread that owns the model and serves every live request.

Exactly one thread calls the model (concurrent `generate()` calls from threads crashed CUDA in the
first version). Requests arrive through a thread-safe inbox (`submit`, `cancel`); the loop admits
them up to `max_running`, prefills each, and then advances every running request by one token per
step, so all live sessions stream at once. Each request has its own row of the KV cache, sampling
settings, grammar matcher and random generator. The inbox is drained before every step, so a cancel
takes effect at the next step; deadlines are checked at every step too (Celery's time limits and
revoke do nothing under the solo pool).

Continuous batching: the running requests' KV caches live in one left-padded batch
(inference.batch.KVBatch); each decode step samples one token per row, each row with its own
xgrammar matcher (one bitmask row each) and sampling settings, and runs one forward pass for all
rows. New requests are prefilled and join at a token boundary; finished or cancelled rows leave.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import xgrammar as xgr

from inference.answer import answer_schema
from inference.batch import KVBatch
from inference.detokenize import IncrementalDetokenizer
from inference.history import HistoryWindow, chat_token_counter, history_window, prompt_messages
from inference.loading import LoadedModel
from inference.metrics import EngineMetrics
from inference.sampling import GenerationError, RowSampling, guard_and_penalize, sample_batch
from inference.serving import (
    MESSAGE_BUSY,
    MESSAGE_DEADLINE,
    MESSAGE_ERROR,
    MESSAGE_LENGTH,
    MESSAGE_TOO_LONG,
    AnswerStream,
    WaitingLine,
    answer_timings,
    past_deadline,
    request_seed,
)
from inference.structured import GrammarFactory
from inference.types import FinishReason, GenerationRequest

logger = logging.getLogger(__name__)

# The Korean messages (MESSAGE_*) live in inference.serving, shared with the remote backend.
MAX_PREFILL_PER_STEP = 8  # prompts prefilled together between two decode steps (bounds the stall)
# The least room an answer needs in the context window (an answer is about 80-250 tokens); with less,
# the request is refused, with more but under max_new_tokens the budget shrinks to the room left.
MIN_ANSWER_TOKENS = 128
# The room kept for the answer (or max_new_tokens, if smaller) before history turns give way: a
# short context window (the demo model's 1,024) drops the oldest turns rather than cut answers off.
ANSWER_RESERVE_TOKENS = 320


class PromptTooLongError(GenerationError):
    """The prompt leaves less than MIN_ANSWER_TOKENS of the model's context window."""


class EventSink(Protocol):
    """Where the engine sends a request's events (the publisher, or a list in tests).

    Called from the engine thread; implementations must not block for long.
    """

    def queued(self, request: GenerationRequest, position: int) -> None:
        """The request was accepted; `position` 0 = joins the batch next step, n = n-th in line."""

    def token(self, request: GenerationRequest, text: str) -> None:
        """More human-readable answer text (a delta of the rendering, never JSON syntax)."""

    def challenge(self, request: GenerationRequest, index: int, card: dict[str, str]) -> None:
        """Challenge `index` (0-based) is complete: `card` is what the close payload will hold there."""

    def done(
        self,
        request: GenerationRequest,
        answer: dict[str, Any],
        *,
        usage: dict[str, int],
        timings: dict[str, float],
        model: str = "",
    ) -> None:
        """The terminal success: the full answer, `usage` (prompt, completion and history tokens, the
        history turns kept), `timings` (seconds) and the model's display name."""

    def error(self, request: GenerationRequest, status: int, message: str, finish_reason: FinishReason) -> None:
        """The terminal failure: HTTP-like `status`, a Korean `message` safe to show, and why it ended."""

    def discard(self, request_id: str) -> None:
        """The request was cancelled: drop anything pending for it and publish nothing more."""


@dataclass
class _Sequence:
    """A running request's state outside the KV batch (its row there has the same index in `_rows`)."""

    request: GenerationRequest
    prompt_ids: list[int]
    matcher: xgr.GrammarMatcher
    detokenizer: IncrementalDetokenizer
    answer: AnswerStream  # the completion text, rendered to the sink as it grows
    rng: torch.Generator
    admitted_at: float
    budget: int  # completion tokens allowed: max_new_tokens, or less where the context window ends
    generated: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float = 0.0
    history: HistoryWindow = field(default_factory=HistoryWindow)  # the past turns put into the prompt


class Engine:
    """Serves generation requests from one thread that owns the model (continuous batching).

    `submit(request)` and `cancel(request_id)` are thread-safe and return at once; results go to
    the `sink`. Up to `max_running` requests decode together in one batch; up to `max_waiting`
    more wait in arrival order and join the batch at a token boundary; past that a request is
    refused at once with `error` 503.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        sink: EventSink,
        *,
        max_running: int = 8,
        max_waiting: int = 64,
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.loaded = loaded
        self._count_tokens = chat_token_counter(loaded.tokenizer)
        # The model's context window (positions); prompt + max_new_tokens must fit. None: not known.
        self.context_tokens: int | None = getattr(loaded.model.config, "max_position_embeddings", None)
        self.sink = sink
        self.metrics = metrics or EngineMetrics(worker="local")
        self.max_running = max_running
        self.max_waiting = max_waiting
        tokenizer = loaded.tokenizer
        vocab_size = int(loaded.model.get_output_embeddings().weight.shape[0])
        self.grammars = GrammarFactory(tokenizer, vocab_size=vocab_size)
        self._bitmask = xgr.allocate_token_bitmask(max_running, vocab_size)
        self._batch = KVBatch(loaded.model, loaded.device)
        self._rows: list[_Sequence] = []  # row i of the batch
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._line = WaitingLine(
            sink, self.metrics, max_running=max_running, max_waiting=max_waiting, running=lambda: len(self._rows)
        )
        self._waiting = self._line.requests  # in arrival order
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.steps = 0  # decode steps run (one forward pass for the whole batch each)

    # --- interface (any thread) ---
    def start(self) -> None:
        """Compile the default grammar and start the engine thread."""
        self.grammars.matcher(answer_schema())
        self._thread = threading.Thread(target=self._run, name="leafresh-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop; requests still running or waiting get an `error` 503 (the worker is going away)."""
        self._stop.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; its events go to the sink."""
        self._inbox.put(("submit", request))

    def cancel(self, request_id: str) -> None:
        """Cancel a request wherever it is; nothing more is published for it."""
        self._inbox.put(("cancel", request_id))

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) counts, read without locking (for heartbeats and metrics)."""
        return len(self._rows), len(self._waiting)

    # --- the loop (engine thread only) ---
    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    self._drain_inbox(block=not self._rows and not self._waiting)
                    self._expire()
                    self._admit()
                    if self._rows:
                        self._decode_step()
                    self.metrics.running.set(len(self._rows))
                    self.metrics.waiting.set(len(self._waiting))
                except Exception:  # the loop must survive anything one request does
                    logger.exception("engine loop failure")
                    self._fail_rows(list(range(len(self._rows))), FinishReason.ERROR, 500, MESSAGE_ERROR)
            self._fail_rows(list(range(len(self._rows))), FinishReason.ERROR, 503, MESSAGE_ERROR)
            while self._waiting:
                self._refuse(self._waiting.popleft(), FinishReason.ERROR, 503, MESSAGE_ERROR)

    def _drain_inbox(self, *, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, value = item
            if kind == "submit":
                self._accept(value)
            elif kind == "cancel":
                self._cancel_now(value)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _accept(self, request: GenerationRequest) -> None:
        """Queue a request (a `chat.queued` with its position: 0 = it joins the batch at the next step).

        A task delivered twice (a broker redelivery) gives one answer; past the bounds, 503
        (inference.serving.WaitingLine).
        """
        if not self._line.screen(request):
            return
        if self._line.full():
            logger.warning("request %s refused: %d running, %d waiting", request.request_id, len(self._rows), len(self._waiting))
            self._refuse(request, FinishReason.ERROR, 503, MESSAGE_BUSY)
            return
        self._line.push(request)

    def _cancel_now(self, request_id: str) -> None:
        for index, seq in enumerate(self._rows):
            if seq.request.request_id == request_id:
                self._log_finish(seq, FinishReason.CANCELLED)
                self.sink.discard(request_id)
                self._drop_rows([index])
                return
        self._line.cancel(request_id)  # out of line, or remembered for a request still to come

    def _expire(self) -> None:
        now = time.time()
        for request in self._line.expire(now):
            self._refuse(request, FinishReason.DEADLINE, 504, MESSAGE_DEADLINE)
        late = [
            index for index, seq in enumerate(self._rows) if past_deadline(seq.request, now, first_token_at=seq.first_token_at)
        ]
        if late:
            self._fail_rows(late, FinishReason.DEADLINE, 504, MESSAGE_DEADLINE)

    def _admit(self) -> None:
        """Move waiting requests into the batch: up to MAX_PREFILL_PER_STEP prompts in one forward pass."""
        admitted: list[_Sequence] = []
        while self._waiting and len(self._rows) + len(admitted) < self.max_running and len(admitted) < MAX_PREFILL_PER_STEP:
            request = self._waiting.popleft()  # _expire has just removed those past their deadline
            try:
                admitted.append(self._new_sequence(request, time.time()))
            except PromptTooLongError as exc:
                logger.info("request %s refused: %s", request.request_id, exc)
                self._refuse(request, FinishReason.ERROR, 400, MESSAGE_TOO_LONG)
            except Exception:
                logger.exception("could not prepare request %s", request.request_id)
                self._refuse(request, FinishReason.ERROR, 500, MESSAGE_ERROR)
        if not admitted:
            return
        try:
            self._batch.prefill([seq.prompt_ids for seq in admitted])  # they become the last rows
        except Exception:
            logger.exception("prefill failed for %d requests", len(admitted))
            for seq in admitted:
                self._fail_seq(seq, FinishReason.ERROR, 500, MESSAGE_ERROR)
            self._line.announce()
            return
        self._rows.extend(admitted)
        self._line.announce()  # everyone still waiting moved up

    def _new_sequence(self, request: GenerationRequest, now: float) -> _Sequence:
        """The request's row: history window, chat template, tokens, grammar matcher, and its budget.

        Where the prompt would leave the answer less than ANSWER_RESERVE_TOKENS (or max_new_tokens,
        if smaller) of the context window, the oldest history turns give way first; then the budget
        is cut to the room left. Raises PromptTooLongError when that room is under MIN_ANSWER_TOKENS.
        """
        tokenizer = self.loaded.tokenizer
        history = history_window(request.history, budget=request.history_budget_tokens, count=self._count_tokens)
        prompt_ids = self._prompt_ids(request, history)
        budget = request.sampling.max_new_tokens
        if self.context_tokens is not None:
            over = len(prompt_ids) + min(budget, ANSWER_RESERVE_TOKENS) - self.context_tokens
            if over > 0 and history.turns:
                history = history_window(request.history, budget=max(0, history.tokens - over), count=self._count_tokens)
                prompt_ids = self._prompt_ids(request, history)
            room = self.context_tokens - len(prompt_ids)
            if room < MIN_ANSWER_TOKENS:
                raise PromptTooLongError(f"{len(prompt_ids)} prompt tokens leave {room} of {self.context_tokens} positions")
            budget = min(budget, room)
        return _Sequence(
            request=request,
            prompt_ids=prompt_ids,
            matcher=self.grammars.matcher(request.schema),
            detokenizer=IncrementalDetokenizer(tokenizer),
            answer=AnswerStream(request, self.sink),
            rng=torch.Generator().manual_seed(request_seed(request)),
            admitted_at=now,
            budget=budget,
            history=history,
        )

    def _prompt_ids(self, request: GenerationRequest, history: HistoryWindow) -> list[int]:
        """The prompt's token ids: the system message, the kept history, then the request's messages."""
        prompt = self.loaded.tokenizer.apply_chat_template(
            prompt_messages(request.messages, history), tokenize=False, add_generation_prompt=True
        )
        return self.loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def _decode_step(self) -> None:
        """Sample one token for every row (each with its own grammar and sampling), then one forward pass."""
        assert self._batch.logits is not None
        size = len(self._rows)
        rows = [self._row_sampling(seq) for seq in self._rows]
        # Sampling runs on the CPU, beside the grammar bitmask and the per-row generators: (B, vocab)
        # floats per step (about 4 MB at B=32 for Mistral's vocabulary) is cheap to copy from a GPU.
        scores = guard_and_penalize(self._batch.logits.cpu(), rows)
        for index, seq in enumerate(self._rows):
            seq.matcher.fill_next_token_bitmask(self._bitmask, index)
        xgr.apply_token_bitmask_inplace(scores, self._bitmask[:size])
        tokens = sample_batch(scores, rows)
        keep: list[int] = []
        fed: list[int] = []
        failed: list[int] = []
        for index, (seq, token_id) in enumerate(zip(self._rows, tokens, strict=True)):
            try:
                if token_id is None:
                    raise GenerationError("no token is allowed (all logits masked or not finite)")
                outcome = self._advance(seq, token_id)
            except Exception:
                logger.exception("decode failed for request %s", seq.request.request_id)
                failed.append(index)
                continue
            if outcome == "continue":
                keep.append(index)
                fed.append(token_id)
        for index in failed:
            self._fail_seq(self._rows[index], FinishReason.ERROR, 500, MESSAGE_ERROR)
        self._rows = [self._rows[index] for index in keep]
        self._batch.keep(keep)
        if self._rows:
            try:
                self._batch.decode(fed)
                self.steps += 1
                self.metrics.steps.inc()
            except Exception:
                logger.exception("decode step failed for %d requests", len(self._rows))
                self._fail_rows(list(range(len(self._rows))), FinishReason.ERROR, 500, MESSAGE_ERROR)

    @staticmethod
    def _row_sampling(seq: _Sequence) -> RowSampling:
        sampling = seq.request.sampling
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = torch.tensor(seq.prompt_ids + seq.generated, dtype=torch.long).unique()
        return RowSampling(
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            repetition_penalty=sampling.repetition_penalty,
            seen_ids=seen,
            rng=seq.rng,
        )

    def _advance(self, seq: _Sequence, token_id: int) -> str:
        """Accept one token: "continue", or "done" when the request ended (its events are sent)."""
        if not seq.matcher.accept_token(token_id):
            raise GenerationError(f"grammar rejected token {token_id}")
        seq.generated.append(token_id)
        now = time.time()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.ttft.observe(now - seq.request.created_at)
        else:
            self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        self.metrics.tokens.inc()
        seq.answer.add(seq.detokenizer.push(token_id))
        if seq.matcher.is_completed() or seq.matcher.is_terminated():
            seq.answer.add(seq.detokenizer.flush(), force=True)
            self._finish(seq)
            return "done"
        if len(seq.generated) >= seq.budget:
            self._fail_seq(seq, FinishReason.LENGTH, 500, MESSAGE_LENGTH)
            return "done"
        return "continue"

    def _finish(self, seq: _Sequence) -> None:
        request = seq.request
        try:
            answer = seq.answer.finish()
        except ValueError:
            logger.exception("completion of request %s is not a valid answer", request.request_id)
            self._fail_seq(seq, FinishReason.ERROR, 500, MESSAGE_ERROR)
            return
        timings = answer_timings(
            request, started_at=seq.admitted_at, first_token_at=seq.first_token_at, tokens=len(seq.generated)
        )
        usage = {
            "prompt_tokens": len(seq.prompt_ids),
            "completion_tokens": len(seq.generated),
            "history_tokens": seq.history.tokens,
            "history_turns": seq.history.turns,
        }
        self._log_finish(seq, FinishReason.STOP)
        self.sink.done(request, answer, usage=usage, timings=timings, model=self.loaded.name)

    def _drop_rows(self, indices: list[int]) -> None:
        gone = set(indices)
        keep = [index for index in range(len(self._rows)) if index not in gone]
        self._rows = [self._rows[index] for index in keep]
        self._batch.keep(keep)

    def _fail_rows(self, indices: list[int], reason: FinishReason, status: int, message: str) -> None:
        for index in indices:
            seq = self._rows[index]
            self._fail_seq(seq, reason, status, message)
        self._drop_rows(indices)

    def _fail_seq(self, seq: _Sequence, reason: FinishReason, status: int, message: str) -> None:
        """End a request that had a row (its terminal `error`); the caller removes the row."""
        self._log_finish(seq, reason)
        self.sink.error(seq.request, status, message, reason)

    def _refuse(self, request: GenerationRequest, reason: FinishReason, status: int, message: str) -> None:
        """End a request that never got a row (refused, expired while waiting, not preparable)."""
        self.metrics.finished(reason, time.time() - request.created_at)
        self.sink.error(request, status, message, reason)

    def _log_finish(self, seq: _Sequence, reason: FinishReason) -> None:
        self.metrics.finished(reason, time.time() - seq.request.created_at)
        logger.info(
            "request %s finished: %s after %d completion tokens",
            seq.request.request_id,
            reason.value,
            len(seq.generated),
        )
