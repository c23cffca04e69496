"""Events: one structured record per step, the spine of "watch it step by step".

Every component (the supervisor, and later istio-cni, ztunnel, istiod, the waypoint) emits
events; they travel as JSON datagrams to the supervisor's `events.sock`, which keeps a bounded
history and streams them to `ambient-lab trace` and the TUI. A component that cannot reach the
supervisor drops the event rather than block traffic: observing must never break the data path.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from lab.common.state import run_dir

MAX_EVENT = 1 << 20


@dataclass
class Event:
    """One step. `kind` is dotted (`pod.created`, `ztunnel.listener.created`, ...); `msg` is one
    sentence for a newcomer; `flow` ties together the steps of one connection across components."""

    kind: str
    msg: str
    component: str = "supervisor"
    node: str = ""
    pod: str = ""
    flow: str = ""
    fields: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)

    def to_json(self) -> str:
        d = {"kind": self.kind, "msg": self.msg, "component": self.component, "node": self.node, "pod": self.pod,
             "flow": self.flow, "fields": self.fields, "ts": self.ts}  # flat: asdict() deep-copies, on a hot path
        return json.dumps(d, separators=(",", ":"), default=str)

    @classmethod
    def from_dict(cls, d: dict) -> "Event":
        return cls(**{k: d[k] for k in ("kind", "msg", "component", "node", "pod", "flow", "fields", "ts") if k in d})

    def line(self) -> str:
        """The readable one-line form `trace` prints."""
        t = time.strftime("%H:%M:%S", time.localtime(self.ts)) + f".{int(self.ts * 1000) % 1000:03d}"
        where = self.component + (f"@{self.node}" if self.node else "")
        flow = f" [{self.flow[:8]}]" if self.flow else ""
        return f"{t} {where:<28} {self.kind:<26}{flow} {self.msg}"


def events_socket(lab: str) -> str:
    return os.path.join(run_dir(lab), "events.sock")


class EventEmitter:
    """Sends events from any process of the lab to its supervisor, never blocking the caller.

    A stream connection (not datagrams: a unix datagram queue holds only a handful of messages)
    with a bounded buffer of its own: if the supervisor falls behind by more than MAX_BUFFER
    bytes, events are dropped rather than slowing the data path down.
    """

    MAX_BUFFER = 4 << 20

    def __init__(self, lab: str, component: str, node: str = "", path: str | None = None) -> None:
        self.path = path or events_socket(lab)
        self.component = component
        self.node = node
        self.sock: socket.socket | None = None
        self.pending = b""
        self.dropped = 0
        self.next_try = 0.0

    def _connect(self) -> None:
        if time.monotonic() < self.next_try:
            return
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(self.path)
            s.setblocking(False)
            self.sock = s
        except OSError:
            s.close()
            self.next_try = time.monotonic() + 0.5

    def emit(self, kind: str, msg: str, *, pod: str = "", flow: str = "", **fields: Any) -> Event:
        ev = Event(kind=kind, msg=msg, component=self.component, node=self.node, pod=pod, flow=flow, fields=fields)
        data = (ev.to_json() + "\n").encode()
        if len(data) > MAX_EVENT or len(self.pending) + len(data) > self.MAX_BUFFER:
            self.dropped += 1
            return ev
        self.pending += data
        self.flush()
        return ev

    def flush(self) -> None:
        if self.sock is None:
            self._connect()
            if self.sock is None:
                self.pending = b""  # no supervisor: nobody to tell
                return
        try:
            sent = self.sock.send(self.pending)
            self.pending = self.pending[sent:]
        except BlockingIOError:
            pass
        except OSError:
            self.sock.close()
            self.sock = None

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.setblocking(True)
                self.sock.settimeout(1)
                if self.pending:
                    self.sock.sendall(self.pending)
            except OSError:
                pass
            self.sock.close()
            self.sock = None
