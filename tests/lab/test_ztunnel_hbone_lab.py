"""Lab tests (root, real namespaces) of the ambient data plane: HBONE between two meshed pods,
served by the lab's real ztunnel processes, with certificates and config from the lab's real
istiod (python -m lab.istiod).

Topology (nothing in the host's netns):

    altest-zh-client    10.9.1.2 --+                     pod "client" (sa client), node n1, enrolled
    altest-zh-server    10.9.2.2 --+-- altest-zh-r       pod "server" (sa server), node n2, enrolled
    altest-zh-outsider  10.9.3.2 --+   (router, a /24    pod "outsider", node n2, NOT enrolled
                                        per link)
    altest-zh-node: istiod on 127.0.0.1:15012 and two ztunnel processes, --node n1 and --node n2
                    (two "nodes" as far as ztunnel and istiod are concerned: separate certificates,
                    node authorization, events and access logs)

istiod watches the cluster through a tiny unix-socket server answering {"op": "watch_cluster"}
with snapshots shaped like the supervisor's cluster_snapshot(): it stands in for the API server,
the test edits it to add and remove AuthorizationPolicies and PeerAuthentications.

`MeshRig` builds all of this; bench/bench_mesh.py reuses it.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lab.cni.iptables import install_inpod_rules
from lab.common.netns import entered
from lab.kube.model import REDIRECTION_ANNOTATION
from lab.proto.zds import WorkloadInfo
from lab.supervisor.client import supervisor_socket
from lab.ztunnel.metrics import parse_exposition
from tests.conftest import require_root
from tests.lab.test_ztunnel_lab import (
    ECHO_APP,
    Agent,
    Events,
    log_fields,
    read_all,
    read_line,
    wait_for,
)

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "altest-zh-"
LAB = f"altest-zh-{os.getpid() % 100000}"
APP_PORT = 8080
SERVICE_VIP, SERVICE_PORT = "10.96.0.50", 80
TD = "cluster.local"


# ------------------------------------------------------------------------------------ the rig
@dataclass
class PodSpec:
    name: str
    ip: str
    node: str
    service_account: str
    enrolled: bool = True
    namespace: str = "default"
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def uid(self) -> str:
        return f"uid-{self.name}"

    @property
    def identity(self) -> str:
        return f"spiffe://{TD}/ns/{self.namespace}/sa/{self.service_account}"

    def snapshot(self) -> dict:
        return {"name": self.name, "namespace": self.namespace, "uid": self.uid, "ip": self.ip, "node": self.node,
                "phase": "Running", "labels": dict(self.labels),
                "annotations": {REDIRECTION_ANNOTATION: "enabled"} if self.enrolled else {},
                "owner": "", "service_account": self.service_account, "ports": {"http": APP_PORT}}


class FakeApiServer:
    """The supervisor's `watch_cluster` stream, for istiod: the snapshot now and after every change.
    Test scaffolding standing in for the Kubernetes API server, not part of what is tested."""

    def __init__(self, path: str, snapshot: dict) -> None:
        self.path = path
        self.snapshot = snapshot
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.writers: list[asyncio.StreamWriter] = []
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_unix_server(self._serve, path=path), self.loop).result(5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        if json.loads(line or b"{}").get("op") != "watch_cluster":
            writer.write(b'{"error": "only watch_cluster"}\n')
            writer.close()
            return
        self.writers.append(writer)
        writer.write(json.dumps({"snapshot": self.snapshot}).encode() + b"\n")
        await writer.drain()
        await reader.read()  # until istiod goes away

    def update(self, change: Callable[[dict], None]) -> None:
        """Edit the cluster (in this thread's view) and push the new snapshot to every watcher."""
        snap = copy.deepcopy(self.snapshot)
        change(snap)
        snap["generation"] = self.snapshot["generation"] + 1
        self.snapshot = snap

        async def push() -> None:
            for w in list(self.writers):
                if not w.is_closing():
                    w.write(json.dumps({"snapshot": snap}).encode() + b"\n")

        asyncio.run_coroutine_threadsafe(push(), self.loop).result(5)

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            for w in self.writers:
                w.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def run(*cmd: str, check: bool = True) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=check).stdout


