"""An HTTP opener whose waits another thread can cut short (used by the ``remote`` reward).

``urllib`` blocks a thread in ``connect`` and ``recv`` for up to the socket timeout, and a
timed-out ``http.client`` socket cannot be read again, so a short timeout cannot simply be
polled. Instead `Cancellation` (a) connects in slices of ``SLICE_S`` seconds, checking its
event between them, and (b) remembers every connected socket, which ``cancel()`` shuts down:
a ``recv`` blocked on it returns at once. Backoff sleeps wait on the same event. So
``cancel()`` from any thread (a signal handler included) stops a request within ``SLICE_S``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import threading
import time
import urllib.request
import weakref
from typing import Any

SLICE_S = 0.1  # longest wait between two looks at the cancel event while connecting


class Cancelled(RuntimeError):
    """The request was cancelled by `Cancellation.cancel` (the caller is shutting down)."""


class Cancellation:
    """A cancel flag plus the sockets it must wake; see the module docstring."""

    def __init__(self) -> None:
        self.event = threading.Event()
        # Re-entrant: cancel() may run in a signal handler on a thread that holds the lock.
        self._lock = threading.RLock()
        self._sockets: weakref.WeakSet = weakref.WeakSet()

    @property
    def cancelled(self) -> bool:
        return self.event.is_set()

    def cancel(self) -> None:
        """Set the flag and shut down every open socket (idempotent, thread-safe)."""
        with self._lock:
            self.event.set()
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)

    def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` unless cancelled first; `Cancelled` if cancelled."""
        if self.event.wait(seconds):
            raise Cancelled("cancelled while waiting to retry")

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            if self.event.is_set():
                _shutdown(sock)
                raise Cancelled("cancelled while connecting")
            self._sockets.add(sock)

    def create_connection(
        self, address: tuple[str, int], timeout: Any = None, source_address: Any = None, **_: Any
    ) -> socket.socket:
        """`socket.create_connection` that looks at the cancel event every ``SLICE_S``."""
        host, port = address
        limit = timeout if isinstance(timeout, (int, float)) else None
        deadline = None if limit is None else time.monotonic() + limit
        last: OSError | None = None
        for family, kind, proto, _, addr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            try:
                if source_address:
                    sock.bind(source_address)
                self._connect(sock, addr, deadline)
                sock.settimeout(limit)
                self.track(sock)
                return sock
            except OSError as err:  # next address (e.g. IPv4 after IPv6)
                sock.close()
                last = err
            except BaseException:
                sock.close()
                raise
        raise last or OSError(f"getaddrinfo returned nothing for {host}:{port}")

    def _connect(self, sock: socket.socket, addr: Any, deadline: float | None) -> None:
        sock.setblocking(False)
        code = sock.connect_ex(addr)
        # A selector, not select.select: a trainer's file descriptors may exceed FD_SETSIZE.
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_WRITE)
            while code in (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK):
                if self.event.is_set():
                    raise Cancelled("cancelled while connecting")
                left = SLICE_S if deadline is None else min(SLICE_S, deadline - time.monotonic())
                if left <= 0:
                    raise TimeoutError("timed out while connecting")
                if selector.select(left):
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise OSError(code, os.strerror(code))


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed, or never connected
        sock.shutdown(socket.SHUT_RDWR)


class _Tracking:
    """Mixin for urllib's handlers: every connection they open goes through a `Cancellation`."""

    cancellation: Cancellation

    def do_open(self, http_class: Any, req: Any, **kwargs: Any) -> Any:
        cancellation = self.cancellation

        def tracked(host: str, **conn_kwargs: Any) -> Any:
            conn = http_class(host, **conn_kwargs)
            # http.client's hook for how connect() opens its socket (HTTPS wraps the result).
            conn._create_connection = cancellation.create_connection
            connect = conn.connect

            def connect_and_track() -> None:
                connect()
                cancellation.track(conn.sock)  # the TLS socket too, once wrapped

            conn.connect = connect_and_track
            return conn

        return super().do_open(tracked, req, **kwargs)  # type: ignore[misc]


class _HTTPHandler(_Tracking, urllib.request.HTTPHandler):
    pass


class _HTTPSHandler(_Tracking, urllib.request.HTTPSHandler):
    pass


def build_opener(cancellation: Cancellation, use_env_proxy: bool) -> urllib.request.OpenerDirector:
    """A urllib opener whose connections ``cancellation`` can cut short.

    ``use_env_proxy=False`` ignores ``http_proxy``/``https_proxy`` (reward servers sit on the
    local network; a cluster-wide proxy would swallow loopback and intranet traffic).
    """
    handlers: list[Any] = [] if use_env_proxy else [urllib.request.ProxyHandler({})]
    for kind in (_HTTPHandler, _HTTPSHandler):
        handler = kind()
        handler.cancellation = cancellation
        handlers.append(handler)
    return urllib.request.build_opener(*handlers)
