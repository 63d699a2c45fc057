"""Helpers the Qwen-Image, Z-Image and Wan adapters share on top of :mod:`.diffusers_common`.

- Variable-length prompt embeddings (Qwen-Image, Z-Image keep only the valid tokens) are
  stored zero-padded to ``max_sequence_length`` with a ``prompt_embeds_mask``, so the prompt
  cache can stack rows; the forward recovers the pipeline's own inputs from the mask.
- A configurable negative prompt: these pipelines take one for CFG (Qwen-Image does CFG only
  when one is given), whereas the SD3 / FLUX adapters always use the empty prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .diffusers_common import DiffusersFlowModel


def pad_rows(rows: Sequence[Tensor], length: int) -> dict[str, Tensor]:
    """Rows of shape `(L_i, C)` as ``prompt_embeds`` `(B, length, C)` (zeros after ``L_i``) and
    ``prompt_embeds_mask`` `(B, length)` (1 on the valid tokens)."""
    longest = max(row.shape[0] for row in rows)
    if longest > length:
        raise ValueError(f"a prompt encodes to {longest} tokens > max_sequence_length={length}")
    embeds = rows[0].new_zeros((len(rows), length, rows[0].shape[-1]))
    mask = torch.zeros((len(rows), length), device=rows[0].device)
    for i, row in enumerate(rows):
        embeds[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = 1.0
    return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}


def valid_rows(embeds: Tensor, mask: Tensor) -> list[Tensor]:
    """The inverse of :func:`pad_rows`: each row's valid tokens, `(L_i, C)`."""
    keep = mask > 0.5
    return [embeds[i][keep[i]] for i in range(embeds.shape[0])]


class NegativePromptModel(DiffusersFlowModel):
    """A diffusers adapter whose CFG negative is ``negative_prompt`` (set in ``_init_family``)."""

    negative_prompt: str = ""

    def _init_negative(self, negative_prompt: Any) -> None:
        if not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt={negative_prompt!r}: expected a string")
        self.negative_prompt = negative_prompt

    def _negative_rows(self, batch: int) -> dict[str, Tensor]:
        """``negative_prompt``'s encoding, ``batch`` rows (cached like any prompt)."""
        if self._negative is None:
            self._negative = self.encode_prompts([self.negative_prompt])
        return {k: v.expand(batch, *v.shape[1:]) for k, v in self._negative.tensors.items()}

    def _with_negative(self, x: Tensor, t: Tensor,
                       tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Inputs of one CFG batch: [negative, conditional] along the batch."""
        negative = self._negative_rows(x.shape[0])
        both = {k: torch.cat([negative[k].to(v.device, v.dtype), v]) for k, v in tensors.items()}
        return torch.cat([x, x]), torch.cat([t, t]), both
