"""Lab tests (root, real namespaces) of ztunnel's in-pod capture: the lab's ztunnel process, run
in a "node" netns, gets two pod netns over ZDS from the real agent side (ZtunnelServer), opens
15001/15006/15008 inside them, and carries real traffic captured by Istio's in-pod rules.

Topology: altest-zt-a (10.9.0.2) <-veth-> altest-zt-b (10.9.0.3), /24, no node in between;
altest-zt-node holds only the ztunnel process. Nothing is added to the host's netns.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from lab.cni.iptables import install_inpod_rules
from lab.cni.ztunnel_server import ZtunnelServer
from lab.common.events import events_socket
from lab.common.netns import entered
from lab.proto.zds import WorkloadInfo
from tests.conftest import require_root
from tests.eventsink import EventSink

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "altest-zt-"
NA, NB, NODE, NC, NC2 = (PREFIX + s for s in ("a", "b", "node", "c", "c2"))
IP_A, IP_B = "10.9.0.2", "10.9.0.3"
APP_PORT = 8080
LAB = f"altest-zt-{os.getpid() % 100000}"
UID_A, UID_B, UID_C = "uid-pod-a", "uid-pod-b", "uid-pod-c"
INFO_A = WorkloadInfo("pod-a", "default", "sa-a")
INFO_B = WorkloadInfo("pod-b", "default", "sa-b")
INFO_C = WorkloadInfo("pod-c", "default", "default")
ZT_PORTS = {15001, 15006, 15008}

# A tiny app for pod b: says which peer address it saw, then echoes until EOF.
ECHO_APP = r"""
import socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1])))
srv.listen(256)
print("ready", flush=True)
def serve(c, peer):
    with c:
        c.sendall(f"{peer[0]} {peer[1]}\n".encode())
        while data := c.recv(65536):
            c.sendall(data)
while True:
    c, peer = srv.accept()
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"""


def run(*cmd: str, check: bool = True) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=check).stdout


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# ------------------------------------------------------------------------------------ helpers
class Agent:
    """The istio-cni node agent's ZDS server, on its own event loop thread."""

    def __init__(self, path: str, known: tuple[tuple[str, WorkloadInfo, str], ...] = ()) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ZtunnelServer(path)
        for uid, info, netns in known:  # pods the agent already knows when it starts
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            self.server.upsert_pod(uid, info, fd)
            os.close(fd)
        self.call(self.server.start())

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add(self, uid: str, info: WorkloadInfo, netns: str):
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return self.call(self.server.add_pod(uid, info, fd))
        finally:
            os.close(fd)

    def delete(self, uid: str):
        return self.call(self.server.del_pod(uid))

    def wait_ready(self, timeout: float = 10.0) -> None:
        self.call(self.server.wait_for_ztunnel(timeout), timeout + 1)

    def close(self) -> None:
        try:
            self.call(self.server.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


class Events:
    """The supervisor's side of the event stream, for one test lab: every event ztunnel sent."""

    def __init__(self, lab: str) -> None:
        self.dir = Path("/run/ambient-lab") / lab
        self.dir.mkdir(parents=True, exist_ok=False)
        self.sink = EventSink(events_socket(lab))
        self.seen: list[dict] = []

    @property
    def events(self) -> list[dict]:
        self.seen += self.sink.drain()
        return self.seen

    def of_kind(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["kind"] == kind]

    def wait(self, kind: str, match: Callable[[dict], bool] = lambda e: True, count: int = 1,
             timeout: float = 5.0) -> list[dict]:
        """The events of `kind` that `match`, once at least `count` arrived (they travel async)."""
        return wait_for(lambda: (found := [e for e in self.of_kind(kind) if match(e)]) and len(found) >= count
                        and found, timeout, f"{count} {kind} event(s)")

    def close(self) -> None:
        self.sink.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Ztunnel:
    """The ztunnel process under test, in the node netns."""

    workdir: Path
    proc: subprocess.Popen | None = None
    outputs: list[Path] = field(default_factory=list)

    @property
    def zds(self) -> str:
        return str(self.workdir / "ztunnel.sock")

    @property
    def admin(self) -> str:
        return str(self.workdir / "admin.sock")

    def start(self) -> None:
        n = len(self.outputs)
        out = self.workdir / f"ztunnel-{n}.out"
        self.outputs.append(out)
        with open(out, "wb") as stdout, open(self.workdir / f"ztunnel-{n}.err", "wb") as stderr:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", NODE, sys.executable, "-m", "lab.ztunnel", "--lab", LAB,
                 "--node", NODE, "--zds-socket", self.zds, "--admin-socket", self.admin],
                cwd=ROOT, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
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
        return [l for out in self.outputs if out.exists() for l in out.read_text().splitlines() if "\taccess\t" in l]

    def stderr(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.workdir.glob("ztunnel-*.err")))

    def admin_request(self, request: dict) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(3)
            s.connect(self.admin)
            s.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                assert chunk, "admin closed the connection"
                data += chunk
        return json.loads(data)


