"""ztunnel's certificates: one per workload identity on its node, fetched from istiod and rotated
(zt:src/identity/manager.rs `SecretManager`, zt:src/identity/caclient.rs, zt:src/tls/csr.rs).

For every identity (service account) that a pod on its node runs as, ztunnel:

1. generates a fresh ECDSA P-256 key and a CSR whose only SAN is the SPIFFE URI (lab/tls/csr.py);
2. calls istiod's `CreateCertificate` over TLS with its OWN token, asking to impersonate the
   workload (`metadata.ImpersonatedIdentity`); istiod signs only if such a pod runs on this
   node (lab/istiod/ca.py);
3. checks that the returned leaf carries exactly the identity it asked for and its own key
   (`WorkloadCertificate.from_ca_response`), and stores it (`CertificateStore`);
4. rotates it at half-life (`not_before + lifetime/2`); when a request fails it retries with
   exponential backoff capped at 150 s and keeps serving the old certificate until it expires.

Requests are queued by priority, as in ztunnel: RealTime (a connection is waiting for the cert)
before Warmup (a pod just appeared on the node: `prefetch`) before Background (rotation), with a
limit on concurrent CA calls. `get` waits for a fetch in flight; if the last attempt failed and
no valid certificate exists, it fails at once with that error (ztunnel's `Unavailable` state).
`forget` drops an identity no local pod uses any more.

Events: ztunnel.cert.requested, .received, .rotated, .refused (with the retry delay), .forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from typing import Any, Protocol

from lab.proto.xds import (
    CreateCertificateRequest,
    CreateCertificateResponse,
    XdsProtocolError,
    decode,
    encode,
)
from lab.tls.certificate import CertificateStore, WorkloadCertificate
from lab.tls.contexts import PeerVerificationError
from lab.tls.csr import build_csr, generate_key, private_key_pem
from lab.tls.identity import DEFAULT_TRUST_DOMAIN, Identity
from lab.ztunnel.xds.client import (
    ISTIOD_IDENTITY,
    Address,
    istiod_client_context,
    open_istiod_connection,
    parse_address,
)

log = logging.getLogger(__name__)

#: SECRET_TTL: the lifetime ztunnel asks for (istiod's default workload cert TTL).
DEFAULT_TTL = timedelta(hours=24)
#: zt:src/identity/manager.rs: retry backoff after a failed request, capped at 150 s.
INITIAL_BACKOFF = 1.0
MAX_BACKOFF = 150.0
#: How many CA requests may run at once.
CONCURRENCY = 8
#: Never schedule a rotation sooner than this (a TTL shorter than istiod's clock-skew backdating
#: would otherwise put the half-life in the past and rotate in a loop).
MIN_REFRESH_DELAY = 1.0

EventSink = Callable[..., Any]


class Priority(IntEnum):
    """Order of pending CA requests (zt `identity::Priority`); lower runs first."""

    REAL_TIME = 0   # a connection waits for this certificate
    WARMUP = 1      # a pod with this identity appeared on the node
    BACKGROUND = 2  # rotation of a certificate that is still valid


class CertificateRequestRefused(Exception):
    """istiod answered CreateCertificate with an error."""


class CertificateUnavailable(Exception):
    """No valid certificate for an identity: the last request failed (or it was forgotten)."""

    def __init__(self, identity: Identity, reason: str) -> None:
        self.identity = identity
        self.reason = reason
        super().__init__(f"no certificate for {identity}: {reason}")


class CaClientLike(Protocol):
    async def create_certificate(self, csr_pem: bytes, identity: Identity, ttl_seconds: int) -> list[bytes]: ...

    async def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# The CA client


class CaClient:
    """`istio.v1.auth.IstioCertificateService/CreateCertificate` over the lab's JSON-line TLS
    connection to istiod (zt:src/identity/caclient.rs).

    One connection, reused; requests are sent one at a time (a line has no request id). The
    node's `token` authenticates every request; `ImpersonatedIdentity` names the workload.
    """

    def __init__(self, address: Address, root_pem: bytes, token: str, *,
                 istiod_identity: Identity | None = ISTIOD_IDENTITY, timeout: float = 10.0) -> None:
        self.address = parse_address(address)
        self.token = token
        self.istiod_identity = istiod_identity
        self.timeout = timeout
        self._ctx = istiod_client_context(root_pem)
        self._lock = asyncio.Lock()
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._conn is None or self._conn[1].is_closing():
            self._conn = await open_istiod_connection(self.address, self._ctx, self.istiod_identity, self.timeout)
        return self._conn

    async def create_certificate(self, csr_pem: bytes, identity: Identity, ttl_seconds: int) -> list[bytes]:
        """Send one CreateCertificateRequest; the chain (PEM, leaf first) or
        CertificateRequestRefused / OSError / TimeoutError."""
        request = CreateCertificateRequest(
            csr=csr_pem.decode("ascii"), validity_duration=int(ttl_seconds),
            metadata={"ImpersonatedIdentity": identity.uri}, token=self.token)
        async with self._lock:
            try:
                reader, writer = await self._connection()
                writer.write(encode(request))
                await writer.drain()
                line = await asyncio.wait_for(reader.readline(), self.timeout)
                if not line:
                    raise ConnectionError("istiod closed the CA connection")
                response = decode(line)
            except BaseException:
                self._drop()
                raise
        if not isinstance(response, CreateCertificateResponse):
            self._drop()
            raise XdsProtocolError(f"expected a CreateCertificateResponse, got {type(response).__name__}")
        if response.error:
            raise CertificateRequestRefused(response.error)
        if not response.cert_chain:
            raise CertificateRequestRefused("istiod returned an empty certificate chain")
        return [c.encode("ascii") for c in response.cert_chain]

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None

    async def close(self) -> None:
        if self._conn is not None:
            writer = self._conn[1]
            self._conn = None
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


# ---------------------------------------------------------------------------------------------
# Priority-ordered concurrency limit


class _PriorityLimiter:
    """At most `slots` holders; waiters are let in by priority, then arrival order."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._heap: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    async def acquire(self, priority: Priority) -> None:
        if self._free > 0 and not self._heap:
            self._free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (int(priority), next(self._seq), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # we were handed the slot just as we were cancelled
            raise

    def release(self) -> None:
        while self._heap:
            _, _, fut = heapq.heappop(self._heap)
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1


# ---------------------------------------------------------------------------------------------
# The manager


@dataclass
class _Entry:
    """One identity's fetch state."""

    identity: Identity
    priority: Priority
    due: float = 0.0  # event-loop time of the next request
    backoff: float = INITIAL_BACKOFF
    fetching: bool = False
    in_backoff: bool = False  # the last request failed; waiting to retry
    last_error: str | None = None
    attempts: int = 0
    waiters: list[asyncio.Future[WorkloadCertificate]] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


class IdentityManager:
    """ztunnel's SecretManager: certificates for the identities of this node's pods.

        manager = IdentityManager(lambda: CaClient(addr, root_pem, token), on_event=emitter.emit)
        manager.prefetch(Identity.of("default", "bookinfo-productpage"))
        cert = await manager.get(identity)      # a WorkloadCertificate
    """

    def __init__(self, ca_client_factory: Callable[[], CaClientLike],
                 trust_domain: str = DEFAULT_TRUST_DOMAIN, ttl: float | timedelta = DEFAULT_TTL,
                 on_event: EventSink | None = None, *, concurrency: int = CONCURRENCY,
                 initial_backoff: float = INITIAL_BACKOFF, max_backoff: float = MAX_BACKOFF,
                 min_refresh_delay: float = MIN_REFRESH_DELAY, store: CertificateStore | None = None) -> None:
        self._factory = ca_client_factory
        self._client: CaClientLike | None = None
        self.trust_domain = trust_domain
        self.ttl_seconds = max(1, int(_seconds(ttl)))
        self.on_event = on_event
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.min_refresh_delay = min_refresh_delay
        self.store = store if store is not None else CertificateStore()
        self._limiter = _PriorityLimiter(concurrency)
        self._entries: dict[Identity, _Entry] = {}

    # ------------------------------------------------------------------ public API

    async def get(self, identity: Identity) -> WorkloadCertificate:
        """A valid certificate for `identity`, fetching it now (RealTime) if there is none.

        Waits for a request in flight; raises CertificateUnavailable when the last request
        failed and no valid certificate exists (the retry continues in the background).
        """
        cert = self.store.get(identity)
        if cert is not None:
            return cert
        entry = self._ensure(identity, Priority.REAL_TIME)
        if entry.in_backoff and entry.last_error is not None:
            raise CertificateUnavailable(identity, entry.last_error)
        entry.priority = min(entry.priority, Priority.REAL_TIME)
        if not entry.fetching:
            entry.due = asyncio.get_running_loop().time()
            entry.wake.set()
        fut: asyncio.Future[WorkloadCertificate] = asyncio.get_running_loop().create_future()
        entry.waiters.append(fut)
        return await fut

    def prefetch(self, identity: Identity) -> None:
        """Start fetching `identity` in the background (Warmup), if not already held or pending:
        a pod with this identity appeared on the node."""
        self._ensure(identity, Priority.WARMUP)

    def forget(self, identity: Identity) -> bool:
        """Drop `identity`: stop its rotation, fail its waiters, remove its certificates (no pod
        on this node runs as it any more). Returns whether anything was known."""
        entry = self._entries.pop(identity, None)
        if entry is not None:
            if entry.task is not None:
                entry.task.cancel()
            self._fail_waiters(entry, "the identity was forgotten")
        dropped = self.store.forget(identity)
        if entry is not None or dropped:
            self._emit("ztunnel.cert.forgotten",
                       f"no pod on this node runs as {identity} any more: its certificate is dropped",
                       identity=str(identity))
            return True
        return False

    def identities(self) -> list[Identity]:
        """Identities managed (held or being fetched)."""
        return sorted(set(self._entries) | set(self.store.identities()))

    def last_error(self, identity: Identity) -> str | None:
        entry = self._entries.get(identity)
        return entry.last_error if entry else None

    async def close(self) -> None:
        tasks = [e.task for e in self._entries.values() if e.task is not None]
        for e in list(self._entries.values()):
            self._fail_waiters(e, "ztunnel is shutting down")
        self._entries.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._client is not None:
            await self._client.close()
            self._client = None

    # ------------------------------------------------------------------ internals

    def _emit(self, kind: str, msg: str, **fields: Any) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(kind, msg, **fields)
        except Exception:
            log.exception("on_event failed for %s", kind)

    def _ensure(self, identity: Identity, priority: Priority) -> _Entry:
        if identity.trust_domain != self.trust_domain:
            raise ValueError(f"{identity} is not in this mesh's trust domain {self.trust_domain!r}")
        entry = self._entries.get(identity)
        if entry is None:
            loop = asyncio.get_running_loop()
            entry = _Entry(identity, priority, due=loop.time(), backoff=self.initial_backoff)
            self._entries[identity] = entry
            entry.task = loop.create_task(self._worker(entry), name=f"cert-{identity}")
        return entry

    def _fail_waiters(self, entry: _Entry, reason: str) -> None:
        waiters, entry.waiters = entry.waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_exception(CertificateUnavailable(entry.identity, reason))

    async def _worker(self, entry: _Entry) -> None:
        """Fetch, then sleep until rotation or retry, forever (until forgotten)."""
        loop = asyncio.get_running_loop()
        while True:
            delay = entry.due - loop.time()
            if delay > 0:
                entry.wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(entry.wake.wait(), delay)
            entry.in_backoff = False
            entry.fetching = True
            await self._limiter.acquire(entry.priority)
            try:
                cert, error = await self._request(entry)
            finally:
                self._limiter.release()
                entry.fetching = False
            if cert is not None:
                self._on_success(entry, cert)
                refresh_in = (cert.refresh_at() - datetime.now(UTC)).total_seconds()
                entry.due = loop.time() + max(self.min_refresh_delay, refresh_in)
                entry.priority = Priority.BACKGROUND
            else:
                assert error is not None
                retry_in = entry.backoff
                self._on_failure(entry, error, retry_in)
                entry.due = loop.time() + retry_in
                entry.backoff = min(self.max_backoff, entry.backoff * 2)

    async def _request(self, entry: _Entry) -> tuple[WorkloadCertificate | None, str | None]:
        """One CreateCertificate round trip: (certificate, None) or (None, why it failed)."""
        identity = entry.identity
        entry.attempts += 1
        key = generate_key()
        csr = build_csr(key, identity)
        self._emit("ztunnel.cert.requested",
                   f"asking istiod to sign a certificate for {identity} ({entry.priority.name.lower()} "
                   f"priority, attempt {entry.attempts}): new P-256 key, CSR with the SPIFFE URI as only SAN, "
                   f"impersonating the workload with ztunnel's own token",
                   identity=str(identity), priority=entry.priority.name, attempt=entry.attempts,
                   ttl=self.ttl_seconds)
        try:
            if self._client is None:
                self._client = self._factory()
            chain = await self._client.create_certificate(csr, identity, self.ttl_seconds)
            return WorkloadCertificate.from_ca_response(identity, chain, private_key_pem(key)), None
        except CertificateRequestRefused as e:
            return None, f"istiod refused: {e}"
        except ValueError as e:  # includes a wrong identity in the returned leaf
            return None, f"unusable response: {e}"
        except (TimeoutError, OSError, ssl.SSLError, PeerVerificationError) as e:
            return None, f"CA unreachable: {str(e) or type(e).__name__}"

    def _on_success(self, entry: _Entry, cert: WorkloadCertificate) -> None:
        replaced = self.store.put(cert)
        entry.last_error = None
        entry.backoff = self.initial_backoff
        fields = dict(identity=str(cert.identity), serial=cert.serial,
                      not_before=cert.not_before.isoformat(), not_after=cert.not_after.isoformat(),
                      refresh_at=cert.refresh_at().isoformat())
        self._emit("ztunnel.cert.received",
                   f"istiod signed {cert.identity}: serial {cert.serial[:16]}, valid until "
                   f"{cert.not_after:%Y-%m-%d %H:%M:%S} UTC, rotation at half-life "
                   f"{cert.refresh_at():%Y-%m-%d %H:%M:%S} UTC",
                   **fields)
        if replaced is not None:
            self._emit("ztunnel.cert.rotated",
                       f"rotated {cert.identity}: serial {replaced.serial[:16]} -> {cert.serial[:16]}; the old "
                       f"certificate stays usable until it expires", previous_serial=replaced.serial, **fields)
        waiters, entry.waiters = entry.waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(cert)

    def _on_failure(self, entry: _Entry, error: str, retry_in: float) -> None:
        entry.last_error = error
        entry.in_backoff = True
        still = self.store.get(entry.identity)
        self._emit("ztunnel.cert.refused",
                   f"no certificate for {entry.identity}: {error}; retrying in {retry_in:.1f}s"
                   + ("; the current certificate stays in use" if still else ""),
                   identity=str(entry.identity), error=error, retry_in=retry_in, attempt=entry.attempts,
                   keeps_old=still is not None)
        waiters, entry.waiters = entry.waiters, []
        for fut in waiters:
            if fut.done():
                continue
            if still is not None:
                fut.set_result(still)
            else:
                fut.set_exception(CertificateUnavailable(entry.identity, error))
