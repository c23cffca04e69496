"""The lab foundation, end to end as root: a real cluster of namespaces from the default scenario."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import time

import pytest

from tests.lab.conftest import Lab, down, lab_cli, leftovers, new_lab_name, up

pytestmark = pytest.mark.lab


def test_productpage_from_curl(default_lab: Lab):
    out = default_lab.exec("deploy/curl", "curl", "-s", "http://productpage:9080/productpage").stdout
    assert "<title>Simple Bookstore App</title>" in out
    assert re.search(r"reviews-v[123]-[a-z0-9]{10}-[a-z0-9]{5}", out), out[-2000:]


def test_get_pods_wide_lists_every_pod_running(default_lab: Lab):
    out = default_lab("get", "pods", "-o", "wide").stdout
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert len(lines) == 9, out
    assert all(" Running " in l for l in lines[1:]), out


def test_pods_on_different_nodes_reach_each_other_by_service_name(default_lab: Lab):
    pods = default_lab.pods()
    node_of = {p["metadata"]["name"]: p["spec"]["nodeName"] for p in pods}
    curl = next(n for n in node_of if n.startswith("curl-"))
    others = {n for n in node_of if node_of[n] != node_of[curl]}
    target = next(n for n in others if n.startswith(("details-", "ratings-", "productpage-")))
    svc = target.split("-")[0]
    for host in (svc, f"{svc}.default", f"{svc}.default.svc.cluster.local"):
        out = default_lab.exec("deploy/curl", "curl", "-s", "-D-", f"http://{host}:9080/health").stdout
        assert " 200 " in out.splitlines()[0], out
    # and straight to the pod IP across nodes
    ip = next(p["status"]["podIP"] for p in pods if p["metadata"]["name"] == target)
    assert " 200 " in default_lab.exec("deploy/curl", "curl", "-s", "-D-", f"http://{ip}:9080/health").stdout


def test_a_service_spreads_100_requests_over_every_endpoint(default_lab: Lab):
    script = "for i in $(seq 100); do curl -s http://reviews:9080/reviews/0; echo; done"
    out = default_lab.exec("deploy/sleep", "sh", "-c", script).stdout
    names = re.findall(r'"podname"\s*:\s*"(reviews-v[123])-', out)
    assert len(names) == 100, out[:500]
    seen = collections.Counter(names)
    assert set(seen) == {"reviews-v1", "reviews-v2", "reviews-v3"}, seen


def test_kube_proxy_rules_are_in_each_node(default_lab: Lab):
    for node in (f"{default_lab.name}-worker", f"{default_lab.name}-worker2"):
        rules = subprocess.run(["ip", "netns", "exec", node, "iptables-legacy-save", "-t", "nat"],
                               capture_output=True, text=True, check=True).stdout
        assert "-A KUBE-SERVICES" in rules and "default/reviews:http cluster IP" in rules
        assert "--mode random --probability" in rules


def test_apps_see_the_client_address(default_lab: Lab):
    curl_ip = next(p["status"]["podIP"] for p in default_lab.pods() if p["metadata"]["name"].startswith("curl-"))
    out = default_lab.exec("deploy/curl", "curl", "-s", "-D-", "http://details:9080/details/0").stdout
    assert curl_ip in out, out


def test_exec_returns_the_commands_exit_code(default_lab: Lab):
    p = default_lab.exec("deploy/curl", "sh", "-c", "exit 7", check=False)
    assert p.returncode == 7
    assert "command terminated with exit code 7" in p.stderr


def test_exec_into_missing_pod_is_a_clear_error(default_lab: Lab):
    p = default_lab.exec("nosuchpod", "true", check=False)
    assert p.returncode == 1 and 'pods "nosuchpod" not found' in p.stderr
    p = default_lab.exec("deploy/nosuch", "true", check=False)
    assert p.returncode == 1 and "not found" in p.stderr


def test_label_and_unlabel_namespace(default_lab: Lab):
    assert default_lab("label", "namespace", "default", "lab-test=yes").stdout.strip() == "namespace/default labeled"
    assert "lab-test=yes" in default_lab("get", "ns", "default", "--show-labels").stdout
    p = default_lab("label", "namespace", "default", "lab-test=no", check=False)
    assert p.returncode != 0 and "--overwrite" in p.stderr
    assert default_lab("label", "namespace", "default", "lab-test-").stdout.strip() == "namespace/default unlabeled"
    assert "lab-test" not in default_lab("get", "ns", "default", "--show-labels").stdout


def test_apply_and_delete_change_pods_services_and_rules(default_lab: Lab, tmp_path):
    f = tmp_path / "extra.yaml"
    f.write_text("""apiVersion: v1
