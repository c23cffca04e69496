"""Unit tests (no root) of ztunnel's HBONE data plane pieces: the policy re-check of the
connection manager, the pool's keying, certificate rotation into new TLS contexts, the cert
fetcher's decisions, the admin config dump, and the inbound request checks."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from lab.hbone import ConnectRequest, HboneConnection, copy_bidirectional, serve_hbone
from lab.hbone.headers import (
    connect_header_list,
    create_hbone_request,
    format_baggage,
    parse_baggage,
)
from lab.istiod.ca import CertificateAuthority
from lab.proto.xds import ADDRESS_TYPE, AUTHORIZATION_TYPE
from lab.proto.zds import WorkloadInfo
from lab.tls.identity import Identity
from lab.ztunnel.admin import certificate_dump, chain_rows, config_dump, rfc3339
from lab.ztunnel.cert_fetcher import CertFetcher, certificate_changes
from lab.ztunnel.config import Config
from lab.ztunnel.identity_manager import CertificateRequestRefused, IdentityManager
from lab.ztunnel.inpod.netns import InpodNetns
from lab.ztunnel.proxy import Flow, InpodWorkload, ProxyInputs
from lab.ztunnel.proxy.connection_manager import (
    POLICY_CHANGE,
    ConnectionManager,
    connections_to_close,
)
from lab.ztunnel.proxy.inbound import (
    guess_inbound_service,
    trace_id_of,
    validate_destination,
)
from lab.ztunnel.proxy.outbound import baggage_of
from lab.ztunnel.proxy.pool import (
    HboneConnectFailed,
    WorkloadConnector,
    WorkloadHbonePool,
    WorkloadKey,
)
from lab.ztunnel.rbac import Authorization, Connection, assert_rbac
from lab.ztunnel.state import (
    ProxyState,
    StateChanges,
    Workload,
    find_workload_for_pod,
    wait_for_workload,
)
from lab.ztunnel.tls_workload import WorkloadTls

pytestmark = pytest.mark.timeout(30)

SLEEP = Identity.of("default", "sleep")
HTTPBIN = Identity.of("default", "httpbin")
OTHER = Identity.of("other", "sleep")


def deny_sleep(name: str = "deny-sleep") -> dict:
    return {"name": name, "namespace": "default", "scope": "NAMESPACE", "action": "DENY",
            "rules": [{"clauses": [{"matches": [{"principals": [{"exact": SLEEP.principal}]}]}]}]}


def workload(uid: str, ip: str, sa: str, *, node: str = "worker", protocol: str = "HBONE", ns: str = "default",
             **extra) -> dict:
    return {"workload": {"uid": uid, "name": uid, "namespace": ns, "addresses": [ip], "node": node,
                         "service_account": sa, "tunnel_protocol": protocol, **extra}}


# ------------------------------------------------------------------ connection manager
def test_connections_to_close_is_what_the_new_config_denies():
    deny = Authorization.from_resource(deny_sleep())
    tracked = [("a", Connection("10.0.0.1", SLEEP, "10.0.0.9", 80)),
               ("b", Connection("10.0.0.2", OTHER, "10.0.0.9", 80)),
               ("c", Connection("10.0.0.3", None, "10.0.0.9", 80))]
    closed = connections_to_close(tracked, lambda ctx: assert_rbac([deny], ctx))
    assert [(k, d.policy) for k, d in closed] == [("a", "default/deny-sleep")]
    assert connections_to_close(tracked, lambda ctx: assert_rbac([], ctx)) == []


@pytest.fixture
def proxy_inputs():
    fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    pi = ProxyInputs(cfg=Config("lab", "worker", "/z"), workload=InpodWorkload("uid-httpbin", WorkloadInfo(
        "httpbin", "default", "httpbin")), netns=InpodNetns(-1, fd), connections=ConnectionManager(),
        emit=lambda *a, **k: None, write_access_log=lambda line: None)
    yield pi
    pi.netns.close()


async def test_recheck_closes_only_connections_a_new_policy_denies(proxy_inputs):
    pi = proxy_inputs
    state = ProxyState()
    state.apply(ADDRESS_TYPE, [("uid-httpbin", workload("uid-httpbin", "10.0.0.9", "httpbin"))])
    cm = pi.connections
    ended: dict[str, str] = {}

    async def live(flow: Flow) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            ended[flow.src[0]] = flow.closing or ""
            raise

    flows = []
    for ip, identity in (("10.0.0.1", SLEEP), ("10.0.0.2", OTHER)):
        flow = Flow(pi, "inbound", 15008, (ip, 5000), ("10.0.0.9", 15008))
        task = asyncio.create_task(live(flow))
        cm.register(flow, task)
        cm.track_rbac(flow, Connection(ip, identity, "10.0.0.9", 80))
        flows.append((flow, task))
    untracked = Flow(pi, "inbound", 15006, ("10.0.0.3", 5000), ("10.0.0.9", 80))  # never authorized
    cm.register(untracked, asyncio.create_task(asyncio.sleep(3600)))
    await asyncio.sleep(0)

    assert cm.recheck(state.assert_rbac) == []  # no policy yet: nothing to close
    state.apply(AUTHORIZATION_TYPE, [("default/deny-sleep", deny_sleep())])
    closed = cm.recheck(state.assert_rbac)
    assert [(f.src[0], ctx.src_identity, d.policy) for f, ctx, d in closed] == [
        ("10.0.0.1", SLEEP, "default/deny-sleep")]
    await asyncio.sleep(0)
    assert ended == {"10.0.0.1": POLICY_CHANGE}
    assert flows[0][1].cancelled() and not flows[1][1].done()
    assert cm.recheck(state.assert_rbac) == []  # already closing: not closed twice

    # A drain closes everything of the pod, with the drain's reason.
    assert await cm.drain("uid-httpbin", "connection closed due to connection drain") == 2
    assert ended["10.0.0.2"] == "connection closed due to connection drain"


# ------------------------------------------------------------------ pool keying
def test_workload_key_is_src_id_dst_ids_src_ip_dst_addr():
    base = WorkloadKey(SLEEP, (HTTPBIN,), "10.0.0.1", ("10.0.0.9", 15008))
    assert base == WorkloadKey(SLEEP, (HTTPBIN,), "10.0.0.1", ("10.0.0.9", 15008), netns=object())  # type: ignore
    assert len({base, WorkloadKey(SLEEP, (HTTPBIN,), "10.0.0.1", ("10.0.0.9", 15008))}) == 1
    for other in (WorkloadKey(OTHER, (HTTPBIN,), "10.0.0.1", ("10.0.0.9", 15008)),
                  WorkloadKey(SLEEP, (OTHER,), "10.0.0.1", ("10.0.0.9", 15008)),
                  WorkloadKey(SLEEP, (HTTPBIN,), "10.0.0.2", ("10.0.0.9", 15008)),
                  WorkloadKey(SLEEP, (HTTPBIN,), "10.0.0.1", ("10.0.0.8", 15008))):
        assert other != base


async def _echo(request: ConnectRequest, respond) -> None:
    stream = await respond(200)
    while data := await stream.read(65536):
        stream.write(data)
        await stream.drain()
    stream.write_eof()


async def test_pool_shares_a_tunnel_per_key_and_opens_more_when_full():
    servers: list[asyncio.Task] = []
    made: list[WorkloadKey] = []

    async def connect(key: WorkloadKey) -> HboneConnection:
        """The pool's factory: a real HTTP/2 connection to an echo server over a socketpair."""
        made.append(key)
        a, b = socket.socketpair()
        sr, sw = await asyncio.open_connection(sock=b)
        servers.append(asyncio.create_task(serve_hbone(sr, sw, _echo)))
        r, w = await asyncio.open_connection(sock=a)
        return HboneConnection(r, w, max_streams=2)

    pod_a, pod_b = object(), object()
    pool = WorkloadHbonePool(connect)
    key = WorkloadKey(SLEEP, (HTTPBIN,), "10.0.0.1", ("10.0.0.9", 15008), netns=pod_a)  # type: ignore[arg-type]
    header_list = create_hbone_request("10.0.0.9", 80, src_ip="10.0.0.1", src_port=1).header_list()
    first = await pool.send_request(key, header_list)
    second = await pool.send_request(key, header_list)
    assert first.new and not second.new and first.connection is second.connection
    third = await pool.send_request(key, header_list)  # 2 streams per tunnel here: a new tunnel
    assert third.new and third.connection is not first.connection
    other_pod = WorkloadKey(SLEEP, (HTTPBIN,), "10.0.0.2", ("10.0.0.9", 15008), netns=pod_b)  # type: ignore
    fourth = await pool.send_request(other_pod, header_list)
    assert fourth.connection not in (first.connection, third.connection)
    assert [k.src for k in made] == ["10.0.0.1", "10.0.0.1", "10.0.0.2"] and pool.connections_opened == 3

    # The streams work: one carries bytes both ways.
    status, _, stream = await first.connection.await_response(first.stream)
    assert status == 200
    stream.write(b"ping")
    stream.write_eof()
    assert await stream.read() == b"ping"

    assert await pool.close_from(pod_a) == 2  # the pod left: its tunnels close, the other pod's stay
    assert len(pool.connections(other_pod)) == 1 and pool.connections(key) == []
    await pool.close()
    for t in servers:
        t.cancel()
    await asyncio.gather(*servers, return_exceptions=True)


