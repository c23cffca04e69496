"""Record the TUI tests' fixtures from real labs (needs root; about half a minute each).

    sudo .venv/bin/python -m tests.tui.record_fixtures [--scenario bookinfo|race|stepping] [--out DIR]

`bookinfo` (tests/tui/fixtures/bookinfo): lab `tuirec` with bookinfo + curl + sleep; namespace
`default` put in ambient; curl productpage from the curl pod (allowed), captured on the curl pod's
eth0 and lo (`captures/`: the wire view's sample); Istio's getting-started L4 policy that only lets
the ingress gateway's identity reach productpage; curl again (denied). After the pod views are
read, the policy is deleted and one more curl goes through: productpage's iptables read again
(`iptables.2.txt`: the counters of the rules that curl hit moved).

`race` (tests/tui/fixtures/race): Istio's start-up race (reference §7.1): namespace `default` is
ambient from the start but the lab starts its pods before istio-cni (`--no-cni-taint`), so they
run un-captured (bypassed); a pod started later is captured (HBONE), one opts out
(`istio.io/dataplane-mode=none`), productpage is re-enrolled by a label change, and the
bypassed curl pod calls it in plain text (ztunnel's inbound passthrough on 15006).

`stepping` (tests/tui/fixtures/stepping): step mode, the mesh debugger. Lab `tuirec`, namespace
`default` in ambient, `ambient-lab step on`; a curl from the curl pod to details waits before
each step: `step next` twice (the plan, the mTLS handshake; it then waits before the CONNECT),
`step all` lets it finish; `step off`.

Each saves what the TUI reads: the event stream, a cluster snapshot, the components, `get -o
json` of each kind, and the pod views' command outputs and logs, read through the same
LiveBackend the TUI uses. The lab is always removed at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAB = "tuirec"
POLICY = ROOT.parent / "shared" / "conformance" / "istio" / "getting-started" / "10-l4-policy-productpage-ztunnel.yaml"
KINDS = ("pods", "svc", "nodes", "ns", "authorizationpolicies", "httproutes", "gateways")
RECORDED_PODS = ("curl", "productpage-v1")  # deployments whose pod views are recorded


def lab(*args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lab", *args, "--name", LAB] if args[0] != "exec" else \
        [sys.executable, "-m", "lab", "exec", "--name", LAB, *args[1:]]
    print("+ ambient-lab", " ".join(args), file=sys.stderr)
    return subprocess.run(cmd, cwd=ROOT, check=check, text=True, capture_output=capture)


def curl(note: str) -> str:
    r = lab("exec", "deploy/curl", "--", "curl", "-s", "-o", "/dev/null", "--max-time", "5", "-w", "%{http_code}",
            "http://productpage:9080/productpage", check=False, capture=True)
    print(f"  curl ({note}): {r.stdout!r} exit {r.returncode}", file=sys.stderr)
    return r.stdout


def capture_curl(note: str) -> tuple[str, dict[str, str]]:
    """A curl captured on the curl pod's eth0 and lo (lab/tui/capture.py); tshark's field outputs."""
    from lab.common.state import run_dir
    from lab.supervisor.client import call
    from lab.supervisor.components import tls_keylog
    from lab.tui import capture

    pod = call(LAB, "resolve_pod", ref="deploy/curl")
    cap = capture.LiveCapture(pod["pod"], pod["netns"], pod["ip"], run_dir(LAB), tls_keylog(LAB))
    cap.start()
    try:
        code = curl(note)
        time.sleep(0.5)
        cap.stop()
        wire, plain = cap.decode(tls_keylog(LAB))
        opaque, _ = cap.decode("")
    finally:
        cap.discard()
    return code, {"pod": pod["pod"], "eth0.tsv": wire, "eth0.no-keylog.tsv": opaque, "lo.tsv": plain}


def play_bookinfo(extras: dict) -> list[str]:
    lab("up", "-q")
    lab("label", "namespace", "default", "istio.io/dataplane-mode=ambient")
    time.sleep(1.0)
    allowed, extras["capture"] = capture_curl("before the policy, captured")
    lab("apply", "-n", "default", "-f", str(POLICY))
    time.sleep(1.5)  # istiod pushes the policy to the ztunnels
    denied = curl("after the policy")
    time.sleep(1.0)
    return ["namespace default labelled istio.io/dataplane-mode=ambient",
            f"curl deploy/curl -> productpage:9080 before the policy: HTTP {allowed or 'none'}",
            f"applied {POLICY.name}", f"curl again after the policy: HTTP {denied or 'none (connection reset)'}"]


AMBIENT_DEFAULT_NS = """apiVersion: v1
kind: Namespace
metadata:
  name: default
  labels:
    istio.io/dataplane-mode: ambient
