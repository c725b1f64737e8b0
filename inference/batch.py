"""The running batch: every live request's KV cache in one left-padded tensor per layer.

Continuous batching at token boundaries, the way TGI's first (non-paged) CausalLM batch did it
(text-generation-inference, server/text_generation_server/models/causal_lm.py, `concatenate` and
`filter`): a new request is prefilled alone and its cache joins the batch by left-padding the
shorter side; a finished request's row is dropped, and columns that are padding in every row are
trimmed. Each decode step is one forward pass for all rows, with an attention mask for the padding
and per-row position ids.

Shapes: B rows, T cached positions, per layer keys/values (B, kv_heads, T, head_dim); `mask` (B, T)
with 1 for real tokens; `logits` (B, vocab), the next-token logits of every row.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    if width == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = width
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


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
            self.cache, self.mask, self.logits = cache, mask, logits
            return
        width = max(self.width, int(mask.shape[1]))
        mine, theirs = width - self.width, width - int(mask.shape[1])
        merged = [
            (
                torch.cat([_left_pad(k1, mine, 2), _left_pad(k2, theirs, 2)], dim=0),
                torch.cat([_left_pad(v1, mine, 2), _left_pad(v2, theirs, 2)], dim=0),
            )
            for (k1, v1), (k2, v2) in zip(_layers(self.cache), _layers(cache), strict=True)
        ]
        self.cache = DynamicCache(ddp_cache_data=merged)
        self.mask = torch.cat([_left_pad(self.mask, mine, 1), _left_pad(mask, theirs, 1)], dim=0)
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
                layer.keys = layer.keys[:, :, start:, :]
                layer.values = layer.values[:, :, start:, :]
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
