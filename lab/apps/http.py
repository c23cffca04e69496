"""A tiny HTTP/1.1 server and client, shared by the stand-in apps.

The container images of Istio's samples (bookinfo's Flask, WEBrick, Liberty and Node servers,
go-httpbin) all speak plain HTTP/1.1 to each other: in ambient mode the application never sees
mTLS or HBONE, ztunnel wraps and unwraps its bytes. So the stand-ins need only this:

- a server: keep-alive connections, ``Content-Length`` on every response, chunked request bodies,
  ``Expect: 100-continue``, one access-log line per request naming the client address the app saw
  (with ztunnel in the path that is still the real client pod's IP: ztunnel preserves it), and a
  ``x-lab-client-address`` response header carrying the same address;
- a client: resolve the upstream name with the system resolver, so the pod's ``/etc/resolv.conf``
  (``search default.svc.cluster.local svc.cluster.local cluster.local``) turns ``details`` into
  the Service's ClusterIP exactly as it does for the real apps, then one request per connection.

Parsing and rendering are pure functions over bytes (tested without sockets); the asyncio parts
only move bytes.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

CLIENT_ADDRESS_HEADER = "x-lab-client-address"
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024

REASONS: dict[int, str] = {
    100: "Continue", 101: "Switching Protocols", 200: "OK", 201: "Created", 202: "Accepted",
    203: "Non-Authoritative Information", 204: "No Content", 205: "Reset Content",
    206: "Partial Content", 300: "Multiple Choices", 301: "Moved Permanently", 302: "Found",
    303: "See Other", 304: "Not Modified", 305: "Use Proxy", 307: "Temporary Redirect",
    308: "Permanent Redirect", 400: "Bad Request", 401: "Unauthorized", 402: "Payment Required",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
    407: "Proxy Authentication Required", 408: "Request Timeout", 409: "Conflict", 410: "Gone",
    411: "Length Required", 412: "Precondition Failed", 413: "Content Too Large",
    414: "URI Too Long", 415: "Unsupported Media Type", 416: "Range Not Satisfiable",
    417: "Expectation Failed", 418: "I'm a teapot", 421: "Misdirected Request",
    422: "Unprocessable Content", 425: "Too Early", 426: "Upgrade Required",
    428: "Precondition Required", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 451: "Unavailable For Legal Reasons",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}

# Methods whose request line the echo app recognises when it sniffs the first bytes.
HTTP_METHODS = frozenset(
    {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"TRACE", b"CONNECT"}
)


class HttpError(Exception):
    """A malformed or oversized HTTP message: the server answers ``status`` and closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class UpstreamError(Exception):
    """An upstream call failed: name not resolved, connection refused or reset, timeout."""


class Headers:
    """HTTP header fields in arrival order; names compare case-insensitively."""

    def __init__(self, fields: Iterable[tuple[str, str]] = ()) -> None:
        self.fields: list[tuple[str, str]] = list(fields)

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name``, or ``default``."""
        wanted = name.lower()
        for key, value in self.fields:
            if key.lower() == wanted:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of ``name``, in order."""
        wanted = name.lower()
        return [value for key, value in self.fields if key.lower() == wanted]

    def add(self, name: str, value: str) -> None:
        self.fields.append((name, value))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self):
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def __repr__(self) -> str:
        return f"Headers({self.fields!r})"


@dataclass
class Request:
    """One HTTP request as the app received it, with the TCP peer it came from."""

    method: str
    target: str
    version: str
    headers: Headers
    body: bytes = b""
    client: tuple[str, int] = ("", 0)
    local: tuple[str, int] = ("", 0)

    @property
    def path(self) -> str:
        """The target's path; an absolute-form target (``http://host/p``, sent to proxies) too."""
        target = self.target.split("?", 1)[0]
        if target.startswith(("http://", "https://")):
            target = "/" + target.split("/", 3)[3] if target.count("/") >= 3 else "/"
        return target

    @property
    def query(self) -> str:
        return self.target.split("?", 1)[1] if "?" in self.target else ""

    @property
    def client_address(self) -> str:
        """``ip:port`` of the TCP peer: the address the application saw."""
        return format_address(self.client)


