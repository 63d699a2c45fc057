"""Training the toy world against a reward hosted by ``serve-reward`` on loopback.

A tiny random toy base (no pretraining) is trained with the ``remote`` reward pointing at
:func:`flowdppo.rewards.server.start_reward_server`. Checks: the server scores exactly the
planned prompts with their metadata, and the trainer logs the values the server computed;
LoRA weights move. A server that answers 500 and one that never answers both stop training
with an error naming the URL after the configured retries, in bounded time.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch

from flowdppo.config import load_config, resolve
from flowdppo.rewards.server import start_reward_server
from flowdppo.trainer.commands import RECIPES


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    """A random toy model with the digits vocabulary, saved like a pretrained base."""
    from flowdppo.models.toy import ToyFlowModel
    from flowdppo.worlds.digits import BASE_RECIPE, vocabulary

    directory = tmp_path_factory.mktemp("tiny_base")
    model = ToyFlowModel.create(vocabulary(BASE_RECIPE["templates"]), num_layers=1, num_heads=2,
                                head_dim=16, text_dim=32, max_length=8, seed=0)
    model.save_pretrained(directory)
    return directory


class LabelBrightness:
    """``mean pixel * (1 + label)``: needs the images and the metadata to arrive intact.
    Records every call (prompts, labels, values). ``gate``: block until it is set."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[tuple[list[str], list[int], list[float]]] = []
        self.gate = gate

    def __call__(self, images, prompts, metadata):
        if self.gate is not None:
            self.gate.wait(30.0)
        labels = [int(m["label"]) for m in metadata]
        values = images.float().mean(dim=(1, 2, 3)) * (1.0 + torch.tensor(labels).float())
        self.calls.append((list(prompts), labels, values.tolist()))
        return values, {}


class Crashing:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        raise RuntimeError("reward model out of memory")


def remote_overrides(base: Path, url: str, **client) -> list[str]:
    item = {"name": "remote", "kwargs": {"url": url, **client}}
    overrides = [f"model.pretrained={base}", "train.num_iterations=2", "sampling.num_steps=4",
                 "sampling.sde_steps.count=2", "sampling.sde_steps.range=[0.0, 0.75]",
                 "sampling.group_size=3", "sampling.num_groups=2", "sampling.eval_num_steps=3",
                 "eval.max_prompts=2", "eval.samples_per_prompt=2", "eval.every=0",
                 "eval.at_start=false", "eval.monitors=[]", "checkpoint.every=2",
                 "logging.progress_bar=false", "logging.tensorboard=false", "optim.lr=0.05",
                 "device=cpu", f"rewards.items={json.dumps([item])}"]
    return overrides


def remote_config(base: Path, url: str, **client):
    """toy_dppo shrunk to seconds, with the remote reward as its only reward."""
    return resolve(load_config(str(RECIPES / "toy_dppo.yaml"), remote_overrides(base, url, **client)))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_training_uses_the_served_reward(tiny_base, tmp_path):
    from flowdppo.trainer.loop import Trainer

    reward = LabelBrightness()
    server, url = start_reward_server({"brightness": reward})
    try:
        trainer = Trainer(remote_config(tiny_base, url, timeout_s=10.0, max_retries=0),
                          tmp_path / "run")
        plans = [trainer.plan(it) for it in range(2)]
        before = {n: p.detach().clone() for n, p in trainer.params.items()}
        trainer.run()
    finally:
        server.shutdown()
    # One request per rollout (6 images fit one sampling chunk), then the final evaluation.
    assert len(reward.calls) == 3
    rows = read_rows(tmp_path / "run" / "metrics.jsonl")
    for plan, (prompts, labels, values), row in zip(plans, reward.calls, rows):
        assert prompts == plan.prompts
        assert labels == [m["label"] for m in plan.metadata]
        assert row["reward_remote"] == pytest.approx(sum(values) / len(values), rel=1e-5)
        assert math.isfinite(row["loss"]) and row["grad_norm"] > 0
    (evaluation,) = read_rows(tmp_path / "run" / "eval.jsonl")
    eval_values = reward.calls[2][2]
    assert evaluation["reward_remote"] == pytest.approx(sum(eval_values) / len(eval_values),
                                                        rel=1e-5)
    moved = [n for n, p in trainer.params.items() if not torch.equal(before[n], p.detach())]
    assert moved, "no LoRA weight changed"


def _train_until_failure(tiny_base, tmp_path, url: str, **client) -> tuple[str, float]:
    from flowdppo.trainer.loop import Trainer

    trainer = Trainer(remote_config(tiny_base, url, **client), tmp_path / "run")
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as caught:
        trainer.run()
    return str(caught.value), time.perf_counter() - start


def test_a_server_error_fails_training_after_the_retries(tiny_base, tmp_path):
    reward = Crashing()
    server, url = start_reward_server({"brightness": reward})
    try:
        message, elapsed = _train_until_failure(tiny_base, tmp_path, url, timeout_s=5.0,
                                                max_retries=2, backoff_s=0.05)
    finally:
        server.shutdown()
    assert reward.calls == 3  # the first attempt and two retries, each answered 500
    assert f"{url}/score" in message and "after 3 attempts" in message
    assert "HTTP 500" in message and "out of memory" in message
    assert elapsed < 10.0


def test_the_cli_reports_a_failing_server_in_one_line(tiny_base, tmp_path, capsys):
    from flowdppo.cli import main

    server, url = start_reward_server({"brightness": Crashing()})
    try:
        code = main(["train", "--config", "toy_dppo", "--output-dir", str(tmp_path / "run"),
                     *remote_overrides(tiny_base, url, timeout_s=5.0, max_retries=0)])
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert code == 1
    assert "flowdppo train: error: remote reward" in err and "--resume" in err
    assert "Traceback" not in err


def test_a_hanging_server_fails_training_after_the_timeouts(tiny_base, tmp_path):
    gate = threading.Event()
    server, url = start_reward_server({"brightness": LabelBrightness(gate)})
    try:
        message, elapsed = _train_until_failure(tiny_base, tmp_path, url, timeout_s=0.5,
                                                max_retries=1, backoff_s=0.05)
    finally:
        gate.set()  # let the worker finish so the server shuts down promptly
        server.shutdown()
    assert f"{url}/score" in message and "after 2 attempts" in message
    assert "timed out" in message
    assert elapsed < 10.0


def test_ctrl_c_while_the_server_stalls_stops_training_within_seconds(tiny_base, tmp_path):
    """Fault: the reward thread kept retrying after Ctrl-C (88 s here, ~8 min at defaults)."""
    import os
    import signal
    import subprocess
    import sys

    from stalled_server import StalledServer

    with StalledServer() as server:
        command = [sys.executable, "-m", "flowdppo.cli", "train", "--config", "toy_dppo",
                   "--output-dir", str(tmp_path / "run"),
                   *remote_overrides(tiny_base, server.url, timeout_s=20.0, max_retries=1)]
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        try:
            assert server.accepted.wait(120.0), "training never asked the reward server"
            time.sleep(0.5)
            start = time.perf_counter()
            child.send_signal(signal.SIGINT)
            child.wait(timeout=60.0)  # before the fix: 2 attempts x 20 s + backoff
            elapsed = time.perf_counter() - start
        finally:
            child.kill()
            child.wait()
        err = child.stderr.read()
    assert child.returncode == 130 and "interrupted" in err, err[-2000:]  # one line, no traceback
    assert "Traceback" not in err, err[-2000:]
    assert elapsed < 10.0, (elapsed, err[-2000:])  # ~2 s of it is torch's own exit
    assert server.connections == 1  # no retry started after Ctrl-C