def listeners(netns: str) -> dict[int, set[int]]:
    """`ss -tlnp` in a netns: TCP listening port -> pids owning a socket on it."""
    out = run("ip", "netns", "exec", netns, "ss", "-tlnpH")
    found: dict[int, set[int]] = {}
    for line in out.splitlines():
        cols = line.split()
        port = int(cols[3].rsplit(":", 1)[1])
        found.setdefault(port, set()).update(int(p) for p in re.findall(r"pid=(\d+)", line))
    return found


def ztunnel_ports(netns: str, pid: int) -> set[int]:
    return {port for port, pids in listeners(netns).items() if pid in pids and port in ZT_PORTS}


def redirect_packets(netns: str, to_port: int) -> int:
    """Packet counter of the nat REDIRECT rule to `to_port`, from iptables-legacy-save -c."""
    out = run("ip", "netns", "exec", netns, "iptables-legacy-save", "-c", "-t", "nat")
    for line in out.splitlines():
        if f"--to-ports {to_port}" in line and line.startswith("["):
            return int(line[1:].split(":")[0])
    raise AssertionError(f"no REDIRECT to {to_port} in {netns}:\n{out}")


def connect(netns: str, addr: tuple[str, int], *, mark: int | None = None, timeout: float = 3.0) -> socket.socket:
    """A TCP connection made from inside `netns` (like an app in that pod)."""
    with entered(netns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(timeout)
        if mark is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        try:
            s.connect(addr)
        except BaseException:
            s.close()
            raise
    return s


def read_line(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def echo_exchange(netns: str = NA, payload: bytes = b"hello through ztunnel") -> tuple[str, int, bytes, int]:
    """Connect to the app in pod b, read the peer it saw, send `payload`, half-close, read the echo.

    Returns (peer ip seen by the app, peer port, echoed bytes, our local port)."""
    with connect(netns, (IP_B, APP_PORT)) as s:
        local_port = s.getsockname()[1]
        line = read_line(s)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)  # half-close: the reply must still arrive
        echoed = read_all(s)
    ip, port = line.decode().split()
    return ip, int(port), echoed, local_port


def log_fields(line: str) -> dict[str, str]:
    return {k: v.strip('"') for k, v in re.findall(r'(\S+)=("[^"]*"|\S+)', line)}


def wait_log(zt: Ztunnel, predicate: Callable[[str], bool], what: str, timeout: float = 5.0) -> str:
    try:
        return wait_for(lambda: next((l for l in zt.access_log() if predicate(l)), None), timeout, what)
    except AssertionError as e:
        raise AssertionError(f"{e}; access log so far:\n" + "\n".join(zt.access_log())) from None


# ------------------------------------------------------------------------------------ fixture
def _remove_namespaces() -> None:
    for ns in (NA, NB, NODE, NC, NC2):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _make_pair() -> None:
    for ns in (NA, NB, NODE, NC, NC2):
        run("ip", "netns", "add", ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
    run("ip", "-n", NA, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", NB)
    for ns, ip in ((NA, IP_A), (NB, IP_B)):
        run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")


def measure(netns: str, n: int) -> dict[str, float]:
    """Median/p95 of connect() time and of time-to-first-byte (the app's greeting), in ms."""
    connects, firsts = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        with connect(netns, (IP_B, APP_PORT)) as s:
            t1 = time.perf_counter()
            assert read_line(s)
            t2 = time.perf_counter()
        connects.append((t1 - t0) * 1000)
        firsts.append((t2 - t0) * 1000)
    q = lambda xs: (statistics.median(xs), statistics.quantiles(xs, n=20)[18])  # noqa: E731
    (cm, c95), (fm, f95) = q(connects), q(firsts)
    return {"connect_median": cm, "connect_p95": c95, "first_byte_median": fm, "first_byte_p95": f95}


@dataclass
class Env:
    zt: Ztunnel | None = None
    agent: Agent | None = None
    events: Events | None = None
    echo: subprocess.Popen | None = None
    direct: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    require_root()
    _remove_namespaces()
    workdir = Path(f"/tmp/zt-{os.getpid()}")
    e = Env()
    try:
        _make_pair()
        workdir.mkdir(exist_ok=True)
        e.echo = subprocess.Popen(["ip", "netns", "exec", NB, sys.executable, "-c", ECHO_APP, str(APP_PORT)],
                                  stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        assert e.echo.stdout is not None and e.echo.stdout.readline().strip() == "ready"
        e.direct = measure(NA, 200)  # before any capture: the baseline
        install_inpod_rules(NA)
        install_inpod_rules(NB)
        e.events = Events(LAB)
        e.agent = Agent(str(workdir / "ztunnel.sock"))
        e.zt = Ztunnel(workdir)
        e.zt.start()
        e.agent.wait_ready()
        assert e.agent.add(UID_A, INFO_A, NA).ok
        assert e.agent.add(UID_B, INFO_B, NB).ok
        yield e
    finally:
        if e.zt is not None:
            e.zt.stop(signal.SIGKILL)
        if e.agent is not None:
            e.agent.close()
        if e.events is not None:
            e.events.close()
        if e.echo is not None:
            e.echo.kill()
            e.echo.wait()
        _remove_namespaces()
        shutil.rmtree(workdir, ignore_errors=True)
        assert not [n for n in run("ip", "netns", "list").split() if n.startswith(PREFIX)]
        assert not workdir.exists() and not Path("/run/ambient-lab", LAB).exists()


# ------------------------------------------------------------------------------------ tests
def test_listeners_in_each_pod_are_owned_by_the_ztunnel_process(env: Env):
    for ns in (NA, NB):
        assert ztunnel_ports(ns, env.zt.pid) == ZT_PORTS, listeners(ns)
    assert ZT_PORTS.isdisjoint(listeners(NODE))  # nothing in ztunnel's own netns
    created = env.events.wait("ztunnel.listener.created", count=6)
    assert {(e["pod"], e["fields"]["port"], e["fields"]["what"]) for e in created} >= {
        (p, port, what) for p in ("pod-a", "pod-b")
        for port, what in ((15001, "outbound"), (15006, "inbound plaintext"), (15008, "inbound HBONE"))}
    added = {e["pod"]: e["fields"] for e in env.events.wait("ztunnel.workload.added", count=2)}
    assert added["pod-a"]["netns_inode"] == os.stat(f"/run/netns/{NA}").st_ino
    assert added["pod-a"]["uid"] == UID_A and added["pod-b"]["service_account"] == "sa-b"


def test_captured_both_ways_with_the_client_ip_preserved(env: Env):
    out_before, in_before = redirect_packets(NA, 15001), redirect_packets(NB, 15006)
    payload = b"hello through ztunnel"
    peer_ip, peer_port, echoed, local_port = echo_exchange(payload=payload)
    assert echoed == payload  # reply arrived after our half-close
    assert peer_ip == IP_A  # the app in b saw pod a's IP, not ztunnel's or 127.0.0.1
    assert redirect_packets(NA, 15001) > out_before  # a's OUTPUT REDIRECT to 15001 took it
    assert redirect_packets(NB, 15006) > in_before  # b's PREROUTING REDIRECT to 15006 took it

    greeting = len(f"{peer_ip} {peer_port}\n")
    out = log_fields(wait_log(env.zt, lambda l: f"src.addr={IP_A}:{local_port} " in l
                              and 'direction="outbound"' in l, "outbound access log"))
    assert out["dst.addr"] == f"{IP_B}:{APP_PORT}" and out["src.workload"] == "pod-a"
    assert (int(out["bytes_sent"]), int(out["bytes_recv"])) == (len(payload), greeting + len(payload))
    assert re.fullmatch(r"\d+ms", out["duration"])

    # One flow id per connection ties its steps together; both legs tell their story.
    def story(src: str, direction: str) -> dict[str, dict]:
        captured = next((e for e in env.events.of_kind("conn.captured")
                         if e["fields"]["src"] == src and e["fields"]["direction"] == direction), None)
        if captured is None:
            return {}
        assert re.fullmatch(r"[0-9a-f]{32}", captured["flow"])
        return {e["kind"]: e for e in env.events.events if e["flow"] == captured["flow"]}

    steps = wait_for(lambda: (s := story(f"{IP_A}:{local_port}", "outbound")) and "conn.closed" in s and s,
                     what="outbound events")
    assert list(steps) == ["conn.captured", "conn.original_dst", "conn.plan", "conn.upstream", "conn.closed"]
    assert steps["conn.plan"]["fields"]["plan"] == "Passthrough"  # no istiod: no workload is known
    assert steps["conn.captured"]["msg"].startswith("ztunnel on altest-zt-node accepted a connection "
                                                    "redirected from pod pod-a to its port 15001")
    assert steps["conn.original_dst"]["fields"]["dst"] == f"{IP_B}:{APP_PORT}"
    assert steps["conn.upstream"]["fields"]["mark"] == 1337
    assert steps["conn.upstream"]["fields"]["upstream"] == f"{IP_B}:{APP_PORT}"
    assert steps["conn.closed"]["fields"]["bytes_sent"] == len(payload)
    a_leg = steps["conn.upstream"]["fields"]["src"]  # ztunnel's socket in pod a, towards b
    assert a_leg.startswith(f"{IP_A}:")

    # Pod b's ztunnel saw that socket as its client and connected to the app from its IP.
    inb = wait_for(lambda: (s := story(a_leg, "inbound")) and "conn.closed" in s and s, what="inbound events")
    assert list(inb) == ["conn.captured", "conn.original_dst", "conn.upstream", "conn.closed"]
    assert inb["conn.captured"]["pod"] == "pod-b"
    assert inb["conn.upstream"]["fields"]["src"] == f"{IP_A}:{peer_port}"  # what the app saw
    assert inb["conn.upstream"]["flow"] != steps["conn.upstream"]["flow"]  # no HBONE yet to carry it
    inbound = log_fields(wait_log(env.zt, lambda l: f"src.addr={a_leg} " in l
                                  and 'direction="inbound"' in l, "inbound access log"))
    assert inbound["dst.addr"] == f"{IP_B}:{APP_PORT}" and inbound["dst.workload"] == "pod-b"
    assert (int(inbound["bytes_recv"]), int(inbound["bytes_sent"])) == (len(payload), greeting + len(payload))
    assert all("connection complete" in l for l in env.zt.access_log() if "error=" not in l)


def expect_reset(netns: str, addr: tuple[str, int], *, mark: int | None = None) -> None:
    """ztunnel refuses with a RST (SO_LINGER 0), as Istio does; it may even beat connect()'s return."""
    with pytest.raises(ConnectionResetError):
        with connect(netns, addr, mark=mark) as s:
            assert s.recv(100) == b"", "expected a reset, got data"
            raise AssertionError("expected a reset, got a clean close")


def test_connections_to_ztunnel_ports_are_refused_as_recursive(env: Env):
    # From pod a to its own loopback: its 15001 listener sees a loopback destination on one of
    # ztunnel's ports and refuses (zt proxy_to checks is_loopback; another pod's port is not refused here).
    expect_reset(NA, ("127.0.0.1", 15001))
    line = wait_log(env.zt, lambda l: "connection failed" in l and "dst.addr=127.0.0.1:15001" in l
                    and 'direction="outbound"' in l, "outbound self-call log")
    assert 'error="attempted recursive call to ourselves"' in line and "\twarn\t" in line
    # Bypassing a's capture (mark 1337): b's PREROUTING sends it to 15006, which refuses too.
    expect_reset(NA, (IP_B, 15001), mark=1337)
    line = wait_log(env.zt, lambda l: "connection failed" in l and f"dst.addr={IP_B}:15001" in l
                    and 'direction="inbound"' in l, "inbound self-call log")
    assert 'error="attempted recursive call to ourselves"' in line
    out = env.events.wait("conn.failed", lambda e: e["fields"]["dst"] == "127.0.0.1:15001")
    into = env.events.wait("conn.failed", lambda e: e["fields"]["dst"] == f"{IP_B}:15001")
    assert out[0]["fields"]["direction"] == "outbound" and into[0]["fields"]["direction"] == "inbound"


def test_hbone_port_without_istiod_accepts_and_closes(env: Env):
    expect_reset(NA, (IP_B, 15008), mark=1337)  # 15008 is not redirected in b
    line = wait_log(env.zt, lambda l: f"dst.addr={IP_B}:15008" in l and "HBONE" in l, "15008 log")
    assert 'direction="inbound"' in line and "without istiod" in line


def test_admin_reports_workloads_and_open_connections(env: Env):
    workloads = env.zt.admin_request({"op": "workloads"})["workloads"]
    assert [(w["name"], w["uid"], w["netns_inode"]) for w in workloads] == [
        ("pod-a", UID_A, os.stat(f"/run/netns/{NA}").st_ino), ("pod-b", UID_B, os.stat(f"/run/netns/{NB}").st_ino)]
    assert all({l["port"] for l in w["listeners"]} == ZT_PORTS for w in workloads)
    assert env.zt.admin_request({"op": "ready"}) == {"ready": True}
    assert "error" in env.zt.admin_request({"op": "nope"})
    with connect(NA, (IP_B, APP_PORT)) as s:
        local = f"{IP_A}:{s.getsockname()[1]}"
        read_line(s)
        conns = env.zt.admin_request({"op": "connections"})["connections"]
    by_dir = {c["direction"]: c for c in conns}
    assert set(by_dir) == {"outbound", "inbound"}, conns
    assert by_dir["outbound"]["workload"] == "pod-a.default"
    assert by_dir["outbound"]["remote"] == by_dir["outbound"]["target"] == f"{IP_B}:{APP_PORT}"
    assert by_dir["outbound"]["local"].startswith(f"{IP_A}:") and by_dir["outbound"]["local"] != local
    assert by_dir["inbound"]["workload"] == "pod-b.default"
    assert by_dir["inbound"]["remote"] == by_dir["outbound"]["local"]  # what b saw = what a's ztunnel used
    assert by_dir["inbound"]["target"] == f"{IP_B}:{APP_PORT}"
    wait_for(lambda: env.zt.admin_request({"op": "connections"})["connections"] == [], what="connections closed")


def test_latency_through_the_capture_path(env: Env):
    captured = measure(NA, 200)
    print(f"\nconnect latency a->b, ms (median / p95): direct connect {env.direct['connect_median']:.3f} / "
          f"{env.direct['connect_p95']:.3f}, first byte {env.direct['first_byte_median']:.3f} / "
          f"{env.direct['first_byte_p95']:.3f}; captured (15001 -> 15006) connect "
          f"{captured['connect_median']:.3f} / {captured['connect_p95']:.3f}, first byte "
          f"{captured['first_byte_median']:.3f} / {captured['first_byte_p95']:.3f}")
    assert captured["first_byte_median"] < 50, captured


def test_add_again_same_netns_keeps_new_netns_replaces_failure_nacks(env: Env):
    pid = env.zt.pid
    assert env.agent.add(UID_C, INFO_C, NC).ok
    assert ztunnel_ports(NC, pid) == ZT_PORTS
    started = {w["uid"]: w["started"] for w in env.zt.admin_request({"op": "workloads"})["workloads"]}
    assert env.agent.add(UID_C, INFO_C, NC).ok  # same (dev, inode): kept
    again = {w["uid"]: w for w in env.zt.admin_request({"op": "workloads"})["workloads"]}
    assert again[UID_C]["started"] == started[UID_C]
    assert [e["pod"] for e in env.events.wait("ztunnel.workload.kept")] == ["pod-c"]

    assert env.agent.add(UID_C, INFO_C, NC2).ok  # new netns for the same pod: replaced
    assert ztunnel_ports(NC, pid) == set() and ztunnel_ports(NC2, pid) == ZT_PORTS
    w = {w["uid"]: w for w in env.zt.admin_request({"op": "workloads"})["workloads"]}[UID_C]
    assert w["netns_inode"] == os.stat(f"/run/netns/{NC2}").st_ino
    assert env.agent.delete(UID_C)[0].ok
    assert ztunnel_ports(NC2, pid) == set()

    # A port taken in the pod (no SO_REUSEPORT): listener creation fails -> NACK, nothing left open.
    with entered(NC):
        squatter = socket.socket()
        squatter.bind(("0.0.0.0", 15006))
        squatter.listen()
    try:
        resp = env.agent.add(UID_C, INFO_C, NC)
        assert not resp.ok and "Address already in use" in resp.ack_error and "pod-c" in resp.ack_error
        assert ztunnel_ports(NC, pid) == set()
        assert UID_C not in {w["uid"] for w in env.zt.admin_request({"op": "workloads"})["workloads"]}
    finally:
        squatter.close()
    env.agent.delete(UID_C)


def test_del_workload_closes_listeners_and_drains_connections(env: Env):
    s = connect(NA, (IP_B, APP_PORT))
    try:
        assert read_line(s).startswith(IP_A.encode())
        acks = env.agent.delete(UID_A)
        assert [a.ok for a in acks] == [True]
        assert ztunnel_ports(NA, env.zt.pid) == set()
        try:
            assert s.recv(100) == b""  # the open connection was closed by the drain
        except ConnectionResetError:
            pass
    finally:
        s.close()
    wait_log(env.zt, lambda l: 'error="connection closed due to connection drain"' in l
             and 'direction="outbound"' in l, "drain log")
    removed = env.events.wait("ztunnel.workload.removed", lambda e: e["pod"] == "pod-a")
    assert removed and removed[-1]["fields"]["connections_closed"] == 1
    with pytest.raises(ConnectionRefusedError):  # rules still redirect, nobody listens: fail closed
        connect(NA, (IP_B, APP_PORT))
    assert env.agent.add(UID_A, INFO_A, NA).ok  # back in the mesh
    assert echo_exchange()[0] == IP_A


def test_snapshot_drains_pods_the_agent_no_longer_knows(env: Env):
    """The agent restarts knowing only pod a: ztunnel reconnects and drains pod b."""
    env.agent.close()
    env.agent = Agent(env.zt.zds, known=((UID_A, INFO_A, NA),))
    env.agent.wait_ready()
    wait_for(lambda: ztunnel_ports(NB, env.zt.pid) == set(), what="pod b drained")
    assert ztunnel_ports(NA, env.zt.pid) == ZT_PORTS  # same netns: kept, not restarted
    reasons = [e["fields"]["reason"] for e in env.events.wait("ztunnel.workload.removed",
                                                              lambda e: e["pod"] == "pod-b")]
    assert reasons == ["the pod was not in the node agent's snapshot"]
    assert env.agent.add(UID_B, INFO_B, NB).ok
    assert echo_exchange()[0] == IP_A


def test_killed_ztunnel_fails_closed_and_restart_restores_from_snapshot(env: Env):
    old = env.zt.pid
    env.zt.stop(signal.SIGKILL)
    wait_for(lambda: env.agent.server.connections == 0, what="agent notices ztunnel is gone")
    assert ztunnel_ports(NA, old) == set() and ztunnel_ports(NB, old) == set()
    with pytest.raises((ConnectionRefusedError, ConnectionResetError)):
        connect(NA, (IP_B, APP_PORT))  # captured, but nothing listens on 15001: no bypass
    env.zt.start()
    env.agent.wait_ready()
    assert env.zt.pid != old
    assert ztunnel_ports(NA, env.zt.pid) == ZT_PORTS and ztunnel_ports(NB, env.zt.pid) == ZT_PORTS
    assert echo_exchange()[0] == IP_A


def test_sigterm_closes_listeners_and_exits_promptly(env: Env):
    assert env.zt.proc is not None
    with connect(NA, (IP_B, APP_PORT)) as s:
        read_line(s)
        t0 = time.monotonic()
        env.zt.proc.send_signal(signal.SIGTERM)
        code = env.zt.proc.wait(5)
        elapsed = time.monotonic() - t0
    print(f"\nztunnel exit after SIGTERM: {elapsed * 1000:.0f} ms")
    assert code == 0, env.zt.stderr()
    assert elapsed < 0.3
    assert ztunnel_ports(NA, env.zt.proc.pid) == set() and not os.path.exists(env.zt.admin)
    last_run = env.zt.outputs[-1].read_text()  # this process's access log only
    assert 'error="connection closed due to connection drain"' in last_run
    assert "received a termination signal" in env.zt.stderr()
