"""The channel from the chained istio-cni plugin to the node agent: HTTP/1.1 over a unix socket.

Real counterpart: is:cni/pkg/plugin/plugin.go (the client: the CNI plugin binary the container
runtime runs after the primary CNI) and is:cni/pkg/nodeagent/cni-watcher.go (the server in the
node agent). In a real node the plugin sends ``POST /cmdadd`` with the pod's name, namespace,
IPs and netns path over ``/var/run/istio-cni/pluginevent.sock``; if the agent cannot be reached
the plugin fails and so does the pod's sandbox ("istio-cni cmdAdd failed to contact node Istio
CNI agent").

In the lab the supervisor plays both the plugin (``source: "cni-plugin"``, as a pod starts)
and the agent's pod informer (``source: "informer"``: on every change, each ambient pod that is
not ``enabled`` is added again, and after the agent restarted), so the same socket also carries removals and a read-only view:

==========  ===========  ======================================================================
method      path         meaning
==========  ===========  ======================================================================
``POST``    ``/cmdadd``  AddPodToMesh. Body ``{uid, name, namespace, service_account, ip,
                         netns, source}``. Reply ``{redirection: "enabled"|"pending"|"",
                         error: "", message}``; HTTP 200, or 400/500 with ``error`` set.
``POST``    ``/cmddel``  RemovePodFromMesh. Body ``{uid, name, namespace, netns}``.
                         Reply ``{redirection: "", error: "", message}``.
``GET``     ``/pods``    The agent's pod cache and the annotations it asked for, as JSON.
``GET``     ``/healthz`` 200 once the agent's ZDS server is listening (readiness), else 503.
==========  ===========  ======================================================================

Every body is one JSON object with ``Content-Length`` (no chunked encoding). The server keeps
HTTP/1.1 connections alive unless the client says ``Connection: close``; the small blocking
client here (:func:`post`, :func:`get`) sends one request per connection, like the plugin does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Protocol

log = logging.getLogger(__name__)

#: Where the real agent listens (for reference; the lab puts one socket per node under its run dir).
ISTIO_PLUGIN_EVENT_SOCKET = "/var/run/istio-cni/pluginevent.sock"

MAX_HEAD = 16 * 1024
MAX_BODY = 256 * 1024
#: A cmdadd may wait for ztunnel's ack (5 s per ztunnel in Istio) on top of the iptables work.
CLIENT_TIMEOUT = 30.0

REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 411: "Length Required",
    413: "Payload Too Large", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}


class PluginError(Exception):
    """The agent answered, but not with a usable reply (HTTP error without JSON, bad framing)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


# ==================================================================================================
# HTTP/1.1 framing (pure: bytes in, data out)
# ==================================================================================================


@dataclass
class Request:
    method: str
    path: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return conn == "keep-alive"
        return conn != "close"


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body.decode()) if self.body else None


class FramingError(ValueError):
    """A request the server refuses before routing; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _parse_headers(lines: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise FramingError(400, f"malformed header line {line!r}")
        headers[name.lower()] = value.strip()
    return headers


def parse_request_head(head: bytes) -> Request:
    """Request line and headers (``head`` ends with the blank line). Raises FramingError."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise FramingError(400, "request head is not ASCII") from None
    lines = text.split("\r\n")
    while lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise FramingError(400, "empty request")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise FramingError(400, f"malformed request line {lines[0]!r}")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise FramingError(505, f"unsupported version {version!r}")
    return Request(method, target.split("?", 1)[0], version, _parse_headers(lines[1:]))


def body_length(headers: dict[str, str]) -> int:
    """The body size the headers announce (0 without Content-Length). Raises FramingError."""
    if "transfer-encoding" in headers:
        raise FramingError(411, "chunked bodies are not supported: send Content-Length")
    raw = headers.get("content-length", "0")
    if not raw.isdigit():
        raise FramingError(400, f"bad Content-Length {raw!r}")
    n = int(raw)
    if n > MAX_BODY:
        raise FramingError(413, f"body of {n} bytes is over the {MAX_BODY}-byte limit")
    return n


def render_response(status: int, obj: Any, *, keep_alive: bool, extra: Optional[dict[str, str]] = None) -> bytes:
    """One HTTP/1.1 response with a JSON body."""
    body = (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body)),
               "Connection": "keep-alive" if keep_alive else "close", **(extra or {})}
    head = f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode("ascii") + body


def render_request(method: str, path: str, body: Optional[dict] = None) -> bytes:
    """One HTTP/1.1 request, ``Connection: close``, with a JSON body if given."""
    data = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: istio-cni\r\nUser-Agent: lab-istio-cni-plugin\r\n"
    if body is not None:
        head += "Content-Type: application/json\r\n"
    head += f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    return head.encode("ascii") + data


