"""HTTP/1.1 inside an HBONE stream, as the waypoint's Envoy codec sees it: request and response
heads parsed with mitmproxy's HTTP/1 parser, chunked and length-delimited bodies, hop-by-hop
headers, Envoy's limits (a header block over 60 KiB is 431) and its local replies.

Pure over a small reader interface (`HttpReader` over anything with `async read(n)`), so it is
tested without sockets; lab/waypoint/proxy.py runs it on each tunnel.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from mitmproxy import http as mhttp
from mitmproxy.net.http import http1
from mitmproxy.net.http import validate as mvalidate

from lab.waypoint import filters as flt

Header = tuple[str, str]

#: Envoy's max_request_headers_kb default (60 KiB): a bigger header block is answered 431.
MAX_REQUEST_HEADERS = 60 * 1024
#: The same bound on a backend's response head (a bigger one is a protocol error, 502).
MAX_RESPONSE_HEADERS = 60 * 1024
#: A request body is buffered (retries, mirrors); above this the waypoint answers 413.
MAX_REQUEST_BODY = 16 * 1024 * 1024
#: Envoy's `server` header value in Istio.
SERVER_HEADER = "istio-envoy"
#: Headers that describe one hop's connection, never forwarded (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
                        "upgrade", "proxy-authenticate", "proxy-authorization"})
READ_CHUNK = 64 * 1024


# ---------------------------------------------------------------------------------------------
# HTTP/1.1 inside the tunnel


class HttpError(Exception):
    """A request the waypoint cannot accept: answered with `status`, then the connection closes."""

    def __init__(self, status: int, details: str, message: str) -> None:
        self.status = status
        self.details = details
        super().__init__(message)


class LimitExceeded(Exception):
    """No separator within the limit (a header block that is too big)."""


class Source(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class HttpReader:
    """A buffered reader over any stream with `read(n)` (an HboneStream, an asyncio
    StreamReader): HTTP/1.1 framing needs look-ahead (pipelined requests, chunk lines)."""

    def __init__(self, source: Source, chunk: int = READ_CHUNK) -> None:
        self._src = source
        self._buf = bytearray()
        self._eof = False
        self.chunk = chunk

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def at_eof(self) -> bool:
        return self._eof and not self._buf

    def peek(self) -> bytes:
        """What is buffered, without consuming it (protocol sniffing looks at the first bytes)."""
        return bytes(self._buf)

    def take_buffered(self) -> bytes:
        """Hand over what is buffered (a TCP chain after sniffing forwards it first)."""
        data, self._buf = bytes(self._buf), bytearray()
        return data

    async def fill(self) -> bool:
        """Read once more from the source into the buffer; False at end of stream."""
        return await self._fill()

    async def _fill(self) -> bool:
        if self._eof:
            return False
        data = await self._src.read(self.chunk)
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    async def wait(self) -> bool:
        """Wait until at least one byte is buffered; False at end of stream."""
        return bool(self._buf) or await self._fill()

    async def read_until(self, separator: bytes, limit: int) -> bytes:
        """Bytes up to and including `separator`. LimitExceeded when more than `limit` bytes
        come without it; asyncio.IncompleteReadError (with what was read) at end of stream."""
        start = 0
        while True:
            idx = self._buf.find(separator, start)
            if idx >= 0:
                end = idx + len(separator)
                if end > limit:
                    raise LimitExceeded(f"{end} bytes before {separator!r}, limit {limit}")
                out = bytes(self._buf[:end])
                del self._buf[:end]
                return out
            if len(self._buf) > limit:
                raise LimitExceeded(f"no {separator!r} within {limit} bytes")
            start = max(0, len(self._buf) - len(separator) + 1)
            if not await self._fill():
                partial = bytes(self._buf)
                self._buf.clear()
                raise asyncio.IncompleteReadError(partial, None)

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not await self._fill():
                partial = bytes(self._buf)
                self._buf.clear()
                raise asyncio.IncompleteReadError(partial, n)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def read_some(self, n: int = READ_CHUNK) -> bytes:
        """Up to n bytes, b"" at end of stream."""
        if not self._buf and not await self._fill():
            return b""
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


def head_lines(head: bytes) -> list[bytes]:
    """A header block (ending in CRLF CRLF) -> its lines WITHOUT their CRLF and without the
    blank line: what mitmproxy's read_request_head / read_response_head expect (its own HTTP/1
    layer hands them the lines of h11's receive buffer, line endings removed; with the CRLF
    kept, a response's reason phrase would end in "\r\n"). A bare CR or LF inside a line is
    refused (request smuggling)."""
    body = head[:-4] if head.endswith(b"\r\n\r\n") else head
    lines = body.split(b"\r\n")
    if any(b"\n" in line or b"\r" in line for line in lines):
        raise ValueError("bare CR or LF in the header block")
    return lines


def header_pairs(headers: mhttp.Headers) -> list[Header]:
    """mitmproxy's headers as (name, value) strings, order and repeats kept (latin-1: every
    byte survives the round trip)."""
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers.fields]


def get_header(headers: Sequence[Header], name: str) -> str | None:
    return flt.get_header(headers, name)


def connection_tokens(headers: Sequence[Header]) -> set[str]:
    value = get_header(headers, "connection") or ""
    return {t.strip().lower() for t in value.split(",") if t.strip()}


def strip_hop_by_hop(headers: Sequence[Header]) -> list[Header]:
    """Remove the headers of one hop: the fixed list, and every header the Connection header names."""
    named = connection_tokens(headers)
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP and k.lower() not in named]


def wants_close(http_version: str, headers: Sequence[Header]) -> bool:
    """Does this message end its connection? (HTTP/1.1 keeps alive unless `close`; 1.0 the reverse.)"""
    tokens = connection_tokens(headers)
    if "close" in tokens:
        return True
    if http_version == "HTTP/1.1":
        return False
    return "keep-alive" not in tokens


@dataclass
class HttpRequest:
    """One request read from the tunnel: the head (parsed by mitmproxy) and the whole body."""

    method: str
    target: str  # the request-target: origin form path (absolute form is reduced to its path)
    http_version: str
    headers: list[Header]
    body: bytes = b""
    head_size: int = 0
    chunked: bool = False

    @property
    def keep_alive(self) -> bool:
        return not wants_close(self.http_version, self.headers)

    @property
    def host(self) -> str:
        return get_header(self.headers, "host") or ""


async def read_chunked(reader: HttpReader, limit: int | None = None) -> AsyncIterator[bytes]:
    """Decode a chunked body (RFC 9112 7.1) chunk by chunk; trailers are read and dropped.
    Raises ValueError for bad framing, asyncio.IncompleteReadError when the stream ends early."""
    total = 0
    while True:
        try:
            line = await reader.read_until(b"\r\n", 4096)
        except LimitExceeded as e:
            raise ValueError(f"chunk size line too long: {e}") from None
        size_text = line[:-2].split(b";", 1)[0].strip()
        if not size_text or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
            raise ValueError(f"bad chunk size line {line[:40]!r}")
        size = int(size_text, 16)
        if size == 0:
            while True:
                try:
                    trailer = await reader.read_until(b"\r\n", 8192)
                except LimitExceeded as e:
                    raise ValueError(f"trailer too long: {e}") from None
                if trailer == b"\r\n":
                    return
        total += size
        if limit is not None and total > limit:
            raise OverflowError(f"body over {limit} bytes")
        data = await reader.read_exactly(size)
        if await reader.read_exactly(2) != b"\r\n":
            raise ValueError("chunk data not followed by CRLF")
        yield data


async def read_request(reader: HttpReader, *, max_headers: int = MAX_REQUEST_HEADERS,
                       max_body: int = MAX_REQUEST_BODY,
                       on_continue: Callable[[], Awaitable[None]] | None = None) -> HttpRequest | None:
    """Read the next request of a keep-alive connection: None at a clean end of stream (no
    byte of a new request), HttpError (400, 413, 431) for what the waypoint must refuse."""
    while True:
        try:
            head = await reader.read_until(b"\r\n\r\n", max_headers)
        except LimitExceeded:
            raise HttpError(431, "http1.headers_too_large",
                            f"the request's header block is over {max_headers // 1024} KiB") from None
        except asyncio.IncompleteReadError as e:
            if not e.partial.strip(b"\r\n"):
                return None
            raise HttpError(400, "http1.codec_error", "the stream ended inside a request's header block") from None
        stripped = head.lstrip(b"\r\n")  # RFC 9112 2.2: ignore empty lines before a request line
        if stripped:
            head = stripped
            break
    try:
        parsed = http1.read_request_head(head_lines(head))
        mvalidate.validate_headers(parsed)
        size = http1.expected_http_body_size(parsed)
    except ValueError as e:
        raise HttpError(400, "http1.codec_error", f"malformed request: {e}") from None
    method = parsed.method
    if method == "CONNECT":
        raise HttpError(400, "http1.codec_error", "CONNECT inside the HBONE tunnel is not supported")
    headers = header_pairs(parsed.headers)
    if parsed.http_version == "HTTP/1.1" and get_header(headers, "host") is None:
        raise HttpError(400, "missing_host_header", "an HTTP/1.1 request without a Host header")
    target = parsed.path or "/"
    if parsed.authority and get_header(headers, "host") is None:
        headers.append(("host", parsed.authority))
    if (get_header(headers, "expect") or "").lower() == "100-continue":
        headers = [(k, v) for k, v in headers if k.lower() != "expect"]
        if size != 0 and on_continue is not None:
            await on_continue()
    try:
        if size is None:
            parts = [p async for p in read_chunked(reader, max_body)]
            body = b"".join(parts)
        elif size > max_body:
            raise HttpError(413, "request_payload_too_large", f"a request body of {size} bytes is over the limit")
        elif size > 0:
            body = await reader.read_exactly(size)
        else:
            body = b""
    except OverflowError:
        raise HttpError(413, "request_payload_too_large", f"a request body over {max_body} bytes") from None
    except ValueError as e:
        raise HttpError(400, "http1.codec_error", f"malformed chunked body: {e}") from None
    except asyncio.IncompleteReadError:
        raise HttpError(400, "http1.codec_error", "the stream ended inside the request body") from None
    return HttpRequest(method=method, target=target, http_version=parsed.http_version, headers=headers, body=body,
                       head_size=len(head), chunked=size is None)


def serialize_head(start_line: str, headers: Sequence[Header]) -> bytes:
    lines = [start_line, *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def http_date(ts: float | None = None) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(ts))


def local_reply(status: int, body: str | bytes = b"", *, close: bool = False,
                headers: Sequence[Header] = ()) -> tuple[bytes, list[Header], bytes]:
    """Envoy's local reply (answered by the waypoint itself): (head bytes, headers, body)."""
    data = body.encode() if isinstance(body, str) else body
    reason = mhttp.status_codes.RESPONSES.get(status, "")
    hdrs: list[Header] = list(headers)
    if data:
        hdrs += [("content-length", str(len(data))), ("content-type", "text/plain")]
    else:
        hdrs.append(("content-length", "0"))
    hdrs += [("date", http_date()), ("server", SERVER_HEADER)]
    if close:
        hdrs.append(("connection", "close"))
    return serialize_head(f"HTTP/1.1 {status} {reason}", hdrs), hdrs, data