class Ztunnel:
    """One ztunnel process (one "node"), in the rig's node netns."""

    def __init__(self, rig: MeshRig, node: str, cert_ttl: int = 0) -> None:
        self.rig, self.node, self.cert_ttl = rig, node, cert_ttl
        self.dir = rig.workdir / node
        self.dir.mkdir(exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.out = self.dir / "ztunnel.out"
        self.err = self.dir / "ztunnel.err"

    zds = property(lambda self: str(self.dir / "ztunnel.sock"))
    admin = property(lambda self: str(self.dir / "admin.sock"))
    token = property(lambda self: str(self.dir / "token"))

    def start(self) -> None:
        cmd = [sys.executable, "-m", "lab.ztunnel", "--lab", self.rig.lab, "--node", self.node,
               "--zds-socket", self.zds, "--admin-socket", self.admin, "--xds-address", self.rig.istiod_address,
               "--token-file", self.token, "--root-cert", str(self.rig.ca_dir / "root-cert.pem")]
        if self.rig.keylog:
            cmd += ["--keylog", str(self.rig.keylog)]
        if self.cert_ttl:
            cmd += ["--cert-ttl", str(self.cert_ttl)]
        with open(self.out, "ab") as out, open(self.err, "ab") as err:
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.rig.node_ns, *cmd], cwd=ROOT, stdout=out,
                                         stderr=err, stdin=subprocess.DEVNULL,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def access_log(self) -> list[str]:
        return [l for l in self.out.read_text().splitlines() if "\taccess\t" in l] if self.out.exists() else []

    def stderr(self) -> str:
        return self.err.read_text() if self.err.exists() else ""

    def admin_request(self, request: dict) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(self.admin)
            s.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(1 << 20)
                assert chunk, "admin closed the connection"
                data += chunk
        reply = json.loads(data)
        assert "error" not in reply, reply
        return reply[request["op"]]

    def wait_log(self, predicate: Callable[[str], bool], what: str, timeout: float = 5.0) -> str:
        try:
            return wait_for(lambda: next((l for l in self.access_log() if predicate(l)), None), timeout, what)
        except AssertionError as e:
            raise AssertionError(f"{e}; ztunnel {self.node} access log:\n" + "\n".join(self.access_log()[-20:])
                                 + "\nstderr:\n" + self.stderr()[-3000:]) from None


