"""Hostile or broken input to ``serve-reward`` and broken answers to the ``remote`` client.

Each test injects one fault found by the fault-injection pass (issue 10, Deliver 6): a
``.npz`` zip bomb, lying ``Content-Length`` headers, the body limit from the CLI, a shared
token, and a server that answers strings or nulls where scores belong. Loopback only.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from flowdppo.cli import build_parser
from flowdppo.errors import RemoteRewardError
from flowdppo.rewards import build_reward
from flowdppo.rewards.commands import server_from_args
from flowdppo.rewards.remote import decode_images, encode_images
from flowdppo.rewards.server import (
    RunningRewardServer,
    exposure_warning,
    start_reward_server,
)


def _mean_reward(images, prompts, metadata):
    return images.float().mean(dim=(1, 2, 3)), {}


@contextmanager
def serving(**kwargs):
    server, url = start_reward_server({"mean": _mean_reward}, **kwargs)
    try:
        yield url
    finally:
        server.shutdown()


def _body(num: int = 2) -> bytes:
    images = encode_images(torch.zeros(num, 3, 4, 4))
    return json.dumps({"images": images, "prompts": ["a"] * num}).encode()


def _raw_request(url: str, head: str, body: bytes = b"", close_write: bool = True) -> tuple[int, dict]:
    """Send ``head`` (request line and headers) and ``body`` on a raw socket; status, JSON."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        if close_write:
            sock.shutdown(socket.SHUT_WR)  # EOF: a server that reads "to the end" gets the body
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


def _npz_bomb_b64(megabytes: int) -> str:
    """Base64 of an ``.npz`` holding ``megabytes`` MB of float16 zeros, deflated ~1000:1."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=np.zeros((megabytes, 8, 256, 256), dtype=np.float16))
    # (B, C, H, W) = (megabytes, 8, 256, 256): 8 x 256 x 256 float16 is 1 MiB per image.
    return base64.b64encode(buffer.getvalue()).decode()


def test_npz_zip_bomb_is_refused_before_decompressing(tmp_path):
    bomb = _npz_bomb_b64(64)  # 64 MiB of zeros as ~90 KB of base64
    assert len(bomb) < 100_000
    with pytest.raises(ValueError, match=r"\.npz.*refused"):
        decode_images(bomb)
    # Peak memory, in a fresh process: decoding the bomb must not inflate it.
    (tmp_path / "bomb.txt").write_text(bomb)
    script = textwrap.dedent(f"""
        import resource
        from pathlib import Path
        from flowdppo.rewards.remote import decode_images
        bomb = Path({str(tmp_path / "bomb.txt")!r}).read_text()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            decode_images(bomb)
        except ValueError:
            pass
        print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)
    before_kb, after_kb = map(int, done.stdout.split())
    # Before the fix: +220 MB (inflated, then copied to float32); after: nothing measurable.
    assert after_kb - before_kb < 16 * 1024, (before_kb, after_kb)


