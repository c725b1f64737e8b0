"""Progressive rendering: the growing JSON completion as human-readable Korean text deltas.

The client never sees JSON syntax. The rendering of an answer is the recommendation sentence,
a blank line, then numbered blocks `1. title — description` separated by blank lines, every text
bounded as in the close payload (inference.answer.bound). The renderer parses the partial JSON
(partial-json-parser) after every chunk and emits only what was added to the rendering, so the
concatenated deltas equal `render_answer(final_answer)`; it also reports each challenge as soon
as it is complete, so the widget can draw its card before the answer ends.
"""

from __future__ import annotations

from typing import Any

import partial_json_parser

from inference.answer import DESCRIPTION_MAX_CHARS, RECOMMEND_MAX_CHARS, TITLE_MAX_CHARS, bound

SEPARATOR = " — "


def render_answer(answer: dict[str, Any]) -> str:
    """Human-readable text of a (possibly partial) answer object.

    A challenge whose title has started renders as `N. title`; once its description key has
    appeared, ` — description` follows. Missing fields render as nothing; texts are bounded.
    """
    text = bound(str(answer.get("recommend", "")), RECOMMEND_MAX_CHARS)
    challenges = answer.get("challenges")
    if isinstance(challenges, list):
        for index, item in enumerate(challenges, start=1):
            if not isinstance(item, dict) or "title" not in item:
                break
            text += f"\n\n{index}. {bound(str(item['title']), TITLE_MAX_CHARS)}"
            if "description" in item:
                text += SEPARATOR + bound(str(item["description"]), DESCRIPTION_MAX_CHARS)
    return text


class ProgressiveRenderer:
    """Feeds on JSON completion text; returns rendering deltas and completed challenges.

    `feed(chunk) -> str`: the text the rendering gained. `completed() -> [(index, dict)]`: the
    generated challenge objects completed since the last call (a challenge is complete once the next one has
    begun; the last one, at `finish`).
    """

    def __init__(self) -> None:
        self._json = ""
        self._emitted = ""
        self._challenges: list[Any] = []
        self._reported = 0

    def feed(self, chunk: str) -> str:
        """Add completion text; return the new rendering delta ("" when nothing is new)."""
        if not chunk:
            return ""
        self._json += chunk
        try:
            partial = partial_json_parser.loads(self._json)
        except Exception:  # noqa: BLE001 - a prefix the parser can't read yet; wait for more
            return ""
        if not isinstance(partial, dict):
            return ""
        if isinstance(partial.get("challenges"), list):
            self._challenges = partial["challenges"]
        rendered = render_answer(partial)
        if not rendered.startswith(self._emitted):
            # Only append-only growth is ever emitted; a rendering that rewrote its past waits.
            return ""
        delta = rendered[len(self._emitted) :]
        self._emitted = rendered
        return delta

    def completed(self) -> list[tuple[int, dict[str, Any]]]:
        """(0-based index, challenge as generated) for the challenges completed since the last call."""
        done = [(index, self._challenges[index]) for index in range(self._reported, len(self._challenges) - 1)]
        self._reported += len(done)
        return done

    def finish(self, answer: dict[str, Any]) -> tuple[str, list[int]]:
        """The last delta, so that everything emitted equals `render_answer(answer)`, and the indices
        of `answer`'s challenges not yet reported by `completed`.

        Raises ValueError if what was emitted is not a prefix of the final rendering (a bug in
        the renderer: the stream would otherwise silently differ from the close payload).
        """
        final = render_answer(answer)
        if not final.startswith(self._emitted):
            raise ValueError("streamed text is not a prefix of the final answer's rendering")
        delta = final[len(self._emitted) :]
        self._emitted = final
        remaining = list(range(self._reported, len(answer["challenges"])))
        self._reported = len(answer["challenges"])
        return delta, remaining
