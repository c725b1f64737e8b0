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
"""

from __future__ import annotations

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


def _preallocated(groups: list[list[tuple[torch.Tensor, torch.Tensor]]], width: int) -> DynamicCache:
    """A cache whose layer i holds the row groups' layer i, stacked in order and left-padded to `width`."""
    cache = DynamicCache()
    cache.layers = [PreallocatedLayer(list(layer), width) for layer in zip(*groups, strict=True)]
    return cache


class KVBatch:
    """Rows of cached sequences decoded together. Not thread-safe: the engine thread owns it."""

    def __init__(self, model: Any, device: torch.device) -> None:
        self.model = model
        self.device = device
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
        """Run prompts together (left-padded, one forward pass) and append them as the last rows."""
        width = max(len(ids) for ids in prompts)
        input_ids = torch.zeros((len(prompts), width), dtype=torch.long, device=self.device)
        mask = torch.zeros((len(prompts), width), dtype=torch.long, device=self.device)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, device=self.device)
            mask[row, width - len(ids) :] = 1
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
        self._append(out.past_key_values, mask, out.logits[:, -1, :].float())

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