def response_body_size(method: str, status: int, headers: Sequence[Header]) -> int | None:
    """How a response body is framed (RFC 9112 6.3): n bytes, None (chunked) or -1 (until the
    backend closes). ValueError for an invalid Content-Length or Transfer-Encoding."""
    if method == "HEAD" or 100 <= status < 200 or status in (204, 304):
        return 0
    te = get_header(headers, "transfer-encoding")
    if te is not None:
        return None if mvalidate.parse_transfer_encoding(te).endswith("chunked") else -1
    length = get_header(headers, "content-length")
    return mvalidate.parse_content_length(length) if length is not None else -1


@dataclass
class HttpResponseHead:
    status: int
    reason: str
    http_version: str
    headers: list[Header]

    def body_size(self, request_method: str) -> int | None:
        """Bytes of body: n, None (chunked) or -1 (until the connection closes)."""
        return response_body_size(request_method, self.status, self.headers)


async def read_response_head(reader: HttpReader, limit: int = MAX_RESPONSE_HEADERS) -> HttpResponseHead:
    """The next final response head from a backend (1xx interim answers are skipped).
    ValueError for anything malformed (the waypoint answers 502 UPE)."""
    while True:
        try:
            head = await reader.read_until(b"\r\n\r\n", limit)
        except LimitExceeded as e:
            raise ValueError(f"response head too large: {e}") from None
        parsed = http1.read_response_head(head_lines(head))
        mvalidate.validate_headers(parsed)
        if 100 <= parsed.status_code < 200 and parsed.status_code != 101:
            continue
        return HttpResponseHead(parsed.status_code, parsed.reason, parsed.http_version, header_pairs(parsed.headers))


async def response_body(reader: HttpReader, size: int | None) -> AsyncIterator[bytes]:
    """The pieces of a response body as they arrive (de-chunked). IncompleteReadError or
    HboneError when the backend goes away before the end."""
    if size is None:
        async for part in read_chunked(reader):
            yield part
        return
    if size < 0:
        while data := await reader.read_some():
            yield data
        return
    left = size
    while left > 0:
        data = await reader.read_some(min(left, READ_CHUNK))
        if not data:
            raise asyncio.IncompleteReadError(b"", left)
        left -= len(data)
        yield data