class HereNetns:
    """The connector's netns handle for a test without root: sockets are made where the test runs."""

    def run(self, body):  # type: ignore[no-untyped-def]
        return body()


async def test_connector_times_out_with_ztunnels_network_policy_hint(tmp_path: Path):
    ca = CertificateAuthority.create(clock_skew_grace=timedelta(0))
    manager = IdentityManager(lambda: InProcessCa(ca, {("default", "sleep")}), ttl=3600)
    # A listener whose accept queue is full: further SYNs are dropped, the connect hangs.
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    filler = socket.create_connection(full.getsockname())
    try:
        connector = WorkloadConnector(manager, WorkloadTls(ca.root_pem), mark=0, connect_timeout=0.3)
        key = WorkloadKey(SLEEP, (HTTPBIN,), "127.0.0.1", full.getsockname(), netns=HereNetns())  # type: ignore
        with pytest.raises(HboneConnectFailed) as e:
            await connector(key)
        assert str(e.value) == (f"connection timed out, maybe a NetworkPolicy is blocking HBONE port "
                                f"{full.getsockname()[1]}: deadline has elapsed")
        full.close()
        with pytest.raises(HboneConnectFailed, match=r"^io error: Connection refused \(os error 111\)$"):
            await connector(key)
    finally:
        filler.close()
        full.close()
        await manager.close()


