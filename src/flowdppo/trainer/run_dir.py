"""A run directory's lifecycle: naming, claiming, refusing to mix runs, overwriting on purpose,
and what a resume may change.

A directory is a *run* when it holds ``config.yaml``. A fresh run needs an empty (or new)
directory; ``--resume`` needs a run; ``--overwrite`` clears a directory that holds only
what runs write (never foreign files).
"""

from __future__ import annotations

import errno
import fnmatch
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# What a run writes into its directory (``--overwrite`` deletes only these).
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "eval.jsonl", "checkpoints", "samples",
               "tensorboard", "wandb", "resume_overrides.jsonl")
# Fields a resume may change: they do not change what the run trains (``*`` as in fnmatch).
RESUME_MAY_CHANGE = ("train.num_iterations", "train.micro_batch_size", "sampling.sample_batch_size",
                     "eval.*", "checkpoint.*", "logging.*", "device", "num_threads", "output_dir",
                     "model.compile", "model.gradient_checkpointing", "rewards.async_workers",
                     "rewards.items.*.kwargs.url", "rewards.items.*.kwargs.timeout_s",
                     "rewards.items.*.kwargs.max_retries", "rewards.items.*.kwargs.backoff_s")
OVERRIDES_LOG = "resume_overrides.jsonl"


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def default_output_dir(recipe: str, seed: int, root: Path = Path("runs")) -> Path:
    """``runs/<recipe>__seed<seed>__<YYYYmmdd-HHMMSS>``, claimed (created empty) so that two
    runs started in the same second get different folders (``-2``, ``-3``, ...)."""
    base = f"{recipe}__seed{seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = root / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ValueError(f"could not find a free run directory under {root} for {base}")


def checkpoint_steps(output_dir: Path) -> list[int]:
    steps = []
    for path in (output_dir / "checkpoints").glob("step_*"):
        tail = path.name[len("step_"):]
        if path.is_dir() and tail.isdigit():
            steps.append(int(tail))
    return sorted(steps)


def prepare_output_dir(output_dir: Path, resume: bool) -> None:
    """Refuse a directory that is not right for the run: a file, an unwritable folder, a run
    (unless resuming it), a non-empty folder that is not a run; create it otherwise."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output directory {output_dir} is a file; choose another --output-dir")
    has_run = (output_dir / "config.yaml").is_file()
    if resume and not has_run:
        raise ValueError(f"--resume {output_dir}: no run there (config.yaml missing); give the "
                         "output directory of an earlier run")
    if not resume and has_run:
        steps = checkpoint_steps(output_dir)
        state = (f"its last checkpoint is step {steps[-1]}" if steps else
                 "it stopped before its first checkpoint; --resume restarts it from step 0")
        raise ValueError(f"output directory {output_dir} already holds a run ({state}); pass "
                         f"--resume {output_dir} to continue it, --overwrite to replace it, or "
                         "choose another --output-dir")
    if not resume and output_dir.is_dir() and any(output_dir.iterdir()):
        names = sorted(p.name for p in output_dir.iterdir())
        raise ValueError(f"output directory {output_dir} is not empty and holds no run "
                         f"(config.yaml missing; it has {_listing(names)}): it is not a "
                         "resumable run; choose another --output-dir, or pass --overwrite if "
                         "these are leftovers of a run")
    _make_writable_dir(output_dir)


def _make_writable_dir(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=output_dir)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        reason = "no space left on device" if err.errno == errno.ENOSPC else err.strerror or err
        raise ValueError(f"output directory {output_dir} cannot be written ({reason}); choose "
                         "another --output-dir or fix its permissions") from err


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def clear_run(output_dir: Path) -> None:
    """``--overwrite``: delete a finished or abandoned run's files, and only those."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise ValueError(f"output directory {output_dir} is a file; choose another --output-dir")
    foreign = sorted(p.name for p in output_dir.iterdir()
                     if p.name not in RUN_ENTRIES and not p.name.startswith("."))
    if foreign:
        raise ValueError(f"--overwrite {output_dir}: refused, it holds files no run writes "
                         f"({_listing(foreign)}); move them away or choose another --output-dir")
    for path in output_dir.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    logger.warning("--overwrite: removed the earlier run in %s", output_dir)


# -- what a resume may change ---------------------------------------------------------------


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a config dict; lists of mappings get their index as a key part."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        out = {f"{prefix}length": len(tree)} if prefix else {}
        for i, value in enumerate(tree):
            out.update(flatten(value, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``key: (saved, new)`` for every field that differs (``output_dir`` excepted)."""
    old, now = flatten(saved), flatten(new)
    keys = sorted(set(old) | set(now))
    return {k: (old.get(k), now.get(k)) for k in keys
            if old.get(k) != now.get(k) and k != "output_dir"}


def check_resume_changes(run: Path, saved: dict[str, Any], new: dict[str, Any]
                         ) -> dict[str, tuple[Any, Any]]:
    """The changes a resume of ``run`` makes; refuses those that redefine the run."""
    changes = config_changes(saved, new)
    schedule = new.get("optim", {}).get("schedule", "constant")
    defining = {k: v for k, v in changes.items()
                if not any(fnmatch.fnmatchcase(k, pattern) for pattern in RESUME_MAY_CHANGE)
                or (k == "train.num_iterations" and schedule != "constant")}
    if defining:
        listed = ", ".join(f"`{k}` ({a!r} -> {b!r})" for k, (a, b) in defining.items())
        extra = (" (`train.num_iterations` sets the length of the "
                 f"`optim.schedule={schedule}` LR schedule)" if "train.num_iterations" in defining
                 else "")
        raise ValueError(f"--resume {run}: these fields define the run and differ from its "
                         f"config.yaml: {listed}{extra}. Drop those overrides, or start a new "
                         "run for the new setting. A resume may change: "
                         f"{', '.join(RESUME_MAY_CHANGE)}")
    return changes


def record_resume_changes(run: Path, step: int, changes: dict[str, tuple[Any, Any]],
                          config_text: str) -> None:
    """Append the changes to ``resume_overrides.jsonl`` and make ``config.yaml`` the new config
    (so the next resume continues with it)."""
    if not changes:
        return
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed_at_step": step,
           "changes": {k: {"from": a, "to": b} for k, (a, b) in changes.items()}}
    with open(run / OVERRIDES_LOG, "a") as handle:
        handle.write(json.dumps(row) + "\n")
    write_text_atomic(run / "config.yaml", config_text)
    logger.info("resume: changed %s (recorded in %s)", ", ".join(changes), run / OVERRIDES_LOG)


def resume_hint(output_dir: Path) -> str:
    """What a user can do after a failure, given what the run left on disk."""
    steps = checkpoint_steps(output_dir)
    if steps:
        return (f"Checkpoints up to step {steps[-1]} are kept; continue with "
                f"`flowdppo train --resume {output_dir}`")
    return (f"No checkpoint was written before the failure, so there is nothing to continue "
            f"from; `flowdppo train --resume {output_dir}` starts the run again from step 0 "
            "with its saved config")
