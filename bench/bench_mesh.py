"""The lab's ambient data plane under load: pods on two nodes, two ztunnel processes, the real istiod.

One run measures, on the same machine (no supervisor):

- bulk throughput pod-to-pod: direct TCP (no mesh), through a plain asyncio relay process (the
  copy loop ztunnel uses for plain TCP, over asyncio's own start_server/open_connection streams,
  in the router netns: the cost of one user-space proxy hop), and through the mesh (client pod
  -> 15001 -> ztunnel n1 -> HBONE mTLS + HTTP/2 -> ztunnel n2 -> server pod), with the ratios.
  For comparison only, the same relay process also listens with the app side read the way
  ztunnel reads it (lab.hbone.wire, without the StreamReader's copies). Two twin pairs of pods
  share the router: "client"/"server" are enrolled, the "plain-" pair never is. The paths are
  measured in alternating rounds, so a change in the machine's load hits all of them alike;
  each round gives a mesh/relay ratio, and the goal is judged on the median of those ratios;
- new mesh connections per second: 200 sequential, then 500 concurrent (connect, first byte,
  close), with and without the mesh, in alternating rounds too (the median is reported);
- HTTP-ish request latency (a 100-byte request, a 300-byte response) on one kept-alive
  connection, p50/p99, with and without the mesh;
- the ztunnels' CPU seconds and RSS per 1000 requests (from /proc/<pid>/stat and status).

Goals reported against: mesh throughput >= 40% of the plain relay, >= 1000 new mesh
connections/s, ztunnel <= 0.2 vCPU per 1000 req/s (i.e. <= 0.2 CPU-seconds per 1000 requests).

Needs root (namespaces). Usage:

    sudo .venv/bin/python bench/bench_mesh.py [--mib 1024] [--repeat 5] [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lab.common.netns import entered
from tests.lab.test_ztunnel_hbone_lab import MeshRig, PodSpec, wait_for

PREFIX = "altest-zb-"
LAB = f"altest-zb-{os.getpid() % 100000}"
CLIENT = PodSpec("client", "10.9.1.2", "n1", "client", labels={"app": "client"})
SERVER = PodSpec("server", "10.9.2.2", "n2", "server", labels={"app": "server"})
PLAIN_CLIENT = PodSpec("plain-client", "10.9.3.2", "n1", "client", enrolled=False, labels={"app": "plain-client"})
PLAIN_SERVER = PodSpec("plain-server", "10.9.4.2", "n2", "server", enrolled=False, labels={"app": "plain-server"})
SINK, ECHO, GREET, RELAY, RELAY_PASS_THROUGH = 9000, 9001, 9002, 9100, 9101
RELAY_IP = "10.9.3.1"  # the router's address on the plain client's link
REQUEST, RESPONSE = 100, 300
MiB = 1024 * 1024

SERVER_APP = r"""
import socket, struct, sys, threading
REQ, RESP = int(sys.argv[1]), int(sys.argv[2])
def sink(c):
    total, buf = 0, bytearray(1 << 20)
    while n := c.recv_into(buf):
        total += n
    c.sendall(struct.pack("!Q", total))
def echo(c):
    resp = b"H" * RESP
    while True:
        got = 0
        while got < REQ:
            data = c.recv(REQ - got)
            if not data:
                return
            got += len(data)
        c.sendall(resp)
def greet(c):
    c.sendall(b"hi\n")
    while c.recv(4096):
        pass
def listen(port, fn):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(1024)
    def run(c):
        with c:
            try:
                fn(c)
            except OSError:
                pass
    while True:
        c, _ = s.accept()
        threading.Thread(target=run, args=(c,), daemon=True).start()
