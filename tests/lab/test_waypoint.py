"""The waypoint, as root, on Istio's own samples: the getting-started tutorial's steps 4 to 6 with
real curl in the pods, then what the destination sees and the flow file."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import require_conformance
from tests.lab.conftest import Lab, down, new_lab_name, up
from tests.lab.test_capture import curl, redirection, wait_for

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def tutorial(root):
    """Steps 1-2: bookinfo, its per-version services and curl, in the mesh."""
    samples = require_conformance() / "samples"
    name = new_lab_name("w")
    files = [samples / "bookinfo_bookinfo.yaml", samples / "bookinfo_bookinfo-versions.yaml", samples / "curl_curl.yaml"]
    try:
        lab = up(name, *[a for f in files for a in ("-f", str(f))])
        lab("label", "namespace", "default", "istio.io/dataplane-mode=ambient")
        wait_for(lambda: all(redirection(p) == "enabled" for p in lab.pods()), what="pods enabled")
        yield lab
    finally:
        down(name)


def gs(name: str) -> str:
    return str(require_conformance() / "getting-started" / name)


def test_step4_waypoint_apply(tutorial: Lab):
    out = tutorial("waypoint", "apply", "--enroll-namespace", "--wait").stdout.splitlines()
    assert out == ["waypoint default/waypoint applied",
                   'namespace default labeled with "istio.io/use-waypoint: waypoint"']
    table = tutorial("get", "gtw", "waypoint").stdout.splitlines()
    assert table[0].split() == ["NAME", "CLASS", "ADDRESS", "PROGRAMMED", "AGE"]
    name, cls, address, programmed, _ = table[1].split()
    assert (name, cls, programmed) == ("waypoint", "istio-waypoint", "True") and address.startswith("10.96.")
    # the waypoint itself is never captured, and ztunnel shows it as TCP
    wp = next(p for p in tutorial.pods() if p["metadata"]["name"].startswith("waypoint-"))
    assert redirection(wp) == ""
    zc = tutorial("ztunnel-config", "workloads").stdout
    assert re.search(rf"{wp['metadata']['name']}\s.*TCP", zc), zc
    # services now name their waypoint
    assert re.search(r"default\s+productpage\s+[\d.]+\s+waypoint\s", tutorial("ztunnel-config", "services").stdout)
    assert "Simple Bookstore App" in curl(tutorial, "deploy/curl", "http://productpage:9080/productpage").stdout


def test_step5_l7_policy(tutorial: Lab):
    tutorial("apply", "-f", gs("30-l7-policy-productpage-waypoint.yaml"), "-f", gs("40-l4-policy-allow-waypoint.yaml"))
    url = "http://productpage:9080/productpage"
    wait_for(lambda: tutorial.exec("deploy/curl", "curl", "-s", url, "-X", "DELETE").stdout == "RBAC: access denied",
             what="DELETE denied")
    p = tutorial.exec("deploy/reviews-v1", "curl", "-s", url)
    assert p.stdout == "RBAC: access denied"
    assert "<title>Simple Bookstore App</title>" in tutorial.exec("deploy/curl", "curl", "-s", url).stdout


def test_destination_sees_the_waypoint_identity(tutorial: Lab):
    """The destination ztunnel's mTLS peer is the waypoint, not curl (reference §6): L4 policies there must allow it."""
    assert curl(tutorial, "deploy/curl", "http://productpage:9080/productpage").returncode == 0
    out = tutorial("trace", "-o", "json").stdout
    handshakes = [json.loads(l) for l in out.splitlines() if '"tls.handshake"' in l]
    inbound = [e for e in handshakes if e["fields"].get("direction") == "inbound" and e["pod"].startswith("productpage-")]
    assert inbound and inbound[-1]["fields"]["src_identity"] == "spiffe://cluster.local/ns/default/sa/waypoint"
    outbound = [e for e in handshakes if e["fields"].get("direction") == "outbound" and e["pod"].startswith("curl-")]
    assert outbound[-1]["fields"]["dst_identity"] == "spiffe://cluster.local/ns/default/sa/waypoint"