class MeshRig:
    """Namespaces, istiod, the fake API server, node agents and ztunnels for a small mesh."""

    def __init__(self, prefix: str, lab: str, pods: list[PodSpec], *, workdir: Path, events: bool = True,
                 keylog: bool = False, cert_ttl: dict[str, int] | None = None,
                 services: list[dict] | None = None) -> None:
        self.prefix, self.lab, self.pods = prefix, lab, {p.name: p for p in pods}
        self.workdir = workdir
        self.router, self.node_ns = prefix + "r", prefix + "node"
        self.ca_dir = workdir / "istiod"
        self.istiod_address = "127.0.0.1:15012"
        self.keylog: Path | None = workdir / "keylog.txt" if keylog else None
        self.want_events = events
        self.cert_ttl = cert_ttl or {}
        self.services = services or []
        self.events: Events | None = None
        self.api: FakeApiServer | None = None
        self.istiod: subprocess.Popen | None = None
        self.agents: dict[str, Agent] = {}
        self.ztunnels: dict[str, Ztunnel] = {}
        self.apps: list[subprocess.Popen] = []

    def netns(self, pod: str) -> str:
        return self.prefix + pod

    @property
    def nodes(self) -> list[str]:
        return sorted({p.node for p in self.pods.values()})

    # -- building
    def build_network(self) -> None:
        """Router + one netns per pod (/24 each, default route via the router); the node netns."""
        self.remove_namespaces()
        for ns in (self.router, self.node_ns, *(self.netns(p) for p in self.pods)):
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "netns", "exec", self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for i, pod in enumerate(self.pods.values()):
            gw = pod.ip.rsplit(".", 1)[0] + ".1"
            veth = f"v{i}"
            run("ip", "-n", self.router, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                "netns", self.netns(pod.name))
            run("ip", "-n", self.router, "addr", "add", f"{gw}/24", "dev", veth)
            run("ip", "-n", self.router, "link", "set", veth, "up")
            run("ip", "-n", self.netns(pod.name), "addr", "add", f"{pod.ip}/24", "dev", "eth0")
            run("ip", "-n", self.netns(pod.name), "link", "set", "eth0", "up")
            run("ip", "-n", self.netns(pod.name), "route", "add", "default", "via", gw)

    def snapshot(self) -> dict:
        return {"generation": 1, "nodes": [{"name": n, "ip": "127.0.0.1", "role": "worker"} for n in self.nodes],
                "namespaces": [{"name": "default", "labels": {}}, {"name": "istio-system", "labels": {}}],
                "pods": [p.snapshot() for p in self.pods.values()], "services": copy.deepcopy(self.services),
                "objects": []}

    def start_control_plane(self) -> None:
        run_dir = Path("/run/ambient-lab") / self.lab
        if self.want_events:
            self.events = Events(self.lab)
        else:
            run_dir.mkdir(parents=True, exist_ok=False)
        self.api = FakeApiServer(supervisor_socket(self.lab), self.snapshot())
        self.ca_dir.mkdir(mode=0o700)
        tokens = {n: f"token-of-{n}-{os.getpid()}" for n in self.nodes}
        (self.ca_dir / "tokens.json").write_text(json.dumps(tokens))
        for node in self.nodes:
            zt = self.ztunnels[node] = Ztunnel(self, node, self.cert_ttl.get(node, 0))
            Path(zt.token).write_text(tokens[node])
        cmd = [sys.executable, "-m", "lab.istiod", "--lab", self.lab, "--listen", self.istiod_address,
               "--ca-dir", str(self.ca_dir), "--tokens", str(self.ca_dir / "tokens.json")]
        if self.cert_ttl:
            cmd += ["--workload-cert-ttl", str(min(self.cert_ttl.values()))]
        with open(self.workdir / "istiod.log", "wb") as log:
            self.istiod = subprocess.Popen(["ip", "netns", "exec", self.node_ns, *cmd], cwd=ROOT, stdout=log,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wait_for(lambda: (self.ca_dir / "root-cert.pem").exists(), 10, "istiod's root certificate")

    def start_app(self, pod: str, script: str, *args: str) -> subprocess.Popen:
        app = subprocess.Popen(["ip", "netns", "exec", self.netns(pod), sys.executable, "-c", script, *args],
                               stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        assert app.stdout is not None and app.stdout.readline().strip() == "ready"
        self.apps.append(app)
        return app

    def start_ztunnels(self) -> None:
        for node, zt in self.ztunnels.items():
            self.agents[node] = Agent(zt.zds)
            zt.start()
        for node in self.ztunnels:
            self.agents[node].wait_ready(15)

    def enrol(self, pod: str) -> None:
        """What istio-cni does: the in-pod rules, then the pod's netns to its node's ztunnel."""
        spec = self.pods[pod]
        install_inpod_rules(self.netns(pod))
        resp = self.agents[spec.node].add(spec.uid, WorkloadInfo(spec.name, spec.namespace, spec.service_account),
                                          self.netns(pod))
        assert resp.ok, resp

    def wait_ready(self, timeout: float = 15.0) -> None:
        for zt in self.ztunnels.values():
            wait_for(lambda zt=zt: zt.admin_request({"op": "ready"}), timeout, f"ztunnel {zt.node} ready")

    def start(self, enrol: bool = True) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.build_network()
        self.start_control_plane()
        self.start_ztunnels()
        if enrol:
            for pod in self.pods.values():
                if pod.enrolled:
                    self.enrol(pod.name)
        self.wait_ready()

    # -- teardown
    def remove_namespaces(self) -> None:
        for ns in [n for n in run("ip", "netns", "list").split() if n.startswith(self.prefix)]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def close(self) -> None:
        for zt in self.ztunnels.values():
            zt.stop(signal.SIGKILL)
        for agent in self.agents.values():
            agent.close()
        if self.istiod is not None:
            self.istiod.kill()
            self.istiod.wait()
        for app in self.apps:
            app.kill()
            app.wait()
        if self.api is not None:
            self.api.close()
        if self.events is not None:
            self.events.close()
        shutil.rmtree(Path("/run/ambient-lab") / self.lab, ignore_errors=True)
        self.remove_namespaces()
        shutil.rmtree(self.workdir, ignore_errors=True)


# ------------------------------------------------------------------------------------ fixture
CLIENT = PodSpec("client", "10.9.1.2", "n1", "client", labels={"app": "client"})
SERVER = PodSpec("server", "10.9.2.2", "n2", "server", labels={"app": "server"})
OUTSIDER = PodSpec("outsider", "10.9.3.2", "n2", "outsider", enrolled=False, labels={"app": "outsider"})
SERVICE = {"name": "server", "namespace": "default", "cluster_ip": SERVICE_VIP, "labels": {},
           "selector": {"app": "server"},
           "ports": [{"name": "http", "port": SERVICE_PORT, "target_port": APP_PORT, "protocol": "TCP"}]}
SERVICE_FQDN = "server.default.svc.cluster.local"


@pytest.fixture(scope="module")
def rig() -> Iterator[MeshRig]:
    require_root()
    r = MeshRig(PREFIX, LAB, [CLIENT, SERVER, OUTSIDER], workdir=Path(f"/tmp/zh-{os.getpid()}"), keylog=True,
                services=[SERVICE], cert_ttl={"n2": 4})
    try:
        r.start()
        r.start_app("server", ECHO_APP, str(APP_PORT))
        yield r
        problems = {n: zt.stderr() for n, zt in r.ztunnels.items()
                    if "Traceback" in zt.stderr() or "exception" in zt.stderr().lower()}
        assert not problems, problems  # no crash, no unhandled task exception in either ztunnel
    finally:
        r.close()
        assert not [n for n in run("ip", "netns", "list").split() if n.startswith(PREFIX)]
        assert not r.workdir.exists() and not Path("/run/ambient-lab", LAB).exists()


def connect(netns: str, addr: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    with entered(netns):
        s = socket.socket()
        s.settimeout(timeout)
        try:
            s.connect(addr)
        except BaseException:
            s.close()
            raise
    return s


def exchange(rig: MeshRig, pod: str = "client", addr: tuple[str, int] = (SERVER.ip, APP_PORT),
             payload: bytes = b"hello over HBONE") -> tuple[str, int, bytes, int]:
    """Connect, read the peer the server app saw, send, half-close, read the echo."""
    with connect(rig.netns(pod), addr) as s:
        local_port = s.getsockname()[1]
        line = read_line(s)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        echoed = read_all(s)
    ip, port = line.decode().split()
    return ip, int(port), echoed, local_port


def expect_reset(rig: MeshRig, pod: str = "client", addr: tuple[str, int] = (SERVER.ip, APP_PORT)) -> None:
    """The app's connection is reset (RST), as Istio does: possibly before connect() even returns."""
    with pytest.raises(ConnectionResetError), connect(rig.netns(pod), addr) as s:
        data = s.recv(100)
        raise AssertionError(f"expected a reset, got {data!r}")


def policy(name: str, spec: dict, kind: str = "AuthorizationPolicy", namespace: str = "default") -> dict:
    return {"kind": kind, "api_version": "security.istio.io/v1", "namespace": namespace, "name": name,
            "labels": {}, "raw": {"apiVersion": "security.istio.io/v1", "kind": kind,
                                  "metadata": {"name": name, "namespace": namespace}, "spec": spec}}


DENY_CLIENT = policy("deny-client", {"selector": {"matchLabels": {"app": "server"}}, "action": "DENY",
                                     "rules": [{"from": [{"source": {"principals": [
                                         f"{TD}/ns/default/sa/client"]}}]}]})
STRICT = policy("default", {"mtls": {"mode": "STRICT"}}, kind="PeerAuthentication")


def set_objects(rig: MeshRig, objects: list[dict]) -> None:
    assert rig.api is not None
    rig.api.update(lambda snap: snap.__setitem__("objects", copy.deepcopy(objects)))


def wait_policies(rig: MeshRig, node: str, wanted: set[str]) -> None:
    zt = rig.ztunnels[node]
    wait_for(lambda: {f"{p['namespace']}/{p['name']}" for p in zt.admin_request({"op": "config_dump"})["policies"]}
             == wanted, 10, f"policies {wanted} at ztunnel {node}")


def new_lines(zt: Ztunnel, before: int, predicate: Callable[[str], bool], what: str) -> str:
    """The first access-log line written after the first `before` lines that matches `predicate`."""
    return wait_for(lambda: next((l for l in zt.access_log()[before:] if predicate(l)), None), 5, what)


def flow_events(rig: MeshRig, flow: str) -> list[dict]:
    assert rig.events is not None
    return [e for e in rig.events.events if e["flow"] == flow]


# ------------------------------------------------------------------------------------ tests
def test_pod_to_pod_traffic_is_only_hbone_on_port_15008(rig: MeshRig):
    pcap = rig.workdir / "a.pcap"
    dump = subprocess.Popen(["ip", "netns", "exec", rig.netns("client"), "tcpdump", "-i", "eth0", "-nn", "-U",
                             "--immediate-mode", "-w", str(pcap), "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert dump.stderr is not None and "listening on" in dump.stderr.readline()
        for _ in range(3):
            exchange(rig, payload=b"x" * 5000)
        time.sleep(0.2)
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(5)
    text = run("tcpdump", "-nn", "-r", str(pcap))
    packets = [l for l in text.splitlines() if " IP " in l]
    assert packets, (text, pcap.stat().st_size)
    for line in packets:
        assert re.search(rf"{re.escape(SERVER.ip)}\.15008\b", line), line  # every packet is to/from :15008
    assert f"{SERVER.ip}.{APP_PORT}" not in text
    # This is the first mesh traffic of the module, so the capture holds the tunnel's handshake:
    # with ztunnel's key log (--keylog), tshark decrypts it and shows the CONNECT inside.
    assert rig.keylog is not None and "CLIENT_HANDSHAKE_TRAFFIC_SECRET" in rig.keylog.read_text()
    out = run("tshark", "-r", str(pcap), "-o", f"tls.keylog_file:{rig.keylog}", "-d", "tcp.port==15008,tls",
              "-Y", "http2.type == 1", "-T", "fields", "-e", "http2.header.value")
    assert "CONNECT" in out and f"{SERVER.ip}:{APP_PORT}" in out, out


def test_client_to_server_through_hbone(rig: MeshRig):
    payload = b"hello over HBONE"
    n1, n2 = rig.ztunnels["n1"], rig.ztunnels["n2"]
    before = len(n2.access_log())
    peer_ip, peer_port, echoed, local_port = exchange(rig, payload=payload)
    assert echoed == payload and peer_ip == CLIENT.ip  # the server app saw the client pod's IP

    out = log_fields(n1.wait_log(lambda l: f"src.addr={CLIENT.ip}:{local_port} " in l, "outbound log"))
    assert out["direction"] == "outbound" and out["dst.addr"] == f"{SERVER.ip}:15008"
    assert out["dst.hbone_addr"] == f"{SERVER.ip}:{APP_PORT}"
    assert (out["src.identity"], out["dst.identity"]) == (CLIENT.identity, SERVER.identity)
    assert (out["src.workload"], out["dst.workload"], out["dst.namespace"]) == ("client", "server", "default")
    greeting = len(f"{peer_ip} {peer_port}\n")
    assert (int(out["bytes_sent"]), int(out["bytes_recv"])) == (len(payload), greeting + len(payload))
    assert "error" not in out

    inbound = log_fields(new_lines(n2, before, lambda l: 'direction="inbound"' in l, "inbound log"))
    assert (inbound["src.identity"], inbound["dst.identity"]) == (CLIENT.identity, SERVER.identity)
    assert inbound["src.addr"].startswith(CLIENT.ip + ":") and inbound["dst.addr"] == f"{SERVER.ip}:15008"
    assert inbound["dst.hbone_addr"] == f"{SERVER.ip}:{APP_PORT}" and inbound["src.workload"] == "client"
    assert (int(inbound["bytes_recv"]), int(inbound["bytes_sent"])) == (len(payload), greeting + len(payload))

    # One flow id on both nodes: the source's flow id travelled as the traceparent trace id.
    assert rig.events is not None
    captured = rig.events.wait("conn.captured", lambda e: e["fields"]["src"] == f"{CLIENT.ip}:{local_port}")[0]
    assert captured["node"] == "n1" and captured["fields"]["port"] == 15001
    flow = captured["flow"]
    wait_for(lambda: {(e["node"], e["kind"]) for e in flow_events(rig, flow)} >= {("n1", "conn.closed"),
                                                                                   ("n2", "conn.closed")},
             5, "both sides closed")
    by_node = {n: [e["kind"] for e in flow_events(rig, flow) if e["node"] == n] for n in ("n1", "n2")}
    assert by_node["n1"] == ["conn.captured", "conn.original_dst", "conn.plan", "tls.certificate", "tls.handshake",
                             "hbone.connect.sent", "hbone.response", "conn.upstream", "conn.closed"], by_node
    assert by_node["n2"] == ["conn.captured", "tls.certificate", "tls.handshake", "hbone.connect.received",
                             "rbac.decision", "conn.upstream", "hbone.response", "conn.closed"], by_node
    ev = {(e["node"], e["kind"]): e for e in flow_events(rig, flow)}
    assert ev[("n1", "conn.plan")]["fields"]["plan"] == "Hbone"
    assert ev[("n1", "tls.certificate")]["fields"]["identity"] == CLIENT.identity  # the SOURCE's cert
    assert ev[("n2", "tls.certificate")]["fields"]["identity"] == SERVER.identity  # the DESTINATION's cert
    hs = ev[("n1", "tls.handshake")]["fields"]
    assert (hs["src_identity"], hs["dst_identity"], hs["alpn"], hs["tls_version"]) == (
        CLIENT.identity, SERVER.identity, "h2", "TLSv1.3")
    sent = ev[("n1", "hbone.connect.sent")]["fields"]
    assert sent["authority"] == f"{SERVER.ip}:{APP_PORT}"
    assert sent["headers"]["traceparent"].split("-")[1] == flow
    assert sent["headers"]["forwarded"] == f'for="{CLIENT.ip}:{local_port}"'
    assert "k8s.namespace.name=default" in sent["headers"]["baggage"]
    assert ev[("n2", "hbone.connect.received")]["fields"]["headers"]["traceparent"] == sent["headers"]["traceparent"]
    assert ev[("n2", "rbac.decision")]["fields"]["allowed"] is True
    assert ev[("n2", "conn.upstream")]["fields"]["src"] == f"{CLIENT.ip}:{peer_port}"  # what the app saw
    assert ev[("n1", "hbone.response")]["fields"]["status"] == 200


def test_service_vip_is_load_balanced_to_the_pod_over_hbone(rig: MeshRig):
    before = len(rig.ztunnels["n2"].access_log())
    peer_ip, _, echoed, local_port = exchange(rig, addr=(SERVICE_VIP, SERVICE_PORT))
    assert peer_ip == CLIENT.ip and echoed == b"hello over HBONE"
    out = log_fields(rig.ztunnels["n1"].wait_log(lambda l: f"src.addr={CLIENT.ip}:{local_port} " in l, "log"))
    assert out["dst.service"] == SERVICE_FQDN and out["dst.hbone_addr"] == f"{SERVER.ip}:{APP_PORT}"
    inbound = log_fields(new_lines(rig.ztunnels["n2"], before, lambda l: 'direction="inbound"' in l, "inbound log"))
    assert inbound["dst.service"] == SERVICE_FQDN  # from the forwarded header's host=


def test_one_pooled_tunnel_carries_many_connections(rig: MeshRig):
    socks = [connect(rig.netns("client"), (SERVER.ip, APP_PORT)) for _ in range(5)]
    try:
        for s in socks:
            assert read_line(s).startswith(CLIENT.ip.encode())
        est = run("ip", "netns", "exec", rig.netns("client"), "ss", "-Htn", "state", "established",
                  "dst", f"{SERVER.ip}")
        remotes = [l.split()[-1] for l in est.splitlines() if l.strip()]
        # The apps' own sockets still name :8080 (their view; REDIRECT took them to 15001 locally);
        # what leaves the pod is ztunnel's single mTLS connection to :15008 carrying all five.
        assert remotes.count(f"{SERVER.ip}:{APP_PORT}") == 5, est
        assert [r for r in remotes if r != f"{SERVER.ip}:{APP_PORT}"] == [f"{SERVER.ip}:15008"], est
    finally:
        for s in socks:
            s.close()


def test_deny_policy_resets_the_client_then_removing_it_restores(rig: MeshRig):
    set_objects(rig, [DENY_CLIENT])
    wait_policies(rig, "n2", {"default/deny-client"})
    expect_reset(rig)
    curl = subprocess.run(["ip", "netns", "exec", rig.netns("client"), "curl", "-sS", "--max-time", "5",
                           f"http://{SERVER.ip}:{APP_PORT}/"], capture_output=True, text=True)
    assert curl.returncode == 56, (curl.returncode, curl.stderr)  # "Connection reset by peer", as in Istio
    assert "reset" in curl.stderr.lower()
    n2 = rig.ztunnels["n2"]
    line = n2.wait_log(lambda l: "explicitly denied by: default/deny-client" in l, "deny log")
    fields = log_fields(line)
    assert fields["error"] == "connection closed due to policy rejection: explicitly denied by: default/deny-client"
    assert fields["src.identity"] == CLIENT.identity and fields["direction"] == "inbound"
    rig.ztunnels["n1"].wait_log(lambda l: 'error="http status: 401 Unauthorized"' in l, "401 at the source")
    failed = parse_exposition(n2.admin_request({"op": "metrics"}))["istio_tcp_connections_failed_total"]
    assert any(l["response_flags"] == "DENY" and l["source_principal"] == CLIENT.identity for l, v in failed if v)
    # the source saw a refused CONNECT (401): a connection failure, CONNECT; only the destination says DENY
    src = parse_exposition(rig.ztunnels["n1"].admin_request({"op": "metrics"}))["istio_tcp_connections_failed_total"]
    assert any(l["reporter"] == "source" and l["response_flags"] == "CONNECT" for l, v in src if v), src
    assert not any(l["response_flags"] == "DENY" for l, v in src if v), src
    assert rig.events is not None
    denied = rig.events.wait("rbac.decision", lambda e: e["fields"]["allowed"] is False
                             and e["fields"]["policy"] == "default/deny-client")[0]
    assert denied["msg"].startswith("ztunnel on n2 checked AuthorizationPolicy default/deny-client") \
        and denied["msg"].endswith("denied")

    set_objects(rig, [])
    wait_policies(rig, "n2", set())
    assert exchange(rig)[0] == CLIENT.ip


def test_live_connection_is_closed_when_a_deny_policy_appears(rig: MeshRig):
    s = connect(rig.netns("client"), (SERVER.ip, APP_PORT))
    try:
        assert read_line(s).startswith(CLIENT.ip.encode())
        s.sendall(b"before")
        assert s.recv(100) == b"before"
        set_objects(rig, [DENY_CLIENT])
        wait_policies(rig, "n2", {"default/deny-client"})
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                s.sendall(b"after")
                if not s.recv(100):
                    raise ConnectionResetError("closed")
                time.sleep(0.05)
    finally:
        s.close()
        set_objects(rig, [])
        wait_policies(rig, "n2", set())
    line = rig.ztunnels["n2"].wait_log(lambda l: 'error="connection closed due to policy change"' in l, "recheck")
    assert log_fields(line)["src.identity"] == CLIENT.identity
    assert rig.events is not None
    rig.events.wait("rbac.decision", lambda e: e["fields"].get("recheck") is True)


def test_strict_peer_authentication_denies_plaintext_but_not_hbone(rig: MeshRig):
    # Before: the outsider (not in the mesh) reaches the server in plaintext via 15006.
    peer_ip, _, _, _ = exchange(rig, pod="outsider")
    assert peer_ip == OUTSIDER.ip
    line = rig.ztunnels["n2"].wait_log(lambda l: f"src.addr={OUTSIDER.ip}:" in l and "error" not in l, "plaintext")
    assert "identity" not in line and log_fields(line)["dst.addr"] == f"{SERVER.ip}:{APP_PORT}"

    set_objects(rig, [STRICT])
    wait_policies(rig, "n2", {"istio-system/istio_converted_static_strict"})
    wait_for(lambda: "istio-system/istio_converted_static_strict" in next(
        w for w in rig.ztunnels["n2"].admin_request({"op": "config_dump"})["workloads"] if w["name"] == "server"
    )["authorization_policies"], 10, "STRICT attached to the server workload")
    try:
        expect_reset(rig, pod="outsider")
        line = rig.ztunnels["n2"].wait_log(lambda l: f"src.addr={OUTSIDER.ip}:" in l and "policy rejection" in l,
                                           "STRICT deny")
        assert "explicitly denied by: istio-system/istio_converted_static_strict" in line
        assert exchange(rig)[0] == CLIENT.ip  # mTLS traffic carries an identity: still allowed
    finally:
        set_objects(rig, [])
        wait_policies(rig, "n2", set())


def test_mesh_pod_to_a_pod_outside_the_mesh_is_plain_tcp(rig: MeshRig):
    app = rig.start_app("outsider", ECHO_APP, str(APP_PORT))
    try:
        peer_ip, _, echoed, local_port = exchange(rig, addr=(OUTSIDER.ip, APP_PORT))
        assert peer_ip == CLIENT.ip and echoed == b"hello over HBONE"
        out = log_fields(rig.ztunnels["n1"].wait_log(lambda l: f"src.addr={CLIENT.ip}:{local_port} " in l, "log"))
        assert out["dst.addr"] == f"{OUTSIDER.ip}:{APP_PORT}" and "src.identity" not in out
        assert out["dst.workload"] == "outsider"
    finally:
        app.kill()
        app.wait()
        rig.apps.remove(app)


def test_config_dump_and_metrics(rig: MeshRig):
    exchange(rig)
    n1, n2 = rig.ztunnels["n1"], rig.ztunnels["n2"]
    dump = n1.admin_request({"op": "config_dump"})
    workloads = {w["name"]: w for w in dump["workloads"]}
    assert workloads["client"]["protocol"] == "HBONE" and workloads["outsider"]["protocol"] == "TCP"
    assert workloads["server"]["addresses"] == [SERVER.ip] and workloads["server"]["node"] == "n2"
    svc = next(s for s in dump["services"] if s["name"] == "server")
    assert svc["vips"] == [SERVICE_VIP] and (svc["healthy"], svc["total"]) == (1, 1)
    certs = dump["certificates"]
    # Only the identity of n1's own HBONE workload: ztunnel never holds another node's certificates.
    assert {c["identity"] for c in certs} == {CLIENT.identity}
    assert [(c["type"], c["status"], c["valid"]) for c in certs] == [("Leaf", "Available", True),
                                                                     ("Root", "Available", True)]
    assert re.fullmatch(r"[0-9a-f]+", certs[0]["serial"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", certs[0]["not_after"])
    assert {c["identity"] for c in n2.admin_request({"op": "config_dump"})["certificates"]} == {SERVER.identity}

    metrics = parse_exposition(n1.admin_request({"op": "metrics"}))
    opened = [l for l, v in metrics["istio_tcp_connections_opened_total"]
              if l["connection_security_policy"] == "mutual_tls" and l["reporter"] == "source"]
    assert opened and opened[0]["source_principal"] == CLIENT.identity
    assert opened[0]["destination_principal"] == SERVER.identity and opened[0]["destination_workload"] == "server"
    inbound = parse_exposition(n2.admin_request({"op": "metrics"}))
    received = sum(v for l, v in inbound["istio_tcp_received_bytes_total"]
                   if l["reporter"] == "destination" and l["source_principal"] == CLIENT.identity)
    assert received > 0
    conns_while_open = []
    with connect(rig.netns("client"), (SERVER.ip, APP_PORT)) as s:
        read_line(s)
        conns_while_open = n1.admin_request({"op": "connections"})
    out = [c for c in conns_while_open if c["direction"] == "outbound"]
    assert out and out[0]["protocol"] == "HBONE" and out[0]["remote"] == f"{SERVER.ip}:15008"
    assert out[0]["target"] == f"{SERVER.ip}:{APP_PORT}" and out[0]["workload"] == "client.default"


def test_certificates_rotate_and_connections_survive(rig: MeshRig):
    """n2 runs with --cert-ttl 4: istiod backdates NotBefore by 2 minutes (ClockSkewGracePeriod,
    not a flag of the lab's istiod), so the half-life is already past and ztunnel re-fetches about
    every second. Each new serial builds a new server context; open connections keep working."""
    n2 = rig.ztunnels["n2"]

    def serial() -> str:
        return next(c["serial"] for c in n2.admin_request({"op": "config_dump"})["certificates"] if c["type"] == "Leaf")

    with connect(rig.netns("client"), (SERVER.ip, APP_PORT)) as s:
        read_line(s)
        first = serial()
        wait_for(lambda: serial() != first, 8, "a rotated certificate")
        s.sendall(b"still here")
        assert s.recv(100) == b"still here"  # the open connection survived the rotation
    assert exchange(rig)[0] == CLIENT.ip
    assert rig.events is not None
    rotated = rig.events.wait("ztunnel.cert.rotated", lambda e: e["node"] == "n2")
    assert rotated[0]["fields"]["identity"] == SERVER.identity
    files = sorted(p.name for p in (n2.dir / "ztunnel-certs").iterdir())
    assert files and all(f.startswith("cluster.local_ns_default_sa_server") for f in files)
    assert oct((n2.dir / "ztunnel-certs").stat().st_mode & 0o777) == "0o700"


def test_pod_leaving_the_mesh_drains_its_tunnels_and_connections(rig: MeshRig):
    n1, n2 = rig.ztunnels["n1"], rig.ztunnels["n2"]
    s = connect(rig.netns("client"), (SERVER.ip, APP_PORT))
    try:
        assert read_line(s).startswith(CLIENT.ip.encode())
        assert [a.ok for a in rig.agents["n2"].delete(SERVER.uid)] == [True]
        with pytest.raises(ConnectionResetError):  # n2 cut the tunnel, so n1 reset the app's connection
            data = s.recv(100)
            raise AssertionError(f"expected a reset, got {data!r}")
    finally:
        s.close()
    n2.wait_log(lambda l: 'direction="inbound"' in l and "connection drain" in l, "inbound drained")
    n1.wait_log(lambda l: 'direction="outbound"' in l and "HBONE" in l and "reset" in l, "outbound cut")
    # The server pod's rules still capture, nobody serves its 15008: fail closed.
    expect_reset(rig)
    n1.wait_log(lambda l: 'error="io error: Connection refused (os error 111)"' in l, "refused tunnel")
    rig.enrol("server")
    wait_for(lambda: exchange(rig)[0] == CLIENT.ip, 5, "traffic after re-enrolling")


def test_sigterm_exits_cleanly_and_removes_the_certificates(rig: MeshRig):
    n1 = rig.ztunnels["n1"]
    assert n1.proc is not None
    n1.proc.send_signal(signal.SIGTERM)
    assert n1.proc.wait(5) == 0, n1.stderr()
    assert not os.path.exists(n1.admin) and not list((n1.dir / "ztunnel-certs").iterdir())
