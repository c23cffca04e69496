"""Wall time of `ambient-lab up` and `down`, and the whole lab's memory, for two scenarios.

    sudo .venv/bin/python bench/bench_up_down.py [--runs 3]

Scenarios: the default (bookinfo + curl + sleep, 8 pods on 2 workers) and 2 workers x 50 pods
(one Deployment of 100 replicas of an unknown image, played by the generic echo app). Memory is
the sum of the proportional set size (PSS, shared pages divided among sharers) of every process
the lab recorded (supervisor, node components, apps), sampled every 50 ms while the lab is up;
RSS summed is printed beside it for comparison. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

LAB = "bench"
MANY = """apiVersion: apps/v1
kind: Deployment
metadata: {name: many}
spec:
  replicas: 100
  selector: {matchLabels: {app: many}}
  template:
    metadata: {labels: {app: many}}
    spec:
      containers: [{name: web, image: example.com/bench/web:1, ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: many}
spec:
  selector: {app: many}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""


def cli(*args: str) -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "lab", *args, "--name", LAB], check=True, capture_output=True)
    return time.monotonic() - t0


def lab_pids() -> list[int]:
    try:
        with open(f"/run/ambient-lab/{LAB}/state.json") as f:
            rec = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    pids = [p["pid"] for p in rec.get("processes", [])]
    if rec.get("supervisor"):
        pids.append(rec["supervisor"]["pid"])
    return pids


def memory_kib(pids: list[int]) -> tuple[int, int]:
    pss = rss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
                    elif line.startswith("Rss:"):
                        rss += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return pss, rss


class PeakSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = (0, 0)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            m = memory_kib(lab_pids())
            if m[0] > self.peak[0]:
                self.peak = m
            time.sleep(0.05)


def scenario(label: str, up_args: list[str], runs: int) -> None:
    ups, downs, peaks = [], [], []
    for _ in range(runs):
        sampler = PeakSampler()
        sampler.start()
        ups.append(cli("up", "-q", *up_args))
        time.sleep(0.5)
        sampler.stop.set()
        sampler.join()
        peaks.append(sampler.peak)
        pods = len([p for p in lab_pids()])
        downs.append(cli("down"))
    pss = max(p[0] for p in peaks) / 1024
    rss = max(p[1] for p in peaks) / 1024
    print(f"{label:<28} up {statistics.median(ups):6.2f}s (min {min(ups):.2f})   "
          f"down {statistics.median(downs):5.2f}s (min {min(downs):.2f})   "
          f"peak memory {pss:7.1f} MiB PSS ({rss:.0f} MiB RSS summed) over {pods} processes")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root: sudo .venv/bin/python bench/bench_up_down.py", file=sys.stderr)
        return 1
    subprocess.run([sys.executable, "-m", "lab", "down", "--name", LAB], capture_output=True)
    print(f"ambient-lab up/down, median of {args.runs} runs, {os.cpu_count()} cores")
    scenario("default (8 pods, 2 nodes)", [], args.runs)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="ambient-lab-bench-") as f:
        f.write(MANY)
        f.flush()
        scenario("2 nodes x 50 pods", ["-f", f.name, "--nodes", "2"], args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
