"""Talking to a lab's supervisor: one JSON request, a stream of JSON replies (see server.py)."""

from __future__ import annotations

import json
import os
import socket
from typing import Iterator

from lab.common.errors import LabError
from lab.common.state import run_dir

SOCKET_NAME = "supervisor.sock"


def supervisor_socket(lab: str) -> str:
    """The lab's API endpoint: every client (CLI, TUI, the components' API calls) talks to it."""
    return os.path.join(run_dir(lab), SOCKET_NAME)


class SupervisorGone(LabError):
    pass


def request(lab: str, op: str, timeout: float | None = 60, **fields) -> Iterator[dict]:
    """Send one request; yield every reply line (the last one has done=True). Errors raise LabError."""
    path = supervisor_socket(lab)
    if not os.path.exists(path):
        raise SupervisorGone(f"lab {lab!r} is not running", f"start it with: sudo ambient-lab up --name {lab}")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        s.close()
        raise SupervisorGone(f"lab {lab!r} has no running supervisor",
                             f"remove what is left with: sudo ambient-lab down --name {lab}") from None
    with s, s.makefile("rwb") as f:
        f.write((json.dumps({"op": op, **fields}) + "\n").encode())
        f.flush()
        for line in f:
            msg = json.loads(line)
            if msg.get("error") and msg.get("done"):
                raise LabError(msg["error"], msg.get("fix", ""))
            yield msg
            if msg.get("done"):
                return
    raise SupervisorGone(f"lab {lab!r}: the supervisor closed the connection")


def call(lab: str, op: str, timeout: float | None = 60, **fields) -> dict:
    """A request with a single final reply."""
    last: dict = {}
    for last in request(lab, op, timeout, **fields):
        pass
    return last
