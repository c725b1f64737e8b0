"""Incremental detokenisation that never emits half a character.

Korean syllables are three bytes in UTF-8 and byte-level BPE often splits them across tokens.
Decoding token by token would emit U+FFFD; instead the detokenizer re-decodes a short window and
holds text back while it ends in an incomplete character. The method is TGI's `decode_token`
(text-generation-inference, server/text_generation_server/models/model.py).
"""

from __future__ import annotations

from typing import Protocol


class _Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    `push(token_id) -> str` returns the new text (possibly "") after adding one token;
    `flush() -> str` returns whatever was held back (call it once, at the end).
    The concatenation of all returned deltas equals `tokenizer.decode(all_ids)` except for
    clean-up of spaces, which is switched off by decoding with the same windows each time.
    """

    def __init__(self, tokenizer: _Decoder) -> None:
        self._tokenizer = tokenizer
        # The Rust tokenizer directly, when the Python wrapper would add nothing (no space clean-up):
        # it is called twice per generated token, and the wrapper's argument handling dominates.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = None if getattr(tokenizer, "clean_up_tokenization_spaces", False) else backend
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=True)
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token id; return the text it completes (may be empty)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Return the held-back tail, dropping a trailing incomplete character."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :].rstrip("\ufffd")