def test_npy_whose_header_lies_about_its_shape_is_refused():
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((1, 3, 4, 4), dtype=np.float32))
    raw = buffer.getvalue()
    lying = raw.replace(b"(1, 3, 4, 4)", b"(9, 3, 4, 4)")  # same header length
    assert lying != raw
    with pytest.raises(ValueError, match=r"declares shape \(9, 3, 4, 4\).*bytes"):
        decode_images(base64.b64encode(lying).decode())
    huge = io.BytesIO()  # 314 GB declared, 64 bytes sent: refused without allocating
    np.lib.format.write_array_header_1_0(
        huge, {"descr": "<f4", "fortran_order": False, "shape": (100_000, 3, 512, 512)})
    huge.write(bytes(64))
    with pytest.raises(ValueError, match=r"declares shape \(100000, 3, 512, 512\)"):
        decode_images(base64.b64encode(huge.getvalue()).decode())
    obj = io.BytesIO()
    np.save(obj, np.array([[[[1]]]], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="dtype"):
        decode_images(base64.b64encode(obj.getvalue()).decode())
    # A big-endian float32 .npy (another machine's np.save) still decodes, exactly.
    big = np.random.default_rng(0).random((2, 3, 4, 4)).astype(">f4")
    other = io.BytesIO()
    np.save(other, big)
    np.testing.assert_array_equal(decode_images(base64.b64encode(other.getvalue()).decode()),
                                  big.astype(np.float32))


@pytest.mark.parametrize("length, code, fragment", [
    ("-1", 400, "non-negative integer"),
    ("abc", 400, "non-negative integer"),
    ("+12", 400, "non-negative integer"),
    (None, 411, "Content-Length header is required"),
])
def test_bad_content_length_is_rejected_without_reading(length, code, fragment):
    body = _body()
    headers = "POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    if length is not None:
        headers += f"Content-Length: {length}\r\n"
    with serving() as url:
        status, answer = _raw_request(url, headers, body)
    assert status == code and fragment in answer["error"], answer


def test_conflicting_content_lengths_and_chunked_bodies_are_rejected():
    body = _body()
    with serving() as url:
        status, answer = _raw_request(
            url, f"POST /score HTTP/1.1\r\nContent-Length: {len(body)}\r\n"
                 f"Content-Length: {len(body) + 5}\r\n", body)
        assert status == 400 and "Content-Length" in answer["error"]
        status, answer = _raw_request(
            url, "POST /score HTTP/1.1\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n")
        assert status == 411 and "chunked" in answer["error"]
        status, answer = _raw_request(  # the same body, honestly sized, is scored
            url, f"POST /score HTTP/1.1\r\nContent-Length: {len(body)}\r\n", body)
        assert status == 200 and answer["rewards"]["mean"] == [0.0, 0.0]


def test_max_body_mb_flag_sets_the_limit():
    args = build_parser().parse_args(["serve-reward", "--reward", "jpeg_compressibility",
                                      "--port", "0", "--max-body-mb", "0.001"])
    httpd = server_from_args(args)
    assert httpd.max_body_bytes == 1048
    server = RunningRewardServer(httpd)
    try:
        big = _body(num=8)
        assert len(big) > 1048
        status, answer = _raw_request(
            server.url, f"POST /score HTTP/1.1\r\nContent-Length: {len(big)}\r\n", big)
    finally:
        server.shutdown()
    assert status == 413 and "--max-body-mb" in answer["error"]
    default = build_parser().parse_args(["serve-reward", "--reward", "jpeg_compressibility"])
    assert default.max_body_mb == 1024.0
    with pytest.raises(ValueError, match="--max-body-mb"):
        server_from_args(build_parser().parse_args(
            ["serve-reward", "--reward", "jpeg_compressibility", "--port", "0",
             "--max-body-mb", "0"]))


def test_shared_token_is_required_when_set(monkeypatch):
    images, prompts = torch.zeros(2, 3, 4, 4), ["a", "b"]
    monkeypatch.delenv("FLOWDPPO_REWARD_TOKEN", raising=False)
    with serving(token="s3cret") as url:
        values, _ = build_reward("remote", url=url, token="s3cret")(images, prompts, [])
        assert values.tolist() == [0.0, 0.0]
        for token in (None, "wrong"):
            remote = build_reward("remote", url=url, token=token, max_retries=3, backoff_s=5.0)
            with pytest.raises(RemoteRewardError, match=r"HTTP 401.*token"):
                remote(images, prompts, [])  # not retried: no 5 s backoff waited
            with pytest.raises(RemoteRewardError, match="HTTP 401"):
                remote.health()
        monkeypatch.setenv("FLOWDPPO_REWARD_TOKEN", "s3cret")  # the client's env var
        values, _ = build_reward("remote", url=url)(images, prompts, [])
        assert values.tolist() == [0.0, 0.0]
    # The CLI takes the token from --token or the same env var.
    args = build_parser().parse_args(["serve-reward", "--reward", "jpeg_compressibility",
                                      "--port", "0"])
    httpd = server_from_args(args)
    httpd.server_close()
    assert httpd.token == "s3cret"
    monkeypatch.delenv("FLOWDPPO_REWARD_TOKEN")
    httpd = server_from_args(args)
    httpd.server_close()
    assert httpd.token is None


def test_binding_beyond_loopback_without_a_token_warns(caplog):
    for host in ("0.0.0.0", "::", "192.168.1.5", "gpu-node-3"):
        message = exposure_warning(host, token=None)
        assert message is not None and "--token" in message and host in message
        assert exposure_warning(host, token="t") is None
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert exposure_warning(host, token=None) is None
    args = build_parser().parse_args(["serve-reward", "--reward", "jpeg_compressibility",
                                      "--port", "0", "--host", "127.0.0.1"])
    with caplog.at_level(logging.WARNING):
        server_from_args(args).server_close()
    assert not [r for r in caplog.records if "token" in r.getMessage()]


class _FixedAnswer(BaseHTTPRequestHandler):
    """Answers every POST with the server's ``answer`` JSON (a reward server gone wrong)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        data = json.dumps(self.server.answer).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("scores, fragment", [
    (["0.5", "0.7"], r"rewards\.mean\[0\] is the string '0\.5'; expected a number"),
    ([0.5, None], r"rewards\.mean\[1\] is null; expected a number"),
    ([0.5, True], r"rewards\.mean\[1\] is a bool"),
    ("0.5", r"rewards\.mean is a str; expected a list of 2 numbers"),
    ([[0.5], [0.7]], r"rewards\.mean\[0\] is a list"),
])
def test_non_numeric_scores_from_a_server_are_a_clear_error(scores, fragment):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _FixedAnswer)
    httpd.answer = {"rewards": {"mean": scores}}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        remote = build_reward("remote", url=url, max_retries=0)
        with pytest.raises(RemoteRewardError, match=fragment) as err:
            remote(torch.zeros(2, 3, 4, 4), ["a", "b"], [])
        assert url in str(err.value)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_urllib_sees_the_401_answer_not_a_reset():
    """A refused request's body is drained first, so the client reads the answer."""
    with serving(token="t") as url:
        body = _body(num=64)  # ~100 KB: more than a socket buffer
        request = urllib.request.Request(url + "/score", data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=5)
    assert err.value.code == 401
    assert "token" in json.loads(err.value.read())["error"]
