"""Optimizer and RNG state in files that cannot run code when read: JSON plus safetensors.

A pickle (``torch.save``) can execute anything when it is loaded, so checkpoints hold
none. Nested optimizer / scheduler state becomes a JSON tree whose tensors are stored
in a safetensors file and referenced by name::

    tensor          -> {"__tensor__": "t3"}          (the tensor itself in the .safetensors)
    tuple           -> {"__tuple__": [...]}
    dict, other keys -> {"__items__": [[key, value], ...]}   (optimizer state is keyed by int)
    dict, str keys  -> a JSON object;  int, float, bool, None, str -> themselves

RNG state is JSON too: Python's ``random`` and NumPy's Mersenne Twister as integer lists,
torch's generator bytes as hex. Checkpoints of the earlier format (``optimizer.pt``,
``rng.pt``) load with ``torch.load(weights_only=True)``, which refuses any object that
is not a tensor or plain data.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

_MARKERS = ("__tensor__", "__tuple__", "__items__")


class UnsafeFileError(ValueError):
    """A checkpoint file that holds something other than tensors and plain data."""


def encode(value: Any, tensors: dict[str, Tensor], where: str = "state") -> Any:
    """``value`` as a JSON tree; its tensors are added to ``tensors`` (CPU, contiguous)."""
    if torch.is_tensor(value):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in value):
            return {k: encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        return {"__items__": [[_plain_key(k, where), encode(v, tensors, f"{where}[{k!r}]")]
                              for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{where}: cannot store a {type(value).__name__} in a checkpoint "
                    "(only tensors, numbers, strings, lists, tuples and dicts)")


def _plain_key(key: Any, where: str) -> Any:
    if key is None or isinstance(key, (bool, int, float, str)):
        return key
    raise TypeError(f"{where}: dict key {key!r} ({type(key).__name__}) cannot be stored")


def decode(tree: Any, tensors: dict[str, Tensor], where: str = "state") -> Any:
    """The inverse of :func:`encode`; anything it would not write raises ValueError."""
    if isinstance(tree, list):
        return [decode(v, tensors, f"{where}[{i}]") for i, v in enumerate(tree)]
    if isinstance(tree, dict):
        marker = next((m for m in _MARKERS if m in tree), None)
        if marker is None:
            return {k: decode(v, tensors, f"{where}.{k}") for k, v in tree.items()}
        if len(tree) != 1:
            raise ValueError(f"{where}: malformed entry {sorted(tree)}")
        body = tree[marker]
        if marker == "__tensor__":
            if not isinstance(body, str) or body not in tensors:
                raise ValueError(f"{where}: names tensor {body!r}, which the tensor file lacks")
            return tensors[body]
        if not isinstance(body, list):
            raise ValueError(f"{where}: {marker} must hold a list")
        if marker == "__tuple__":
            return tuple(decode(v, tensors, f"{where}[{i}]") for i, v in enumerate(body))
        if not all(isinstance(p, list) and len(p) == 2 for p in body):
            raise ValueError(f"{where}: __items__ must hold [key, value] pairs")
        return {_plain_key(k, where): decode(v, tensors, f"{where}[{k!r}]") for k, v in body}
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise ValueError(f"{where}: unexpected {type(tree).__name__}")


def save_tree(value: Any, json_path: Path, tensor_path: Path) -> None:
    """Write ``value`` as ``json_path`` (structure) + ``tensor_path`` (its tensors)."""
    tensors: dict[str, Tensor] = {}
    tree = encode(value, tensors)
    save_file(tensors, str(tensor_path))
    json_path.write_text(json.dumps(tree))


def load_tree(json_path: Path, tensor_path: Path) -> Any:
    return decode(json.loads(json_path.read_text()), load_file(str(tensor_path)))


# -- RNG state -----------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states, as JSON-ready values."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(words), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": _hex(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_hex(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, words, gauss = state["python"]
    random.setstate((int(version), tuple(int(w) for w in words), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss),
                         float(cached)))
    torch.set_rng_state(_unhex(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unhex(s) for s in state["cuda"]])


def _hex(tensor: Tensor) -> str:
    return tensor.cpu().numpy().tobytes().hex()


def _unhex(text: str) -> Tensor:
    return torch.frombuffer(bytearray.fromhex(text), dtype=torch.uint8).clone()


def check_rng_state(state: Any, where: str) -> dict[str, Any]:
    """``state`` if it has the shape :func:`rng_state` writes, else a ValueError naming ``where``."""
    try:
        version, words, _ = state["python"]
        _, keys, *_ = state["numpy"]
        ok = (isinstance(version, int) and len(words) == 625 and len(keys) == 624
              and isinstance(state["torch"], str))
        bytes.fromhex(state["torch"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: not an RNG state ({err})") from err
    if not ok:
        raise ValueError(f"{where}: not an RNG state (unexpected sizes)")
    return state


# -- the earlier format: optimizer.pt / rng.pt ------------------------------------------------


def load_legacy(path: Path, rng: bool) -> Any:
    """An ``optimizer.pt`` / ``rng.pt`` of the earlier format, loaded without running code.

    ``weights_only=True`` admits tensors and plain containers only; ``rng.pt`` also holds
    NumPy's generator state (a uint32 array), so NumPy's array reconstruction is allowed for
    it and the result is checked to be exactly an RNG state.
    """
    allowed = _numpy_array_globals() if rng else []
    try:
        with torch.serialization.safe_globals(allowed):
            value = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        refused = re.search(r"GLOBAL ([\w.]+)", str(err))  # a class or function to call
        if refused is None and "Weights only load failed" in str(err):
            # torch's text advises turning the safe mode off: never; say what is wrong
            raise ValueError(f"{path}: damaged (not a torch file flowdppo wrote)") from err
        if refused is None:
            raise  # damaged or missing: the caller names the file
        raise UnsafeFileError(
            f"{path}: refused to load: it asks to call {refused.group(1)}, which is not a "
            "tensor or plain data, so reading it could run code. flowdppo never writes such "
            "objects: the file was altered or does not come from flowdppo. Resume from a "
            "checkpoint you trust (--resume-from step_N) or start a new run") from err
    return _legacy_rng(value, path) if rng else value


def _legacy_rng(value: Any, path: Path) -> dict[str, Any]:
    """The earlier ``rng.pt`` content as :func:`rng_state` values."""
    try:
        version, words, gauss = value["python"]
        name, keys, pos, has_gauss, cached = value["numpy"]
        state = {"python": [int(version), [int(w) for w in words], gauss],
                 "numpy": [str(name), np.asarray(keys, dtype=np.uint32).tolist(), int(pos),
                           int(has_gauss), float(cached)],
                 "torch": _hex(value["torch"])}
        if "cuda" in value:
            state["cuda"] = [_hex(s) for s in value["cuda"]]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{path}: not an RNG state ({err})") from err
    return check_rng_state(state, str(path))


def _numpy_array_globals() -> list:
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]

