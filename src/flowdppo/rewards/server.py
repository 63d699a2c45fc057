"""``flowdppo serve-reward``: host rewards over HTTP for the ``remote`` reward.

Protocol (see :mod:`flowdppo.rewards.remote`): ``POST /score`` scores a batch with every hosted
reward (or the ``rewards`` named in the request), ``GET /health`` lists them. Answers:
200 with the rewards; 400 (JSON ``error``) for a malformed request or a ``Content-Length``
that is not one non-negative integer; 401 without the shared token (when the server has
one); 404 unknown path; 411 no ``Content-Length`` (chunked bodies are not read); 413 body
over ``max_body_mb``; 500 with the reward's exception message; 504 when scoring outlasts
``request_timeout_s``. Every request gets an answer; the connection then closes. The body
is read only after the path, the length and the token are checked, and never past the
declared length.

Batching (:mod:`flowdppo.rewards.service`): one worker thread scores; waiting requests of
the same image shape are coalesced into batches of at most ``max_batch_size`` images and big
ones split into chunks, so concurrent trainer processes share forward passes. With several
rewards hosted, ``weighted_sum`` = sum of weight * reward is returned too.

Only the standard library (``http.server``) is used: no web framework to install. The CLI
command (``flowdppo serve-reward``) is in :mod:`flowdppo.rewards.commands`.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .base import WeightedReward
from .remote import decode_images
from .service import WEIGHTED_SUM, RewardService, ScoreJob

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_MB = 1024.0  # a 256-image 512 px float16 evaluation request is ~400 MB


def parse_score_request(body: bytes, hosted: Sequence[str]) -> ScoreJob:
    """A `ScoreJob` from a ``/score`` body; `ValueError` naming the field for anything malformed."""
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"body is not JSON: {err}") from None
    if not isinstance(request, dict) or not isinstance(request.get("images"), str):
        raise ValueError(
            "body must be a JSON object with 'images' (base64 .npy), 'prompts', 'metadata'"
        )
    images = decode_images(request["images"])
    num = images.shape[0]
    if num == 0:
        raise ValueError("images: the batch is empty")
    prompts = _list_of(request.get("prompts"), str, num, field="prompts")
    metadata = request.get("metadata") or [{} for _ in range(num)]
    metadata = _list_of(metadata, dict, num, field="metadata")
    names = request.get("rewards") or list(hosted)
    if isinstance(names, list) and WEIGHTED_SUM in names:
        names = list(hosted)  # the weighted sum needs every hosted reward
    unknown = [n for n in names if n not in hosted] if isinstance(names, list) else names
    if unknown:
        raise ValueError(f"rewards: unknown {unknown}; this server hosts {sorted(hosted)}")
    return ScoreJob(
        images=images, prompts=prompts, metadata=metadata, names=tuple(dict.fromkeys(names))
    )


def _list_of(value: Any, kind: type, num: int, *, field: str) -> list:
    """``value`` if a list of ``num`` items of ``kind``, else a `ValueError` naming ``field``."""
    if (
        not isinstance(value, list)
        or len(value) != num
        or not all(isinstance(v, kind) for v in value)
    ):
        noun = "strings" if kind is str else "objects"
        raise ValueError(f"{field}: expected a list of {num} {noun}")
    return value


class _Handler(BaseHTTPRequestHandler):
    server: RewardHTTPServer
    timeout = 120  # seconds a client may stall while sending; never a thread held forever

    def do_GET(self) -> None:
        refusal = self._refusal("/health", "GET /health or POST /score", body=False)
        if refusal:
            self._send(*refusal)
            return
        service = self.server.service
        self._send(
            200,
            {
                "status": "ok",
                "rewards": list(service.rewards),
                "weights": {n: r.weight for n, r in service.rewards.items()},
                "max_batch_size": service.max_batch_size,
            },
        )

    def do_POST(self) -> None:
        try:
            code, answer = self._score()
        except Exception as err:  # a bug here must still answer, not drop the connection
            logger.exception("reward server error")
            code, answer = 500, {"error": f"{type(err).__name__}: {err}"}
        self._send(code, answer)

    def _score(self) -> tuple[int, dict[str, Any]]:
        refusal = self._refusal("/score", "POST /score", body=True)
        if refusal:
            return refusal
        body = self.rfile.read(self._length())
        try:
            job = parse_score_request(body, list(self.server.service.rewards))
        except ValueError as err:
            return 400, {"error": str(err)}
        self.server.service.submit(job)
        if not job.done.wait(self.server.request_timeout_s):
            return 504, {"error": f"scoring took longer than {self.server.request_timeout_s} s"}
        if job.error is not None:
            return 500, {"error": job.error}
        return 200, job.result

    def _refusal(self, path: str, usage: str, body: bool) -> tuple[int, dict[str, Any]] | None:
        """The answer refusing this request before its body is read, or None to go on."""
        if self.path.rstrip("/") != path:
            return 404, {"error": f"unknown path {self.path}; use {usage}"}
        if body:
            problem = _length_problem(self.headers.get_all("Content-Length"),
                                      self.headers.get("Transfer-Encoding"))
            if problem:
                return problem
        if not self._authorized():
            self._drain()  # so the client reads the 401, not a reset connection
            return 401, {"error": "missing or wrong token: send 'Authorization: Bearer <token>' "
                                  "(remote reward: kwargs.token or $FLOWDPPO_REWARD_TOKEN)"}
        if body and self._length() > self.server.max_body_bytes:
            return 413, {"error": f"body of {self._length()} bytes exceeds "
                                  f"{self.server.max_body_bytes} (serve-reward --max-body-mb)"}
        return None

    def _length(self) -> int:
        return int(self.headers.get("Content-Length", "0"))

    def _authorized(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        sent = self.headers.get("Authorization", "")
        # Constant-time comparison: the answer time must not leak how much of it matched.
        return hmac.compare_digest(sent.encode(), f"Bearer {token}".encode())

    def _drain(self, cap: int = 2**20) -> None:
        """Read and drop up to ``cap`` bytes of a refused body (when its length is known)."""
        if self.command == "POST" and not _length_problem(
            self.headers.get_all("Content-Length"), self.headers.get("Transfer-Encoding")
        ):
            self.rfile.read(min(self._length(), cap))

    def _send(self, code: int, answer: dict[str, Any]) -> None:
        data = json.dumps(answer).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
            logger.info("client %s left before its %d answer", self.address_string(), code)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)


def _length_problem(
    lengths: list[str] | None, transfer_encoding: str | None
) -> tuple[int, dict[str, Any]] | None:
    """411/400 unless the body has exactly one non-negative integer ``Content-Length``."""
    if transfer_encoding is not None:
        return 411, {"error": "chunked (Transfer-Encoding) bodies are not accepted; "
                              "send a Content-Length header"}
    if not lengths:
        return 411, {"error": "a Content-Length header is required"}
    if len(set(lengths)) > 1:
        return 400, {"error": f"conflicting Content-Length headers {lengths}"}
    value = lengths[0].strip()
    if not (value.isascii() and value.isdigit()):  # "-1" would mean: read until EOF
        return 400, {"error": f"Content-Length {lengths[0]!r}: expected a non-negative integer"}
    return None


def exposure_warning(host: str, token: str | None) -> str | None:
    """A warning when ``host`` reaches beyond this machine and no token guards the server."""
    if token:
        return None
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:  # a host name: it may resolve to any interface
        pass
    return (
        f"serve-reward binds {host}, reachable from other machines, without a token: anyone "
        "who can reach it can use its GPU and read what it computes. Pass --token (or set "
        "$FLOWDPPO_REWARD_TOKEN) here and the same token in the remote reward, or bind "
        "127.0.0.1 and tunnel (ssh -L)."
    )


class RewardHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server holding a `RewardService` (one thread per connection)."""

    daemon_threads = True  # a handler stuck on a slow reward never blocks shutdown

    def __init__(
        self,
        address: tuple[str, int],
        service: RewardService,
        request_timeout_s: float = 600.0,
        max_body_mb: float = DEFAULT_MAX_BODY_MB,
        token: str | None = None,
    ) -> None:
        if not max_body_mb > 0:
            raise ValueError(f"--max-body-mb={max_body_mb}; expected a size in MiB > 0")
        if token is not None and not token.strip():
            raise ValueError("--token is empty; give a secret string, or none for no token")
        super().__init__(address, _Handler)
        self.service, self.request_timeout_s = service, request_timeout_s
        self.max_body_bytes = int(max_body_mb * 2**20)
        self.token = token

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class RunningRewardServer:
    """A `RewardHTTPServer` serving on a background thread; ``shutdown()`` stops everything."""

    def __init__(self, httpd: RewardHTTPServer) -> None:
        self.httpd, self.url = httpd, httpd.url
        # A short poll interval: shutdown() waits for the serving loop to notice.
        self.thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="reward-http",
            daemon=True,
        )
        self.thread.start()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.httpd.service.close()
        self.thread.join(timeout=5.0)


def start_reward_server(
    rewards: Sequence[Any] | Mapping[str, Any],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    max_batch_size: int = 64,
    coalesce: bool = True,
    request_timeout_s: float = 600.0,
    max_body_mb: float = DEFAULT_MAX_BODY_MB,
    token: str | None = None,
) -> tuple[RunningRewardServer, str]:
    """Serve ``rewards`` on a background thread; returns the server (``.shutdown()``) and its URL.

    ``rewards``: `WeightedReward` items, or a mapping name -> reward callable (weight 1).
    ``port=0`` picks a free port. ``token``: require ``Authorization: Bearer <token>``.
    """
    if isinstance(rewards, Mapping):
        rewards = [WeightedReward(name, reward) for name, reward in rewards.items()]
    service = RewardService(list(rewards), max_batch_size=max_batch_size, coalesce=coalesce)
    httpd = RewardHTTPServer((host, port), service, request_timeout_s=request_timeout_s,
                             max_body_mb=max_body_mb, token=token)
    server = RunningRewardServer(httpd)
    return server, server.url