@dataclass
class Response:
    """An HTTP response before rendering; Content-Length is added when rendered."""

    status: int = 200
    body: bytes = b""
    content_type: str | None = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def text(cls, text: str, status: int = 200,
             content_type: str = "text/plain; charset=utf-8") -> Response:
        return cls(status, text.encode(), content_type)

    @classmethod
    def html(cls, text: str, status: int = 200) -> Response:
        return cls(status, text.encode(), "text/html; charset=utf-8")

    @classmethod
    def json(cls, value: object, status: int = 200, *, compact: bool = False,
             indent: int | None = None, content_type: str = "application/json") -> Response:
        if compact:
            body = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        else:
            body = json.dumps(value, indent=indent, ensure_ascii=False)
        return cls(status, body.encode(), content_type)


Handler = Callable[[Request], Awaitable[Response]]


def format_address(address: tuple) -> str:
    """``ip:port`` (``[ip]:port`` for IPv6) from a socket address tuple."""
    if not address or not address[0]:
        return "-"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------- parsing (pure)

def parse_head(data: bytes) -> tuple[str, list[tuple[str, str]]]:
    """Split a message head (start line + header fields, CRLF-separated) into its parts."""
    try:
        text = data.decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes every byte
        raise HttpError(400, "undecodable head") from exc
    lines = text.split("\r\n")
    start = lines[0]
    fields: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(400, f"malformed header line {line!r}")
        fields.append((name, value.strip(" \t")))
    return start, fields


def parse_request_head(data: bytes) -> tuple[str, str, str, Headers]:
    """Parse ``METHOD target HTTP/1.x`` and the header fields of a request head."""
    start, fields = parse_head(data)
    parts = start.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise HttpError(400, f"malformed request line {start!r}")
    method, target, version = parts
    if not version.startswith("HTTP/1."):
        raise HttpError(505, f"unsupported version {version!r}")
    return method, target, version, Headers(fields)


def parse_status_line(line: str) -> tuple[str, int, str]:
    """Parse ``HTTP/1.1 200 OK`` into (version, status, reason)."""
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise HttpError(502, f"malformed status line {line!r}")
    return parts[0], int(parts[1]), parts[2] if len(parts) > 2 else ""


def body_framing(headers: Headers) -> tuple[str, int]:
    """How a request body is delimited: ("chunked", 0), ("length", n) or ("none", 0)."""
    encodings = ",".join(headers.get_all("transfer-encoding")).lower()
    if encodings:
        if encodings.replace(" ", "").split(",")[-1] != "chunked":
            raise HttpError(501, f"unsupported transfer-encoding {encodings!r}")
        return "chunked", 0
    lengths = headers.get_all("content-length")
    if not lengths:
        return "none", 0
    if len(set(lengths)) != 1 or not lengths[0].isdigit():
        raise HttpError(400, f"bad content-length {lengths!r}")
    length = int(lengths[0])
    if length > MAX_BODY_BYTES:
        raise HttpError(413, "body too large")
    return "length", length


def wants_keep_alive(version: str, headers: Headers) -> bool:
    """HTTP/1.1 keeps the connection unless ``Connection: close``; 1.0 only on ``keep-alive``."""
    tokens = {t.strip().lower() for v in headers.get_all("connection") for t in v.split(",")}
    if version == "HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


def http_date(now: float | None = None) -> str:
    """An IMF-fixdate for the ``Date`` header (RFC 9110 5.6.7)."""
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))


def render_response(response: Response, *, keep_alive: bool, head_only: bool = False,
                    client_address: str | None = None, version: str = "HTTP/1.1") -> bytes:
    """Serialize a response: status line, headers with Content-Length, then the body."""
    status = response.status
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}"]
    names = {name.lower() for name, _ in response.headers}
    if response.content_type and "content-type" not in names:
        lines.append(f"content-type: {response.content_type}")
    lines.extend(f"{name}: {value}" for name, value in response.headers)
    if "date" not in names:
        lines.append(f"date: {http_date()}")
    if status >= 200 and status not in (204, 304):
        lines.append(f"content-length: {len(response.body)}")
    if client_address is not None:
        lines.append(f"{CLIENT_ADDRESS_HEADER}: {client_address}")
    if not keep_alive:
        lines.append("connection: close")
    elif version == "HTTP/1.0":
        lines.append("connection: keep-alive")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if head_only or status < 200 or status in (204, 304):
        return head
    return head + response.body


