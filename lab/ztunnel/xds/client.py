"""ztunnel's Delta ADS client (zt:src/xds/client.rs `AdsClient`).

One long-lived stream to istiod (port 15012, TLS) carries everything ztunnel knows about the mesh:

1. connect with TLS 1.3, verifying istiod's certificate against the mesh root (the trust bundle
   ztunnel was given) and checking that it names istiod; ztunnel authenticates with its service-account token, sent with the first
   request;
2. subscribe to both types, `istio.workload.Address` and `istio.security.Authorization`, with a
   wildcard ("*"); after a reconnect, `initial_resource_versions` tells istiod which resources
   (and versions) ztunnel still holds, so it only sends what changed;
3. apply every DeltaDiscoveryResponse to the ProxyState (added/updated `resources`,
   `removed_resources`), then answer it: an ACK is a request carrying `response_nonce`; a NACK
   adds `error_detail` when a resource could not be used (the good ones are still applied);
4. ztunnel is "ready" once the first response of every type has been applied;
5. when the stream breaks, reconnect with exponential backoff (the state is kept meanwhile:
   traffic keeps flowing on the last known config).

Events: ztunnel.xds.connected, .received {type_url, added, updated, removed, version, nonce,
bytes}, .ack, .nack {error}, .ready, .disconnected {error, retry_in}. `on_event(kind, msg,
**fields)` has the signature of lab.common.events.EventEmitter.emit; `on_change(result)` is called
(or awaited) after each response that changed the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from lab.proto.xds import (
    MAX_LINE,
    TYPE_URLS,
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    XdsProtocolError,
    client_tls_context,
    decode,
    encode,
)
from lab.tls.contexts import PeerVerificationError, verify_server_identity
from lab.tls.identity import Identity
from lab.ztunnel.state import ApplyResult, ProxyState

log = logging.getLogger(__name__)

#: Reconnect backoff: doubled after each failed attempt, reset once a response arrives.
INITIAL_BACKOFF = 0.1
MAX_BACKOFF = 15.0
CONNECT_TIMEOUT = 10.0
#: Who istiod is in the lab: its certificate's URI SAN (real istiod's certificate carries the DNS
#: name of its service, istiod.istio-system.svc, which ztunnel checks instead).
ISTIOD_IDENTITY = Identity.of("istio-system", "istiod")

EventSink = Callable[..., Any]
ChangeHandler = Callable[[ApplyResult], Awaitable[None] | None]
Address = tuple[str, int] | str

SHORT_TYPE = {url: url.rsplit(".", 1)[-1] for url in TYPE_URLS}


def parse_address(address: Address) -> tuple[str, int]:
    """("host", port) or "host:port" -> ("host", port)."""
    if isinstance(address, tuple):
        return address[0], int(address[1])
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


istiod_client_context = client_tls_context  # ztunnel's name for it


async def open_istiod_connection(address: tuple[str, int], ctx: ssl.SSLContext, expected: Identity | None,
                                 timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """TCP + TLS to istiod, then check that its certificate names `expected` (a URI SAN), as
    the chain check alone would accept any workload of the mesh. Raises OSError, ssl.SSLError,
    TimeoutError or PeerVerificationError."""
    host, port = address
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=ctx, server_hostname="", limit=MAX_LINE), timeout)
    if expected is not None:
        try:
            verify_server_identity(writer.get_extra_info("ssl_object"), [expected])
        except PeerVerificationError:
            writer.close()
            raise
    return reader, writer


class XdsStreamError(Exception):
    """The stream broke or istiod sent something that is not a DeltaDiscoveryResponse."""


class XdsClient:
    """Keeps `state` in sync with istiod, forever (until `close`).

        client = XdsClient(("172.18.0.1", 15012), root_pem, "node-1", token, state, emitter.emit)
        client.start()
        await client.ready.wait()
    """

    def __init__(self, address: Address, root_pem: bytes, node_name: str, token: str, state: ProxyState,
                 on_event: EventSink | None = None, on_change: ChangeHandler | None = None, *,
                 node_id: str | None = None, istiod_identity: Identity | None = ISTIOD_IDENTITY,
                 initial_backoff: float = INITIAL_BACKOFF,
                 max_backoff: float = MAX_BACKOFF, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.address = parse_address(address)
        self.root_pem = root_pem
        self.node_name = node_name
        self.node = {"id": node_id or f"ztunnel~{node_name}", "metadata": {"NODE_NAME": node_name}}
        self.token = token
        self.istiod_identity = istiod_identity
        self.state = state
        self.on_event = on_event
        self.on_change = on_change
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        #: Set once the first response of every type has been applied.
        self.ready = asyncio.Event()
        #: Resource versions ztunnel holds, per type: sent back as initial_resource_versions.
        self.versions: dict[str, dict[str, str]] = {t: {} for t in TYPE_URLS}
        self.connections = 0  # how many streams were established (1 + reconnects)
        self._seen_types: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ctx = istiod_client_context(root_pem)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> asyncio.Task[None]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(), name="xds-client")
        return self._task

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._close_writer()

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _emit(self, kind: str, msg: str, **fields: Any) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(kind, msg, **fields)
        except Exception:  # observing must never break the control plane
            log.exception("on_event failed for %s", kind)

    async def run(self) -> None:
        """Connect, stream, and reconnect with backoff until cancelled."""
        backoff = self.initial_backoff
        host, port = self.address
        while True:
            got_response = False
            try:
                got_response = await self._session()
                error = "istiod closed the stream"
            except (TimeoutError, OSError, ssl.SSLError, PeerVerificationError, XdsStreamError, XdsProtocolError) as e:
                error = str(e) or type(e).__name__
            finally:
                self._close_writer()
            if got_response:
                backoff = self.initial_backoff
            self._emit("ztunnel.xds.disconnected",
                       f"xDS stream to istiod {host}:{port} ended ({error}); reconnecting in {backoff:.2f}s, "
                       f"keeping the last known config meanwhile", error=error, retry_in=backoff)
            await asyncio.sleep(backoff)
            backoff = min(self.max_backoff, backoff * 2)

    # ------------------------------------------------------------------ one stream

    async def _send(self, writer: asyncio.StreamWriter, req: DeltaDiscoveryRequest) -> None:
        writer.write(encode(req))
        await writer.drain()

    async def _session(self) -> bool:
        """One stream: subscribe, then apply + ACK/NACK every response. Returns (when istiod ends
        the stream cleanly) whether any response was received; raises on errors."""
        host, port = self.address
        reader, writer = await open_istiod_connection(self.address, self._ctx, self.istiod_identity,
                                                      self.connect_timeout)
        self._writer = writer
        self.connections += 1
        self._emit("ztunnel.xds.connected",
                   f"connected to istiod at {host}:{port} over TLS 1.3 (its certificate chains to the mesh "
                   f"root and names {self.istiod_identity or 'any identity'}); subscribing to workloads, "
                   f"services and authorization policies",
                   address=f"{host}:{port}", reconnect=self.connections > 1)
        for i, type_url in enumerate(TYPE_URLS):
            await self._send(writer, DeltaDiscoveryRequest(
                type_url=type_url, node=self.node, resource_names_subscribe=["*"],
                initial_resource_versions=dict(self.versions[type_url]),
                token=self.token if i == 0 else ""))
        got_response = False
        while True:
            try:
                line = await reader.readline()
            except ValueError as e:  # line longer than MAX_LINE
                raise XdsStreamError(str(e)) from None
            if not line:
                return got_response
            msg = decode(line)
            if not isinstance(msg, DeltaDiscoveryResponse):
                raise XdsStreamError(f"expected a DeltaDiscoveryResponse, got {type(msg).__name__}")
            got_response = True
            await self._handle(writer, msg, len(line))

    async def _handle(self, writer: asyncio.StreamWriter, resp: DeltaDiscoveryResponse, size: int) -> None:
        """Apply one response, record versions, ACK or NACK it, report it."""
        short = SHORT_TYPE.get(resp.type_url, resp.type_url)
        if resp.type_url not in TYPE_URLS:
            result = ApplyResult(resp.type_url, rejected={"*": f"unknown type_url {resp.type_url!r}"})
        else:
            result = self.state.apply(resp.type_url, resp.resources, resp.removed_resources)
            versions = self.versions[resp.type_url]
            by_name = {r.name: r.version for r in resp.resources}
            for name in result.added + result.updated:
                versions[name] = by_name[name]
            for name in resp.removed_resources:
                versions.pop(name, None)
        self._emit("ztunnel.xds.received",
                   f"istiod sent {short} version {resp.system_version_info}: {len(result.added)} added, "
                   f"{len(result.updated)} updated, {len(result.removed)} removed"
                   + (f", {len(result.rejected)} rejected" if result.rejected else ""),
                   type_url=resp.type_url, added=result.added, updated=result.updated,
                   removed=list(resp.removed_resources), version=resp.system_version_info,
                   nonce=resp.nonce, bytes=size)
        if result.rejected:
            detail = "; ".join(f"{name}: {why}" for name, why in result.rejected.items())
            await self._send(writer, DeltaDiscoveryRequest(
                type_url=resp.type_url, node=self.node, resource_names_subscribe=[],
                response_nonce=resp.nonce, error_detail=detail))
            self._emit("ztunnel.xds.nack",
                       f"NACK {short} nonce {resp.nonce}: ztunnel could not use {sorted(result.rejected)} "
                       f"({detail}); the other resources were applied", type_url=resp.type_url,
                       nonce=resp.nonce, error=detail, rejected=sorted(result.rejected))
        else:
            await self._send(writer, DeltaDiscoveryRequest(
                type_url=resp.type_url, node=self.node, resource_names_subscribe=[],
                response_nonce=resp.nonce))
            self._emit("ztunnel.xds.ack", f"ACK {short} nonce {resp.nonce}", type_url=resp.type_url,
                       nonce=resp.nonce, version=resp.system_version_info)
        if result.changed and self.on_change is not None:
            try:
                out = self.on_change(result)
                if inspect.isawaitable(out):
                    await out
            except Exception:
                log.exception("on_change failed")
        if resp.type_url in TYPE_URLS and resp.type_url not in self._seen_types:
            self._seen_types.add(resp.type_url)
            if self._seen_types == set(TYPE_URLS) and not self.ready.is_set():
                self.ready.set()
                self._emit("ztunnel.xds.ready",
                           f"ztunnel has its first full config: {len(self.state.workloads)} workloads, "
                           f"{len(self.state.services)} services, {len(self.state.policies)} policies",
                           workloads=len(self.state.workloads), services=len(self.state.services),
                           policies=len(self.state.policies))
