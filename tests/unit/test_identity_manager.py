"""ztunnel's certificate manager (lab/ztunnel/identity_manager.py) against a real
CertificateAuthority (lab/istiod/ca.py) behind a small TLS server speaking the lab's
CreateCertificate messages (lab/proto/xds.py), on loopback.
"""

from __future__ import annotations

import asyncio
import ssl
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from lab.istiod.ca import CertificateAuthority, CertificateRefused, issue_leaf
from lab.proto.xds import CreateCertificateRequest, CreateCertificateResponse, decode, encode
from lab.tls.csr import generate_key, load_csr, private_key_pem
from lab.tls.identity import Identity
from lab.ztunnel.identity_manager import CaClient, CertificateUnavailable, IdentityManager, Priority

pytestmark = pytest.mark.timeout(30)

NODE = "node-1"
TOKEN = "token-of-ztunnel-on-node-1"
PRODUCTPAGE = Identity.of("default", "bookinfo-productpage")
REVIEWS = Identity.of("default", "bookinfo-reviews")
RATINGS = Identity.of("default", "bookinfo-ratings")


def istiod_server_context(ca: CertificateAuthority, directory: Path) -> ssl.SSLContext:
    key = generate_key()
    leaf = issue_leaf(key.public_key(), "spiffe://cluster.local/ns/istio-system/sa/istiod",
                      ca.root_cert, ca.root_key, timedelta(hours=1))
    cert_path, key_path = directory / "istiod-cert.pem", directory / "istiod-key.pem"
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(private_key_pem(key))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["istio-xds-lab"])
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


class CaServer:
    """istiod's CreateCertificate endpoint in miniature: authenticate the node by its token,
    then let the real CertificateAuthority decide (node authorization, CSR identity, TTL)."""

    def __init__(self, ca: CertificateAuthority, ctx: ssl.SSLContext) -> None:
        self.ca = ca
        self.ctx = ctx
        self.pods: dict[str, set[tuple[str, str]]] = {NODE: set()}
        self.tokens = {TOKEN: NODE}
        self.asked: list[str] = []         # ImpersonatedIdentity of every request, in order
        self.gate = asyncio.Event()
        self.gate.set()
        self.lie_as: Identity | None = None  # sign the CSR's key for another identity
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def answer(self, req: CreateCertificateRequest) -> CreateCertificateResponse:
        node = self.tokens.get(req.token)
        if node is None:
            return CreateCertificateResponse(error="authentication failure: unknown token")
        requested = Identity.parse(req.metadata["ImpersonatedIdentity"])
        if self.lie_as is not None:
            leaf = issue_leaf(load_csr(req.csr.encode()).public_key(), self.lie_as.uri, self.ca.root_cert,
                              self.ca.root_key, timedelta(seconds=req.validity_duration))
            return CreateCertificateResponse(cert_chain=[leaf.public_bytes(serialization.Encoding.PEM).decode(),
                                                         self.ca.root_pem.decode()])
        try:
            chain = self.ca.sign(req.csr.encode(), requested, timedelta(seconds=req.validity_duration), node,
                                 lambda n: self.pods.get(n, set()))
        except CertificateRefused as e:
            return CreateCertificateResponse(error=str(e))
        return CreateCertificateResponse(cert_chain=[c.decode() for c in chain])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                req = decode(line)
                self.asked.append(req.metadata["ImpersonatedIdentity"])
                await self.gate.wait()
                writer.write(encode(self.answer(req)))
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []

    def __call__(self, kind: str, msg: str, **fields) -> None:
        self.events.append((kind, msg, fields))

    def of(self, kind: str) -> list[dict]:
        return [f for k, _, f in self.events if k == kind]