# ------------------------------------------------------------------ certificates: rotation into TLS
class InProcessCa:
    """A CaClientLike that calls the real CertificateAuthority directly (no network): node
    authorization included, for pods of `node`."""

    def __init__(self, ca: CertificateAuthority, pods: set[tuple[str, str]]) -> None:
        self.ca, self.pods, self.calls = ca, pods, 0

    async def create_certificate(self, csr_pem: bytes, identity: Identity, ttl_seconds: int) -> list[bytes]:
        self.calls += 1
        from lab.istiod.ca import CertificateRefused

        try:
            return self.ca.sign(csr_pem, identity, timedelta(seconds=ttl_seconds), "worker", self.pods)
        except CertificateRefused as e:
            raise CertificateRequestRefused(str(e)) from e

    async def close(self) -> None:
        pass


def served_serial(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> str:
    """Handshake in memory; the serial of the certificate the server presented."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=None)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side, out, peer_in in ((client, c_out, s_in), (server, s_out, c_in)):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            peer_in.write(out.read())
        if client.version() and server.version():
            try:
                client.read(1)
            except ssl.SSLWantReadError:
                pass
    der = client.getpeercert(binary_form=True)
    assert der, "no handshake"
    return format(x509.load_der_x509_certificate(der).serial_number, "x")


async def test_rotation_builds_a_new_server_context_with_the_new_certificate(tmp_path: Path):
    ca = CertificateAuthority.create(clock_skew_grace=timedelta(0))
    client_ca = InProcessCa(ca, {("default", "httpbin"), ("default", "sleep")})
    manager = IdentityManager(lambda: client_ca, ttl=2, min_refresh_delay=0.2)
    tls = WorkloadTls(ca.root_pem, cert_dir=str(tmp_path / "certs"))
    try:
        first = await manager.get(HTTPBIN)
        client_ctx = tls.client(await manager.get(SLEEP))
        ctx1 = tls.server(first)
        assert tls.server(first) is ctx1  # same serial: same context
        assert served_serial(ctx1, client_ctx) == first.serial

        deadline = asyncio.get_running_loop().time() + 5
        while manager.store.current(HTTPBIN).serial == first.serial:  # rotation at half-life (1 s)
            assert asyncio.get_running_loop().time() < deadline, "no rotation"
            await asyncio.sleep(0.05)
        second = await manager.get(HTTPBIN)
        assert second.serial != first.serial
        ctx2 = tls.server(second)
        assert ctx2 is not ctx1 and served_serial(ctx2, client_ctx) == second.serial
        assert oct((tmp_path / "certs").stat().st_mode & 0o777) == "0o700"
        names = sorted(p.name for p in tls.files(HTTPBIN))
        assert len(names) == 4 and all(n.startswith("cluster.local_ns_default_sa_httpbin-") for n in names)
        assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in tls.files(HTTPBIN))
        while manager.store.current(HTTPBIN).serial == second.serial:
            await asyncio.sleep(0.05)
        tls.server(await manager.get(HTTPBIN))
        assert len(tls.files(HTTPBIN)) == 4  # only the current and the previous certificate stay on disk
        tls.forget(HTTPBIN)
        assert tls.files(HTTPBIN) == [] and not any(p.name.startswith("cluster.local_ns_default_sa_httpbin")
                                                    for p in (tmp_path / "certs").iterdir())
    finally:
        await manager.close()
        tls.close()
    assert list((tmp_path / "certs").iterdir()) == []


def test_cert_fetcher_prefetches_local_hbone_identities_and_forgets_unused():
    state = ProxyState()
    state.apply(ADDRESS_TYPE, [
        ("a", workload("a", "10.0.0.1", "sleep")),
        ("b", workload("b", "10.0.0.2", "httpbin", node="other")),  # another node's: never ours
        ("c", workload("c", "10.0.0.3", "plain", protocol="NONE")),  # ours but not in the mesh yet
    ])
    prefetch, forget = certificate_changes(state.workloads.values(), "worker",
                                           [Identity.of("default", "plain"), Identity.of("default", "gone")])
    assert prefetch == [SLEEP]
    assert forget == [Identity.of("default", "gone")]  # "plain" is still used by a local pod


async def test_cert_fetcher_drives_the_identity_manager():
    ca = CertificateAuthority.create(clock_skew_grace=timedelta(0))
    manager = IdentityManager(lambda: InProcessCa(ca, {("default", "sleep")}), ttl=3600)
    try:
        fetcher = CertFetcher("worker", manager)
        state = ProxyState()
        state.apply(ADDRESS_TYPE, [("a", workload("a", "10.0.0.1", "sleep"))])
        assert fetcher.update(state) == ([SLEEP], [])
        for _ in range(100):
            if manager.store.get(SLEEP):
                break
            await asyncio.sleep(0.01)
        assert manager.store.get(SLEEP) is not None  # prefetched without any connection asking
        state.remove_workload("a")
        assert fetcher.update(state) == ([], [SLEEP])
        assert manager.identities() == []
    finally:
        await manager.close()


# ------------------------------------------------------------------ admin dump
async def test_certificate_dump_reports_status_and_chain():
    ca = CertificateAuthority.create(clock_skew_grace=timedelta(0))
    gate = asyncio.Event()

    class SlowCa(InProcessCa):
        async def create_certificate(self, csr_pem, identity, ttl_seconds):
            await gate.wait()
            return await super().create_certificate(csr_pem, identity, ttl_seconds)

    manager = IdentityManager(lambda: SlowCa(ca, {("default", "sleep")}), ttl=3600)
    try:
        manager.prefetch(SLEEP)
        manager.prefetch(OTHER)  # not on this node: istiod refuses
        await asyncio.sleep(0.05)
        rows = {r["identity"]: r for r in certificate_dump(manager)}
        assert rows[SLEEP.uri]["status"] == "Initializing" and rows[SLEEP.uri]["type"] == "NA"
        gate.set()
        await manager.get(SLEEP)
        for _ in range(100):
            if manager.last_error(OTHER):
                break
            await asyncio.sleep(0.01)
        rows = certificate_dump(manager)
        sleep_rows = [r for r in rows if r["identity"] == SLEEP.uri]
        assert [(r["type"], r["status"], r["valid"]) for r in sleep_rows] == [
            ("Leaf", "Available", True), ("Root", "Available", True)]
        leaf = manager.store.current(SLEEP)
        assert sleep_rows[0]["serial"] == leaf.serial and sleep_rows[0]["not_after"] == rfc3339(leaf.not_after)
        other = [r for r in rows if r["identity"] == OTHER.uri]
        assert other[0]["status"] == "Unavailable" and "no instances" in other[0]["error"]
    finally:
        await manager.close()


def test_chain_rows_types_and_validity():
    ca = CertificateAuthority.create()
    later = datetime.now(UTC) + timedelta(days=4000)
    rows = chain_rows(SLEEP, [ca.root_pem, ca.root_pem, ca.root_pem], "Available", later)
    assert [r["type"] for r in rows] == ["Leaf", "Intermediate", "Root"] and not rows[0]["valid"]


def test_config_dump_lists_workloads_services_policies():
    state = ProxyState()
    state.apply(ADDRESS_TYPE, [
        ("uid-h", workload("uid-h", "10.0.0.9", "httpbin",
                           services={"default/httpbin.default.svc.cluster.local": {"8000": 80}})),
        ("uid-p", workload("uid-p", "10.0.0.8", "plain", protocol="NONE", status="UNHEALTHY",
                           services={"default/httpbin.default.svc.cluster.local": {"8000": 80}})),
        ("default/httpbin.default.svc.cluster.local",
         {"service": {"name": "httpbin", "namespace": "default", "hostname": "httpbin.default.svc.cluster.local",
                      "addresses": ["10.96.0.9"], "ports": [{"service_port": 8000, "target_port": 80}]}}),
    ])
    state.apply(AUTHORIZATION_TYPE, [("default/deny-sleep", deny_sleep())])
    dump = config_dump(state, [], [{"flow": "f"}])
    assert [(w["name"], w["protocol"], w["status"]) for w in dump["workloads"]] == [
        ("uid-h", "HBONE", "HEALTHY"), ("uid-p", "TCP", "UNHEALTHY")]
    (svc,) = dump["services"]
    assert (svc["vips"], svc["healthy"], svc["total"]) == (["10.96.0.9"], 1, 2)
    assert dump["policies"] == [{"name": "deny-sleep", "namespace": "default", "action": "Deny",
                                 "scope": "Namespace", "dry_run": False, "rules": 1}]
    assert dump["connections"] == [{"flow": "f"}]


# ------------------------------------------------------------------ inbound checks, baggage, workload wait
def test_validate_destination_requires_the_pods_own_ip():
    assert validate_destination("10.0.0.9", ("10.0.0.9", 80)) is None
    assert validate_destination("10.0.0.9", ("10.0.0.7", 80)) == "ip mismatch: 10.0.0.9 != 10.0.0.7"


def test_guess_inbound_service_prefers_the_forwarded_host():
    w = Workload.from_resource(workload("u", "10.0.0.9", "httpbin", services={
        "default/a.default.svc.cluster.local": {"80": 8080}, "default/b.default.svc.cluster.local": {"81": 8080},
        "default/c.default.svc.cluster.local": {"90": 9090}})["workload"])
    assert guess_inbound_service(w, "b.default.svc.cluster.local", 8080) == "b.default.svc.cluster.local"
    assert guess_inbound_service(w, None, 8080) == "a.default.svc.cluster.local"
    assert guess_inbound_service(w, "elsewhere.svc", 9090) == "c.default.svc.cluster.local"
    assert guess_inbound_service(w, None, 7) is None


def test_trace_id_travels_in_traceparent():
    req = create_hbone_request("10.0.0.9", 80, src_ip="10.0.0.1", src_port=1, trace_id="ab" * 16)
    assert trace_id_of(ConnectRequest(req.authority, req.header_list())) == "ab" * 16
    assert trace_id_of(ConnectRequest("10.0.0.9:80", connect_header_list("10.0.0.9:80", [("traceparent", "x")]))) \
        is None


def test_baggage_describes_the_workload():
    w = Workload.from_resource(workload("u", "10.0.0.9", "httpbin", workload_type="deployment",
                                        workload_name="httpbin", canonical_name="httpbin", canonical_revision="v1",
                                        cluster_id="Kubernetes")["workload"])
    b = parse_baggage(format_baggage(baggage_of(w)))
    assert (b.cluster_name, b.namespace, b.workload_kind, b.workload_name, b.service_name, b.service_version) == (
        "Kubernetes", "default", "deployment", "httpbin", "httpbin", "v1")


async def test_wait_for_workload_matches_by_uid_or_name_and_waits():
    state, changes = ProxyState(), StateChanges()
    state.apply(ADDRESS_TYPE, [("uid-x", workload("uid-x", "10.0.0.1", "sleep"))])
    assert find_workload_for_pod(state, "uid-x", "?", "?").uid == "uid-x"
    assert find_workload_for_pod(state, "zds-uid", "uid-x", "default").uid == "uid-x"  # by name + namespace
    assert await wait_for_workload(state, changes, "nope", "nope", "default", timeout=0.05) is None

    async def later() -> None:
        await asyncio.sleep(0.05)
        state.apply(ADDRESS_TYPE, [("uid-y", workload("uid-y", "10.0.0.2", "sleep"))])
        changes.notify()

    task = asyncio.create_task(later())
    found = await wait_for_workload(state, changes, "uid-y", "uid-y", "default", timeout=2)
    assert found is not None and found.addresses == ("10.0.0.2",)
    await task


async def test_hbone_copy_counts_match_the_streams_counters():
    """Flow.transferred() reads live counters from the stream; they match what was copied."""
    a, b = socket.socketpair()
    sr, sw = await asyncio.open_connection(sock=b)
    server = asyncio.create_task(serve_hbone(sr, sw, _echo))
    r, w = await asyncio.open_connection(sock=a)
    conn = HboneConnection(r, w)
    _, _, stream = await conn.connect_stream("10.0.0.9:80")
    app_side, ours = socket.socketpair()
    ar, aw = await asyncio.open_connection(sock=ours)
    app_side.sendall(b"x" * 1000)
    app_side.shutdown(socket.SHUT_WR)
    sent, recv = await copy_bidirectional(stream, ar, aw)
    assert (sent, recv) == (1000, 1000) == (stream.bytes_sent, stream.bytes_received)
    app_side.close()
    aw.close()
    await conn.aclose()
    server.cancel()
    await asyncio.gather(server, return_exceptions=True)
