"""The ``remote`` reward: score images on a reward server over HTTP, and the wire format.

A reward server (``flowdppo serve-reward``, :mod:`flowdppo.rewards.server`) hosts rewards that
need another environment (GenEval, VLM judges, big reward models). The protocol is JSON:

    POST {url}/score   {"images": base64(.npy of (B, C, H, W) float16/float32/uint8),
                        "prompts": [B str], "metadata": [B dict], "rewards": [names] (optional)}
                  ->   {"rewards": {name: [B floats]}, "info": {name: {...}}}
    GET  {url}/health  -> {"status": "ok", "rewards": [names], ...}

Float images travel in [0, 1] (float16 by default: half the bytes, error <= 2.4e-4); uint8
images are ``round(255 x)``; ``.npz`` archives are refused (zip bombs). A server started with
a token wants ``Authorization: Bearer <token>`` on every request (401 otherwise). The client
retries connection errors, timeouts and 5xx answers with exponential backoff
(``backoff_s * 2**k`` before retry k + 1); a 4xx answer is the caller's error and is not
retried. Only the standard library is used (urllib).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import math
import os
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
from .base import Reward, RewardCancelled, RewardOutput, register_reward
from .http_client import Cancellation, Cancelled, build_opener
from .preprocess import check_batch

logger = logging.getLogger(__name__)


WIRE_DTYPES = ("float16", "float32", "uint8")
TOKEN_ENV = "FLOWDPPO_REWARD_TOKEN"  # the shared token, read by both ends when not given


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
    """Base64 ``.npy`` text -> `(B, C, H, W)` float32 numpy in [0, 1].

    The header is checked before any array is built: 4 dimensions, dtype uint8/float16/
    float32/float64, and a declared size equal to the bytes that follow, so memory stays
    bounded by the request body. ``.npz`` archives are refused: a small zip can inflate to
    gigabytes, and the client never sends one. Raises `ValueError` naming the problem for
    anything else (the server answers 400).
    """
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"images: not base64 of a .npy array ({err})") from None
    if raw.startswith(b"PK"):
        raise ValueError(
            "images: .npz (zip) archives are refused, as decompression bombs could be; "
            "send base64 of a plain .npy file (np.save), as the remote reward does"
        )
    array = _read_npy(raw)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
        raise ValueError("images: float values must be finite and in [0, 1]")
    return array


_NPY_KINDS = {("u", 1), ("f", 2), ("f", 4), ("f", 8)}


def _read_npy(raw: bytes) -> np.ndarray:
    """A read-only array viewing a ``.npy`` file's bytes, its header checked first."""
    fmt = np.lib.format
    buffer = io.BytesIO(raw)
    try:
        version = fmt.read_magic(buffer)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f".npy format version {version}; expected 1.0 or 2.0")
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran_order, dtype = read(buffer)
    except ValueError as err:
        raise ValueError(f"images: not base64 of a .npy array ({err})") from None
    if dtype.fields is not None or dtype.subdtype is not None or (
        (dtype.kind, dtype.itemsize) not in _NPY_KINDS
    ):
        raise ValueError(f"images: dtype {dtype}; expected uint8, float16 or float32")
    if len(shape) != 4:
        raise ValueError(f"images: expected shape (B, C, H, W), got {shape}")
    expected, actual = math.prod(shape) * dtype.itemsize, len(raw) - buffer.tell()
    if expected != actual:
        raise ValueError(
            f"images: the .npy header declares shape {shape} {dtype} ({expected} bytes) "
            f"but {actual} bytes of data follow"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=buffer.tell())
    return array.reshape(shape, order="F" if fortran_order else "C")


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
        token (`str`, *optional*): the server's shared token (``serve-reward --token``), sent
            as ``Authorization: Bearer``; defaults to ``$FLOWDPPO_REWARD_TOKEN`` when set.

    ``cancel()`` (from any thread) ends a pending request within ~0.1 s, and every later
    one at once, with `RewardCancelled`.
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
        token: str | None = None,
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
        self._token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self._cancellation = Cancellation()
        self._opener = build_opener(self._cancellation, use_env_proxy)

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
        name, values = self._select(answer, images.shape[0])
        info = {
            "attempts": attempts,
            "latency_s": time.perf_counter() - start,
            "server": answer.get("info", {}).get(name, {}),
        }
        return torch.tensor(values, dtype=torch.float32), info

    def health(self) -> dict[str, Any]:
        """The server's ``/health`` answer (with the same retries)."""
        return self._post("/health", None)[0]

    def cancel(self) -> None:
        """Abort the pending request and refuse later ones (the run is stopping)."""
        self._cancellation.cancel()

    def _select(self, answer: Any, num: int) -> tuple[str, list[float]]:
        """The chosen reward's ``num`` scores from a ``/score`` answer, checked field by field."""
        rewards = answer.get("rewards") if isinstance(answer, dict) else None
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
        problem = _score_problem(rewards[name], num)
        if problem:
            raise RemoteRewardError(
                f"remote {self.url}: answer field rewards.{name}{problem}; the server must "
                "send one JSON number per image (NaN for an image it cannot score)"
            )
        return name, rewards[name]

    def _post(self, path: str, data: bytes | None) -> tuple[Any, int]:
        """The decoded JSON answer and the number of attempts it took; GET when ``data`` is None."""
        url, last_error = self.url + path, ""
        headers = {"Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            for attempt in range(self.max_retries + 1):
                if attempt:
                    self._cancellation.sleep(self.backoff_s * 2 ** (attempt - 1))
                try:
                    return self._attempt(url, data, headers), attempt + 1
                except _Retryable as err:
                    last_error = str(err)
                if self._cancellation.cancelled:  # the failure was the cancel shutting the socket
                    raise Cancelled("cancelled during the request")
                logger.warning("remote reward %s: attempt %d of %d failed: %s",
                               url, attempt + 1, self.max_retries + 1, last_error)
        except Cancelled as err:
            raise RewardCancelled(f"remote reward {url}: {err} (the run is stopping)") from None
        raise RemoteRewardError(
            f"remote reward {url} failed after {self.max_retries + 1} attempts; "
            f"last error: {last_error}"
        )

    def _attempt(self, url: str, data: bytes | None, headers: dict[str, str]) -> Any:
        """One request; `_Retryable` for what a retry may fix, `RemoteRewardError` for a 4xx."""
        if self._cancellation.cancelled:
            raise Cancelled("cancelled before the request")
        method = "GET" if data is None else "POST"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            message = f"HTTP {err.code}: {_error_message(err)}"
            if err.code < 500:  # the request itself is wrong: retrying cannot help
                raise RemoteRewardError(
                    f"remote reward {url} rejected the request (not retried): {message}"
                ) from None
            raise _Retryable(message) from None
        except (OSError, HTTPException, json.JSONDecodeError) as err:  # URLError is an OSError
            raise _Retryable(f"{type(err).__name__}: {getattr(err, 'reason', err)}") from None


class _Retryable(Exception):
    """An attempt's failure that a retry may fix (connection, time-out, 5xx, garbled answer)."""


def _score_problem(values: Any, num: int) -> str:
    """What is wrong with ``values`` as ``num`` scores, as a suffix of the field name ('' if fine)."""
    if not isinstance(values, list):
        return f" is a {type(values).__name__}; expected a list of {num} numbers"
    if len(values) != num:
        return f" has {len(values)} values for {num} images"
    for i, value in enumerate(values):
        if value is None:
            return f"[{i}] is null; expected a number"
        if isinstance(value, str):
            return f"[{i}] is the string {value[:40]!r}; expected a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"[{i}] is a {type(value).__name__}; expected a number"
    return ""


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
    token: str | None = None,
    device: str = "cpu",
) -> Reward:
    """A reward computed by a ``flowdppo serve-reward`` server (``device`` accepted, unused).

    Prefer ``$FLOWDPPO_REWARD_TOKEN`` to ``token``: a token in the config lands in the run's
    ``config.yaml``.
    """
    return RemoteReward(
        url,
        reward_name=reward_name,
        timeout_s=timeout_s,
        max_retries=max_retries,
        backoff_s=backoff_s,
        wire_dtype=wire_dtype,
        use_env_proxy=use_env_proxy,
        token=token,
    )
