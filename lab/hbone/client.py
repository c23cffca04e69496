"""The HBONE client: CONNECT streams over one pooled HTTP/2 connection
(ztunnel src/proxy/h2/client.rs, src/proxy/pool.rs).

The source ztunnel (and the waypoint, towards backends) opens one mTLS + HTTP/2 connection
per `WorkloadKey` (source identity, destination identities, source IP, destination
ip:15008) and multiplexes one CONNECT stream per application TCP connection on it. When
all of a connection's streams are in use (POOL_MAX_STREAMS_PER_CONNECTION = 100), the pool
opens another connection for the same key rather than queueing; connections that carried no
stream for POOL_UNUSED_RELEASE_TIMEOUT (5 minutes) are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

import h2.config
import h2.events
import h2.exceptions
from h2.errors import ErrorCodes

from lab.hbone import wire
from lab.hbone.headers import Header, connect_header_list
from lab.hbone.stream import (
    MAX_CONCURRENT_STREAMS,
    H2Session,
    HboneConnectionLost,
    HboneError,
    HboneH2Connection,
    HboneStream,
    HboneStreamReset,
    decode_headers,
    log,
)

#: zt:src/config.rs POOL_UNUSED_RELEASE_TIMEOUT
POOL_UNUSED_RELEASE_TIMEOUT = 300.0
#: zt:src/proxy.rs: how long the TCP + TLS connect to port 15008 may take.
CONNECT_TIMEOUT = 10.0


class HboneHttpError(HboneError):
    """The HBONE server answered the CONNECT with a status other than 200
    (ztunnel's `Error::HttpStatus`): 400 bad request, 401 denied by policy, 503 no upstream."""

    def __init__(self, status: int, headers: Sequence[Header] = ()) -> None:
        self.status = status
        self.headers = list(headers)
        super().__init__(f"HBONE CONNECT failed with HTTP status {status}")


class HboneConnectionFull(HboneError):
    """No free stream slot on this connection (or it is closing)."""


class HboneConnection(H2Session):
    """One mTLS + HTTP/2 client connection carrying up to `max_streams` CONNECT streams.

    Works over any asyncio reader/writer pair; must be created inside a running event loop
    (it starts its reader and sender tasks at once).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 max_streams: int = MAX_CONCURRENT_STREAMS) -> None:
        conn = HboneH2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.max_streams = max_streams
        self._responses: dict[int, asyncio.Future[tuple[int, list[Header]]]] = {}
        self.idle_since = asyncio.get_running_loop().time()
        self.on_idle: Callable[[HboneConnection], None] | None = None
        self.retired = False  # reached its stream limit once: the pool never picks it again
        self.streams_opened = 0
        super().__init__(reader, writer, conn, max_concurrent_streams=max_streams)

    def __repr__(self) -> str:
        peer = self.writer.get_extra_info("peername")
        return f"<HboneConnection to {peer} streams={len(self.streams)} closed={self.closed.is_set()}>"

    @property
    def active_streams(self) -> int:
        return len(self.streams)

    def stream_limit(self) -> int:
        """Our own limit, lowered to what the server advertised (SETTINGS_MAX_CONCURRENT_STREAMS)."""
        return min(self.max_streams, self.conn.remote_settings.max_concurrent_streams)

    def has_capacity(self) -> bool:
        return (not self.closed.is_set() and self.close_reason is None
                and len(self.streams) < self.stream_limit())

    def open_stream(self, header_list: Sequence[Header]) -> HboneStream:
        """Send a request's HEADERS now (synchronously) and return its stream.

        Taking the slot without awaiting is what lets the pool hand out slots without races.
        """
        if self.closed.is_set() or self.close_reason is not None:
            raise HboneConnectionLost(self.close_reason or "connection closed")
        if len(self.streams) >= self.stream_limit():
            raise HboneConnectionFull(f"{len(self.streams)} of {self.stream_limit()} streams in use")
        sid = self.conn.get_next_available_stream_id()
        try:
            self.conn.send_headers(sid, list(header_list))
        except h2.exceptions.TooManyStreamsError as e:
            raise HboneConnectionFull(str(e)) from e
        stream = HboneStream(self, sid)
        self.streams[sid] = stream
        self._responses[sid] = asyncio.get_running_loop().create_future()
        self.streams_opened += 1
        self._flush()
        return stream

    async def await_response(self, stream: HboneStream) -> tuple[int, list[Header], HboneStream]:
        """Wait for the response of a stream made by open_stream; non-200 raises HboneHttpError."""
        fut = self._responses[stream.stream_id]
        try:
            status, headers = await fut
        except BaseException:
            stream.close()
            raise
        finally:
            self._responses.pop(stream.stream_id, None)
        stream.response_headers = headers
        if status != 200:
            stream.close()
            raise HboneHttpError(status, headers)
        return status, headers, stream

    async def request(self, header_list: Sequence[Header]) -> tuple[int, list[Header], HboneStream]:
        """Any request (tests use it to send a non-CONNECT one)."""
        return await self.await_response(self.open_stream(header_list))

    async def connect_stream(self, authority: str, headers: Sequence[Header] = ()
                             ) -> tuple[int, list[Header], HboneStream]:
        """CONNECT to `authority` (`ip:port`) and return (200, response headers, stream)."""
        return await self.request(connect_header_list(authority, list(headers)))

    # ------------------------------------------------------------------ session hooks
    def _on_response(self, event: h2.events.Event) -> None:
        if not isinstance(event, h2.events.ResponseReceived):
            return  # 1xx informational responses carry nothing for CONNECT
        headers = decode_headers(event.headers)
        fut = self._responses.get(event.stream_id)
        if fut is None or fut.done():
            return
        try:
            status = int(dict(headers).get(":status", ""))
        except ValueError:
            status = 502
        fut.set_result((status, headers))

    def _on_stream_reset(self, stream: HboneStream, error_code: int) -> None:
        fut = self._responses.get(stream.stream_id)
        if fut is not None and not fut.done():
            fut.set_exception(HboneStreamReset(error_code, "reset by peer before the response"))

    def _stream_finished(self, stream: HboneStream) -> None:
        fut = self._responses.get(stream.stream_id)
        if fut is not None and not fut.done():
            fut.set_exception(stream.error or HboneConnectionLost("stream ended before the response"))
        if not self.streams:
            self.idle_since = asyncio.get_running_loop().time()
            if self.on_idle is not None:
                self.on_idle(self)

    def _shutdown(self, reason: str) -> None:
        for fut in self._responses.values():
            if not fut.done():
                fut.set_exception(HboneConnectionLost(reason))
        super()._shutdown(reason)


async def open_hbone_connection(host: str, port: int, ssl_context: ssl.SSLContext | None, *,
                                local_addr: tuple[str, int] | None = None,
                                sock: object | None = None,
                                max_streams: int = MAX_CONCURRENT_STREAMS,
                                timeout: float = CONNECT_TIMEOUT,
                                verify: Callable[[ssl.SSLObject], object] | None = None) -> HboneConnection:
    """TCP (+ TLS with ALPN h2, no SNI) to an HBONE port, then the HTTP/2 client.

    `sock` is a connected or unconnected socket made elsewhere, e.g. inside a pod's netns.
    `verify(ssl_object)` checks the server's identity (see lab.tls.contexts) right after the
    handshake, BEFORE any HTTP/2 byte is sent: rustls runs ztunnel's identity verifier inside
    the handshake, so a peer with the wrong identity never even sees the connection preface.
    If it raises, the connection is aborted and the exception propagates.
    """
    tls = {"ssl": ssl_context, "server_hostname": ""} if ssl_context is not None else {}
    try:
        if sock is not None:
            reader, writer = await asyncio.wait_for(
                wire.open_connection(sock=sock, **tls), timeout)  # type: ignore[arg-type]
        else:
            reader, writer = await asyncio.wait_for(
                wire.open_connection(host, port, local_addr=local_addr, **tls), timeout)  # type: ignore[arg-type]
    except asyncio.TimeoutError as e:
        raise HboneError(f"connection timed out, maybe a NetworkPolicy is blocking HBONE port {port}") from e
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
        writer.close()
        raise HboneError(f"peer did not negotiate ALPN h2 (got {ssl_object.selected_alpn_protocol()!r})")
    if verify is not None and ssl_object is not None:
        try:
            verify(ssl_object)
        except BaseException:
            writer.transport.abort()
            raise
    return HboneConnection(reader, writer, max_streams=max_streams)


K = TypeVar("K", bound=Hashable)


class HboneConnectionPool(Generic[K]):
    """Connections keyed by a hashable key (ztunnel's `WorkloadKey`), several per key when
    one is full. `connect(key)` is the caller's async factory making a new HboneConnection
    (TCP from the right netns and source IP, TLS with the source workload's certificate)."""

    def __init__(self, connect: Callable[[K], Awaitable[HboneConnection]], *,
                 idle_timeout: float = POOL_UNUSED_RELEASE_TIMEOUT) -> None:
        self._connect = connect
        self.idle_timeout = idle_timeout
        self._conns: dict[K, list[HboneConnection]] = {}
        self._locks: dict[K, asyncio.Lock] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self.connections_opened = 0

    def connections(self, key: K) -> list[HboneConnection]:
        """The live connections for a key."""
        return [c for c in self._conns.get(key, []) if not c.closed.is_set()]

    def keys(self) -> list[K]:
        return [k for k in self._conns if self.connections(k)]

    async def checkout(self, key: K, header_list: Sequence[Header]) -> tuple[HboneConnection, HboneStream]:
        """A connection for `key` with a free slot (new if none), and a stream sent on it."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            conn = self._pick(key)
            if conn is None:
                conn = await self._open(key)
            self._cancel_timer(conn)
            stream = conn.open_stream(header_list)
            if not conn.has_capacity():
                self._retire(key, conn)
            return conn, stream

    @staticmethod
    def _retire(key: K, conn: HboneConnection) -> None:
        """A connection that reached its stream limit is never picked again (ztunnel pool.rs
        `maybe_checkin_conn` does not check it back in): it serves the streams it has and closes
        once they are done; later connections open a new tunnel even after its streams finish.
        It stays listed, so closing a pod's or the pool's connections still reaches it."""
        conn.retired = True

    async def reserve(self, key: K) -> tuple[HboneConnection, bool]:
        """A connection for `key` with a free slot, opened now if there is none (True: just opened),
        without sending anything on it: step mode shows the mTLS handshake before the CONNECT. A
        connection opened here that no stream ever uses is released like any idle one."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            conn = self._pick(key)
            if conn is not None:
                return conn, False
            conn = await self._open(key)
            self._on_idle(key, conn)
            return conn, True

    async def _open(self, key: K) -> HboneConnection:
        conn = await self._connect(key)
        self.connections_opened += 1
        conn.on_idle = lambda c, k=key: self._on_idle(k, c)
        self._conns.setdefault(key, []).append(conn)
        return conn

    async def connect_stream(self, key: K, authority: str, headers: Sequence[Header] = ()
                             ) -> tuple[int, list[Header], HboneStream]:
        """CONNECT through a pooled connection; raises HboneHttpError on a non-200 answer."""
        conn, stream = await self.checkout(key, connect_header_list(authority, list(headers)))
        return await conn.await_response(stream)

    def _pick(self, key: K) -> HboneConnection | None:
        live = self.connections(key)
        if live:
            self._conns[key] = live
        else:
            self._conns.pop(key, None)
        for conn in live:
            if conn.has_capacity() and not conn.retired:
                return conn
        return None

    def _on_idle(self, key: K, conn: HboneConnection) -> None:
        self._cancel_timer(conn)
        if conn.retired:  # its last stream is done: it goes now
            with contextlib.suppress(ValueError, KeyError):
                self._conns[key].remove(conn)
            asyncio.get_running_loop().create_task(conn.aclose())
            return
        loop = asyncio.get_running_loop()
        self._timers[id(conn)] = loop.call_later(self.idle_timeout, self._maybe_release, key, conn)

    def _cancel_timer(self, conn: HboneConnection) -> None:
        timer = self._timers.pop(id(conn), None)
        if timer is not None:
            timer.cancel()

    def _maybe_release(self, key: K, conn: HboneConnection) -> None:
        self._timers.pop(id(conn), None)
        if conn.active_streams:
            return
        log.debug("releasing idle HBONE connection %r", conn)
        with contextlib.suppress(ValueError, KeyError):
            self._conns[key].remove(conn)
        asyncio.get_running_loop().create_task(conn.aclose())

    async def close(self) -> None:
        """Close every pooled connection (GOAWAY)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        conns = [c for lst in self._conns.values() for c in lst]
        self._conns.clear()
        await asyncio.gather(*(c.aclose(ErrorCodes.NO_ERROR) for c in conns), return_exceptions=True)
