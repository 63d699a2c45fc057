"""Reward server and ``remote`` client on loopback: values, retries, timeouts, errors, batching."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from flowdppo.cli import build_parser
from flowdppo.rewards import WeightedReward, build_reward
from flowdppo.rewards.commands import parse_reward_spec, rewards_from_args
from flowdppo.rewards.remote import encode_images
from flowdppo.rewards.server import start_reward_server
from flowdppo.rewards.service import RewardService, ScoreJob


class MeanReward:
    """mean pixel * (1 + len(prompt)); records the batch sizes it is called with."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[int] = []
        self.gate = gate

    def __call__(self, images, prompts, metadata):
        if self.gate is not None and not self.calls:
            self.gate.wait(5.0)  # the first call blocks until the test opens the gate
        self.calls.append(images.shape[0])
        lengths = torch.tensor([1.0 + len(p) for p in prompts])
        return images.float().mean(dim=(1, 2, 3)) * lengths, {"length": lengths}


def make_mean_reward(device: str = "cpu") -> MeanReward:
    """A user factory, importable as ``test_reward_server:make_mean_reward``."""
    return MeanReward()


class FailingReward:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        raise RuntimeError("boom: the reward model crashed")


@contextmanager
def serving(rewards, **kwargs):
    server, url = start_reward_server(rewards, **kwargs)
    try:
        yield url
    finally:
        server.shutdown()


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    # Rounded through float16 so the default wire format carries them exactly.
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return x.half().float()


def _post(url: str, body: bytes, path: str = "/score") -> tuple[int, dict]:
    request = urllib.request.Request(url + path, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_remote_values_equal_the_in_process_rewards():
    jpeg, mean = build_reward("jpeg_compressibility"), MeanReward()
    images, prompts = _images(5), ["a", "bb", "ccc", "dddd", "eeeee"]
    with serving([WeightedReward("jpeg", jpeg, 0.5), WeightedReward("mean", mean, 2.0)],
                 max_batch_size=2) as url:
        for name, local in (("jpeg", jpeg), ("mean", MeanReward())):
            remote = build_reward("remote", url=url, reward_name=name, timeout_s=5)
            values, info = remote(images, prompts, [{}] * 5)
            expected, _ = local(images, prompts, [{}] * 5)
            assert values.dtype == torch.float32 and values.shape == (5,)
            torch.testing.assert_close(values, expected.float(), rtol=0, atol=0)
            assert info["attempts"] == 1
        assert info["server"]["length"] == [2.0, 3.0, 4.0, 5.0, 6.0]  # per-image info comes back
        assert max(mean.calls) <= 2  # the server split 5 images into chunks of 2
        body = json.dumps({"images": encode_images(images), "prompts": prompts}).encode()
        status, answer = _post(url, body)  # all rewards: their weighted sum comes too
        assert status == 200
        weighted = [0.5 * j + 2.0 * m for j, m in
                    zip(answer["rewards"]["jpeg"], answer["rewards"]["mean"])]
        assert answer["rewards"]["weighted_sum"] == pytest.approx(weighted)
        remote = build_reward("remote", url=url, reward_name="weighted_sum")
        summed, _ = remote(images, prompts, [])
        assert summed.tolist() == pytest.approx(weighted)
        health = build_reward("remote", url=url).health()
        assert health["rewards"] == ["jpeg", "mean"] and health["max_batch_size"] == 2
        with pytest.raises(ValueError, match="set reward_name"):
            build_reward("remote", url=url)(images, prompts, [])


@pytest.mark.parametrize("wire_dtype", ["float32", "uint8"])
def test_other_wire_formats(wire_dtype):
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    if wire_dtype == "uint8":
        images = (images * 255).round() / 255
    with serving({"mean": MeanReward()}) as url:
        values, _ = build_reward("remote", url=url, wire_dtype=wire_dtype)(images, ["x"] * 3, [])
    expected, _ = MeanReward()(images, ["x"] * 3, [])
    torch.testing.assert_close(values, expected, rtol=1e-6, atol=1e-6)


def test_server_error_is_retried_then_reported():
    failing = FailingReward()
    with serving({"bad": failing}) as url:
        remote = build_reward("remote", url=url, max_retries=2, backoff_s=0.01, timeout_s=5)
        with pytest.raises(RuntimeError) as err:
            remote(_images(2), ["a", "b"], [])
    message = str(err.value)
    assert url in message and "3 attempts" in message and "HTTP 500" in message
    assert "boom: the reward model crashed" in message
    assert failing.calls == 3


def test_hanging_server_times_out_within_bounded_time():
    gate = threading.Event()
    with serving({"slow": MeanReward(gate=gate)}) as url:
        remote = build_reward("remote", url=url, timeout_s=0.3, max_retries=1, backoff_s=0.05)
        start = time.perf_counter()
        with pytest.raises(RuntimeError, match=r"2 attempts.*(timed out|Timeout)"):
            remote(_images(1), ["a"], [])
        elapsed = time.perf_counter() - start
        gate.set()  # release the worker so shutdown is immediate
    assert 0.6 <= elapsed < 3.0  # two 0.3 s timeouts and a 0.05 s backoff


def test_connection_refused_is_retried_with_backoff():
    server, url = start_reward_server({"mean": MeanReward()})
    server.shutdown()  # nothing listens there any more
    remote = build_reward("remote", url=url, max_retries=2, backoff_s=0.05, timeout_s=1)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"3 attempts; last error: URLError"):
        remote(_images(1), ["a"], [])
    assert time.perf_counter() - start >= 0.05 + 0.1  # backoff doubles: 0.05, then 0.1


