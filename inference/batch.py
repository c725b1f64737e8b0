"""The running batch: every live request's KV cache in one left-padded tensor per layer.

Continuous batching at token boundaries, the way TGI's first (non-paged) CausalLM batch did it
(text-generation-inference, server/text_generation_server/models/causal_lm.py, `concatenate` and
`filter`): a new request is prefilled alone and its cache joins the batch by left-padding the
shorter side; a finished request's row is dropped, and columns that are padding in every row are
trimmed. Each decode step is one forward pass for all rows, with an attention mask for the padding
and per-row position ids.

Shapes: B rows, T cached positions, per layer keys/values (B, kv_heads, T, head_dim); `mask` (B, T)
with 1 for real tokens; `logits` (B, vocab), the next-token logits of every row.

Each layer's keys and values are views of buffers with spare columns (`PreallocatedLayer`): a decode
step writes its one new column in place instead of concatenating the whole cache, which per step
and layer would copy all B x T cached positions (transformers' DynamicLayer does `torch.cat`).

Prefix caching (as vLLM's automatic prefix caching and SGLang's RadixAttention do, here without
paging): prompts that begin with the same tokens (the system prompt) reuse that prefix's keys and
values, computed once (`PrefixCache`), and only their own suffix runs through the model. A row is
then laid out [padding, prefix, padding, suffix]; the attention mask hides both paddings and the
position ids count only real tokens, so the result is the same as prefilling the whole prompt.
"""

from __future__ import annotations

import os
from collections import OrderedDict, deque
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

