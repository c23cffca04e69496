"""The proxies' admin sockets: one JSON object per line each way, over a unix stream socket.

Real ztunnel and Envoy serve an admin HTTP port on localhost (ztunnel's :15000/config_dump,
Envoy's /config_dump, /stats/prometheus). The lab's ztunnel and waypoint serve the same kind of
answers on a unix socket next to their other files; the CLI (`ztunnel-config`, `metrics`), the
supervisor (step mode) and tests are its clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import Callable, Mapping
from typing import Any

#: Largest admin request line accepted.
ADMIN_MAX_LINE = 64 * 1024


def admin_response(request: Any, ops: Mapping[str, Callable[[], Any]],
                   commands: Mapping[str, Callable[[dict[str, Any]], Any]] | None = None) -> dict[str, Any]:
    """Answer one admin request with the reader registered for its op, or with the command (an op
    that takes the request's fields: step mode's) registered for it."""
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        return {"error": 'expected a JSON object like {"op": "config_dump"}'}
    op = request["op"]
    commands = commands or {}
    if op in commands:
        try:
            return {op: commands[op](request)}
        except (ValueError, TypeError) as e:
            return {"error": f"{op}: {e}"}
    reader = ops.get(op)
    if reader is None:
        return {"error": f"unknown op {op!r}; one of: {', '.join([*ops, *commands])}"}
    return {op: reader()}


# ------------------------------------------------------------------------------------ the socket
async def start_admin(path: str, answer: Callable[[Any], dict[str, Any]]) -> asyncio.AbstractServer:
    """Serve the admin protocol on a unix stream socket at `path` (a stale socket is replaced)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                except ValueError as e:
                    reply = {"error": f"not JSON: {e}"}
                else:
                    reply = answer(request)
                writer.write(json.dumps(reply, separators=(",", ":"), default=str).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return await asyncio.start_unix_server(serve, path=path, limit=ADMIN_MAX_LINE)


def stop_admin(server: asyncio.AbstractServer, path: str) -> None:
    server.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def admin_request(path: str, op: str, timeout: float = 5.0, **fields: Any) -> Any:
    """A client for the socket (the CLI, tests): send {"op": op, **fields}, return the answer's value."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the proxy closed the admin connection")
            data += chunk
    reply = json.loads(data)
    if "error" in reply:
        raise ValueError(reply["error"])
    return reply[op]
