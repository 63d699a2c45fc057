"""The ``remote`` reward: score images on a reward server over HTTP, and the wire format.

A reward server (``flowdppo serve-reward``, :mod:`flowdppo.rewards.server`) hosts rewards that
need another environment (GenEval, VLM judges, big reward models). The protocol is JSON:

    POST {url}/score   {"images": base64(.npy of (B, C, H, W) float16/float32/uint8),
                        "prompts": [B str], "metadata": [B dict], "rewards": [names] (optional)}
                  ->   {"rewards": {name: [B floats]}, "info": {name: {...}}}
    GET  {url}/health  -> {"status": "ok", "rewards": [names], ...}

Float images travel in [0, 1] (float16 by default: half the bytes, error <= 2.4e-4); uint8
images are ``round(255 x)``. The client retries connection errors, timeouts and 5xx answers
with exponential backoff (``backoff_s * 2**k`` before retry k + 1); a 4xx answer is the
caller's error and is not retried. Only the standard library is used (urllib).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from http.client import HTTPException
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import RemoteRewardError
from .base import Reward, RewardOutput, register_reward
from .preprocess import check_batch

logger = logging.getLogger(__name__)


WIRE_DTYPES = ("float16", "float32", "uint8")


def encode_images(images: Tensor, wire_dtype: str = "float16") -> str:
    """`(B, C, H, W)` [0, 1] images -> base64 text of a ``.npy`` file in ``wire_dtype``."""
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype={wire_dtype!r}; expected one of {WIRE_DTYPES}")
    x = images.detach().to("cpu", torch.float32).clamp(0, 1)
    array = (x * 255).round().to(torch.uint8).numpy() if wire_dtype == "uint8" else x.numpy()
    buffer = io.BytesIO()
    np.save(buffer, array.astype(wire_dtype, copy=False), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_images(text: str) -> np.ndarray:
    """Base64 ``.npy``/``.npz`` text -> `(B, C, H, W)` float32 numpy in [0, 1].

    Raises `ValueError` naming the problem for anything else (the server answers 400).
    """
    try:
        loaded = np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False)
    except (ValueError, OSError, EOFError, TypeError) as err:
        raise ValueError(f"images: not base64 of a .npy/.npz array ({err})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        names = loaded.files
        if "images" not in names and len(names) != 1:
            raise ValueError(
                f"images: .npz needs an 'images' array or exactly one array; has {names}"
            )
        loaded = loaded["images" if "images" in names else names[0]]
    if loaded.ndim != 4:
        raise ValueError(f"images: expected shape (B, C, H, W), got {loaded.shape}")
    if loaded.dtype == np.uint8:
        return loaded.astype(np.float32) / 255.0
    if loaded.dtype not in (np.float16, np.float32, np.float64):
        raise ValueError(f"images: dtype {loaded.dtype}; expected uint8, float16 or float32")
    array = loaded.astype(np.float32)
    if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
        raise ValueError("images: float values must be finite and in [0, 1]")
    return array


class RemoteReward:
    """Scores with one reward hosted by a reward server; see the module docstring.

    Args:
        url (`str`): the server's base URL, e.g. ``http://127.0.0.1:8000``.
        reward_name (`str`, *optional*): which hosted reward to return; defaults to the only one.
        timeout_s (`float`): socket timeout of each attempt (connect, and each wait for data).
        max_retries (`int`): retries after the first attempt.
        backoff_s (`float`): wait before the first retry; doubles each retry.
        wire_dtype (`str`): ``float16`` (default), ``float32`` (exact) or ``uint8``.
        use_env_proxy (`bool`): honour ``http_proxy``/``https_proxy`` (default: connect directly).
    """

    def __init__(
        self,
        url: str,
        reward_name: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        wire_dtype: str = "float16",
        use_env_proxy: bool = False,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote: url={url!r}; expected http://host:port")
        if timeout_s <= 0 or max_retries < 0 or backoff_s < 0:
            raise ValueError(
                f"remote: need timeout_s > 0, max_retries >= 0, backoff_s >= 0; got "
                f"{timeout_s}, {max_retries}, {backoff_s}"
            )
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"remote: wire_dtype={wire_dtype!r}; expected one of {WIRE_DTYPES}")
        self.url = url.rstrip("/")
        self.reward_name, self.wire_dtype = reward_name, wire_dtype
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        # Reward servers sit on the local network: cluster-wide http_proxy settings would
        # send loopback and intranet traffic to the proxy, so they are ignored unless asked for.
        handlers = [] if use_env_proxy else [urllib.request.ProxyHandler({})]
        self._opener = urllib.request.build_opener(*handlers)

    def __call__(
        self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> RewardOutput:
        check_batch(images, prompts, metadata, reward="remote")
        if images.shape[0] == 0:
            return torch.zeros(0), {}
        body: dict[str, Any] = {
            "images": encode_images(images, self.wire_dtype),
            "prompts": list(prompts),
            "metadata": list(metadata) if metadata else [{} for _ in prompts],
        }
        if self.reward_name is not None:
            body["rewards"] = [self.reward_name]
        start = time.perf_counter()
        answer, attempts = self._post("/score", json.dumps(body, default=_json_default).encode())
        name, values = self._select(answer)
        if len(values) != images.shape[0]:
            raise RemoteRewardError(
                f"remote {self.url}: {len(values)} rewards for {images.shape[0]} images"
            )
        info = {
            "attempts": attempts,
            "latency_s": time.perf_counter() - start,
            "server": answer.get("info", {}).get(name, {}),
        }
        return torch.tensor(values, dtype=torch.float32), info

    def health(self) -> dict[str, Any]:
        """The server's ``/health`` answer (with the same retries)."""
        return self._post("/health", None)[0]

    def _select(self, answer: dict[str, Any]) -> tuple[str, list[float]]:
        rewards = answer.get("rewards")
        if not isinstance(rewards, dict) or not rewards:
            raise RemoteRewardError(
                f"remote {self.url}: answer has no 'rewards' mapping: {str(answer)[:200]}"
            )
        name = self.reward_name
        if name is None:
            if len(rewards) != 1:
                raise ValueError(
                    f"remote {self.url} hosts {sorted(rewards)}: set reward_name to one"
                )
            name = next(iter(rewards))
        if name not in rewards:
            raise RemoteRewardError(
                f"remote {self.url}: no reward {name!r} in the answer ({sorted(rewards)})"
            )
        return name, rewards[name]

    def _post(self, path: str, data: bytes | None) -> tuple[dict[str, Any], int]:
        """The decoded JSON answer and the number of attempts it took; GET when ``data`` is None."""
        url, last_error = self.url + path, ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(
                url,
                data=data,
                method="GET" if data is None else "POST",
                headers={"Content-Type": "application/json"},
            )
            try:
                with self._opener.open(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read()), attempt + 1
            except urllib.error.HTTPError as err:
                last_error = f"HTTP {err.code}: {_error_message(err)}"
                if err.code < 500:  # the request itself is wrong: retrying cannot help
                    raise RemoteRewardError(
                        f"remote reward {url} rejected the request (not retried): {last_error}"
                    ) from None
            except (
                urllib.error.URLError,
                TimeoutError,
                ConnectionError,
                HTTPException,
                json.JSONDecodeError,
            ) as err:
                last_error = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            logger.warning(
                "remote reward %s: attempt %d of %d failed: %s",
                url,
                attempt + 1,
                self.max_retries + 1,
                last_error,
            )
        raise RemoteRewardError(
            f"remote reward {url} failed after {self.max_retries + 1} attempts; "
            f"last error: {last_error}"
        )


def _json_default(value: Any) -> Any:
    """Metadata values JSON cannot encode: tensors and arrays as lists, others as text."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _error_message(err: urllib.error.HTTPError) -> str:
    """The server's JSON ``error`` field, else the raw body (truncated)."""
    try:
        body = err.read().decode(errors="replace")
    except (OSError, HTTPException):
        return err.reason or ""
    try:
        return str(json.loads(body).get("error", body))[:500]
    except (json.JSONDecodeError, AttributeError):
        return body[:500]


@register_reward("remote")
def remote(
    url: str = "http://127.0.0.1:8000",
    reward_name: str | None = None,
    timeout_s: float = 120.0,
    max_retries: int = 3,
    backoff_s: float = 1.0,
    wire_dtype: str = "float16",
    use_env_proxy: bool = False,
    device: str = "cpu",
) -> Reward:
    """A reward computed by a ``flowdppo serve-reward`` server (``device`` accepted, unused)."""
    return RemoteReward(
        url,
        reward_name=reward_name,
        timeout_s=timeout_s,
        max_retries=max_retries,
        backoff_s=backoff_s,
        wire_dtype=wire_dtype,
        use_env_proxy=use_env_proxy,
    )
