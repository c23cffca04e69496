"""The lab's waypoint under load: HTTP/1.1 requests through `python -m lab.waypoint` next to the
same requests over direct HBONE, on the topology of tests/lab/test_waypoint_process_lab.py
(WaypointRig: client pod, waypoint pod, backend pods v1/v2 behind the real lab ztunnel, the real
istiod; no supervisor).

Paths (the client is this process, in the client pod's netns, with a certificate for its
identity from the lab's CA):

  via waypoint  client --mTLS+h2 CONNECT VIP:80--> waypoint (HTTP parse, RBAC, HTTPRoute 90/10,
                new HBONE with its own identity) --> ztunnel (n2) --> backend app
  direct HBONE  client --mTLS+h2 CONNECT podIP:8080--> ztunnel (n2) --> backend app v1

Measured, each path in the same run:

- latency: `--requests` sequential GETs on one kept-alive tunnel, p50/p99 and requests/s;
- throughput: the same number of GETs over `--concurrency` tunnels in parallel, requests/s;
- the waypoint process's CPU seconds (utime+stime from /proc) and RSS: CPU-seconds per 1000
  requests is the same number as vCPUs per 1000 requests/s.

The load generator is Python too and shares the 2 cores with the waypoint, ztunnel and the
backends, so absolute numbers are lower bounds. Needs root (namespaces). Usage:

    sudo .venv/bin/python bench/bench_waypoint.py [--requests 2000] [--concurrency 8] [--no-events]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lab.hbone import HboneConnection  # noqa: E402
from lab.tls.identity import Identity  # noqa: E402
from tests.lab.test_waypoint_process_lab import PORT, TARGET, V1, VIP, MeshClient, WaypointRig, in_netns  # noqa: E402
from tests.unit.test_waypoint_proxy import get  # noqa: E402

FLOW = "b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0"
#: The backend's identity: on the direct path the client checks it exactly, as ztunnel would.
V1_ID = Identity.of("default", V1.service_account)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def sequential(conn: HboneConnection, authority: tuple[str, int], n: int) -> list[float]:
    stream = await MeshClient.tunnel(conn, FLOW, authority=authority)
    buf = bytearray()
    for _ in range(20):  # warm-up: upstream connections, caches
        await get(stream, "/warm", buf=buf)
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        resp = await get(stream, f"/seq/{i}", buf=buf)
        times.append(time.perf_counter() - t0)
        assert resp.status == 200, resp
    stream.write_eof()
    return times


async def concurrent(conn: HboneConnection, authority: tuple[str, int], n: int, c: int) -> float:
    async def worker(k: int, count: int) -> None:
        stream = await MeshClient.tunnel(conn, FLOW, authority=authority, src_port=41000 + k)
        buf = bytearray()
        for i in range(count):
            assert (await get(stream, f"/par/{k}/{i}", buf=buf)).status == 200
        stream.write_eof()

    per = n // c
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k, per) for k in range(c)))
    return per * c / (time.perf_counter() - t0)


def measure(rig: WaypointRig, client: MeshClient, via_waypoint: bool, n: int, c: int) -> dict[str, float]:
    assert rig.waypoint is not None
    pid = rig.waypoint.pid
    authority = (VIP, PORT) if via_waypoint else (V1.ip, TARGET)

    async def run() -> tuple[list[float], float, float]:
        conn = await (client.connect() if via_waypoint else client.connect(V1.ip, V1_ID))
        try:
            cpu0 = cpu_seconds(pid)
            times = await sequential(conn, authority, n)
            rps = await concurrent(conn, authority, n, c)
            return times, rps, cpu_seconds(pid) - cpu0
        finally:
            await conn.aclose()

    times, rps, cpu = in_netns(rig.netns("client"), run, timeout=600)
    return {"p50_ms": percentile(times, 50) * 1000, "p99_ms": percentile(times, 99) * 1000,
            "seq_rps": len(times) / sum(times), "par_rps": rps,
            "waypoint_cpu_s_per_1000": cpu / (2 * n + 20) * 1000, "waypoint_rss_mib": rss_mib(pid)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--no-events", action="store_true", help="no event sink (the waypoint drops its events)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    rig = WaypointRig(Path(f"/tmp/wpbench-{os.getpid()}"), events=not args.no_events)
    try:
        rig.start_all()
        client = MeshClient(rig)
        assert rig.waypoint is not None
        rss0 = rss_mib(rig.waypoint.pid)
        direct = measure(rig, client, False, args.requests, args.concurrency)
        via = measure(rig, client, True, args.requests, args.concurrency)
    finally:
        rig.close()
    print(f"requests per path: {args.requests} sequential + {args.requests} over {args.concurrency} tunnels; "
          f"events {'off' if args.no_events else 'on'}")
    print(f"{'path':<14}{'p50 ms':>9}{'p99 ms':>9}{'seq req/s':>11}{'par req/s':>11}")
    for name, r in (("direct HBONE", direct), ("via waypoint", via)):
        print(f"{name:<14}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['seq_rps']:>11.0f}{r['par_rps']:>11.0f}")
    print(f"waypoint: {via['waypoint_cpu_s_per_1000']:.3f} CPU-seconds per 1000 requests "
          f"(= vCPU per 1000 req/s); RSS {rss0:.1f} MiB idle, {via['waypoint_rss_mib']:.1f} MiB after the load")
    print(f"added latency by the waypoint hop: p50 +{via['p50_ms'] - direct['p50_ms']:.2f} ms, "
          f"p99 +{via['p99_ms'] - direct['p99_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
