"""Lab test (root, real namespaces) of the waypoint process, `python -m lab.waypoint`, between a
client and two backend pods, with the lab's real istiod (CA) and real ztunnel (HBONE inbound of
the backends).

Topology (nothing in the host's netns; every netns name starts with altest-wp-):

    altest-wp-client    10.9.1.2 --+                      the client: this test opens HBONE from here
    altest-wp-waypoint  10.9.3.2 --+-- altest-wp-r        `python -m lab.waypoint` (not captured)
    altest-wp-v1        10.9.2.2 --+   (router, /24 each) backend v1, enrolled, node n2
    altest-wp-v2        10.9.4.2 --+                      backend v2, enrolled, node n2
    altest-wp-node      10.9.100.2 -+                     istiod (:15012) and the ztunnels of n1, n2

The backends are tiny HTTP/1.1 servers answering their own name and the peer address they saw;
the real lab ztunnel (in-pod listeners handed over by a ZDS server in the test, with Istio's
in-pod rules) terminates HBONE in front of them. istiod and the waypoint both watch the cluster
through a small unix-socket server answering {"op": "watch_cluster"} (test scaffolding standing
in for the API server, from test_ztunnel_hbone_lab.FakeApiServer): Service `svc` labelled
istio.io/use-waypoint=waypoint, the Gateway `waypoint`, the HTTPRoute splitting 90/10 between
svc-v1 and svc-v2, an L7 AuthorizationPolicy denying DELETE.

The client side is what a source ztunnel does: a certificate for the client's identity from
the real CA, mTLS to the waypoint's 15008 (checking the waypoint's SAN), CONNECT with
authority = the Service VIP:port. `WaypointRig` builds all of this; bench/bench_waypoint.py
reuses it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

from lab.common.admin_socket import admin_request
from lab.common.netns import entered
from lab.hbone import HboneConnection, HboneStream, open_hbone_connection
from lab.hbone.headers import Baggage, create_hbone_request, parse_traceparent
from lab.tls.certificate import WorkloadCertificate
from lab.tls.contexts import client_context, verify_server_identity
from lab.tls.csr import build_csr, generate_key, private_key_pem
from lab.tls.identity import Identity
from lab.ztunnel.identity_manager import CaClient
from lab.ztunnel.metrics import parse_exposition
from tests.conftest import require_root
from tests.lab.test_ztunnel_hbone_lab import MeshRig, PodSpec, run, wait_for
from tests.unit.test_waypoint_proxy import get, waypoint_snapshot

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "altest-wp-"
LAB = f"altest-wp-{os.getpid() % 100000}"
TD = "cluster.local"
VIP, PORT, TARGET = "10.96.0.10", 80, 8080
NODE_IP, NODE_GW = "10.9.100.2", "10.9.100.1"
WAYPOINT_LABELS = {"gateway.networking.k8s.io/gateway-name": "waypoint", "istio.io/dataplane-mode": "none"}

CLIENT = PodSpec("client", "10.9.1.2", "n1", "client", enrolled=False, labels={"app": "client"})
WAYPOINT = PodSpec("waypoint", "10.9.3.2", "n1", "waypoint", enrolled=False, labels=dict(WAYPOINT_LABELS))
V1 = PodSpec("v1", "10.9.2.2", "n2", "svc-v1", labels={"app": "svc", "version": "v1"})
V2 = PodSpec("v2", "10.9.4.2", "n2", "svc-v2", labels={"app": "svc", "version": "v2"})
CLIENT_ID = Identity.of("default", "client")
WAYPOINT_ID = Identity.of("default", "waypoint")

# A backend: HTTP/1.1 keep-alive, answers "<name> <peer ip>", logs one line per request to a file.
HTTP_APP = r"""
import http.server, sys
name, port, logfile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
log = open(logfile, "a", buffering=1)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = -1  # head and body in one write (flushed after each request) ...
    disable_nagle_algorithm = True  # ... and no Nagle delay waiting for the peer's delayed ACK
    def answer(self):
        n = int(self.headers.get("content-length") or 0)
        if n:
            self.rfile.read(n)
        out = f"{name} {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(out)))
        self.send_header("x-backend", name)
        self.end_headers()
        self.wfile.write(out)
        log.write(f"{self.client_address[0]} {self.command} {self.path} host={self.headers.get('host')}\n")
    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = answer
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    def handle_error(self, request, client_address):
        pass  # a peer resetting a kept-alive connection is not news