def test_malformed_requests_get_400_and_are_not_retried():
    mean = MeanReward()
    good = encode_images(_images(2))
    cases = {
        b"not json": "not JSON",
        json.dumps({"prompts": ["a"]}).encode(): "'images'",
        json.dumps({"images": "@@@", "prompts": ["a"]}).encode(): "base64",
        json.dumps({"images": good, "prompts": ["a"]}).encode(): "prompts: expected a list of 2",
        json.dumps({"images": good, "prompts": ["a", "b"], "metadata": [1, 2]}).encode():
            "metadata",
        json.dumps({"images": encode_images(torch.rand(2, 3, 4), "float32"),
                    "prompts": ["a", "b"]}).encode(): "shape",
        json.dumps({"images": good, "prompts": ["a", "b"], "rewards": ["nope"]}).encode(): "nope",
    }
    with serving({"mean": mean}) as url:
        for body, fragment in cases.items():
            status, answer = _post(url, body)
            assert status == 400 and fragment in answer["error"], (body[:40], answer)
        out_of_range = np.full((1, 3, 2, 2), 2.0, dtype=np.float32)
        body = json.dumps({"images": _npy_b64(out_of_range), "prompts": ["a"]}).encode()
        status, answer = _post(url, body)
        assert status == 400 and "[0, 1]" in answer["error"]
        status, answer = _post(url, b"{}", path="/nothing")
        assert status == 404 and "POST /score" in answer["error"]
        remote = build_reward("remote", url=url, reward_name="nope", max_retries=3, backoff_s=1.0)
        start = time.perf_counter()
        with pytest.raises(RuntimeError, match=r"HTTP 400.*nope"):
            remote(_images(1), ["a"], [])
        assert time.perf_counter() - start < 0.9  # not retried: no backoff was waited
    assert mean.calls == []  # nothing malformed reached the reward


def _npy_b64(array: np.ndarray) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return base64.b64encode(buffer.getvalue()).decode()


def test_waiting_requests_are_coalesced_and_split_back():
    gate = threading.Event()
    reward = MeanReward(gate=gate)
    service = RewardService([WeightedReward("mean", reward)], max_batch_size=8)
    try:
        jobs = [_job(1, seed=0)]
        service.submit(jobs[0])  # the worker blocks inside the reward on this one
        time.sleep(0.05)
        jobs += [_job(2, seed=1), _job(3, seed=2), _job(2, seed=3, size=8)]
        for job in jobs[1:]:
            service.submit(job)
        gate.set()
        assert all(job.done.wait(5.0) for job in jobs)
    finally:
        service.close()
    # Jobs 1 and 2 (same shape) ran as one batch of 5; job 3 (other image size) alone.
    assert reward.calls == [1, 5, 2]
    for job in jobs:
        expected, _ = MeanReward()(torch.from_numpy(job.images), job.prompts, job.metadata)
        assert job.error is None
        assert job.result["rewards"]["mean"] == pytest.approx(expected.tolist())


def _job(n: int, seed: int, size: int = 4) -> ScoreJob:
    images = _images(n, size=size, seed=seed).numpy()
    return ScoreJob(images=images, prompts=[f"p{seed}{i}" * (i + 1) for i in range(n)],
                metadata=[{}] * n, names=("mean",))


def test_reward_specs_and_cli_arguments():
    assert parse_reward_spec("pickscore") == ("pickscore", 1.0)
    assert parse_reward_spec("pickscore:2.5") == ("pickscore", 2.5)
    assert parse_reward_spec("my.module:factory") == ("my.module:factory", 1.0)
    assert parse_reward_spec("my.module:factory:0.5") == ("my.module:factory", 0.5)
    args = build_parser().parse_args([
        "serve-reward", "--reward", "jpeg_compressibility:0.5",
        "--reward", "test_reward_server:make_mean_reward",
        "--reward-kwargs", '{"jpeg_compressibility": {"quality": 50}}', "--port", "0",
    ])
    rewards = rewards_from_args(args)
    assert [(r.name, r.weight) for r in rewards] == [
        ("jpeg_compressibility", 0.5), ("test_reward_server:make_mean_reward", 1.0)]
    assert rewards[0].reward.quality == 50 and isinstance(rewards[1].reward, MeanReward)
    with serving(rewards) as url:
        health = build_reward("remote", url=url).health()
    assert health["weights"] == {
        "jpeg_compressibility": 0.5, "test_reward_server:make_mean_reward": 1.0}
    bad = build_parser().parse_args(["serve-reward", "--reward", "a", "--reward", "b",
                                     "--reward-kwargs", '{"quality": 50}'])
    with pytest.raises(ValueError, match="several rewards"):
        rewards_from_args(bad)
    with pytest.raises(ValueError, match="cannot import"):
        rewards_from_args(build_parser().parse_args(["serve-reward", "--reward", "no_such_mod:f"]))