def test_step6_canary_90_10(tutorial: Lab):
    tutorial("apply", "-f", gs("50-httproute-reviews-90-10.yaml"))
    script = ("for i in $(seq 1000); do curl -s http://productpage:9080/productpage "
              "| grep -o 'reviews-v.-' | head -n 1; done")
    out = tutorial.exec("deploy/curl", "sh", "-c", script).stdout.split()
    counts = collections.Counter(out)
    assert sum(counts.values()) == 1000, counts
    share_v1 = counts["reviews-v1-"] / 10
    assert 87 <= share_v1 <= 93 and counts["reviews-v1-"] + counts["reviews-v2-"] == 1000, counts


def test_waypoint_metrics(tutorial: Lab):
    assert curl(tutorial, "deploy/curl", "http://productpage:9080/productpage").returncode == 0
    out = tutorial("metrics").stdout
    assert "# waypoint default/waypoint" in out
    assert re.search(r'istio_requests_total\{[^}]*reporter="waypoint"[^}]*destination_service="productpage', out) or \
        re.search(r'istio_requests_total\{[^}]*destination_service="productpage[^}]*reporter="waypoint"', out), out[-800:]
    assert "istio_request_duration_milliseconds_bucket" in out


def test_flows_are_in_mitmproxys_format(tutorial: Lab, tmp_path):
    out = tutorial("flows").stdout
    assert re.search(r"GET http://[\d.]+:9080/productpage", out), out[-500:]
    files = [f for f in tutorial("flows").stderr.split() if f.endswith("flows.mitm")]
    mitmdump = os.path.join(os.path.dirname(sys.executable), "mitmdump")
    p = subprocess.run([mitmdump, "-nr", files[0], "--set", f"confdir={tmp_path}"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and "/productpage" in p.stdout and "200" in p.stdout, p.stdout[-500:] + p.stderr[-500:]


def test_kill_and_restart_the_waypoint(tutorial: Lab):
    """Killing the waypoint breaks the L7 traffic it carries; traffic that never used it carries on."""
    details_ip = next(p["status"]["podIP"] for p in tutorial.pods() if p["metadata"]["name"].startswith("details-"))
    assert "killed" in tutorial("kill", "waypoint").stdout
    try:
        assert curl(tutorial, "deploy/curl", "http://productpage:9080/productpage").returncode != 0
        # a pod IP is not a service: waypoint-for=service leaves it to ztunnel alone (HBONE, L4)
        direct = curl(tutorial, "deploy/curl", f"http://{details_ip}:9080/details/0")
        assert direct.returncode == 0 and '"id"' in direct.stdout, direct
    finally:
        tutorial("restart", "waypoint")
    wait_for(lambda: "Simple Bookstore App" in curl(tutorial, "deploy/curl",
                                                    "http://productpage:9080/productpage").stdout,
             timeout=15, what="traffic through the restarted waypoint")
    assert re.search(r"waypoint-\S+\s+1/1\s+Running\s+1\s", tutorial("get", "pods").stdout)


def test_tcp_through_a_waypoint_is_forwarded_on_its_tcp_chain(tutorial: Lab):
    """tcp-echo (ports named tcp, tcp-other) behind the namespace's waypoint: the waypoint does not
    parse it as HTTP (it used to answer 400); it forwards the bytes at L4 to a tcp-echo pod."""
    samples = require_conformance() / "samples"
    tutorial("apply", "-f", str(samples / "tcp-echo_tcp-echo-services.yaml"))
    wait_for(lambda: {redirection(p) for p in tutorial.pods() if p["metadata"]["name"].startswith("tcp-echo-")}
             == {"enabled"}, what="tcp-echo pods enabled")
    wait_for(lambda: re.search(r"default\s+tcp-echo\s+[\d.]+\s+waypoint\s",
                               tutorial("ztunnel-config", "services").stdout), what="tcp-echo uses the waypoint")
    for port in (9000, 9001):
        out = tutorial.exec("deploy/curl", "sh", "-c",
                            f"echo world | curl -s --max-time 2 telnet://tcp-echo:{port}", check=False).stdout
        assert re.search(r"^(one|two) world$", out.strip()), (port, out)  # the sample's v1 and v2 prefixes
    trace = tutorial("trace", "-o", "json").stdout
    chains = [json.loads(line) for line in trace.splitlines() if '"waypoint.tcp"' in line]
    assert any("on its TCP chain (the port is declared TCP)" in e["msg"] for e in chains), chains[-3:]