"""

LATE_PODS = """apiVersion: apps/v1
kind: Deployment
metadata:
  name: late
spec:
  replicas: 1
  selector:
    matchLabels: {app: late}
  template:
    metadata:
      labels: {app: late}
    spec:
      containers:
      - name: late
        image: docker.io/curlimages/curl:8.16.0
        command: ["/bin/sleep", "infinity"]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: opted-out
spec:
  replicas: 1
  selector:
    matchLabels: {app: opted-out}
  template:
    metadata:
      labels: {app: opted-out, istio.io/dataplane-mode: none}
    spec:
      containers:
      - name: opted-out
        image: docker.io/curlimages/curl:8.16.0
        command: ["/bin/sleep", "infinity"]
"""


def play_race(tmp: Path) -> list[str]:
    from lab.supervisor.client import call
    from lab.supervisor.lifecycle import default_scenario

    (tmp / "ns.yaml").write_text(AMBIENT_DEFAULT_NS)
    (tmp / "late.yaml").write_text(LATE_PODS)
    lab("up", "-q", "--no-cni-taint", "-f", str(tmp / "ns.yaml"), "-f", default_scenario())
    lab("apply", "-f", str(tmp / "late.yaml"))
    productpage = call(LAB, "resolve_pod", ref="deploy/productpage-v1")["pod"]
    lab("label", "pod", productpage, "istio.io/dataplane-mode=none")  # re-enrol: the doctor's fix
    lab("label", "pod", productpage, "istio.io/dataplane-mode-")
    time.sleep(1.0)
    code = curl("from the bypassed curl pod to the re-enrolled productpage")
    time.sleep(1.0)
    return ["namespace default ambient from the start; pods started before istio-cni (--no-cni-taint): bypassed",
            "deployment late started after istio-cni: captured; deployment opted-out: istio.io/dataplane-mode=none",
            f"pod {productpage} re-enrolled by labelling it dataplane-mode=none, then removing the label",
            f"curl deploy/curl (bypassed) -> productpage:9080 (meshed), plain text: HTTP {code or 'none'}"]


def play_stepping() -> list[str]:
    from lab.supervisor.client import call

    lab("up", "-q")
    lab("label", "namespace", "default", "istio.io/dataplane-mode=ambient")
    time.sleep(1.0)
    lab("step", "on")
    curl = subprocess.Popen([sys.executable, "-m", "lab", "exec", "--name", LAB, "deploy/curl", "--", "curl", "-s",
                             "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "20",
                             "http://details:9080/details/0"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    steps = []
    try:
        for release in ("next", "next", None):
            deadline = time.monotonic() + 10
            while not (held := call(LAB, "step_held")["held"]) and time.monotonic() < deadline:
                time.sleep(0.05)
            steps.append(held[0]["step"] if held else "?")
            time.sleep(0.3)
            if release:
                lab("step", release, held[0]["flow"][:12] if held else "")
        lab("step", "all")
        code, _ = curl.communicate(timeout=20)
    finally:
        if curl.poll() is None:
            curl.kill()
        lab("step", "off", check=False)
    time.sleep(1.0)
    return ["namespace default labelled istio.io/dataplane-mode=ambient", "ambient-lab step on",
            "curl deploy/curl -> details:9080 in the background: held before " + ", then ".join(steps),
            "ambient-lab step next twice, then step all", f"the curl finished: HTTP {code or 'none'}",
            "ambient-lab step off"]


def record(out: Path, scenario: str) -> None:
    import tempfile

    sys.path.insert(0, str(ROOT))
    from lab.supervisor.client import call, request
    from lab.tui.backend import LiveBackend
    from lab.tui.commands import POD_TABS
    from lab.tui.model import PodState

    with tempfile.TemporaryDirectory() as tmp:
        extras: dict = {}
        story = play_race(Path(tmp)) if scenario == "race" else play_stepping() if scenario == "stepping" \
            else play_bookinfo(extras)

    if out.exists():
        shutil.rmtree(out)
    (out / "get").mkdir(parents=True)
    (out / "pods").mkdir()
    (out / "logs").mkdir()
    events = [m["event"] for m in request(LAB, "trace", timeout=30) if "event" in m]
    (out / "events.jsonl").write_text("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events))
    for msg in request(LAB, "watch_cluster", timeout=30):
        snapshot = msg["snapshot"]
        break
    (out / "snapshot.json").write_text(json.dumps(snapshot, indent=1) + "\n")
    comps = call(LAB, "components")
    (out / "components.json").write_text(json.dumps({k: comps[k] for k in ("components", "uncaptured")}, indent=1) + "\n")
    live = LiveBackend(LAB, start_if_needed=False)
    for kind in KINDS:
        reply = live.request("get", kind=kind, all_namespaces=True, output="json")
        (out / "get" / f"{kind}.json").write_text(reply["stdout"] + "\n")
    netns = {e["pod"]: e["fields"].get("netns", "") for e in events if e["kind"] == "pod.created"}
    for p in snapshot["pods"]:
        if not any(p["name"].startswith(d + "-") for d in RECORDED_PODS):
            continue
        pod = PodState(name=p["name"], namespace=p["namespace"], node=p["node"], ip=p["ip"], netns=netns.get(p["name"], ""))
        (out / "pods" / pod.name).mkdir()
        for tab in POD_TABS:
            (out / "pods" / pod.name / f"{tab}.txt").write_text(live.pod_output(pod, tab))
        (out / "logs" / f"{pod.name}.log").write_text(live.logs(pod))
    for n in snapshot["nodes"]:
        (out / "logs" / f"ztunnel_{n['name']}.log").write_text(live.logs(component="ztunnel", node=n["name"]))
    if "capture" in extras:
        cap = dict(extras["capture"])
        cap_dir = out / "captures" / cap.pop("pod")
        cap_dir.mkdir(parents=True)
        for name, text in cap.items():
            (cap_dir / name).write_text(text)
        lab("delete", "-n", "default", "-f", str(POLICY))
        time.sleep(1.5)
        story.append(f"deleted the policy; curl again, then productpage's iptables read again: HTTP {curl('again')}")
        for p in snapshot["pods"]:
            if p["name"].startswith("productpage-v1-"):
                pod = PodState(name=p["name"], namespace=p["namespace"], ip=p["ip"], netns=netns.get(p["name"], ""))
                (out / "pods" / pod.name / "iptables.2.txt").write_text(live.pod_output(pod, "iptables"))
    (out / "lab.json").write_text(json.dumps({"lab": LAB, "scenario": scenario,
                                              "recorded": time.strftime("%Y-%m-%d %H:%M:%S"), "story": story},
                                             indent=1) + "\n")
    print(f"recorded {len(events)} events into {out}", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=["bookinfo", "race", "stepping"], default="bookinfo")
    ap.add_argument("--out", help="default: tests/tui/fixtures/SCENARIO")
    args = ap.parse_args()
    try:
        record(Path(args.out or ROOT / "tests" / "tui" / "fixtures" / args.scenario), args.scenario)
    finally:
        lab("down", check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
