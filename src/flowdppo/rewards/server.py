"""``flowdppo serve-reward``: host rewards over HTTP for the ``remote`` reward.

Protocol (see :mod:`flowdppo.rewards.remote`): ``POST /score`` scores a batch with every hosted
reward (or the ``rewards`` named in the request), ``GET /health`` lists them. Answers:
200 with the rewards; 400 (JSON ``error``) for a malformed request; 404 unknown path;
413 body too large; 500 with the reward's exception message; 504 when scoring outlasts
``request_timeout_s``. Every request gets an answer; the connection then closes.

Batching (:mod:`flowdppo.rewards.service`): one worker thread scores; waiting requests of
the same image shape are coalesced into batches of at most ``max_batch_size`` images and big
ones split into chunks, so concurrent trainer processes share forward passes. With several
rewards hosted, ``weighted_sum`` = sum of weight * reward is returned too.

Only the standard library (``http.server``) is used: no web framework to install.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .base import WeightedReward, build_reward
from .remote import decode_images
from .service import WEIGHTED_SUM, RewardService, ScoreJob

logger = logging.getLogger(__name__)


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
        if self.path.rstrip("/") != "/health":
            self._send(404, {"error": f"unknown path {self.path}; use GET /health or POST /score"})
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
        if self.path.rstrip("/") != "/score":
            return 404, {"error": f"unknown path {self.path}; use POST /score"}
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return 411, {"error": "a numeric Content-Length header is required"}
        if length > self.server.max_body_bytes:
            return 413, {"error": f"body of {length} bytes exceeds {self.server.max_body_bytes}"}
        try:
            job = parse_score_request(self.rfile.read(length), list(self.server.service.rewards))
        except ValueError as err:
            return 400, {"error": str(err)}
        self.server.service.submit(job)
        if not job.done.wait(self.server.request_timeout_s):
            return 504, {"error": f"scoring took longer than {self.server.request_timeout_s} s"}
        if job.error is not None:
            return 500, {"error": job.error}
        return 200, job.result

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


class RewardHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server holding a `RewardService` (one thread per connection)."""

    daemon_threads = True  # a handler stuck on a slow reward never blocks shutdown

    def __init__(
        self,
        address: tuple[str, int],
        service: RewardService,
        request_timeout_s: float = 600.0,
        max_body_mb: float = 1024.0,
    ) -> None:
        super().__init__(address, _Handler)
        self.service, self.request_timeout_s = service, request_timeout_s
        self.max_body_bytes = int(max_body_mb * 2**20)

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
) -> tuple[RunningRewardServer, str]:
    """Serve ``rewards`` on a background thread; returns the server (``.shutdown()``) and its URL.

    ``rewards``: `WeightedReward` items, or a mapping name -> reward callable (weight 1).
    ``port=0`` picks a free port.
    """
    if isinstance(rewards, Mapping):
        rewards = [WeightedReward(name, reward) for name, reward in rewards.items()]
    service = RewardService(list(rewards), max_batch_size=max_batch_size, coalesce=coalesce)
    httpd = RewardHTTPServer((host, port), service, request_timeout_s=request_timeout_s)
    server = RunningRewardServer(httpd)
    return server, server.url


def parse_reward_spec(spec: str) -> tuple[str, float]:
    """``NAME[:WEIGHT]`` -> (name, weight); NAME is a registry name or ``module.path:factory``."""
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass  # "module:factory" with no weight
    return spec, 1.0


def _reward_kwargs(raw: str | None, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--reward-kwargs``: {name: {kwargs}} or, with one reward, its flat {kwargs}."""
    if not raw:
        return {name: {} for name in names}
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"--reward-kwargs is not JSON: {err}") from None
    if not isinstance(parsed, dict):
        raise ValueError("--reward-kwargs must be a JSON object")
    if parsed and set(parsed) <= set(names) and all(isinstance(v, dict) for v in parsed.values()):
        return {name: dict(parsed.get(name, {})) for name in names}
    if len(names) == 1:
        return {names[0]: parsed}
    raise ValueError(
        f"--reward-kwargs: with several rewards give {{name: {{kwargs}}}} keyed by {list(names)}"
    )


def build_reward_from_spec(name: str, kwargs: dict[str, Any]) -> Any:
    """A registry reward, or ``module.path:factory`` imported and called with ``kwargs``."""
    if ":" not in name:
        return build_reward(name, **kwargs)
    import importlib

    module_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"--reward {name}: cannot import {attr!r} from {module_name!r}: {err}"
        ) from None
    return factory(**kwargs)


def rewards_from_args(args: argparse.Namespace) -> list[Any]:
    """The `WeightedReward` items the ``serve-reward`` arguments ask for."""
    specs = [parse_reward_spec(spec) for spec in args.reward]
    names = [name for name, _ in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"--reward: a reward is listed twice: {names}")
    kwargs = _reward_kwargs(args.reward_kwargs, names)
    if args.device:
        for item in kwargs.values():
            item.setdefault("device", args.device)
    return [
        WeightedReward(name, build_reward_from_spec(name, kwargs[name]), weight)
        for name, weight in specs
    ]


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve-reward", help="host rewards over HTTP for the 'remote' reward"
    )
    serve.add_argument(
        "--reward",
        action="append",
        required=True,
        metavar="NAME[:WEIGHT]",
        help="registry name or module.path:factory, optional weight (repeatable)",
    )
    serve.add_argument(
        "--reward-kwargs",
        default=None,
        metavar="JSON",
        help='factory arguments: {"name": {...}}, or {...} with one reward',
    )
    serve.add_argument("--device", default=None, help="device passed to every factory (e.g. cuda)")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback)")
    serve.add_argument("--port", type=int, default=8000, help="port (0 = any free port)")
    serve.add_argument("--max-batch-size", type=int, default=64, help="images per reward call")
    serve.add_argument(
        "--request-timeout-s",
        type=float,
        default=600.0,
        help="answer 504 when scoring a request takes longer",
    )
    serve.add_argument(
        "--no-coalesce",
        action="store_true",
        help="score each request alone instead of batching waiting requests",
    )
    serve.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    service = RewardService(
        rewards_from_args(args), max_batch_size=args.max_batch_size, coalesce=not args.no_coalesce
    )
    httpd = RewardHTTPServer(
        (args.host, args.port), service, request_timeout_s=args.request_timeout_s
    )
    print(
        f"serving rewards {list(service.rewards)} at {httpd.url} (POST /score, GET /health)",
        flush=True,
    )
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        service.close()
    return 0