def render_request(method: str, host_header: str, target: str, headers: Iterable[tuple[str, str]],
                   body: bytes = b"") -> bytes:
    """Serialize a client request with Host, Content-Length (when a body) and Connection: close."""
    lines = [f"{method} {target} HTTP/1.1", f"host: {host_header}"]
    given = []
    for name, value in headers:
        if name.lower() in ("host", "content-length", "connection", "transfer-encoding"):
            continue
        given.append(name.lower())
        lines.append(f"{name}: {value}")
    if "accept" not in given:
        lines.append("accept: */*")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"content-length: {len(body)}")
    lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def looks_like_http(first: bytes) -> bool | None:
    """Does a connection's first data start an HTTP/1 request line? None: need more bytes.

    True once the bytes read ``<METHOD> `` for a known method, False as soon as they cannot.
    """
    for i, byte in enumerate(first[:9]):
        if byte == 0x20:  # the space after the method
            return first[:i] in HTTP_METHODS
        if not (0x41 <= byte <= 0x5A):  # A-Z
            return False
    return False if len(first) >= 9 else None


# ---------------------------------------------------------------- reading (asyncio)

async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    """Read a chunked body (RFC 9112 7.1): hex size lines, data, then trailer lines."""
    parts: list[bytes] = []
    total = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        size_text = line[:-2].split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError as exc:
            raise HttpError(400, f"bad chunk size {size_text!r}") from exc
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass  # trailer fields are read and dropped
            return b"".join(parts)
        total += size
        if total > MAX_BODY_BYTES:
            raise HttpError(413, "body too large")
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise HttpError(400, "chunk not followed by CRLF")


async def read_head(reader: asyncio.StreamReader, prefix: bytes = b"") -> bytes | None:
    """Read up to the blank line ending a head; None on a clean EOF before any byte."""
    try:
        data = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial and not prefix:
            return None
        raise HttpError(400, "connection closed inside the head") from exc
    except asyncio.LimitOverrunError as exc:
        raise HttpError(431, "head too large") from exc
    return prefix + data[:-4]


async def read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       prefix: bytes = b"") -> Request | None:
    """Read one request (head and body) from a connection; None when the client closed it."""
    head = await read_head(reader, prefix)
    if head is None:
        return None
    method, target, version, headers = parse_request_head(head)
    framing, length = body_framing(headers)
    if framing != "none" and (headers.get("expect") or "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    if framing == "chunked":
        body = await read_chunked(reader)
    elif framing == "length":
        body = await reader.readexactly(length)
    else:
        body = b""
    return Request(method, target, version, headers, body)


# ---------------------------------------------------------------- server

def log_line(text: str) -> None:
    """One line on stdout (the pod's log file), flushed at once."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def access_log_line(request: Request, status: int, size: int, started: float) -> str:
    """An access-log line: client address first, then request line, status, size, duration."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"
    millis = (time.monotonic() - started) * 1000
    return (f'{stamp} {request.client_address} "{request.method} {request.target} '
            f'{request.version}" {status} {size} {millis:.0f}ms')


class HttpServer:
    """Serves one app's handler on any number of listening sockets, HTTP/1.1 keep-alive."""

    def __init__(self, handler: Handler, log: Callable[[str], None] = log_line) -> None:
        self.handler = handler
        self.log = log

    async def serve_connection(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter, prefix: bytes = b"") -> None:
        """Answer requests on one connection until the client closes or asks to close."""
        client = writer.get_extra_info("peername") or ("", 0)
        local = writer.get_extra_info("sockname") or ("", 0)
        try:
            while True:
                try:
                    request = await read_request(reader, writer, prefix)
                    started = time.monotonic()  # from the request's arrival, not from keep-alive idle time
                except HttpError as exc:
                    writer.write(render_response(Response.text(f"{exc}\n", exc.status),
                                                 keep_alive=False,
                                                 client_address=format_address(client)))
                    self.log(f'{format_address(client)} "-" {exc.status} ({exc})')
                    break
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    break
                prefix = b""
                if request is None:
                    break
                request.client, request.local = client, local
                try:
                    response = await self.handler(request)
                except Exception as exc:  # the app's bug becomes a 500, as in any web framework
                    self.log(f"error handling {request.method} {request.target}: {exc!r}")
                    response = Response.text("Internal Server Error\n", 500)
                keep_alive = wants_keep_alive(request.version, request.headers)
                writer.write(render_response(
                    response, keep_alive=keep_alive, head_only=request.method == "HEAD",
                    client_address=request.client_address, version=request.version))
                await writer.drain()
                self.log(access_log_line(request, response.status, len(response.body), started))
                if not keep_alive:
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


async def start_servers(serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable],
                        host: str, ports: Iterable[int],
                        log: Callable[[str], None] = log_line) -> list[asyncio.Server]:
    """Listen on ``host`` at every port (the container ports), logging the bound addresses."""
    servers = []
    for port in ports:
        server = await asyncio.start_server(serve, host, port, backlog=1024, reuse_address=True)
        for sock in server.sockets:
            log(f"listening on {format_address(sock.getsockname())}")
        servers.append(server)
    return servers


