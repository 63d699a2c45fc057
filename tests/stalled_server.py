"""A reward server gone silent, on loopback: it accepts connections and never answers."""

from __future__ import annotations

import selectors
import socket
import threading


class StalledServer:
    """Listens on 127.0.0.1, accepts, reads whatever comes, never writes a byte.

    ``accepted`` is set once the first connection arrives; ``connections`` counts them.
    Use as a context manager; its thread polls a stop flag, so it always ends.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.accepted = threading.Event()
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="stalled-server", daemon=True)

    def __enter__(self) -> StalledServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()

    def _serve(self) -> None:
        clients: list[socket.socket] = []
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.05):
                    if key.fileobj is self._listener:
                        client, _ = self._listener.accept()
                        clients.append(client)
                        selector.register(client, selectors.EVENT_READ)
                        self.connections += 1
                        self.accepted.set()
                    elif not key.fileobj.recv(65536):  # the client left
                        selector.unregister(key.fileobj)
        for client in clients:
            client.close()