def parse_response(data: bytes) -> Response:
    """A complete response (head + body as read until EOF). Raises PluginError if malformed."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep:
        raise PluginError("truncated HTTP response from the node agent")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise PluginError(f"malformed status line {lines[0]!r}")
    try:
        headers = _parse_headers(lines[1:])
    except FramingError as e:
        raise PluginError(str(e)) from None
    n = headers.get("content-length")
    if n is not None:
        if not n.isdigit() or len(rest) < int(n):
            raise PluginError("truncated HTTP response body from the node agent")
        rest = rest[: int(n)]
    return Response(int(parts[1]), headers, rest)


# ==================================================================================================
# Server (in the node agent)
# ==================================================================================================


class PluginEventHandler(Protocol):
    """What the node agent provides to the routes; each returns (HTTP status, JSON object)."""

    async def cmd_add(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]: ...

    async def cmd_del(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]: ...

    def pods_view(self) -> dict[str, Any]: ...

    def ready(self) -> bool: ...


Route = Callable[[PluginEventHandler, Request], Awaitable[tuple[int, Any]]]


def _json_body(req: Request) -> dict[str, Any]:
    try:
        obj = json.loads(req.body.decode() or "null")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FramingError(400, f"body is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise FramingError(400, "body must be a JSON object")
    return obj


async def _cmdadd(h: PluginEventHandler, req: Request) -> tuple[int, Any]:
    return await h.cmd_add(_json_body(req))


async def _cmddel(h: PluginEventHandler, req: Request) -> tuple[int, Any]:
    return await h.cmd_del(_json_body(req))


async def _pods(h: PluginEventHandler, req: Request) -> tuple[int, Any]:
    return 200, h.pods_view()


async def _healthz(h: PluginEventHandler, req: Request) -> tuple[int, Any]:
    ok = h.ready()
    return (200 if ok else 503), {"ready": ok}


ROUTES: dict[str, dict[str, Route]] = {
    "/cmdadd": {"POST": _cmdadd},
    "/cmddel": {"POST": _cmddel},
    "/pods": {"GET": _pods},
    "/healthz": {"GET": _healthz},
}


def _error_body(message: str) -> dict[str, str]:
    return {"redirection": "", "error": message, "message": message}


class PluginEventServer:
    """The agent's HTTP server on a unix stream socket (Istio's CNI plugin event listener)."""

    def __init__(self, path: str | os.PathLike[str], handler: PluginEventHandler) -> None:
        self.path = os.fspath(path)
        self.handler = handler
        self._server: Optional[asyncio.Server] = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen (a stale socket file from a killed agent is removed first); mode 0600."""
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._serve, path=self.path, limit=MAX_HEAD)
        os.chmod(self.path, 0o600)
        log.info("CNI plugin event server listening on %s", self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._conns):
            task.cancel()
        for task in list(self._conns):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection should end."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if e.partial.strip():
                log.warning("plugin event connection closed mid-request")
            return False
        except asyncio.LimitOverrunError:
            writer.write(render_response(431, _error_body("request head too large"), keep_alive=False))
            await writer.drain()
            return False
        try:
            req = parse_request_head(head)
            req.body = await reader.readexactly(body_length(req.headers))
            status, obj, extra = await self._dispatch(req)
        except FramingError as e:
            writer.write(render_response(e.status, _error_body(str(e)), keep_alive=False))
            await writer.drain()
            return False
        writer.write(render_response(status, obj, keep_alive=req.keep_alive, extra=extra))
        await writer.drain()
        return req.keep_alive

    async def _dispatch(self, req: Request) -> tuple[int, Any, Optional[dict[str, str]]]:
        methods = ROUTES.get(req.path)
        if methods is None:
            return 404, _error_body(f"no route {req.path}"), None
        route = methods.get(req.method)
        if route is None:
            allow = ", ".join(sorted(methods))
            return 405, _error_body(f"{req.method} not allowed on {req.path}"), {"Allow": allow}
        try:
            status, obj = await route(self.handler, req)
        except FramingError:
            raise
        except Exception as e:  # a bug in the agent: answer, keep serving
            log.exception("plugin event %s %s failed", req.method, req.path)
            return 500, _error_body(f"internal error: {type(e).__name__}: {e}"), None
        return status, obj, None


# ==================================================================================================
# Client (the CNI plugin's side; the supervisor calls it, from a thread)
# ==================================================================================================


def request(socket_path: str, method: str, path: str, body: Optional[dict] = None,
            timeout: float = CLIENT_TIMEOUT) -> Response:
    """One blocking HTTP request over the agent's unix socket; OSError if it cannot be reached."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(socket_path)
        s.sendall(render_request(method, path, body))
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return parse_response(b"".join(chunks))


def _reply_object(resp: Response, what: str) -> dict[str, Any]:
    try:
        obj = resp.json()
    except (UnicodeDecodeError, json.JSONDecodeError):
        obj = None
    if not isinstance(obj, dict):
        raise PluginError(f"{what}: HTTP {resp.status} without a JSON object", resp.status)
    return obj


def post(socket_path: str, path: str, body: dict[str, Any], timeout: float = CLIENT_TIMEOUT) -> dict[str, Any]:
    """``POST path`` with a JSON body; return the agent's JSON reply.

    The reply is returned also for an HTTP error that carries ``error`` (e.g. 500 when the rules
    could not be installed): the caller reads ``reply["error"]``. OSError when the agent cannot be
    reached (the real plugin then fails the pod's sandbox); PluginError for anything unreadable.
    """
    resp = request(socket_path, "POST", path, body, timeout)
    obj = _reply_object(resp, f"POST {path}")
    if resp.status // 100 != 2 and not obj.get("error"):
        raise PluginError(f"POST {path}: HTTP {resp.status}", resp.status)
    return obj


def get(socket_path: str, path: str, timeout: float = CLIENT_TIMEOUT) -> dict[str, Any]:
    """``GET path``; the JSON reply if 2xx, else PluginError (``/healthz`` before ready: 503)."""
    resp = request(socket_path, "GET", path, None, timeout)
    obj = _reply_object(resp, f"GET {path}")
    if resp.status // 100 != 2:
        raise PluginError(f"GET {path}: HTTP {resp.status} {obj.get('error', '')}".rstrip(), resp.status)
    return obj