HEADROOM = 64  # spare columns allocated with a layer's buffers; they grow by at least half again when full


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    if width == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = width
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose `keys`/`values` (B, kv_heads, T, head_dim) are views of larger buffers.

    Built from row groups, each left-padded (with zeros) to the common width T. `update` appends new
    positions in place; the buffers are reallocated (copied) only when the spare columns run out, by
    at least half their size, so appending costs O(B) amortised per position instead of O(B x T).
    Used only by KVBatch, which selects rows with `batch_select_indices` and trims with `trim_left`.
    """

    def __init__(self, groups: list[tuple[torch.Tensor, torch.Tensor]], width: int) -> None:
        super().__init__()
        first = groups[0][0]
        self.dtype, self.device = first.dtype, first.device
        self.is_initialized = True
        shape = (sum(keys.shape[0] for keys, _ in groups), first.shape[1], width + HEADROOM, first.shape[3])
        self._key_buffer, self._value_buffer = first.new_empty(shape), first.new_empty(shape)
        row = 0
        for keys, values in groups:
            rows, pad = keys.shape[0], width - keys.shape[2]
            for buffer, part in ((self._key_buffer, keys), (self._value_buffer, values)):
                buffer[row : row + rows, :, :pad] = 0  # masked, but 0 x NaN would still poison attention
                buffer[row : row + rows, :, pad:width] = part
            row += rows
        self._length = width
        self._expose()

    def _expose(self) -> None:
        self.keys = self._key_buffer[:, :, : self._length]
        self.values = self._value_buffer[:, :, : self._length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, kv_heads, n, head_dim) new positions; return the whole cached keys and values."""
        end = self._length + key_states.shape[2]
        if end > self._key_buffer.shape[2]:
            columns = max(end + HEADROOM, self._key_buffer.shape[2] * 3 // 2)
            shape = (*self._key_buffer.shape[:2], columns, self._key_buffer.shape[3])
            keys, values = self._key_buffer.new_empty(shape), self._value_buffer.new_empty(shape)
            keys[:, :, : self._length] = self.keys
            values[:, :, : self._length] = self.values
            self._key_buffer, self._value_buffer = keys, values
        self._key_buffer[:, :, self._length : end] = key_states
        self._value_buffer[:, :, self._length : end] = value_states
        self._length = end
        self._expose()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only these rows, in this order (one copy, spare columns included)."""
        self._key_buffer = self._key_buffer.index_select(0, indices)
        self._value_buffer = self._value_buffer.index_select(0, indices)
        self._expose()

    def trim_left(self, columns: int) -> None:
        """Drop the first `columns` positions of every row (a view: no copy)."""
        self._key_buffer = self._key_buffer[:, :, columns:]
        self._value_buffer = self._value_buffer[:, :, columns:]
        self._length -= columns
        self._expose()


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the common prefix of two token sequences."""
    return len(os.path.commonprefix([a, b]))  # noqa: RUF071 - token by token


class PrefixCache:
    """Keys and values of shared prompt prefixes, learnt from the prompts themselves.

    A prompt whose first tokens equal those of the last `recent` prompts of its family (see
    `candidate`) for at least `min_tokens` more than any cached prefix already covers has that
    common prefix cached (one forward pass of the prefix alone, once per family); later prompts
    starting with it prefill only the rest. At most
    `entries` prefixes are kept, least recently used dropped. Per layer an entry holds keys and
    values of shape (1, kv_heads, P, head_dim): for Mistral-7B in bf16, 128 KiB per token.
    """

    def __init__(self, entries: int = 8, min_tokens: int = 16, recent: int = 32) -> None:
        self.entries: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.min_tokens = min_tokens
        self._entries_max = entries
        self._recent: deque[tuple[int, ...]] = deque(maxlen=recent)

    def match(self, ids: list[int]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """The longest cached prefix of `ids` that leaves at least one token: (length, layers) or (0, None)."""
        best: tuple[int, ...] = ()
        for prefix in self.entries:
            if len(best) < len(prefix) < len(ids) and tuple(ids[: len(prefix)]) == prefix:
                best = prefix
        if not best:
            return 0, None
        self.entries.move_to_end(best)
        return len(best), self.entries[best]

    def candidate(self, ids: list[int]) -> int:
        """Remember `ids`; return the length of a new prefix worth caching (0: none).

        The prefix is what `ids` shares with *every* different recent prompt that shares at least
        `min_tokens` with it (for a family of prompts built from one template: the system prompt and
        the template's fixed start), so one entry serves the whole family instead of a new entry per
        pair of similar prompts.
        """
        key = tuple(ids)
        shared = [length for other in self._recent if other != key and (length := _common(key, other)) >= self.min_tokens]
        self._recent.append(key)
        if not shared:
            return 0
        common = min(*shared, len(ids) - 1)
        covered, _ = self.match(ids)
        return common if common - covered >= self.min_tokens else 0

    def add(self, ids: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Cache the prefix `ids` with its per-layer (keys, values)."""
        self.entries[tuple(ids)] = layers
        while len(self.entries) > self._entries_max:
            self.entries.popitem(last=False)


def _preallocated(groups: list[list[tuple[torch.Tensor, torch.Tensor]]], width: int) -> DynamicCache:
    """A cache whose layer i holds the row groups' layer i, stacked in order and left-padded to `width`."""
    cache = DynamicCache()
    cache.layers = [PreallocatedLayer(list(layer), width) for layer in zip(*groups, strict=True)]
    return cache


class KVBatch:
    """Rows of cached sequences decoded together. Not thread-safe: the engine thread owns it."""

    def __init__(self, model: Any, device: torch.device, prefixes: PrefixCache | None = None) -> None:
        self.model = model
        self.device = device
        self.prefixes = prefixes if prefixes is not None else PrefixCache()
        self.cache: Any = None
        self.mask: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """Number of rows (B)."""
        return 0 if self.mask is None else int(self.mask.shape[0])

    @property
    def width(self) -> int:
        """Cached positions per row, padding included (T)."""
        return 0 if self.mask is None else int(self.mask.shape[1])

    def prefill(self, prompts: list[list[int]]) -> None:
        """Run prompts together (one forward pass) and append them, in order, as the last rows.

        Each prompt reuses the longest cached prefix it starts with; rows are left-padded so that
        cached prefixes end in one column and suffixes in the last.
        """
        for ids in prompts:
            length = self.prefixes.candidate(ids)
            if length:
                out = self.model(input_ids=torch.tensor([ids[:length]], device=self.device), use_cache=True, logits_to_keep=1)
                self.prefixes.add(ids[:length], _layers(out.past_key_values))
        matches = [self.prefixes.match(ids) for ids in prompts]
        cached = max(length for length, _ in matches)
        width = max(len(ids) - length for ids, (length, _) in zip(prompts, matches, strict=True))
        rows = len(prompts)
        input_ids = torch.zeros((rows, width), dtype=torch.long, device=self.device)
        mask = torch.zeros((rows, cached + width), dtype=torch.long, device=self.device)
        for row, (ids, (length, _)) in enumerate(zip(prompts, matches, strict=True)):
            suffix = ids[length:]
            input_ids[row, width - len(suffix) :] = torch.tensor(suffix, device=self.device)
            mask[row, cached - length : cached] = 1
            mask[row, cached + width - len(suffix) :] = 1
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, cached:]
        past = self._past(matches, cached) if cached else None
        # Only the last position's logits are needed: the LM head over every prompt position would
        # cost rows × prompt length × vocabulary multiply-adds (transformers' `logits_to_keep`).
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=past,
            use_cache=True,
            logits_to_keep=1,
        )
        self._append(out.past_key_values, mask, out.logits[:, -1, :].float())

    def _past(self, matches: list[tuple[int, Any]], width: int) -> DynamicCache:
        """Rows' cached prefixes as one cache, each row's right-aligned in `width` columns (zeros before)."""
        entries = [entry for _, entry in matches if entry is not None]
        layers = []
        for index in range(len(entries[0])):
            sample_keys, sample_values = entries[0][index]
            shape = (len(matches), sample_keys.shape[1], width, sample_keys.shape[3])
            keys, values = sample_keys.new_zeros(shape), sample_values.new_zeros(shape)
            for row, (length, entry) in enumerate(matches):
                if entry is not None:
                    keys[row, :, width - length :] = entry[index][0][0]
                    values[row, :, width - length :] = entry[index][1][0]
            layers.append((keys, values))
        return DynamicCache(ddp_cache_data=layers)

    def _append(self, cache: Any, mask: torch.Tensor, logits: torch.Tensor) -> None:
        if self.mask is None:
            self.cache, self.mask, self.logits = _preallocated([_layers(cache)], int(mask.shape[1])), mask, logits
            return
        width = max(self.width, int(mask.shape[1]))
        self.cache = _preallocated([_layers(self.cache), _layers(cache)], width)
        self.mask = torch.cat(
            [_left_pad(self.mask, width - self.width, 1), _left_pad(mask, width - int(mask.shape[1]), 1)], dim=0
        )
        assert self.logits is not None
        self.logits = torch.cat([self.logits, logits], dim=0)

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order) and trim columns that are padding in every row."""
        if len(rows) == self.size:
            return
        if not rows:
            self.cache = self.mask = self.logits = None
            return
        index = torch.tensor(rows, device=self.device)
        assert self.mask is not None and self.logits is not None
        self.cache.batch_select_indices(index)
        self.mask = self.mask.index_select(0, index)
        self.logits = self.logits.index_select(0, index)
        start = int(self.mask.any(dim=0).nonzero()[0].item())
        if start > 0:
            for layer in self.cache.layers:
                layer.trim_left(start)
            self.mask = self.mask[:, start:]

    def decode(self, token_ids: list[int]) -> None:
        """Feed one token per row (in row order); `logits` becomes the next-token logits."""
        assert self.mask is not None and len(token_ids) == self.size
        input_ids = torch.tensor(token_ids, device=self.device).unsqueeze(1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.size, 1))], dim=1)
        position_ids = self.mask.sum(dim=1, keepdim=True) - 1
        out = self.model(
            input_ids=input_ids,
            attention_mask=self.mask,
            position_ids=position_ids,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        self.logits = out.logits[:, -1, :].float()