srv = Server(("0.0.0.0", port), H)
print("ready", flush=True)
srv.serve_forever()
"""


# ------------------------------------------------------------------------------------ the rig
class WaypointProcess:
    """`python -m lab.waypoint` in the waypoint pod's netns, as the supervisor will start it."""

    def __init__(self, rig: "WaypointRig") -> None:
        self.rig = rig
        self.dir = rig.workdir / "waypoint"
        self.dir.mkdir(exist_ok=True)
        self.out, self.err = self.dir / "stdout", self.dir / "stderr"
        self.proc: Optional[subprocess.Popen] = None

    admin_socket = property(lambda self: str(self.dir / "admin.sock"))
    flows = property(lambda self: self.dir / "flows.mitm")

    def start(self) -> None:
        rig = self.rig
        cmd = [sys.executable, "-m", "lab.waypoint", "--lab", rig.lab, "--namespace", "default", "--name", "waypoint",
               "--node", WAYPOINT.node, "--pod", WAYPOINT.name, "--pod-ip", WAYPOINT.ip,
               "--xds-address", rig.istiod_address, "--token-file", rig.ztunnels[WAYPOINT.node].token,
               "--root-cert", str(rig.ca_dir / "root-cert.pem"), "--state-dir", str(self.dir)]
        with open(self.out, "ab") as out, open(self.err, "ab") as err:
            self.proc = subprocess.Popen(["ip", "netns", "exec", rig.netns(WAYPOINT.name), *cmd], cwd=ROOT,
                                         stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5) -> Optional[int]:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def admin(self, op: str) -> Any:
        return admin_request(self.admin_socket, op)

    def ready(self) -> bool:
        try:
            return bool(self.admin("ready"))
        except (OSError, ValueError):
            return False

    def wait_ready(self, timeout: float = 15) -> None:
        try:
            wait_for(self.ready, timeout, "the waypoint ready")
        except AssertionError as e:
            raise AssertionError(f"{e}\nstderr:\n{self.stderr()[-3000:]}") from None

    def access_log(self) -> list[str]:
        return self.out.read_text().splitlines() if self.out.exists() else []

    def stderr(self) -> str:
        return self.err.read_text() if self.err.exists() else ""


class WaypointRig(MeshRig):
    """MeshRig (istiod, ztunnels, ZDS, fake API server) plus a link from the node netns to the
    router, so that the waypoint pod reaches istiod at NODE_IP:15012 as it would the
    control-plane node; the cluster is `waypoint_snapshot`; the backends run HTTP_APP."""

    def __init__(self, workdir: Path, events: bool = True) -> None:
        super().__init__(PREFIX, LAB, [CLIENT, WAYPOINT, V1, V2], workdir=workdir, events=events)
        self.istiod_address = f"{NODE_IP}:15012"
        self.waypoint: Optional[WaypointProcess] = None  # made once the workdir exists
        self.backend_logs: dict[str, Path] = {}

    def build_network(self) -> None:
        super().build_network()
        run("ip", "-n", self.router, "link", "add", "vnode", "type", "veth", "peer", "name", "eth0", "netns",
            self.node_ns)
        run("ip", "-n", self.router, "addr", "add", f"{NODE_GW}/24", "dev", "vnode")
        run("ip", "-n", self.router, "link", "set", "vnode", "up")
        run("ip", "-n", self.node_ns, "addr", "add", f"{NODE_IP}/24", "dev", "eth0")
        run("ip", "-n", self.node_ns, "link", "set", "eth0", "up")
        run("ip", "-n", self.node_ns, "route", "add", "default", "via", NODE_GW)

    def snapshot(self) -> dict:
        snap = waypoint_snapshot([p.snapshot() for p in self.pods.values()], vip=VIP, port=PORT, target=TARGET)
        snap["nodes"] = [{"name": n, "ip": NODE_IP, "role": "worker"} for n in self.nodes]
        return snap

    def start_all(self) -> None:
        self.start()
        for spec in (V1, V2):
            log = self.workdir / f"{spec.name}.log"
            self.backend_logs[spec.name] = log
            self.start_app(spec.name, HTTP_APP, spec.name, str(TARGET), str(log))
        self.waypoint = WaypointProcess(self)
        self.waypoint.start()
        self.waypoint.wait_ready()

    def close(self) -> None:
        if self.waypoint is not None:
            self.waypoint.stop(signal.SIGKILL)
        super().close()


