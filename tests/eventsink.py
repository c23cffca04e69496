"""A stand-in for the supervisor's event socket in tests: accepts the lab's event streams
(JSON lines over a unix stream socket, see lab/common/events.py) and keeps every event it read."""

from __future__ import annotations

import json
import os
import socket
import threading


class EventSink:
    def __init__(self, path: str) -> None:
        self.path = path
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            t = threading.Thread(target=self._read, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _read(self, conn: socket.socket) -> None:
        conn.settimeout(0.05)
        buf = b""
        with conn:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                *lines, buf = buf.split(b"\n")
                with self._lock:
                    self.events += [json.loads(l) for l in lines if l.strip()]

    def drain(self) -> list[dict]:
        """Every event read since the last drain."""
        with self._lock:
            out, self.events = self.events, []
        return out

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=1)
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
