"""Prompt sources: a registry of named sources and user files (txt one per line, jsonl with
metadata). Built-in sources register from ``flowdppo.builtins`` (the package top)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .registry import Registry


@dataclass(frozen=True)
class PromptItem:
    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptSplits:
    train: list[PromptItem]
    eval: list[PromptItem]


PROMPT_SOURCES: Registry[Callable[..., PromptSplits]] = Registry(
    "prompt source", extra_names=("files",))


def register_prompts(name: str) -> Callable:
    """Decorator registering a prompt source factory ``(**kwargs) -> PromptSplits``."""
    return PROMPT_SOURCES.register(name)


def read_prompt_file(path: str | Path) -> list[PromptItem]:
    """Read ``.txt`` (one prompt per line) or ``.jsonl`` (``{"prompt": ..., **metadata}``)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file {str(path)!r} does not exist; give an existing .txt or .jsonl")
    items: list[PromptItem] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f'{path}:{number}: each line must be an object with a "prompt" string')
            prompt = record.pop("prompt")
            items.append(PromptItem(prompt, record))
    elif path.suffix == ".txt":
        items = [PromptItem(line.strip()) for line in path.read_text().splitlines() if line.strip()]
    else:
        raise ValueError(f"prompt file {str(path)!r}: expected a .txt or .jsonl file")
    if not items:
        raise ValueError(f"prompt file {str(path)!r} holds no prompts")
    return items


def build_prompts(
    source: str, *, train_file: str | None = None, eval_file: str | None = None, **kwargs: Any
) -> PromptSplits:
    """Prompts by source name (a registered source or ``package.module:factory``), or
    ``"files"`` with train/eval files."""
    if source == "files":
        if train_file is None:
            raise ValueError("prompts.train_file is required when prompts.source = 'files'")
        train = read_prompt_file(train_file)
        evaluation = read_prompt_file(eval_file) if eval_file else train[: min(len(train), 16)]
        return PromptSplits(train, evaluation)
    return PROMPT_SOURCES.lookup(source)(**kwargs)
