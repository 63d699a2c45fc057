"""Stopping the reward service fast: `RewardSet.cancel`, the remote client's waits, signals.

Fault (issue 10): Ctrl-C while a remote request stalls exited ~88 s later, because the
reward thread kept retrying (about 8 minutes at the defaults). Every server here is on
127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from flowdppo.rewards import RewardSet, WeightedReward
from flowdppo.rewards.base import RewardCancelled
from flowdppo.rewards.remote import RemoteReward
from flowdppo.trainer import interrupt
from stalled_server import StalledServer

TESTS = Path(__file__).parent


def _remote_set(url: str, **client) -> RewardSet:
    client = {"timeout_s": 30.0, "max_retries": 5, "backoff_s": 1.0, **client}
    return RewardSet([WeightedReward("remote", RemoteReward(url, **client))], num_workers=1)


def _batch(num: int = 2):
    return torch.zeros(num, 3, 4, 4), ["a"] * num, [{}] * num


def _assert_cancelled_fast(rewards: RewardSet, futures: list) -> float:
    start = time.perf_counter()
    rewards.cancel()
    for future in futures:
        assert isinstance(future.exception(timeout=1.0), RewardCancelled)
    assert rewards.close(timeout_s=1.0), "a reward worker still runs 1 s after cancel()"
    return time.perf_counter() - start


def test_cancel_stops_a_request_stalled_in_recv():
    with StalledServer() as server:
        rewards = _remote_set(server.url)
        futures = [rewards.submit(*_batch()) for _ in range(3)]
        assert server.accepted.wait(5.0)
        time.sleep(0.2)  # the worker is now blocked reading the answer
        elapsed = _assert_cancelled_fast(rewards, futures)
    assert elapsed < 1.0
    assert server.connections == 1  # no retry was started after the cancel


def test_cancel_stops_a_retry_backoff():
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()  # nothing listens: the first attempt is refused, then a 30 s backoff
    rewards = _remote_set(url, backoff_s=30.0)
    future = rewards.submit(*_batch())
    time.sleep(0.3)
    assert not future.done()
    assert _assert_cancelled_fast(rewards, [future]) < 1.0


def test_cancel_stops_a_stalled_connect():
    # A listener whose accept queue is full drops further SYNs: connect() then hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers = []
    try:
        for _ in range(8):
            sock = socket.socket()
            sock.settimeout(0.3)
            try:
                sock.connect(address)
            except TimeoutError:
                sock.close()
                break
            fillers.append(sock)
        else:
            pytest.skip("this kernel never let connect() stall on a full backlog")
        rewards = _remote_set(f"http://{address[0]}:{address[1]}")
        future = rewards.submit(*_batch())
        time.sleep(0.3)
        assert not future.done()
        assert _assert_cancelled_fast(rewards, [future]) < 1.0
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


def test_cancel_fails_futures_even_when_the_reward_cannot_stop():
    gate = threading.Event()

    def stuck(images, prompts, metadata):
        gate.wait(10.0)  # an in-process reward model that ignores cancellation
        return torch.zeros(len(prompts)), {}

    rewards = RewardSet([WeightedReward("stuck", stuck)], num_workers=1)
    future = rewards.submit(*_batch())
    time.sleep(0.1)
    start = time.perf_counter()
    rewards.cancel()
    assert isinstance(future.exception(timeout=1.0), RewardCancelled)
    assert time.perf_counter() - start < 1.0
    assert not rewards.close(timeout_s=0.1)  # still inside the reward ...
    assert all(t.daemon for t in threading.enumerate() if t.name.startswith("flowdppo-reward"))
    gate.set()  # ... which cannot hold the interpreter's exit (daemon), and ends here
    assert rewards.close(timeout_s=5.0)
    late = rewards.submit(*_batch())
    assert isinstance(late.exception(timeout=0), RewardCancelled)
    with pytest.raises(RewardCancelled):
        rewards.compute(*_batch())


def test_close_without_cancel_still_finishes_queued_work():
    rewards = RewardSet([WeightedReward("z", lambda i, p, m: (torch.ones(len(p)), {}))],
                        num_workers=2)
    futures = [rewards.submit(*_batch(n)) for n in (1, 2, 3)]
    assert rewards.close()
    assert [f.result()[0]["z"].tolist() for f in futures] == [[1.0], [1.0] * 2, [1.0] * 3]


def _wait_for(condition, seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_first_signal_asks_to_stop_second_one_insists():
    calls = []
    previous = signal.getsignal(signal.SIGINT)
    with interrupt.stop_on_signals(lambda: calls.append("cancel")) as stop:
        assert not stop.requested and not interrupt.stop_requested()
        interrupt.check_stop()  # nothing requested: returns
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(lambda: stop.requested)
        assert calls == ["cancel"] and stop.signal_name == "SIGTERM"
        assert interrupt.stop_requested()
        with pytest.raises(interrupt.Interrupted, match="SIGTERM"):
            interrupt.check_stop()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            _wait_for(lambda: False, 2.0)
        assert calls == ["cancel"]  # callbacks run once, on the first signal
    assert signal.getsignal(signal.SIGINT) is previous
    assert not interrupt.stop_requested()


def test_an_error_caused_by_the_stop_surfaces_as_interrupted():
    with pytest.raises(interrupt.Interrupted) as caught, interrupt.stop_on_signals():
        os.kill(os.getpid(), signal.SIGINT)
        assert _wait_for(interrupt.stop_requested)
        raise RewardCancelled("the reward wait was cut short")
    assert isinstance(caught.value.__cause__, RewardCancelled)
    with pytest.raises(ValueError), interrupt.stop_on_signals():  # no signal: errors pass as is
        raise ValueError("a real bug")


_CHILD = """
import signal, sys, time, torch
# A terminal's Ctrl-C, even when this test runs where SIGINT is ignored (a background CI
# job): Python installs no KeyboardInterrupt handler for a signal ignored at start-up.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {tests!r})
from flowdppo.rewards import RewardSet, WeightedReward
from flowdppo.rewards.remote import RemoteReward
from flowdppo.trainer.interrupt import stop_on_signals
remote = RemoteReward({url!r}, timeout_s=20.0, max_retries=3, backoff_s=1.0)
rewards = RewardSet([WeightedReward("remote", remote)], num_workers=1)
future = rewards.submit(torch.zeros(1, 3, 4, 4), ["a"], [{{}}])
print("waiting", flush=True)
if {graceful}:
    with stop_on_signals(rewards.cancel):
        future.result()
else:
    future.result()
"""


@pytest.mark.parametrize("graceful", [False, True], ids=["plain", "stop_on_signals"])
def test_ctrl_c_during_a_stalled_request_exits_within_seconds(graceful):
    with StalledServer() as server:
        code = _CHILD.format(tests=str(TESTS), url=server.url, graceful=graceful)
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        try:
            assert child.stdout.readline().strip() == "waiting"
            assert server.accepted.wait(30.0)
            time.sleep(0.3)
            start = time.perf_counter()
            child.send_signal(signal.SIGINT)
            child.wait(timeout=30.0)  # before the fix: 20 s x 4 attempts + backoff
            elapsed = time.perf_counter() - start
        finally:
            child.kill()
            child.wait()
        err = child.stderr.read()
    assert child.returncode != 0
    # A Python that imported torch takes ~2 s to exit on a loaded 2-core machine, signal or
    # not; the fault was 80+ s here (and ~8 minutes at the client's defaults).
    assert elapsed < 8.0, (elapsed, err[-2000:])
    assert ("Interrupted: stopped by SIGINT" if graceful else "KeyboardInterrupt") in err
