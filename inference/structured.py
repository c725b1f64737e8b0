"""Structured output: xgrammar grammars compiled from JSON schemas, one matcher per request.

Generation is constrained to the schema (inference.answer.answer_schema), so a completion is
always a prefix of a schema-valid JSON document. Lengths are not bounded in the grammar
(xgrammar's maxLength is slow and blocks escapes); `max_new_tokens` bounds the whole. Whitespace
is not free: compact separators, as the demo model was trained on.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import xgrammar as xgr


class GrammarFactory:
    """Compiles JSON schemas for one tokenizer and hands out fresh matchers.

    `matcher(schema) -> xgr.GrammarMatcher`; compiled grammars are cached by schema text.
    `vocab_size` is the model's logits width (it may exceed the tokenizer's length).
    Raises xgrammar.InvalidJSONError (a ValueError) for a schema xgrammar cannot compile.
    """

    def __init__(self, tokenizer: Any, *, vocab_size: int, stop_token_ids: list[int] | None = None) -> None:
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self._compiler = xgr.GrammarCompiler(info)
        self._compile = lru_cache(maxsize=64)(self._compile_text)

    def _compile_text(self, schema_text: str) -> xgr.CompiledGrammar:
        return self._compiler.compile_json_schema(schema_text, any_whitespace=False, separators=(",", ":"))

    def matcher(self, schema: dict[str, Any]) -> xgr.GrammarMatcher:
        """A new matcher at the start of `schema`'s grammar."""
        return xgr.GrammarMatcher(self._compile(json.dumps(schema, sort_keys=False, ensure_ascii=False)))