for port, fn in ((9000, sink), (9001, echo), (9002, greet)):
    threading.Thread(target=listen, args=(port, fn), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

RELAY_APP = r"""
import asyncio, socket, sys
from lab.hbone import wire
from lab.ztunnel.proxy.relay import Transferred, copy_bidirectional
async def main(port, pass_through_port, target, target_port):
    async def serve(r, w):
        ur, uw = await asyncio.open_connection(target, target_port, limit=256 * 1024)
        await copy_bidirectional((r, w), (ur, uw), Transferred())
    plain = await asyncio.start_server(serve, "0.0.0.0", port, limit=256 * 1024)  # asyncio's streams
    sock = socket.create_server(("0.0.0.0", pass_through_port))
    pass_through = await wire.start_server(serve, sock=sock)  # the app side as ztunnel reads it
    print("ready", flush=True)
    await asyncio.gather(plain.serve_forever(), pass_through.serve_forever())
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
"""


# ------------------------------------------------------------------ client side (pod "client")
def pod_socket(netns: str) -> socket.socket:
    with entered(netns):
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


def throughput(netns: str, addr: tuple[str, int], mib: int) -> float:
    """Push `mib` MiB one way; MiB/s until the server confirmed every byte."""
    chunk = memoryview(b"\0" * MiB)
    s = pod_socket(netns)
    with s:
        s.connect(addr)
        t0 = time.perf_counter()
        for _ in range(mib):
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < 8:
            data = s.recv(8 - len(got))
            assert data, "server closed early"
            got += data
        elapsed = time.perf_counter() - t0
    assert struct.unpack("!Q", got)[0] == mib * MiB
    return mib / elapsed


def sequential_connections(netns: str, addr: tuple[str, int], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        s = pod_socket(netns)
        with s:
            s.connect(addr)
            assert s.recv(3) == b"hi\n"
    return n / (time.perf_counter() - t0)


def concurrent_connections(netns: str, addr: tuple[str, int], n: int) -> float:
    socks = [pod_socket(netns) for _ in range(n)]

    async def one(s: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        s.setblocking(False)
        await loop.sock_connect(s, addr)
        data = b""
        while len(data) < 3:
            chunk = await loop.sock_recv(s, 3 - len(data))
            assert chunk, "closed before the greeting"
            data += chunk
        s.close()

    async def all_of_them() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(s) for s in socks))
        return n / (time.perf_counter() - t0)

    return asyncio.run(all_of_them())


def latency(netns: str, addr: tuple[str, int], n: int) -> list[float]:
    """Round trips of a 100-byte request and a 300-byte response on one connection, in ms."""
    req = b"G" * REQUEST
    out = []
    s = pod_socket(netns)
    with s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.connect(addr)
        for _ in range(n):
            t0 = time.perf_counter()
            s.sendall(req)
            got = 0
            while got < RESPONSE:
                data = s.recv(RESPONSE - got)
                assert data
                got += len(data)
            out.append((time.perf_counter() - t0) * 1000)
    return out


def step(what: str) -> None:
    """Progress on stderr (the results go to stdout at the end)."""
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def median(xs: list[float]) -> float:
    xs, mid = sorted(xs), len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


# ------------------------------------------------------------------ ztunnel process accounting
CLK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Cpu:
    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.start = {n: cpu_seconds(p) for n, p in pids.items()}

    def used(self) -> dict[str, float]:
        return {n: cpu_seconds(p) - self.start[n] for n, p in self.pids.items()}


# ------------------------------------------------------------------ the run
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=1024,
                    help="MiB per throughput run; long runs average out the machine's load (default %(default)s)")
    ap.add_argument("--repeat", type=int, default=5,
                    help="alternating rounds of the throughput and connection measurements (default %(default)s)")
    ap.add_argument("--requests", type=int, default=2000, help="requests of the latency run (default %(default)s)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_mesh needs root (network namespaces)", file=sys.stderr)
        return 2

    rig = MeshRig(PREFIX, LAB, [CLIENT, SERVER, PLAIN_CLIENT, PLAIN_SERVER], workdir=Path(f"/tmp/zb-{os.getpid()}"),
                  events=False)
    a, plain = rig.netns("client"), rig.netns("plain-client")
    results: dict[str, float] = {}
    rounds: list[dict[str, float]] = []
    conn_rounds: list[dict[str, float]] = []
    try:
        rig.start(enrol=False)
        rig.start_app("server", SERVER_APP, str(REQUEST), str(RESPONSE))
        rig.start_app("plain-server", SERVER_APP, str(REQUEST), str(RESPONSE))
        relay = subprocess.Popen(["ip", "netns", "exec", rig.router, sys.executable, "-c", RELAY_APP, str(RELAY),
                                  str(RELAY_PASS_THROUGH), PLAIN_SERVER.ip, str(SINK)], cwd=ROOT,
                                 stdout=subprocess.PIPE, text=True)
        rig.apps.append(relay)
        assert relay.stdout is not None and relay.stdout.readline().strip() == "ready"

        step("enrolling the client and server pods (the plain- pair stays out of the mesh)")
        rig.enrol("client")
        rig.enrol("server")
        rig.wait_ready()
        for zt in rig.ztunnels.values():  # certificates prefetched, config in place
            wait_for(lambda zt=zt: any(c["status"] == "Available" for c in
                                       zt.admin_request({"op": "config_dump"})["certificates"]), 10, "certificates")
        assert sequential_connections(a, (SERVER.ip, GREET), 5)  # warm: the pooled tunnel is up
        pids = {n: zt.pid for n, zt in rig.ztunnels.items()}

        bulk_cpu = {n: 0.0 for n in pids}
        for r in range(args.repeat):
            step(f"throughput round {r + 1}/{args.repeat}: direct, relays, mesh")
            one = {"direct": throughput(plain, (PLAIN_SERVER.ip, SINK), args.mib),
                   "relay": throughput(plain, (RELAY_IP, RELAY), args.mib),
                   "relay_pt": throughput(plain, (RELAY_IP, RELAY_PASS_THROUGH), args.mib)}
            cpu = Cpu(pids)
            one["mesh"] = throughput(a, (SERVER.ip, SINK), args.mib)
            for n, used in cpu.used().items():
                bulk_cpu[n] += used
            rounds.append(one)
        for path in ("direct", "relay", "relay_pt", "mesh"):
            results[path] = max(r[path] for r in rounds)

        conn_cpu = {n: 0.0 for n in pids}
        for r in range(args.repeat):
            step(f"new connections round {r + 1}/{args.repeat}: without and with the mesh")
            one = {"direct_seq": sequential_connections(plain, (PLAIN_SERVER.ip, GREET), 200),
                   "direct_conc": concurrent_connections(plain, (PLAIN_SERVER.ip, GREET), 500)}
            cpu = Cpu(pids)
            one["mesh_seq"] = sequential_connections(a, (SERVER.ip, GREET), 200)
            one["mesh_conc"] = concurrent_connections(a, (SERVER.ip, GREET), 500)
            for n, used in cpu.used().items():
                conn_cpu[n] += used
            conn_rounds.append(one)
        for what in ("direct_seq", "direct_conc", "mesh_seq", "mesh_conc"):
            results[what] = median([r[what] for r in conn_rounds])

        step("latency, without and with the mesh")
        direct_lat = latency(plain, (PLAIN_SERVER.ip, ECHO), args.requests)
        cpu = Cpu(pids)
        t0 = time.perf_counter()
        mesh_lat = latency(a, (SERVER.ip, ECHO), args.requests)
        lat_elapsed = time.perf_counter() - t0
        req_cpu = cpu.used()
        rss = {n: rss_mib(p) for n, p in pids.items()}
    finally:
        rig.close()

    n = args.requests
    print(f"bench_mesh: 2 + 2 pods (meshed and plain), 2 ztunnel processes (n1 = source, n2 = destination), "
          f"{os.cpu_count()} CPUs, "
          f"Python {sys.version.split()[0]}")
    median_ratio = median([r["mesh"] / r["relay"] for r in rounds])
    print("\nbulk throughput, one connection, MiB/s (%d alternating rounds x %d MiB, best shown)"
          % (args.repeat, args.mib))
    print(f"  direct TCP pod -> pod       {results['direct']:8.0f}")
    print(f"  plain asyncio relay         {results['relay']:8.0f}   ({results['relay'] / results['direct']:.0%} of direct)")
    print(f"  same relay, pass-through I/O{results['relay_pt']:8.0f}   (the app side read as ztunnel reads it, "
          f"lab.hbone.wire: for comparison only)")
    print(f"  mesh (15001 -> HBONE -> app){results['mesh']:8.0f}   ({results['mesh'] / results['relay']:.0%} of the relay, "
          f"{results['mesh'] / results['relay_pt']:.0%} of the pass-through relay, "
          f"{results['mesh'] / results['direct']:.0%} of direct)")
    print("  per round, mesh / relay: " + ", ".join(f"{r['mesh'] / r['relay']:.0%}" for r in rounds)
          + f"   median {median_ratio:.0%}   goal >= 40% of the relay: " + ("met" if median_ratio >= 0.4 else "NOT met"))
    mib_total = args.mib * args.repeat
    print("  ztunnel CPU during the mesh runs: " + ", ".join(f"{k} {v:.2f}s" for k, v in bulk_cpu.items())
          + f" for {mib_total} MiB")
    print("\nnew connections per second (connect + first byte + close), median of %d alternating rounds"
          % args.repeat)
    print(f"  direct      200 sequential {results['direct_seq']:7.0f}/s   500 concurrent {results['direct_conc']:7.0f}/s")
    print(f"  mesh        200 sequential {results['mesh_seq']:7.0f}/s   500 concurrent {results['mesh_conc']:7.0f}/s")
    print("  mesh, 500 concurrent, per round: " + ", ".join(f"{r['mesh_conc']:.0f}/s" for r in conn_rounds))
    print(f"  goal >= 1000 new mesh connections/s: sequential {'met' if results['mesh_seq'] >= 1000 else 'NOT met'}"
          f" (one at a time: bound by the latency of the whole path), concurrent "
          f"{'met' if results['mesh_conc'] >= 1000 else 'NOT met'}")
    per_conn = {k: v / (700 * args.repeat) * 1000 for k, v in conn_cpu.items()}
    print("  ztunnel CPU per 1000 new connections: " + ", ".join(f"{k} {v:.2f}s" for k, v in per_conn.items()))
    print(f"\nrequest latency on a kept-alive connection ({REQUEST} B request, {RESPONSE} B response, {n} requests), ms")
    print(f"  direct      p50 {pct(direct_lat, 50):.3f}   p99 {pct(direct_lat, 99):.3f}")
    print(f"  mesh        p50 {pct(mesh_lat, 50):.3f}   p99 {pct(mesh_lat, 99):.3f}   ({n / lat_elapsed:.0f} req/s)")
    per_k = {k: v / n * 1000 for k, v in req_cpu.items()}
    total = sum(per_k.values())
    print("\nztunnel cost per 1000 requests: CPU " + ", ".join(f"{k} {v:.3f}s" for k, v in per_k.items())
          + f" (both: {total:.3f}s); RSS " + ", ".join(f"{k} {v:.0f} MiB" for k, v in rss.items()))
    print(f"  goal <= 0.2 vCPU per 1000 req/s (= 0.2 CPU-s per 1000 requests) per ztunnel: "
          f"{'met' if max(per_k.values()) <= 0.2 else 'NOT met'} (worst {max(per_k.values()):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
