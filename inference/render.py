"""Progressive rendering: the growing JSON completion as human-readable Korean text deltas.

The client never sees JSON syntax. The rendering of an answer is the recommendation sentence,
a blank line, then numbered blocks `1. title — description` separated by blank lines. The
renderer parses the partial JSON (partial-json-parser) after every chunk and emits only what
was added to the rendering, so the concatenated deltas equal `render_answer(final_answer)`.
"""

from __future__ import annotations

from typing import Any

import partial_json_parser

SEPARATOR = " — "


def render_answer(answer: dict[str, Any]) -> str:
    """Human-readable text of a (possibly partial) answer object.

    A challenge whose title has started renders as `N. title`; once its description key has
    appeared, ` — description` follows. Missing fields render as nothing.
    """
    text = str(answer.get("recommend", ""))
    challenges = answer.get("challenges")
    if isinstance(challenges, list):
        for index, item in enumerate(challenges, start=1):
            if not isinstance(item, dict) or "title" not in item:
                break
            text += f"\n\n{index}. {item['title']}"
            if "description" in item:
                text += SEPARATOR + str(item["description"])
    return text


class ProgressiveRenderer:
    """Feeds on JSON completion text; returns rendering deltas and completed challenges.

    `feed(chunk) -> str`: the text the rendering gained. `completed_challenges` counts the
    challenges whose description string has closed (a complete card).
    """

    def __init__(self) -> None:
        self._json = ""
        self._emitted = ""

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
        rendered = render_answer(partial)
        if not rendered.startswith(self._emitted):
            # Only append-only growth is ever emitted; a rendering that rewrote its past waits.
            return ""
        delta = rendered[len(self._emitted) :]
        self._emitted = rendered
        return delta

    def finish(self, answer: dict[str, Any]) -> str:
        """The last delta, so that everything emitted equals `render_answer(answer)`.

        Raises ValueError if what was emitted is not a prefix of the final rendering (a bug in
        the renderer: the stream would otherwise silently differ from the close payload).
        """
        final = render_answer(answer)
        if not final.startswith(self._emitted):
            raise ValueError("streamed text is not a prefix of the final answer's rendering")
        delta = final[len(self._emitted) :]
        self._emitted = final
        return delta
