"""ztunnel's Delta ADS client (lab/ztunnel/xds/client.py) against a small real TLS server that
speaks the lab's xDS wire protocol (lab/proto/xds.py: JSON lines over TLS 1.3).

The server here is a scripted istiod: the test decides what it answers and reads what the
client sent (subscriptions, ACKs, NACKs), over a real TLS connection on loopback.
"""

from __future__ import annotations

import asyncio
import ssl
from datetime import timedelta
from pathlib import Path

import pytest

from lab.istiod.ca import CertificateAuthority, issue_leaf
from lab.proto.xds import (
    ADDRESS_TYPE,
    AUTHORIZATION_TYPE,
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    Resource,
    decode,
    encode,
)
from lab.tls.csr import generate_key, private_key_pem
from lab.ztunnel.state import ProxyState
from lab.ztunnel.xds.client import XdsClient

pytestmark = pytest.mark.timeout(30)

PP = "Kubernetes//Pod/default/productpage-v1"
REVIEWS = "Kubernetes//Pod/default/reviews-v1"
PP_SVC = "default/productpage.default.svc.cluster.local"


def istiod_server_context(ca: CertificateAuthority, directory: Path,
                          san: str = "spiffe://cluster.local/ns/istio-system/sa/istiod") -> ssl.SSLContext:
    """istiod's side: a certificate signed by the mesh root; no client certificate asked."""
    key = generate_key()
    leaf = issue_leaf(key.public_key(), san, ca.root_cert, ca.root_key, timedelta(hours=1))
    from cryptography.hazmat.primitives import serialization
    cert_path, key_path = directory / "istiod-cert.pem", directory / "istiod-key.pem"
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(private_key_pem(key))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["istio-xds-lab"])
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


