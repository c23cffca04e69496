"""The HBONE server: terminate CONNECT streams on port 15008
(ztunnel src/proxy/h2/server.rs, the request checks of src/proxy/inbound.rs).

`serve_hbone` runs the HTTP/2 server side of one accepted (already TLS-wrapped) connection.
For every new stream it checks the request as ztunnel does before anything else:

- the method must be CONNECT, the `:authority` an `ip:port` -> otherwise 400;
- at most 100 concurrent streams (advertised in SETTINGS): an extra stream is refused with
  RST_STREAM(REFUSED_STREAM), the connection and its other streams carry on;
- a header list over 16 KiB (SETTINGS_MAX_HEADER_LIST_SIZE) -> 431, the connection carries on.

Then the caller's handler decides (authorization -> 401, upstream failure -> 503, or 200
and a bidirectional copy). A peer that does not speak HTTP/2 (garbage, wrong preface) gets a
GOAWAY and the connection is closed; other connections are not affected.

The streams the server answers by itself (400, 431, REFUSED_STREAM) never reach the handler;
`on_reject` hears of each one as a `RejectedStream`, so that the proxy can log them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from h2.connection import _decode_headers  # the HPACK decode step, reused for refused streams
from h2.errors import ErrorCodes
from h2.stream import StreamClosedBy
from hyperframe.frame import RstStreamFrame

from lab.hbone.headers import (
    STATUS_BAD_REQUEST,
    STATUS_HEADERS_TOO_LARGE,
    STATUS_OK,
    STATUS_SERVICE_UNAVAILABLE,
    AuthorityError,
    Header,
    header_value,
    parse_authority,
)
from lab.hbone.stream import (
    MAX_CONCURRENT_STREAMS,
    MAX_HEADER_LIST_SIZE,
    H2Session,
    HboneError,
    HboneH2Connection,
    HboneStream,
    HboneStreamReset,
    decode_headers,
    log,
)

#: Header blocks between MAX_HEADER_LIST_SIZE and this are answered 431; larger ones are an
#: attack (HPACK bomb) and end the connection.
HARD_HEADER_LIST_LIMIT = 64 * 1024


@dataclass(frozen=True)
class RejectedStream:
    """A stream the server answered itself, before any handler: a failed request check (`status`
    400 or 431), or, with `status` 0, a stream over SETTINGS_MAX_CONCURRENT_STREAMS refused with
    RST_STREAM(REFUSED_STREAM)."""

    stream_id: int
    status: int
    reason: str
    headers: list[Header] = field(default_factory=list)


@dataclass(frozen=True)
class ConnectRequest:
    """A CONNECT request that passed the protocol checks."""

    authority: str
    headers: list[Header] = field(default_factory=list)  # all headers, pseudo-headers included
    stream_id: int = 0

    def get(self, name: str) -> str | None:
        return header_value(self.headers, name)

    @property
    def destination(self) -> tuple[str, int]:
        """The `(ip, port)` of the authority."""
        return parse_authority(self.authority)


Respond = Callable[..., Awaitable[HboneStream | None]]
Handler = Callable[[ConnectRequest, Respond], Awaitable[None]]
OnReject = Callable[[RejectedStream], None]


def header_list_size(headers: Sequence[Header]) -> int:
    """Size of a header list as SETTINGS_MAX_HEADER_LIST_SIZE counts it (RFC 9113 6.5.2)."""
    return sum(len(k.encode()) + len(v.encode()) + 32 for k, v in headers)


def validate_connect_request(headers: Sequence[Header]) -> tuple[int, str]:
    """The checks ztunnel's inbound makes on a new stream, as `(status, reason)`.

    200 means "go on"; 400 for a method other than CONNECT or an authority that is not an
    `ip:port`; 431 for a header list over 16 KiB.
    """
    if header_list_size(headers) > MAX_HEADER_LIST_SIZE:
        return STATUS_HEADERS_TOO_LARGE, f"header list over {MAX_HEADER_LIST_SIZE} bytes"
    method = header_value(headers, ":method")
    if method != "CONNECT":
        return STATUS_BAD_REQUEST, f"method {method!r} is not CONNECT"
    authority = header_value(headers, ":authority")
    if authority is None:
        return STATUS_BAD_REQUEST, "no :authority"
    try:
        parse_authority(authority)
    except AuthorityError as e:
        return STATUS_BAD_REQUEST, str(e)
    return STATUS_OK, ""


class _HboneServerH2(HboneH2Connection):
    """h2's server connection with the stream limit and header limit as *stream* errors.

    Plain h2 treats a stream over SETTINGS_MAX_CONCURRENT_STREAMS and an oversized header
    block as connection errors (GOAWAY, every stream lost). RFC 9113 5.1.2 allows, and
    ztunnel's Rust h2 does, refusing just that stream with RST_STREAM(REFUSED_STREAM).
    """

    def __init__(self) -> None:
        super().__init__(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.refused_streams: list[int] = []
        self.on_refused: Callable[[int], None] | None = None

    def _receive_headers_frame(self, frame):  # type: ignore[no-untyped-def]
        sid = frame.stream_id
        self.decoder.max_header_list_size = HARD_HEADER_LIST_LIMIT  # 431 below this, see above
        if (sid not in self.streams and sid % 2 == 1 and sid > self.highest_inbound_stream_id
                and self.open_inbound_streams >= self.local_settings.max_concurrent_streams):
            _decode_headers(self.decoder, frame.data)  # keep the HPACK table in step with the peer
            self.highest_inbound_stream_id = sid
            self._closed_streams[sid] = StreamClosedBy.SEND_RST_STREAM
            rst = RstStreamFrame(sid)
            rst.error_code = ErrorCodes.REFUSED_STREAM
            self.refused_streams.append(sid)
            if self.on_refused is not None:
                self.on_refused(sid)
            return [rst], []
        return super()._receive_headers_frame(frame)


class HboneServerConnection(H2Session):
    """The server side of one HBONE connection; `serve_hbone` is the usual entry point."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler, *,
                 max_streams: int = MAX_CONCURRENT_STREAMS, on_reject: OnReject | None = None) -> None:
        self.handler = handler
        self.on_reject = on_reject
        self._handler_tasks: dict[asyncio.Task[None], HboneStream] = {}
        self.requests_seen = 0
        self.rejected: list[tuple[int, int, str]] = []  # (stream id, status, reason)
        conn = _HboneServerH2()
        conn.on_refused = lambda sid: self._notify(RejectedStream(
            sid, 0, f"more than {max_streams} concurrent streams on one connection: refused (REFUSED_STREAM)"))
        super().__init__(reader, writer, conn, max_concurrent_streams=max_streams)

    @property
    def refused_streams(self) -> list[int]:
        return self.conn.refused_streams  # type: ignore[attr-defined, no-any-return]

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        headers = decode_headers(event.headers)
        self.requests_seen += 1
        status, reason = validate_connect_request(headers)
        if status != STATUS_OK:
            log.debug("HBONE stream %d rejected with %d: %s", sid, status, reason)
            self.rejected.append((sid, status, reason))
            self._answer_and_end(sid, status)
            self._notify(RejectedStream(sid, status, reason, headers))
            return
        stream = HboneStream(self, sid)
        self.streams[sid] = stream
        request = ConnectRequest(authority=header_value(headers, ":authority") or "", headers=headers,
                                 stream_id=sid)
        task = asyncio.create_task(self._run_handler(request, stream), name=f"hbone-stream-{sid}")
        self._handler_tasks[task] = stream
        task.add_done_callback(lambda t: self._handler_tasks.pop(t, None))

    def _notify(self, rejected: RejectedStream) -> None:
        """Tell `on_reject`; its failure must not take the connection down."""
        if self.on_reject is not None:
            try:
                self.on_reject(rejected)
            except Exception:  # noqa: BLE001 - a logging hook must not end the connection
                log.exception("HBONE on_reject callback failed for stream %d", rejected.stream_id)

    def _answer_and_end(self, sid: int, status: int, headers: Sequence[Header] = ()) -> None:
        """A final non-200 answer: HEADERS with END_STREAM, then RST_STREAM(NO_ERROR) so the
        client stops sending (RFC 9113 8.1)."""
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.send_headers(sid, [(":status", str(status)), *headers], end_stream=True)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.reset_stream(sid, ErrorCodes.NO_ERROR)
        self._flush()

    async def _run_handler(self, request: ConnectRequest, stream: HboneStream) -> None:
        responded = False

        async def respond(status: int, headers: Sequence[Header] = ()) -> HboneStream | None:
            """Answer the CONNECT. 200 returns the stream to copy bytes on; others end it."""
            nonlocal responded
            if responded:
                raise HboneError("CONNECT already answered")
            responded = True
            if stream.error is not None:
                raise stream.error
            if status == STATUS_OK:
                self.conn.send_headers(stream.stream_id, [(":status", "200"), *headers])
                self._flush()
                return stream
            self._give_back_unread(stream)
            self._answer_and_end(stream.stream_id, status, headers)
            stream._on_error(HboneStreamReset(ErrorCodes.NO_ERROR, f"answered {status}"))
            self._forget(stream)
            return None

        try:
            await self.handler(request, respond)
        except asyncio.CancelledError:
            stream.close()
            raise
        except Exception:
            log.exception("HBONE handler failed for %s", request.authority)
            if not responded and stream.error is None:
                with contextlib.suppress(Exception):
                    await respond(STATUS_SERVICE_UNAVAILABLE)
            stream.close()
            return
        if not responded:
            await respond(STATUS_SERVICE_UNAVAILABLE)
        elif stream.error is None:
            if stream._eof_requested:
                await stream.wait_sent()
            stream.close()  # RST only if the stream is not fully closed yet

    def _cancel_unfinished_handlers(self) -> None:
        """The connection is gone: cancel the handlers of streams still open. A handler whose
        stream already ended cleanly both ways is only finishing up (ztunnel writes its access-log
        line); cancelling it because the peer then closed the connection would log a clean
        connection as cut."""
        for task, stream in list(self._handler_tasks.items()):
            if stream.error is not None or not stream._closed.is_set():
                task.cancel()

    def _shutdown(self, reason: str) -> None:
        super()._shutdown(reason)
        self._cancel_unfinished_handlers()

    async def aclose(self, error_code: int = ErrorCodes.NO_ERROR) -> None:
        await super().aclose(error_code)
        self._cancel_unfinished_handlers()
        tasks = list(self._handler_tasks)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=1.0)  # finishing handlers get a second
            for task in late:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def serve_hbone(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler, *,
                      max_streams: int = MAX_CONCURRENT_STREAMS, on_reject: OnReject | None = None) -> str:
    """Serve one accepted HBONE connection until it ends; returns why it ended.

    `handler(request, respond)` is called once per valid CONNECT stream; it must call
    `await respond(status, headers=())` once: 200 returns the HboneStream, anything else
    ends the stream. A handler that returns without answering, or raises, yields 503.
    `on_reject(RejectedStream)` is called for every stream answered without the handler.
    """
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        return f"ALPN {ssl_object.selected_alpn_protocol()!r} is not h2"
    session = HboneServerConnection(reader, writer, handler, max_streams=max_streams, on_reject=on_reject)
    try:
        await session.closed.wait()
    finally:
        await session.aclose()
    return session.close_reason or "closed"
