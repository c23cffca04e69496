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
from dataclasses import asdict, dataclass, field
from typing import Any

from .state import run_dir

MAX_DATAGRAM = 60_000


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
        return json.dumps(asdict(self), separators=(",", ":"), default=str)

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
    """Sends events from any process of the lab to its supervisor (fire and forget)."""

    def __init__(self, lab: str, component: str, node: str = "") -> None:
        self.path = events_socket(lab)
        self.component = component
        self.node = node
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setblocking(False)

    def emit(self, kind: str, msg: str, *, pod: str = "", flow: str = "", **fields: Any) -> Event:
        ev = Event(kind=kind, msg=msg, component=self.component, node=self.node, pod=pod, flow=flow, fields=fields)
        data = ev.to_json().encode()
        if len(data) <= MAX_DATAGRAM:
            try:
                self.sock.sendto(data, self.path)
            except OSError:
                pass  # supervisor busy or gone: never block the data path
        return ev

    def close(self) -> None:
        self.sock.close()
