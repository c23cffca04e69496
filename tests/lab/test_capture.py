"""In-pod capture, as root, on a real lab: enrolment by label, Istio's exact rules read back from
the kernel, ztunnel's listeners inside the pods, traffic through them, failure and the start-up race."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from lab.cni import iptables as inpod
from tests.conftest import require_conformance
from tests.lab.conftest import Lab, down, lab_cli, new_lab_name, up

pytestmark = pytest.mark.lab
AMBIENT = "istio.io/dataplane-mode=ambient"


@pytest.fixture(scope="module")
def mesh_lab(root):
    """The default scenario in a lab of its own, so enrolling `default` does not disturb other tests."""
    name = new_lab_name("c")
    try:
        yield up(name)
    finally:
        down(name)


def events(lab: Lab, since: float = 0.0) -> list[dict]:
    out = lab("trace", "-o", "json").stdout
    evs = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [e for e in evs if e["ts"] >= since]


def pod(lab: Lab, prefix: str) -> dict:
    return next(p for p in lab.pods() if p["metadata"]["name"].startswith(prefix))


def redirection(p: dict) -> str:
    return (p["metadata"].get("annotations") or {}).get("ambient.istio.io/redirection", "")


def wait_for(predicate, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = predicate()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def curl(lab: Lab, target: str, url: str, *extra: str) -> subprocess.CompletedProcess:
    return lab.exec(target, "curl", "-s", "--max-time", "5", *extra, url, check=False)


def test_traffic_of_unenrolled_pods_does_not_touch_ztunnel(mesh_lab: Lab):
    t0 = time.time()
    assert "Simple Bookstore App" in curl(mesh_lab, "deploy/curl", "http://productpage:9080/productpage").stdout
    assert not [e for e in events(mesh_lab, t0) if e["kind"].startswith("conn.")]
    assert all(redirection(p) == "" for p in mesh_lab.pods())


def test_enrol_live_by_namespace_label(mesh_lab: Lab):
    pids_before = {p["metadata"]["name"]: p["status"].get("podIP") for p in mesh_lab.pods()}
    out = mesh_lab("label", "namespace", "default", AMBIENT).stdout
    assert out.strip() == "namespace/default labeled"
    wait_for(lambda: all(redirection(p) == "enabled" for p in mesh_lab.pods()), what="all pods enabled")
    # no pod restarted: same names, same IPs
    assert {p["metadata"]["name"]: p["status"].get("podIP") for p in mesh_lab.pods()} == pids_before
    wide = mesh_lab("get", "pods", "-o", "wide").stdout
    assert all(line.rstrip().endswith("enabled") for line in wide.splitlines()[1:]), wide


def test_rules_in_the_kernel_equal_istios_golden_file(mesh_lab: Lab):
    golden = (require_conformance() / "cni-iptables" / "default.golden").read_text()
    curl_pod = pod(mesh_lab, "curl-")
    saved = mesh_lab("iptables", curl_pod["metadata"]["name"]).stdout
    ours = inpod.normalise_save(saved)
    expected = inpod.normalise_save(golden)
    # DNS capture is off in the lab: the golden file minus its two port-53 rules and its raw table
    expected_no_dns = [l for l in expected if "--dport 53" not in l and not l.startswith("*raw")]
    expected_no_dns = inpod.normalise_save(inpod.render_save(inpod.inpod_rules(dns_capture=False), with_dns=False))
    assert ours == expected_no_dns
    rules = subprocess.run(["ip", "netns", "exec", netns_of(mesh_lab, curl_pod), "ip", "rule"], capture_output=True,
                           text=True, check=True).stdout
    assert "32764:" in rules and "fwmark 0x111/0xfff lookup 100" in rules


def netns_of(lab: Lab, p: dict) -> str:
    return f"{lab.name}-{p['metadata']['namespace']}-{p['metadata']['name']}"


def test_ztunnel_listeners_live_in_the_pods_and_belong_to_ztunnel(mesh_lab: Lab):
    p = pod(mesh_lab, "productpage-")
    ss = subprocess.run(["ip", "netns", "exec", netns_of(mesh_lab, p), "ss", "-tlnpH"], capture_output=True,
                        text=True, check=True).stdout
    ztunnel_pid = component_pid(mesh_lab, "ztunnel", p["spec"]["nodeName"])
    for port in (15001, 15006, 15008):
        line = next((l for l in ss.splitlines() if re.search(rf":{port}\b", l)), "")
        # what a learner sees in real ambient: the node's ztunnel owns sockets inside the pod
        assert f'users:(("ztunnel",pid={ztunnel_pid},' in line, ss
    app = next((l for l in ss.splitlines() if re.search(r":9080\b", l)), "")
    assert 'users:(("productpage",' in app, ss


def test_every_process_is_named_after_what_it_plays(mesh_lab: Lab):
    """`ps -o comm` (the kernel's short name) and `ps -o args` name the component, not python."""
    from lab.supervisor.client import call

    rows = call(mesh_lab.name, "components")["components"]
    seen = set()
    for r in rows:
        if not r["pid"]:
            continue
        comm = Path(f"/proc/{r['pid']}/comm").read_text().strip()
        args = Path(f"/proc/{r['pid']}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert comm == r["component"], (r, comm)
        assert args.startswith(r["component"] + " --"), (r, args)
        seen.add(comm)
    assert {"kube-dns", "istio-cni", "ztunnel", "istiod"} <= seen, seen
    from lab.common.state import LabRecord

    sup = LabRecord.load(mesh_lab.name).supervisor
    assert Path(f"/proc/{sup.pid}/comm").read_text().strip() == "lab-supervisor"
    ps = subprocess.run(["ps", "-o", "comm=", "-p", ",".join(str(x.pid) for x in LabRecord.load(mesh_lab.name).processes)],
                        capture_output=True, text=True).stdout.split()
    assert "python3.12" not in ps and "python3" not in ps and "python" not in ps, ps
    assert {"productpage", "details", "reviews", "ratings", "sleep"} <= set(ps), ps


def component_pid(lab: Lab, what: str, node: str) -> int:
    from lab.supervisor.client import call

    rows = call(lab.name, "components")["components"]
    return next(r["pid"] for r in rows if r["component"] == what and r["node"] == node)


def test_enrolled_traffic_goes_through_ztunnel_both_ways(mesh_lab: Lab):
    curl_pod = pod(mesh_lab, "curl-")
    details = pod(mesh_lab, "details-")
    before = counters(mesh_lab, curl_pod, "--to-ports 15001")
    t0 = time.time()
    out = curl(mesh_lab, "deploy/curl", "http://details:9080/details/0", "-D-").stdout
    assert '"id": 0' in out or '"id":0' in out, out
    # the app saw the curl pod's own address: the source IP survives the inbound leg
    assert curl_pod["status"]["podIP"] in out
    assert counters(mesh_lab, curl_pod, "--to-ports 15001") > before  # outbound: nat OUTPUT REDIRECT to 15001
    evs = wait_for(lambda: [e for e in events(mesh_lab, t0) if e["kind"] == "conn.original_dst"] or None,
                   what="original destination events")
    svc_ip = next(s for s in json.loads(mesh_lab("get", "svc", "details", "-o", "json").stdout)["spec"]["clusterIPs"])
    assert f"{svc_ip}:9080" in json.dumps(evs)  # outbound: the service VIP the app dialled
    # inbound between meshed pods is HBONE: it lands on 15008, which the rules never redirect
    inbound = [e for e in events(mesh_lab, t0) if e["kind"] == "conn.captured" and e["pod"] == details["metadata"]["name"]]
    assert inbound and inbound[-1]["fields"].get("port") == 15008, inbound


def test_plaintext_inbound_is_redirected_to_15006(mesh_lab: Lab):
    """A client outside the mesh (here the node itself, as a kubelet would be) reaches a meshed pod
    in plaintext: PREROUTING REDIRECTs it to ztunnel's 15006 with the pod's own address as original destination."""
    details = pod(mesh_lab, "details-")
    before = counters(mesh_lab, details, "--to-ports 15006")
    t0 = time.time()
    node_netns = details["spec"]["nodeName"]
    out = subprocess.run(["ip", "netns", "exec", node_netns, "curl", "-s", "--max-time", "5",
                          f"http://{details['status']['podIP']}:9080/details/0"], capture_output=True, text=True)
    assert '"id"' in out.stdout, out
    assert counters(mesh_lab, details, "--to-ports 15006") > before
    evs = wait_for(lambda: [e for e in events(mesh_lab, t0) if e["kind"] == "conn.original_dst"] or None,
                   what="inbound original destination")
    assert f"{details['status']['podIP']}:9080" in json.dumps(evs)


def counters(lab: Lab, p: dict, needle: str) -> int:
    saved = subprocess.run(["ip", "netns", "exec", netns_of(lab, p), "iptables-legacy-save", "-c", "-t", "nat"],
                           capture_output=True, text=True, check=True).stdout
    line = next(l for l in saved.splitlines() if needle in l and "REDIRECT" in l)
    return int(line.split("]")[0].strip("[").split(":")[0])


def test_illegal_port_is_refused(mesh_lab: Lab):
    details = pod(mesh_lab, "details-")
    t0 = time.time()
    p = curl(mesh_lab, "deploy/curl", f"http://{details['status']['podIP']}:15001/")
    assert p.returncode != 0
    wait_for(lambda: any("recursive call" in json.dumps(e) for e in events(mesh_lab, t0)), what="recursive refusal")


def test_kill_and_restart_ztunnel(mesh_lab: Lab):
    curl_pod = pod(mesh_lab, "curl-")
    node = curl_pod["spec"]["nodeName"]
    elsewhere = [p for p in mesh_lab.pods() if p["spec"]["nodeName"] != node]
    client = next(p for p in elsewhere if p["metadata"]["name"].split("-")[0] in ("sleep", "curl", "details", "ratings"))
    server = next(p for p in elsewhere if p is not client and p["metadata"]["name"].split("-")[0] != "sleep")
    assert "killed" in mesh_lab("kill", "ztunnel", node).stdout
    try:
        p = curl(mesh_lab, "deploy/curl", "http://details:9080/details/0")
        assert p.returncode in (7, 28, 52, 56), p  # fail closed: no ztunnel, no traffic
        # the other node's meshed pods carry on
        other = curl(mesh_lab, client["metadata"]["name"], f"http://{server['status']['podIP']}:9080/health", "-D-")
        assert " 200 " in other.stdout, other
    finally:
        mesh_lab("restart", "ztunnel", node)
    wait_for(lambda: curl(mesh_lab, "deploy/curl", "http://details:9080/details/0").returncode == 0,
             timeout=10, what="traffic after ztunnel restart")


def test_restarting_istio_cni_keeps_the_pods_listeners(mesh_lab: Lab):
    """A restarted agent takes its node's enrolled pods back before ztunnel reconnects (its initial
    snapshot): ztunnel keeps their listeners, and traffic to them never stops."""
    p = pod(mesh_lab, "productpage-")
    node = p["spec"]["nodeName"]
    t0 = time.time()
    mesh_lab("restart", "istio-cni", node)
    built = wait_for(lambda: [e for e in events(mesh_lab, t0) if e["kind"] == "cni.snapshot.built"
                              and e.get("node") == node], what="the initial snapshot")
    assert "took back" in built[0]["msg"]
    removed = [e for e in events(mesh_lab, t0) if e["kind"] == "ztunnel.workload.removed"]
    assert removed == [], removed
    assert redirection(pod(mesh_lab, "productpage-")) == "enabled"
    assert "Simple Bookstore App" in curl(mesh_lab, "deploy/curl", "http://productpage:9080/productpage").stdout


FAIL_CLOSED = """apiVersion: v1
kind: Namespace
metadata: {{name: closed, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: late, namespace: closed}}
spec:
  selector: {{matchLabels: {{app: late}}}}
  template:
    metadata: {{labels: {{app: late}}}}
    spec:
      nodeName: {node}
      containers: [{{name: c, image: docker.io/istio/examples-bookinfo-details-v1:1.20.3, ports: [{{containerPort: 9080}}]}}]
"""


def fail_closed_pod(lab: Lab, component: str):
    """Kill a node's `component`, then create an ambient pod on that node: the pod must wait in
    ContainerCreating, with FailedCreatePodSandBox events and no app process, and run captured once
    the component is back (istio-cni's plugin fails the ADD; the kubelet retries the sandbox)."""
    node = f"{lab.name}-worker2"
    manifest = FAIL_CLOSED.format(node=node)
    lab("kill", component, node)
    try:
        t0 = time.time()
        lab("apply", "-f", "-", input=manifest)
        waiting = wait_for(lambda: [e for e in events(lab, t0) if e["kind"] == "pod.sandbox.failed"],
                           what="FailedCreatePodSandBox")
        p = lab.pods("closed")[0]
        assert p["status"]["phase"] == "ContainerCreating", p["status"]
        time.sleep(1.0)  # more retries than one, and the app still does not run
        p = lab.pods("closed")[0]
        assert p["status"]["phase"] == "ContainerCreating", p["status"]
        ss = subprocess.run(["ip", "netns", "exec", netns_of(lab, p), "ss", "-tlnH"], capture_output=True,
                            text=True).stdout
        assert ":9080" not in ss, ss  # the app never ran outside the mesh
        assert len([e for e in events(lab, t0) if e["kind"] == "pod.sandbox.failed"]) >= 2
        return waiting, p
    finally:
        lab("restart", component, node)
        wait_for(lambda: redirection(lab.pods("closed")[0]) == "enabled"
                 and lab.pods("closed")[0]["status"]["phase"] == "Running", timeout=15, what="captured, then running")
        assert "ISTIO_OUTPUT" in lab("iptables", "-n", "closed", "deploy/late").stdout
        lab("delete", "-f", "-", input=manifest)


def test_istio_cni_agent_down_new_ambient_pods_wait_instead_of_running_uncaptured(mesh_lab: Lab):
    waiting, _ = fail_closed_pod(mesh_lab, "istio-cni")
    assert "failed to contact node Istio CNI agent" in waiting[0]["msg"], waiting[0]


def test_ztunnel_down_new_ambient_pods_are_pending_and_their_sandbox_retried(mesh_lab: Lab):
    waiting, p = fail_closed_pod(mesh_lab, "ztunnel")
    assert "failed to add pod to the mesh" in waiting[0]["msg"], waiting[0]
    assert redirection(p) == "pending"


def test_unenrol_removes_rules_and_traffic_still_works(mesh_lab: Lab):
    assert mesh_lab("label", "namespace", "default", "istio.io/dataplane-mode-").stdout.strip() == \
        "namespace/default unlabeled"
    wait_for(lambda: all(redirection(p) == "" for p in mesh_lab.pods()), what="annotations removed")
    saved = mesh_lab("iptables", "deploy/curl").stdout
    assert "ISTIO_" not in saved
    assert "Simple Bookstore App" in curl(mesh_lab, "deploy/curl", "http://productpage:9080/productpage").stdout


def test_readiness_race_without_the_taint(root, tmp_path):
    f = tmp_path / "race.yaml"
    f.write_text("""apiVersion: v1
kind: Namespace
metadata: {name: race, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: early, namespace: race}
spec:
  selector: {matchLabels: {app: early}}
  template:
    metadata: {labels: {app: early}}
    spec:
      containers: [{name: c, image: curlimages/curl}]
""")
    name = new_lab_name("r")
    try:
        lab_cli("up", "--name", name, "-q", "--no-cni-taint", "-f", str(f), "--nodes", "1", timeout=120)
        lab = Lab(name)
        p = lab.pods("race")[0]
        evs = events(lab)
        kinds = [(e["kind"], e.get("pod", "")) for e in evs]
        # the pod ran before istio-cni existed on its node: no CmdAdd, so no capture in that window
        created = kinds.index(("pod.created", p["metadata"]["name"]))
        ready = next(i for i, e in enumerate(evs) if e["kind"] == "cni.ready")
        assert created < ready
        # then the agent's informer, level-triggered, enrolled it as soon as it started
        assert redirection(p) == "enabled"
        added = [e for e in evs if e["kind"] == "cni.pod.add" and e.get("pod") == p["metadata"]["name"]]
        assert added and "informer" in json.dumps(added[0]), added
        assert "race/" not in lab_cli("doctor", "--name", name, check=False).stdout
    finally:
        down(name)


def test_with_the_taint_pods_wait_for_istio_cni(mesh_lab: Lab):
    evs = [e["kind"] for e in events(mesh_lab)]
    assert "node.untainted" in evs
    # every pod was created after its node was untainted
    first_pod = evs.index("pod.created")
    assert evs.index("node.untainted") < first_pod
