"""A TCP proxy in front of a real `mlflow server` that refuses, hangs or answers 503 on demand.

Used by the outage tests and by ``benchmarks/outage.py``: the MLflow client and server stay real; only the
network between them fails.
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
        threading.Thread(target=self._accept, daemon=True).start()

    def set_mode(self, mode: str) -> None:
        with self._lock:
            self.mode = mode
            for c in self._conns:  # keep-alive connections must not outlive a mode change
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)  # unblocks a thread in recv(), unlike close()
                    c.close()
            self._conns.clear()

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
                threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
                self._pipe(client, upstream)
        except OSError:
            pass

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
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
