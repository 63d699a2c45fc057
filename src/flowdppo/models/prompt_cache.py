"""A least-recently-used cache of per-prompt encodings (text encoders are the slow part
of a rollout for large prompt sets; each distinct prompt is encoded once)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from torch import Tensor


class PromptCache:
    """Least-recently-used cache of per-prompt encodings, kept on the CPU.

    Each entry maps a prompt to its rows ``{name: Tensor}`` (no batch dimension). CPU
    storage bounds accelerator memory: a T5 embedding of 512 tokens is ~4 MB in bf16.
    """

    def __init__(self, max_size: int = 256) -> None:
        if max_size < 1:
            raise ValueError(f"prompt_cache_size={max_size}: must be >= 1")
        self.max_size = max_size
        self._rows: OrderedDict[str, dict[str, Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        self._rows.clear()

    def rows(self, prompts: Sequence[str],
             encode: Callable[[list[str]], dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Rows for ``prompts``; the missing unique prompts are encoded in one batch."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._rows]
        fresh: dict[str, dict[str, Tensor]] = {}
        if missing:
            batch = encode(missing)
            for i, prompt in enumerate(missing):
                fresh[prompt] = {k: v[i].detach().to("cpu") for k, v in batch.items()}
        out = []
        for prompt in prompts:
            row = fresh.get(prompt) or self._rows[prompt]
            self._rows[prompt] = row
            self._rows.move_to_end(prompt)
            out.append(row)
        while len(self._rows) > self.max_size:
            self._rows.popitem(last=False)
        return out