kind: Namespace
metadata:
  name: extra
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: extra}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: example.com/some/unknown:1, ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: extra}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
""")
    out = default_lab("apply", "-f", str(f)).stdout
    assert "namespace/extra created" in out and "deployment.apps/web created" in out and "service/web created" in out
    pods = default_lab("get", "pods", "-n", "extra")
    assert "generic echo" in pods.stderr  # unknown image: get pods says which app plays it (a note, like a warning)
    body = default_lab.exec("deploy/curl", "curl", "-s", "http://web.extra/").stdout
    assert "web-" in body
    out = default_lab("apply", "-f", str(f)).stdout
    assert "deployment.apps/web unchanged" in out
    out = default_lab("delete", "-f", str(f)).stdout
    assert "namespace/extra deleted" in out
    assert not [n for n in os.listdir("/run/netns") if n.startswith(f"{default_lab.name}-extra-")]


def test_bad_input_leaves_nothing_behind(root, tmp_path):
    name = new_lab_name("b")
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata:\n  name: x\nspec:\n  ports:\n  - port: 99999\n")
    p = lab_cli("up", "--name", name, "-f", str(bad), check=False)
    assert p.returncode != 0 and "bad.yaml:1:" in p.stderr and "out of range" in p.stderr
    assert leftovers(name) == []
    p = lab_cli("up", "--name", "Bad_Name", check=False)
    assert p.returncode != 0 and "invalid lab name" in p.stderr


def test_lab_name_in_use_is_refused(default_lab: Lab):
    p = lab_cli("up", "--name", default_lab.name, check=False)
    assert p.returncode != 0 and "already running" in p.stderr


def test_two_labs_side_by_side_and_sigkilled_supervisor(root, default_lab: Lab, tmp_path):
    f = tmp_path / "small.yaml"
    f.write_text("""apiVersion: apps/v1
kind: Deployment
metadata: {name: httpbin}
spec:
  selector: {matchLabels: {app: httpbin}}
  template:
    metadata: {labels: {app: httpbin}}
    spec:
      containers: [{name: httpbin, image: docker.io/kong/httpbin:0.1.0, ports: [{containerPort: 80}]}]
---
apiVersion: v1
kind: Service
metadata: {name: httpbin}
spec:
  selector: {app: httpbin}
  ports: [{name: http, port: 8000, targetPort: 80}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: client}
spec:
  selector: {matchLabels: {app: client}}
  template:
    metadata: {labels: {app: client}}
    spec:
      containers: [{name: c, image: curlimages/curl}]
""")
    name = new_lab_name("s")
    lab = up(name, "-f", str(f), "--nodes", "1")
    try:
        out = lab.exec("deploy/client", "curl", "-s", "http://httpbin:8000/get").stdout
        assert json.loads(out)["url"].endswith("/get")
        # the default lab still works beside it
        assert "Simple Bookstore App" in default_lab.exec("deploy/curl", "curl", "-s",
                                                           "http://productpage:9080/productpage").stdout
        # kill the supervisor with SIGKILL: `down` must still remove everything from the record
        record = json.load(open(f"/run/ambient-lab/{name}/state.json"))
        os.kill(record["supervisor"]["pid"], signal.SIGKILL)
        time.sleep(0.2)
        assert leftovers(name), "the lab's namespaces and processes outlive its supervisor"
    finally:
        down(name)
    assert leftovers(name) == []
    p = lab_cli("down", "--name", name)  # idempotent
    assert "not running" in p.stderr


def test_down_removes_everything(root):
    name = new_lab_name("x")
    lab = up(name, "--nodes", "1")
    assert lab("status").returncode == 0
    assert leftovers(name)
    t0 = time.monotonic()
    down(name)
    assert leftovers(name) == [], leftovers(name)
    assert time.monotonic() - t0 < 10
