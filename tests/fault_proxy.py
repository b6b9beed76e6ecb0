"""A TCP proxy in front of a real `mlflow server` that refuses, hangs or answers 503 on demand.

Used by the outage tests and by ``benchmarks/outage.py``: the MLflow client and server stay real; only the
network between them fails. It also counts the bytes it carries each way (``up``: to the target, ``down``: back),
and ``cut_once`` drops one connection in the middle of a transfer.
"""

from __future__ import annotations

import contextlib
import socket
import threading


class FaultProxy:
    def __init__(self, target: str) -> None:
        host, port = target.rsplit("//", 1)[1].split(":")
        self.target = (host, int(port))
        self.mode = "pass"
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.up = 0
        self.down = 0
        self._cut: tuple[str, int] | None = None
        threading.Thread(target=self._accept, daemon=True).start()

    def set_mode(self, mode: str) -> None:
        with self._lock:
            self.mode = mode
            for c in self._conns:  # keep-alive connections must not outlive a mode change
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)  # unblocks a thread in recv(), unlike close()
                    c.close()
            self._conns.clear()

    def cut_once(self, direction: str, after: int) -> None:
        """Drop the first connection that carries more than ``after`` bytes ``direction`` ("up" or "down")."""
        with self._lock:
            self._cut = (direction, after)

    @property
    def cut_pending(self) -> bool:
        return self._cut is not None

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                mode = self.mode
                self._conns.append(client)
            threading.Thread(target=self._serve, args=(client, mode), daemon=True).start()

    def _serve(self, client: socket.socket, mode: str) -> None:
        try:
            if mode == "refuse":
                client.close()
            elif mode == "hang":
                while client.recv(65536):
                    pass
            elif mode == "503":
                client.recv(65536)
                client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                client.close()
            else:
                upstream = socket.create_connection(self.target)
                with self._lock:
                    self._conns.append(upstream)
                threading.Thread(target=self._pipe, args=(upstream, client, "down"), daemon=True).start()
                self._pipe(client, upstream, "up")
        except OSError:
            pass

    def _pipe(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        carried = 0
        try:
            while data := src.recv(65536):
                carried += len(data)
                with self._lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
                    cut = self._cut is not None and self._cut[0] == direction and carried > self._cut[1]
                    if cut:
                        self._cut = None
                if cut:
                    return  # both sockets close below: the transfer dies mid-way
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._listener.close()
        self.set_mode("refuse")
