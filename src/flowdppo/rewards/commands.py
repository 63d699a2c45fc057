"""``flowdppo serve-reward``: the command that hosts rewards over HTTP (see
:mod:`flowdppo.rewards.server` for the protocol and :mod:`flowdppo.rewards.remote` for the
client)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from .base import WeightedReward, build_reward
from .remote import TOKEN_ENV
from .server import DEFAULT_MAX_BODY_MB, RewardHTTPServer, exposure_warning
from .service import RewardService

logger = logging.getLogger(__name__)


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
        "--max-body-mb",
        type=float,
        default=DEFAULT_MAX_BODY_MB,
        help=f"largest request body in MiB, else 413 (default {DEFAULT_MAX_BODY_MB:g})",
    )
    serve.add_argument(
        "--token",
        default=None,
        help=f"shared secret clients must send (Authorization: Bearer); default ${TOKEN_ENV}, "
        "which keeps it out of the process list",
    )
    serve.add_argument(
        "--no-coalesce",
        action="store_true",
        help="score each request alone instead of batching waiting requests",
    )
    serve.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    httpd = server_from_args(args)
    print(
        f"serving rewards {list(httpd.service.rewards)} at {httpd.url} (POST /score, GET /health)"
        + ("; token required" if httpd.token else ""),
        flush=True,
    )
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        httpd.service.close()
    return 0


def server_from_args(args: argparse.Namespace) -> RewardHTTPServer:
    """The (bound, not yet serving) server the ``serve-reward`` arguments describe."""
    if not args.max_body_mb > 0:
        raise ValueError(f"--max-body-mb={args.max_body_mb}; expected a size in MiB > 0")
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    warning = exposure_warning(args.host, token)
    if warning:
        logger.warning(warning)
    service = RewardService(
        rewards_from_args(args), max_batch_size=args.max_batch_size, coalesce=not args.no_coalesce
    )
    try:
        return RewardHTTPServer(
            (args.host, args.port),
            service,
            request_timeout_s=args.request_timeout_s,
            max_body_mb=args.max_body_mb,
            token=token,
        )
    except BaseException:
        service.close()
        raise


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
    """A registry reward, or ``module.path:factory`` (the registry resolves dotted paths)."""
    try:
        return build_reward(name, **kwargs)
    except ValueError as err:
        raise ValueError(f"--reward {name}: {err}") from None


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
