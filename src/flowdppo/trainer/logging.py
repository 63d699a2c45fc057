"""Run outputs: ``metrics.jsonl`` / ``eval.jsonl`` (flat keys), TensorBoard and wandb
(namespaced keys). Only the main process writes."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from .run_dir import write_text_atomic

logger = logging.getLogger(__name__)

# Flat key -> namespace for TensorBoard/wandb (STYLE 15).
_NAMESPACES = (("reward", "reward/"), ("adv_", "adv/"), ("time_", "perf/"), ("eval_", "eval/"))


def namespaced(key: str) -> str:
    for prefix, space in _NAMESPACES:
        if key.startswith(prefix):
            return space + key
    return "train/" + key


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


def flat_hparams(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 3e-4}}`` -> ``{"optim.lr": 3e-4}``; values TensorBoard's hparams
    table takes (bool, int, float, str), anything else as its text (lists, None)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flat_hparams(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = json.dumps(value)
    return flat


def write_hparams(writer: Any, config: dict[str, Any]) -> None:
    """The run's config as TensorBoard's hyperparameter table, in the run's own event file
    (``SummaryWriter.add_hparams`` would open a second run in a sub-folder)."""
    from torch.utils.tensorboard.summary import hparams

    for summary in hparams(flat_hparams(config), {}):
        writer.file_writer.add_summary(summary)


class RunLogger:
    """Appends JSON lines and mirrors scalars to TensorBoard / wandb."""

    def __init__(self, output_dir: Path, *, tensorboard: bool, wandb: bool, wandb_project: str,
                 config: dict[str, Any], enabled: bool = True) -> None:
        self.output_dir = output_dir
        self.enabled = enabled
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
            write_hparams(self._tb, config)
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError as err:
                raise ValueError("`logging.wandb: true` needs wandb: pip install 'flowdppo[wandb]'") from err
            self._wandb = wandb_module.init(project=wandb_project, config=config,
                                            dir=str(output_dir), name=output_dir.name)

    def log(self, file: str, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.output_dir / file, "a") as handle:
            handle.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        step = int(row["step"])
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        prefix = "eval/" if file.startswith("eval") else ""
        for key, value in scalars.items():
            name = prefix + key if prefix else namespaced(key)
            if self._tb is not None:
                self._tb.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log({(prefix + k if prefix else namespaced(k)): v
                             for k, v in scalars.items()}, step=step)

    def add_image(self, tag: str, path: Path, step: int) -> None:
        if self._tb is None:
            return
        import numpy as np
        from PIL import Image

        image = np.asarray(Image.open(path).convert("RGB"))
        self._tb.add_image(tag, image, step, dataformats="HWC")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep rows with ``step <= max_step`` (resume: drop rows written after the checkpoint).

    A torn last line (the process died, or the disk filled, mid-write) is dropped with a
    warning naming the file; a damaged line before the last one is an error naming it.
    """
    if not path.is_file():
        return
    lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    rows = []
    for position, (number, line) in enumerate(lines):
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            if position < len(lines) - 1:
                raise ValueError(f"{path}, line {number}: not a JSON row with a step ({err}); "
                                 "fix or delete that line, then resume again") from err
            logger.warning("%s: dropping its torn last line %d (%s)", path, number, err)
            continue
        if step <= max_step:
            rows.append(line)
    write_text_atomic(path, "".join(row + "\n" for row in rows))