class ScriptedIstiod:
    """A TLS server speaking lab.proto.xds; records every request, sends what the test says."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.requests: asyncio.Queue[tuple[int, DeltaDiscoveryRequest]] = asyncio.Queue()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        conn = len(self.writers)
        try:
            while line := await reader.readline():
                await self.requests.put((conn, decode(line)))
        except (ConnectionError, ssl.SSLError):
            pass

    async def request(self, timeout: float = 5.0) -> tuple[int, DeltaDiscoveryRequest]:
        return await asyncio.wait_for(self.requests.get(), timeout)

    async def send(self, msg, raw: bytes | None = None) -> None:
        w = self.writers[-1]
        w.write(raw if raw is not None else encode(msg))
        await w.drain()

    def drop(self) -> None:
        self.writers[-1].close()

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def workload(uid: str, ip: str, protocol: str = "HBONE") -> dict:
    return {"workload": {"uid": uid, "name": uid.rsplit("/", 1)[-1], "namespace": "default", "addresses": [ip],
                         "node": "node-1", "service_account": "bookinfo", "trust_domain": "cluster.local",
                         "tunnel_protocol": protocol, "services": {PP_SVC: {"9080": 9080}},
                         "authorization_policies": [], "status": "HEALTHY", "capacity": 1, "waypoint": None}}


SERVICE = {"service": {"name": "productpage", "namespace": "default",
                       "hostname": "productpage.default.svc.cluster.local", "addresses": ["10.96.0.10"],
                       "ports": [{"service_port": 9080, "target_port": 9080}], "subject_alt_names": [],
                       "waypoint": None, "load_balancing": None}}
POLICY = {"name": "deny-plaintext", "namespace": "istio-system", "scope": "GLOBAL", "action": "DENY",
          "rules": [{"clauses": [{"matches": [{"not_principals": [{"presence": {}}]}]}]}], "dry_run": False}


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture
async def istiod(ca, tmp_path):
    server = ScriptedIstiod(istiod_server_context(ca, tmp_path))
    await server.start()
    yield server
    await server.close()


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []
        self.changes = []

    def __call__(self, kind: str, msg: str, **fields) -> None:
        self.events.append((kind, msg, fields))

    def of(self, kind: str) -> list[dict]:
        return [f for k, _, f in self.events if k == kind]


async def eventually(cond, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


@pytest.fixture
async def client(ca, istiod):
    rec = Recorder()
    state = ProxyState()
    c = XdsClient(("127.0.0.1", istiod.port), ca.root_pem, "node-1", "ztunnel-token", state, rec,
                  on_change=rec.changes.append, initial_backoff=0.05, max_backoff=0.2)
    c.recorder = rec
    c.start()
    yield c
    await c.close()


async def subscribe(istiod: ScriptedIstiod) -> list[DeltaDiscoveryRequest]:
    return [(await istiod.request())[1] for _ in range(2)]


async def full_state(istiod: ScriptedIstiod) -> None:
    await istiod.send(DeltaDiscoveryResponse(ADDRESS_TYPE, "v1", "n1", resources=[
        Resource(PP, "1", workload(PP, "10.244.1.10")),
        Resource(REVIEWS, "1", workload(REVIEWS, "10.244.2.11", "NONE")),
        Resource(PP_SVC, "1", SERVICE)]))
    await istiod.send(DeltaDiscoveryResponse(AUTHORIZATION_TYPE, "v1", "n2", resources=[
        Resource("istio-system/deny-plaintext", "1", POLICY)]))


async def test_subscribe_full_state_ack_and_ready(client, istiod):
    subs = await subscribe(istiod)
    assert [r.type_url for r in subs] == [ADDRESS_TYPE, AUTHORIZATION_TYPE]
    assert all(r.resource_names_subscribe == ["*"] and r.initial_resource_versions == {} for r in subs)
    assert all(r.node["metadata"]["NODE_NAME"] == "node-1" for r in subs)
    assert subs[0].token == "ztunnel-token" and subs[1].token == ""
    assert not client.ready.is_set()

    await full_state(istiod)
    acks = [(await istiod.request())[1] for _ in range(2)]
    assert [(a.type_url, a.response_nonce, a.error_detail) for a in acks] == [
        (ADDRESS_TYPE, "n1", ""), (AUTHORIZATION_TYPE, "n2", "")]
    await asyncio.wait_for(client.ready.wait(), 5)

    st = client.state
    assert st.workload_by_ip("10.244.1.10").name == "productpage-v1"
    assert st.service_by_vip("10.96.0.10").hostname == "productpage.default.svc.cluster.local"
    assert list(st.policies) == ["istio-system/deny-plaintext"]
    assert client.versions[ADDRESS_TYPE] == {PP: "1", REVIEWS: "1", PP_SVC: "1"}

    rec = client.recorder
    received = rec.of("ztunnel.xds.received")
    assert received[0]["type_url"] == ADDRESS_TYPE and sorted(received[0]["added"]) == sorted([PP, REVIEWS, PP_SVC])
    assert received[0]["nonce"] == "n1" and received[0]["version"] == "v1" and received[0]["bytes"] > 100
    assert [f["nonce"] for f in rec.of("ztunnel.xds.ack")] == ["n1", "n2"]
    assert len(rec.of("ztunnel.xds.ready")) == 1 and rec.of("ztunnel.xds.ready")[0]["workloads"] == 2
    assert len(rec.of("ztunnel.xds.connected")) == 1
    assert [c.type_url for c in rec.changes] == [ADDRESS_TYPE, AUTHORIZATION_TYPE]


async def test_diff_updates_and_removes(client, istiod):
    await subscribe(istiod)
    await full_state(istiod)
    [await istiod.request() for _ in range(2)]
    moved = workload(PP, "10.244.1.99")
    await istiod.send(DeltaDiscoveryResponse(ADDRESS_TYPE, "v2", "n3", resources=[Resource(PP, "2", moved)],
                                             removed_resources=[REVIEWS]))
    _, ack = await istiod.request()
    assert (ack.response_nonce, ack.error_detail, ack.resource_names_subscribe) == ("n3", "", [])
    st = client.state
    assert st.workload_by_ip("10.244.1.10") is None and st.workload_by_ip("10.244.1.99").uid == PP
    assert REVIEWS not in st.workloads
    assert client.versions[ADDRESS_TYPE] == {PP: "2", PP_SVC: "1"}
    last = client.recorder.of("ztunnel.xds.received")[-1]
    assert (last["updated"], last["added"], last["removed"], last["version"]) == ([PP], [], [REVIEWS], "v2")


async def test_nack_on_malformed_resource_applies_the_rest(client, istiod):
    await subscribe(istiod)
    bad = {"workload": {"uid": "broken", "name": "broken", "namespace": "default", "addresses": ["not-an-ip"]}}
    await istiod.send(DeltaDiscoveryResponse(ADDRESS_TYPE, "v1", "n1", resources=[
        Resource("broken", "1", bad), Resource(PP, "1", workload(PP, "10.244.1.10"))]))
    _, nack = await istiod.request()
    assert nack.response_nonce == "n1"
    assert "broken" in nack.error_detail and "not an IP" in nack.error_detail
    assert client.state.workload_by_ip("10.244.1.10") is not None  # the good one was applied
    assert "broken" not in client.versions[ADDRESS_TYPE]
    nacks = client.recorder.of("ztunnel.xds.nack")
    assert nacks[0]["rejected"] == ["broken"] and nacks[0]["nonce"] == "n1"
    # A bad policy is NACKed the same way
    await istiod.send(DeltaDiscoveryResponse(AUTHORIZATION_TYPE, "v1", "n2", resources=[
        Resource("a/b", "1", {"name": "b", "namespace": "a", "action": "AUDIT"})]))
    _, nack = await istiod.request()
    assert nack.type_url == AUTHORIZATION_TYPE and "action" in nack.error_detail


async def test_reconnect_resubscribes_with_versions_and_keeps_state(client, istiod):
    await subscribe(istiod)
    await full_state(istiod)
    [await istiod.request() for _ in range(2)]
    istiod.drop()
    conn, first = await istiod.request()
    conn2, second = await istiod.request()
    assert conn == conn2 == 2
    assert first.initial_resource_versions == {PP: "1", REVIEWS: "1", PP_SVC: "1"}
    assert second.initial_resource_versions == {"istio-system/deny-plaintext": "1"}
    assert first.token == "ztunnel-token" and first.response_nonce == ""
    assert client.state.workload_by_ip("10.244.1.10") is not None  # last known config kept
    assert client.connections == 2
    dis = client.recorder.of("ztunnel.xds.disconnected")
    assert dis and dis[0]["retry_in"] == pytest.approx(0.05)
    assert client.recorder.of("ztunnel.xds.connected")[-1]["reconnect"] is True
    # the new stream works
    await istiod.send(DeltaDiscoveryResponse(ADDRESS_TYPE, "v2", "n9", removed_resources=[REVIEWS]))
    _, ack = await istiod.request()
    assert ack.response_nonce == "n9" and REVIEWS not in client.state.workloads


async def test_garbage_from_istiod_breaks_the_stream_then_reconnects(client, istiod):
    await subscribe(istiod)
    await istiod.send(None, raw=b"this is not json\n")
    conn, req = await istiod.request()
    assert conn == 2 and req.type_url == ADDRESS_TYPE
    assert "not JSON" in client.recorder.of("ztunnel.xds.disconnected")[0]["error"]


async def test_istiod_certificate_must_chain_to_the_mesh_root(istiod):
    other_root = CertificateAuthority.create().root_pem
    rec = Recorder()
    c = XdsClient(f"127.0.0.1:{istiod.port}", other_root, "node-1", "t", ProxyState(), rec,
                  initial_backoff=0.02, max_backoff=0.05)
    c.start()
    try:
        await eventually(lambda: len(rec.of("ztunnel.xds.disconnected")) >= 3)
        assert "CERTIFICATE_VERIFY_FAILED" in rec.of("ztunnel.xds.disconnected")[0]["error"]
        assert c.connections == 0 and not c.ready.is_set()
        retries = [f["retry_in"] for f in rec.of("ztunnel.xds.disconnected")]
        assert retries[:3] == pytest.approx([0.02, 0.04, 0.05])  # doubled, capped
        assert istiod.requests.empty()
    finally:
        await c.close()


async def test_istiod_must_present_istiods_identity(ca, tmp_path):
    """A certificate from the right root is not enough: any mesh workload has one."""
    impostor = ScriptedIstiod(istiod_server_context(ca, tmp_path, "spiffe://cluster.local/ns/default/sa/curl"))
    await impostor.start()
    rec = Recorder()
    c = XdsClient(("127.0.0.1", impostor.port), ca.root_pem, "node-1", "t", ProxyState(), rec,
                  initial_backoff=0.02, max_backoff=0.05)
    c.start()
    try:
        await eventually(lambda: rec.of("ztunnel.xds.disconnected"))
        assert "expected SAN" in rec.of("ztunnel.xds.disconnected")[0]["error"]
        assert c.connections == 0 and impostor.requests.empty()
    finally:
        await c.close()
        await impostor.close()