# ---------------------------------------------------------------- client

@dataclass
class ClientResponse:
    """What an upstream answered."""

    status: int
    headers: Headers
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


async def read_response(reader: asyncio.StreamReader, method: str) -> ClientResponse:
    """Read a response: status line, headers, body by length, chunks or until EOF."""
    while True:
        head = await read_head(reader)
        if head is None:
            raise UpstreamError("upstream closed the connection before responding")
        start, fields = parse_head(head)
        _, status, _ = parse_status_line(start)
        if status >= 200 or status == 101:
            break  # 1xx interim responses are skipped
    headers = Headers(fields)
    if method == "HEAD" or status in (204, 304) or status < 200:
        return ClientResponse(status, headers, b"")
    framing, length = body_framing(headers)
    if framing == "chunked":
        body = await read_chunked(reader)
    elif framing == "length":
        body = await reader.readexactly(length)
    else:
        body = await reader.read()
    return ClientResponse(status, headers, body)


async def resolve(host: str, port: int) -> list[tuple[str, int]]:
    """Resolve a name with the system resolver, as the real apps do.

    ``loop.getaddrinfo`` runs ``socket.getaddrinfo`` (glibc) in a thread, which reads the pod's
    ``/etc/resolv.conf``: ``details`` is tried with each search domain until the cluster DNS
    answers, the same lookup a real pod makes.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][:2] for info in infos]


async def request(method: str, host: str, port: int, target: str,
                  headers: Iterable[tuple[str, str]] = (), body: bytes = b"",
                  timeout: float = 3.0) -> ClientResponse:
    """One HTTP/1.1 request on a fresh connection, bounded by ``timeout`` seconds overall.

    Raises UpstreamError for every failure that the real apps catch and degrade on.
    """
    host_header = host if port == 80 else f"{host}:{port}"
    try:
        async with asyncio.timeout(timeout):
            addresses = await resolve(host, port)
            last_error: Exception | None = None
            for address in addresses:
                try:
                    reader, writer = await asyncio.open_connection(address[0], address[1])
                    break
                except OSError as exc:
                    last_error = exc
            else:
                raise UpstreamError(f"connect to {host}:{port} failed: {last_error}")
            try:
                writer.write(render_request(method, host_header, target, headers, body))
                await writer.drain()
                return await read_response(reader, method)
            finally:
                writer.close()
    except TimeoutError as exc:
        raise UpstreamError(f"{method} http://{host_header}{target}: timed out "
                            f"after {timeout}s") from exc
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, HttpError) as exc:
        raise UpstreamError(f"{method} http://{host_header}{target}: {exc}") from exc


def forward_headers(headers: Headers, names: Iterable[str]) -> list[tuple[str, str]]:
    """The incoming headers named in ``names`` (trace context etc.), to copy upstream."""
    out = []
    for name in names:
        value = headers.get(name)
        if value is not None:
            out.append((name, value))
    return out