async def eventually(cond, timeout: float = 8.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.fixture
def ca() -> CertificateAuthority:
    # No backdating, so that a 2-second certificate has its half-life 1 s after issue.
    return CertificateAuthority.create(clock_skew_grace=timedelta(0))


@pytest.fixture
async def istiod(ca, tmp_path):
    server = CaServer(ca, istiod_server_context(ca, tmp_path))
    server.pods[NODE] = {("default", "bookinfo-productpage"), ("default", "bookinfo-reviews"),
                         ("default", "bookinfo-ratings")}
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def make_manager(ca, istiod):
    managers = []

    def make(**options) -> IdentityManager:
        rec = Recorder()
        options.setdefault("ttl", timedelta(hours=1))
        m = IdentityManager(lambda: CaClient(("127.0.0.1", istiod.port), ca.root_pem, TOKEN),
                            "cluster.local", on_event=rec, **options)
        m.recorder = rec
        managers.append(m)
        return m

    yield make
    for m in managers:
        await m.close()


async def test_fetch_checks_identity_and_stores(make_manager, istiod, ca):
    m = make_manager()
    cert = await m.get(PRODUCTPAGE)
    assert cert.identity == PRODUCTPAGE
    assert cert.root_pem == ca.root_pem
    assert (cert.not_after - cert.not_before) == timedelta(hours=1)
    assert m.store.get(PRODUCTPAGE) is cert
    assert await m.get(PRODUCTPAGE) is cert          # cached: no second request
    assert istiod.asked == [PRODUCTPAGE.uri]
    rec = m.recorder
    assert rec.of("ztunnel.cert.requested")[0]["priority"] == "REAL_TIME"
    assert rec.of("ztunnel.cert.received")[0]["serial"] == cert.serial
    assert rec.of("ztunnel.cert.rotated") == []


async def test_concurrent_gets_share_one_request(make_manager, istiod):
    m = make_manager()
    certs = await asyncio.gather(*(m.get(REVIEWS) for _ in range(5)))
    assert len({id(c) for c in certs}) == 1
    assert istiod.asked == [REVIEWS.uri]


async def test_leaf_for_another_identity_is_rejected(make_manager, istiod):
    istiod.lie_as = Identity.of("kube-system", "admin")
    m = make_manager(initial_backoff=5.0)
    with pytest.raises(CertificateUnavailable) as err:
        await m.get(PRODUCTPAGE)
    assert "kube-system" in err.value.reason and "was requested" in err.value.reason
    assert m.store.get(PRODUCTPAGE) is None
    assert m.recorder.of("ztunnel.cert.refused")[0]["error"].startswith("unusable response")


async def test_rotation_at_half_life_keeps_previous(make_manager, istiod):
    m = make_manager(ttl=2, min_refresh_delay=0.1)
    first = await m.get(RATINGS)
    await eventually(lambda: m.recorder.of("ztunnel.cert.rotated"))
    rotated = m.recorder.of("ztunnel.cert.rotated")[0]
    assert rotated["previous_serial"] == first.serial
    current = m.store.current(RATINGS)
    assert current.serial != first.serial and current.serial == rotated["serial"]
    assert m.store.previous(RATINGS) is first     # kept until it expires
    assert (await m.get(RATINGS)).serial == current.serial
    received = m.recorder.of("ztunnel.cert.received")
    assert [r["serial"] for r in received[:2]] == [first.serial, current.serial]
    assert m.recorder.of("ztunnel.cert.requested")[1]["priority"] == "BACKGROUND"


async def test_refusal_retries_with_backoff_until_allowed(make_manager, istiod):
    istiod.pods[NODE] = set()                # no productpage pod on this node (yet)
    m = make_manager(initial_backoff=0.05, max_backoff=0.2)
    with pytest.raises(CertificateUnavailable) as err:
        await m.get(PRODUCTPAGE)
    assert "request impersonation authentication failure" in err.value.reason
    await eventually(lambda: len(m.recorder.of("ztunnel.cert.refused")) >= 4)
    retries = [f["retry_in"] for f in m.recorder.of("ztunnel.cert.refused")]
    assert retries[:4] == pytest.approx([0.05, 0.1, 0.2, 0.2])   # doubled, capped
    # While the last attempt failed, get() fails at once rather than waiting.
    with pytest.raises(CertificateUnavailable):
        await m.get(PRODUCTPAGE)
    istiod.pods[NODE] = {("default", "bookinfo-productpage")}    # the pod got scheduled here
    await eventually(lambda: m.store.get(PRODUCTPAGE) is not None)
    assert (await m.get(PRODUCTPAGE)).identity == PRODUCTPAGE
    assert m.last_error(PRODUCTPAGE) is None


async def test_failed_rotation_keeps_the_old_certificate(make_manager, istiod):
    m = make_manager(ttl=2, min_refresh_delay=0.1, initial_backoff=0.05, max_backoff=0.1)
    first = await m.get(REVIEWS)
    istiod.pods[NODE] = set()
    await eventually(lambda: m.recorder.of("ztunnel.cert.refused"))
    refused = m.recorder.of("ztunnel.cert.refused")[0]
    assert refused["keeps_old"] is True
    assert await m.get(REVIEWS) is first     # still valid: still served


async def test_prefetch_and_forget(make_manager, istiod):
    m = make_manager(ttl=2, min_refresh_delay=0.1)
    m.prefetch(PRODUCTPAGE)
    await eventually(lambda: m.store.get(PRODUCTPAGE) is not None)
    assert m.recorder.of("ztunnel.cert.requested")[0]["priority"] == "WARMUP"
    assert m.identities() == [PRODUCTPAGE]
    assert m.forget(PRODUCTPAGE) is True
    assert m.store.get(PRODUCTPAGE) is None and m.identities() == []
    assert m.recorder.of("ztunnel.cert.forgotten")[0]["identity"] == PRODUCTPAGE.uri
    asked = len(istiod.asked)
    await asyncio.sleep(1.5)                 # past the half-life: no rotation for a forgotten identity
    assert len(istiod.asked) == asked
    assert m.forget(PRODUCTPAGE) is False
    assert (await m.get(PRODUCTPAGE)).identity == PRODUCTPAGE   # fetched anew on demand


async def test_forget_fails_waiters(make_manager, istiod):
    istiod.gate.clear()
    m = make_manager()
    waiter = asyncio.create_task(m.get(RATINGS))
    await eventually(lambda: istiod.asked)
    m.forget(RATINGS)
    with pytest.raises(CertificateUnavailable, match="forgotten"):
        await waiter
    istiod.gate.set()


async def test_real_time_requests_go_before_warmup(make_manager, istiod):
    istiod.gate.clear()                      # istiod is slow: requests queue up
    m = make_manager(concurrency=1)
    m.prefetch(PRODUCTPAGE)                  # takes the only slot
    await eventually(lambda: istiod.asked == [PRODUCTPAGE.uri])
    m.prefetch(REVIEWS)                      # Warmup, queued
    await asyncio.sleep(0.05)
    realtime = asyncio.create_task(m.get(RATINGS))   # RealTime, queued after it
    await asyncio.sleep(0.05)
    istiod.gate.set()
    await realtime
    await eventually(lambda: len(istiod.asked) == 3)
    assert istiod.asked == [PRODUCTPAGE.uri, RATINGS.uri, REVIEWS.uri]
    assert Priority.REAL_TIME < Priority.WARMUP < Priority.BACKGROUND


async def test_unreachable_ca_and_foreign_trust_domain(ca):
    rec = Recorder()
    # A port nothing listens on (bound and closed at once).
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    m = IdentityManager(lambda: CaClient(("127.0.0.1", port), ca.root_pem, TOKEN), on_event=rec,
                        initial_backoff=5.0)
    try:
        with pytest.raises(CertificateUnavailable, match="CA unreachable"):
            await m.get(PRODUCTPAGE)
        with pytest.raises(ValueError, match="trust domain"):
            await m.get(Identity("other.td", "default", "x"))
    finally:
        await m.close()


async def test_ca_client_reports_istiod_refusal(ca, istiod):
    from lab.tls.csr import build_csr
    from lab.ztunnel.identity_manager import CertificateRequestRefused
    client = CaClient(f"127.0.0.1:{istiod.port}", ca.root_pem, "stolen-token")
    try:
        with pytest.raises(CertificateRequestRefused, match="unknown token"):
            await client.create_certificate(build_csr(generate_key(), REVIEWS), REVIEWS, 3600)
        client.token = TOKEN
        chain = await client.create_certificate(build_csr(generate_key(), REVIEWS), REVIEWS, 3600)
        assert len(chain) == 2 and chain[-1] == ca.root_pem
    finally:
        await client.close()