# ------------------------------------------------------------------------------------ the client
def in_netns(netns: str, coro_fn: Callable[[], Any], timeout: float = 60) -> Any:
    """Run an asyncio program in a thread that lives inside `netns`: every socket it opens
    belongs to that pod (setns is per thread)."""
    result: dict[str, Any] = {}

    def main() -> None:
        try:
            with entered(netns):
                result["value"] = asyncio.run(coro_fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            result["error"] = e

    t = threading.Thread(target=main, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AssertionError(f"the client in {netns} did not finish within {timeout}s")
    if "error" in result:
        raise result["error"]
    return result.get("value")


class MeshClient:
    """What the client's source ztunnel does towards a waypoint: the client's certificate from
    istiod's CA, mTLS to waypointIP:15008 (the waypoint's SAN must be exactly its identity),
    one CONNECT per application connection with authority = the Service VIP:port."""

    def __init__(self, rig: WaypointRig, identity: Identity = CLIENT_ID, node: str = "n1") -> None:
        self.rig, self.identity, self.node = rig, identity, node
        self.root = (rig.ca_dir / "root-cert.pem").read_bytes()
        self.token = Path(rig.ztunnels[node].token).read_text().strip()
        self.cert: Optional[WorkloadCertificate] = None

    async def certificate(self) -> WorkloadCertificate:
        if self.cert is None:
            ca = CaClient(self.rig.istiod_address, self.root, self.token)
            key = generate_key()
            try:
                chain = await ca.create_certificate(build_csr(key, self.identity), self.identity, 3600)
            finally:
                await ca.close()
            self.cert = WorkloadCertificate.from_ca_response(self.identity, chain, private_key_pem(key))
        return self.cert

    async def connect(self, ip: str = WAYPOINT.ip, expect: Identity = WAYPOINT_ID) -> HboneConnection:
        ctx = client_context(await self.certificate(), self.root)
        conn = await open_hbone_connection(ip, 15008, ctx, timeout=5)
        verify_server_identity(conn.writer.get_extra_info("ssl_object"), [expect])
        return conn

    @staticmethod
    async def tunnel(conn: HboneConnection, flow: str, authority: tuple[str, int] = (VIP, PORT),
                     src_port: int = 40000) -> HboneStream:
        hreq = create_hbone_request(authority[0], authority[1], src_ip=CLIENT.ip, src_port=src_port,
                                    service_host="svc.default.svc.cluster.local",
                                    baggage=Baggage(cluster_name="Kubernetes", namespace="default",
                                                    workload_kind="deployment", workload_name="client",
                                                    service_name="client", service_version="v1"),
                                    trace_id=flow)
        _, _, stream = await conn.connect_stream(hreq.authority, hreq.headers)
        return stream


FLOW = "0af7651916cd43dd8448eb211c80319c"


@pytest.fixture(scope="module")
def rig() -> Iterator[WaypointRig]:
    require_root()
    r = WaypointRig(Path(f"/tmp/wp-{os.getpid()}"))
    try:
        r.start_all()
        yield r
        assert r.waypoint is not None
        err = r.waypoint.stderr()
        assert "Traceback" not in err, err[-4000:]  # no crash, no unhandled exception in the waypoint
    finally:
        r.close()
        assert not [n for n in run("ip", "netns", "list").split() if n.startswith(PREFIX)]
        assert not r.workdir.exists() and not Path("/run/ambient-lab", LAB).exists()


def backend_lines(rig: WaypointRig, name: str) -> list[str]:
    path = rig.backend_logs[name]
    return path.read_text().splitlines() if path.exists() else []


# ------------------------------------------------------------------------------------ tests
def test_canary_split_l7_policy_and_the_waypoint_identity_at_the_backends(rig: WaypointRig):
    wp = rig.waypoint
    assert wp is not None
    client = MeshClient(rig)
    before = {n: len(backend_lines(rig, n)) for n in ("v1", "v2")}
    log_before = len(wp.access_log())

    async def session() -> tuple[Counter, set[str], int, str]:
        conn = await client.connect()
        try:
            stream = await MeshClient.tunnel(conn, FLOW)
            buf = bytearray()
            names: Counter = Counter()
            peers: set[str] = set()
            for i in range(200):
                resp = await get(stream, f"/item/{i}", buf=buf)
                assert resp.status == 200, resp
                name, peer = resp.body.decode().split()
                names[name] += 1
                peers.add(peer)
            denied = await get(stream, "/item/0", method="DELETE", buf=buf)
            return names, peers, denied.status, denied.body.decode()
        finally:
            await conn.aclose()

    names, peers, denied_status, denied_body = in_netns(rig.netns(CLIENT.name), session)
    assert names["v1"] + names["v2"] == 200 and 160 <= names["v1"] <= 196, names  # the 90/10 canary
    assert names["v2"] > 0
    assert (denied_status, denied_body) == (403, "RBAC: access denied")
    # The backends' apps saw the waypoint's address (ztunnel preserved the HBONE client's IP) ...
    assert peers == {WAYPOINT.ip}
    got = {n: backend_lines(rig, n)[before[n]:] for n in ("v1", "v2")}
    assert len(got["v1"]) == names["v1"] and len(got["v2"]) == names["v2"]  # the DELETE never arrived
    assert all(line.startswith(f"{WAYPOINT.ip} GET /item/") and "host=svc:80" in line for line in got["v1"])
    # ... and their ztunnel saw the WAYPOINT's identity, not the client's. (Its access log only
    # gets a line when a connection closes; the waypoint keeps its upstream connections alive,
    # so look at ztunnel's events: the TLS handshake and the L4 authorization of each tunnel.)
    assert rig.events is not None
    handshakes = rig.events.wait("tls.handshake", lambda e: e["flow"] == FLOW and e["node"] == "n2")
    assert {e["fields"]["src_identity"] for e in handshakes} == {str(WAYPOINT_ID)}
    assert {e["fields"]["dst_identity"] for e in handshakes} <= {V1.identity, V2.identity}
    rbac = rig.events.wait("rbac.decision", lambda e: e["flow"] == FLOW and e["node"] == "n2")
    assert all(e["fields"]["allowed"] and e["fields"]["src_identity"] == str(WAYPOINT_ID) for e in rbac)
    received = rig.events.wait("hbone.connect.received", lambda e: e["flow"] == FLOW and e["node"] == "n2")
    assert {e["fields"]["authority"] for e in received} <= {f"{V1.ip}:{TARGET}", f"{V2.ip}:{TARGET}"}
    assert len(received) <= 10, len(received)  # upstream HTTP/1.1 connections are kept alive

    # The waypoint's access log: one line per request, Envoy's format, with the flow id.
    lines = wait_for(lambda: (ls := wp.access_log()[log_before:]) and len(ls) >= 201 and ls, 5, "201 log lines")
    assert sum('"GET /item/' in l and '" 200 - via_upstream ' in l for l in lines) == 200
    deny = next(l for l in lines if '"DELETE /item/0 HTTP/1.1" 403' in l)
    assert "rbac_access_denied_matched_policy[ns[default]-policy[deny-delete]-rule[0]]" in deny
    assert all(f'flow="{FLOW}"' in l and f'src.identity="{CLIENT.identity}"' in l for l in lines)

    # One flow id across the waypoint's events and the destination ztunnel's.
    wp_events = rig.events.wait("waypoint.response", lambda e: e["flow"] == FLOW, count=201)
    assert wp_events
    kinds = {e["kind"] for e in rig.events.events if e["flow"] == FLOW and e["component"] == "waypoint"}
    assert {"waypoint.tunnel.in", "waypoint.request", "waypoint.authz", "waypoint.route", "waypoint.tunnel.out",
            "waypoint.response"} <= kinds, kinds
    tin = next(e for e in rig.events.events if e["kind"] == "waypoint.tunnel.in" and e["flow"] == FLOW)
    assert tin["fields"]["client_identity"] == CLIENT.identity and tin["pod"] == WAYPOINT.name
    out = next(e for e in rig.events.events if e["kind"] == "waypoint.tunnel.out" and e["flow"] == FLOW)
    assert out["fields"]["identity"] == str(WAYPOINT_ID) and out["fields"]["peer_identity"] in (V1.identity,
                                                                                               V2.identity)
    assert parse_traceparent(received[0]["fields"]["headers"]["traceparent"]).trace_id == FLOW
    denied = next(e for e in rig.events.events if e["kind"] == "waypoint.authz" and e["flow"] == FLOW
                  and not e["fields"]["allowed"])
    assert denied["fields"]["policy"] == "default/deny-delete"

    # mitmdump reads the waypoint's flow file.
    mitmdump = Path(sys.executable).parent / "mitmdump"
    conf = rig.workdir / "mitm-conf"
    p = subprocess.run([str(mitmdump), "-nr", str(wp.flows), "--set", f"confdir={conf}"], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "HOME": str(rig.workdir)})
    assert p.returncode == 0, p.stderr
    assert f"{CLIENT.ip}:40000: GET http://{VIP}/item/7" in p.stdout  # port 80 is the scheme's default
    assert f"{CLIENT.ip}:40000: DELETE http://{VIP}/item/0" in p.stdout and "<< 403 Forbidden" in p.stdout


def test_admin_readiness_and_metrics(rig: WaypointRig):
    wp = rig.waypoint
    assert wp is not None
    config = wp.admin("config")
    assert config["waypoint"] == "default/waypoint" and config["identity"] == str(WAYPOINT_ID)
    assert config["listeners"][1]["filter_chains"][0]["destination"] == f"{VIP}:{PORT}"
    clusters = {c["name"]: c for c in config["clusters"]}
    assert [e["address"] for e in clusters["inbound-vip|80|http|svc-v1.default.svc.cluster.local"]["endpoints"]] \
        == [f"{V1.ip}:{TARGET}"]
    stats = wp.admin("stats")
    assert stats["downstream_rq_total"] >= 1 and stats["hbone_upstream"]["connections_opened"] >= 1
    metrics = parse_exposition(wp.admin("metrics"))
    series = metrics["istio_requests_total"]
    assert any(l["reporter"] == "waypoint" and l["source_principal"] == CLIENT.identity
               and l["destination_workload"] in ("v1", "v2") and l["response_code"] == "200" for l, _ in series)
    # Readiness, as kubelet probes it: plain HTTP on 15021 from outside the pod.
    out = run("ip", "netns", "exec", rig.netns(CLIENT.name), "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
              "--max-time", "5", f"http://{WAYPOINT.ip}:15021/healthz/ready")
    assert out == "200"
    # The waypoint's certificate is in its state dir, issued for its own identity.
    certs = sorted(p.name for p in (wp.dir / "certs").iterdir())
    assert certs and all(name.startswith("cluster.local_ns_default_sa_waypoint") for name in certs)


def test_unknown_authority_is_503_and_bad_request_is_400(rig: WaypointRig):
    client = MeshClient(rig)

    async def session() -> tuple[int, int, bytes]:
        conn = await client.connect()
        try:
            try:
                await MeshClient.tunnel(conn, FLOW, authority=("10.96.0.99", 80))
                status = 200
            except Exception as e:  # noqa: BLE001
                status = getattr(e, "status", -1)
            stream = await MeshClient.tunnel(conn, FLOW, src_port=40001)
            stream.write(b"BROKEN\r\n\r\n")
            data = b""
            while chunk := await stream.read(65536):
                data += chunk
            again = await MeshClient.tunnel(conn, FLOW, src_port=40002)  # the mTLS connection is fine
            ok = await get(again, "/x")
            return status, ok.status, data
        finally:
            await conn.aclose()

    status, ok, data = in_netns(rig.netns(CLIENT.name), session)
    assert status == 503 and ok == 200
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"connection: close" in data


def test_killed_waypoint_fails_requests_and_restart_restores(rig: WaypointRig):
    wp = rig.waypoint
    assert wp is not None
    client = MeshClient(rig)

    async def one_request() -> int:
        conn = await client.connect()
        try:
            stream = await MeshClient.tunnel(conn, FLOW)
            return (await get(stream, "/after-restart")).status
        finally:
            await conn.aclose()

    assert in_netns(rig.netns(CLIENT.name), one_request) == 200
    wp.stop(signal.SIGKILL)
    with pytest.raises((ConnectionRefusedError, OSError)):
        in_netns(rig.netns(CLIENT.name), one_request)
    wp.start()
    wp.wait_ready()
    assert in_netns(rig.netns(CLIENT.name), one_request) == 200


def test_sigterm_exits_promptly(rig: WaypointRig):
    wp = rig.waypoint
    assert wp is not None
    client = MeshClient(rig)
    opened = threading.Event()
    release = threading.Event()

    async def hold_a_tunnel() -> None:
        conn = await client.connect()
        stream = await MeshClient.tunnel(conn, FLOW)
        assert (await get(stream, "/held")).status == 200
        opened.set()
        while not release.is_set():
            await asyncio.sleep(0.05)
        await conn.aclose()

    holder = threading.Thread(target=lambda: in_netns(rig.netns(CLIENT.name), hold_a_tunnel), daemon=True)
    holder.start()
    assert opened.wait(10)
    t0 = time.monotonic()
    code = wp.stop(signal.SIGTERM, timeout=5)
    elapsed = time.monotonic() - t0
    release.set()
    holder.join(10)
    assert code == 0 and elapsed < 3, (code, elapsed, wp.stderr()[-2000:])
    assert not os.path.exists(wp.admin_socket)
    assert "received a termination signal" in wp.stderr()
    wp.start()  # leave it running for whatever comes next
    wp.wait_ready()
