"""ztunnel's HBONE connection pool (zt:src/proxy/pool.rs ``WorkloadHBONEPool``, ``WorkloadKey``).

An HBONE tunnel is an mTLS + HTTP/2 connection; every application TCP connection becomes one
CONNECT stream on it. ztunnel reuses a tunnel for every connection with the same

    WorkloadKey{src_id, dst_id, src, dst}
        src_id  the source workload's identity (its certificate is presented),
        dst_id  the identities the server may present (the destination's, plus the service's SANs),
        src     the source pod's IP (the tunnel's TCP connection leaves from the pod),
        dst     the next hop, podIP:15008 (or waypointIP:15008),

so a tunnel never mixes identities: two pods with the same service account on one node still get
separate tunnels (their IPs differ), and pod A talking to B and to C uses two. A tunnel carries
at most POOL_MAX_STREAMS_PER_CONNECTION (100) streams; when all are busy the pool opens another
tunnel for the same key. Tunnels idle for 5 minutes are closed (lab.hbone.HboneConnectionPool
does the bookkeeping).

Opening a tunnel (`WorkloadConnector`): a TCP socket created INSIDE the source pod's netns with
mark 1337 (so the pod's rules let it out and its source IP is the pod's), a connect with a 10 s
timeout ("connection timed out, maybe a NetworkPolicy is blocking HBONE port 15008"), TLS 1.3 with
ALPN h2 and no SNI, presenting the source workload's certificate; then the server's certificate
must carry exactly one of `dst_id` ("peer did not present the expected SAN").
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lab.common.seams import SeamError, Seams
from lab.hbone import (
    HboneConnection,
    HboneConnectionPool,
    HboneError,
    HboneStream,
    open_hbone_connection,
)
from lab.hbone.headers import Header
from lab.tls.contexts import IdentityMismatch, match_server_identity, verify_server_identity
from lab.tls.identity import Identity
from lab.ztunnel.proxy import ProxyError, io_error
from lab.ztunnel.socket import Addr, format_addr, upstream_socket

if TYPE_CHECKING:
    from lab.ztunnel.identity_manager import IdentityManager
    from lab.ztunnel.inpod.netns import InpodNetns
    from lab.ztunnel.tls_workload import WorkloadTls

#: zt:src/proxy.rs MaybeHBONENetworkPolicyError (the inner error is tokio's timeout text).
HBONE_TIMEOUT_ERROR = "connection timed out, maybe a NetworkPolicy is blocking HBONE port {port}: deadline has elapsed"


@dataclass(frozen=True)
class WorkloadKey:
    """What makes two connections share a tunnel (zt ``WorkloadKey``). `netns` rides along to
    open the tunnel from inside the source pod; it is not part of the key."""

    src_id: Identity
    dst_id: tuple[Identity, ...]
    src: str
    dst: Addr
    netns: InpodNetns | None = field(default=None, compare=False, hash=False, repr=False)

    def __str__(self) -> str:
        dst_ids = ",".join(str(i) for i in self.dst_id)
        return f"{self.src_id}@{self.src} -> [{dst_ids}]@{format_addr(self.dst)}"


class HboneConnectFailed(ProxyError):
    """The tunnel could not be opened (TCP, TLS or identity)."""


@dataclass
class WorkloadConnector:
    """Opens one tunnel for a key (zt ``HboneConnector``)."""

    identities: IdentityManager
    tls: WorkloadTls
    mark: int
    connect_timeout: float = 10.0
    max_streams: int = 100
    seams: Seams | None = None  # the identity exercise plugs a learner's match_server_identity here

    def match(self) -> Callable[[list[Identity], list[Identity]], Identity | None]:
        if self.seams is None:
            return match_server_identity
        return self.seams.get("ztunnel.match_server_identity", match_server_identity,
                              check=lambda v: None if v is None or isinstance(v, Identity) else "expected an Identity or None")

    async def __call__(self, key: WorkloadKey) -> HboneConnection:
        if key.netns is None:
            raise HboneConnectFailed("no network namespace to open the HBONE connection from")
        cert = await self.identities.get(key.src_id)
        ctx = self.tls.client(cert)
        sock = key.netns.run(lambda: upstream_socket(mark=self.mark))
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, key.dst), self.connect_timeout)
        except TimeoutError:
            sock.close()
            raise HboneConnectFailed(HBONE_TIMEOUT_ERROR.format(port=key.dst[1])) from None
        except OSError as e:
            sock.close()
            raise HboneConnectFailed(io_error(e)) from e
        proved: list[Identity] = []  # the server's identity, checked before any HTTP/2 byte is sent
        try:
            conn = await open_hbone_connection(
                key.dst[0], key.dst[1], ctx, sock=sock, timeout=self.connect_timeout, max_streams=self.max_streams,
                verify=lambda ssl_object: proved.append(verify_server_identity(ssl_object, key.dst_id, self.match())))
        except IdentityMismatch as e:
            raise HboneConnectFailed(f"{e}: {e.detail()}") from e
        except SeamError as e:
            sock.close()
            raise HboneConnectFailed(str(e)) from e
        except ssl.SSLError as e:
            sock.close()
            raise HboneConnectFailed(f"tls handshake error: {e.reason or e}") from e
        except (OSError, HboneError) as e:
            sock.close()
            raise HboneConnectFailed(str(e) if isinstance(e, HboneError) else io_error(e)) from e
        conn.peer_identity = proved[0]  # type: ignore[attr-defined]  # which expected identity the server proved
        return conn


@dataclass
class PooledStream:
    """A CONNECT stream sent on a pooled tunnel; `new` tells whether the tunnel was just opened."""

    connection: HboneConnection
    stream: HboneStream
    new: bool

    @property
    def peer_identity(self) -> Identity | None:
        """The identity the server's certificate proved (one of the key's `dst_id`)."""
        return getattr(self.connection, "peer_identity", None)


class WorkloadHbonePool:
    """The pool of one ztunnel: every pod's tunnels, keyed by WorkloadKey."""

    def __init__(self, connect: Callable[[WorkloadKey], Awaitable[HboneConnection]], *,
                 idle_timeout: float | None = None) -> None:
        kwargs: dict[str, Any] = {} if idle_timeout is None else {"idle_timeout": idle_timeout}
        self._pool: HboneConnectionPool[WorkloadKey] = HboneConnectionPool(connect, **kwargs)

    async def send_request(self, key: WorkloadKey, header_list: Sequence[Header]) -> PooledStream:
        """Find (or open) a tunnel for `key` with a free stream and send the request's HEADERS on
        it. Raises ProxyError when no tunnel can be opened."""
        before = self._pool.connections_opened
        conn, stream = await self._pool.checkout(key, header_list)
        return PooledStream(conn, stream, new=self._pool.connections_opened != before and conn.streams_opened == 1)

    async def connect_ahead(self, key: WorkloadKey) -> tuple[HboneConnection, bool]:
        """Step mode: make sure a tunnel for `key` with a free stream exists (opening it now: TCP,
        mTLS, identity check; True if it was opened), so the learner sees the handshake as a step
        of its own before the CONNECT. `send_request` then uses it. Raises ProxyError."""
        return await self._pool.reserve(key)

    @property
    def connections_opened(self) -> int:
        return self._pool.connections_opened

    def keys(self) -> list[WorkloadKey]:
        return self._pool.keys()

    def connections(self, key: WorkloadKey) -> list[HboneConnection]:
        return self._pool.connections(key)

    async def close_from(self, netns: InpodNetns) -> int:
        """Close every tunnel opened from one pod (it left the mesh); returns how many."""
        conns = [c for k in self._pool.keys() if k.netns is netns for c in self._pool.connections(k)]
        await asyncio.gather(*(c.aclose() for c in conns), return_exceptions=True)
        return len(conns)

    async def close(self) -> None:
        await self._pool.close()
