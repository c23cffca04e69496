"""Identity and HBONE, as root, on a lab built from Istio's own sample manifests: the getting-started
tutorial's steps 1 to 3, then the properties behind them (identities in the access log, source IP
kept, the wire shows only TLS on 15008, STRICT, live policy changes, the CA's node binding)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import require_conformance
from tests.lab.conftest import Lab, down, lab_cli, new_lab_name, up
from tests.lab.test_capture import curl, pod, redirection, wait_for

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def tutorial(root):
    """Step 1: Istio's bookinfo, bookinfo-versions and curl samples, unchanged, plus httpbin for long requests."""
    samples = require_conformance() / "samples"
    name = new_lab_name("h")
    files = [samples / "bookinfo_bookinfo.yaml", samples / "bookinfo_bookinfo-versions.yaml",
             samples / "curl_curl.yaml", samples / "httpbin_httpbin.yaml"]
    args = [a for f in files for a in ("-f", str(f))]
    try:
        lab = up(name, *args)
        yield lab
    finally:
        down(name)


def ztunnel_log(lab: Lab) -> str:
    return lab("logs", "ztunnel").stdout


def workloads(lab: Lab) -> str:
    return lab("ztunnel-config", "workloads").stdout


def test_step2_label_namespace_makes_traffic_hbone_without_restarts(tutorial: Lab):
    before = {p["metadata"]["name"]: p["status"]["podIP"] for p in tutorial.pods()}
    assert tutorial("label", "namespace", "default", "istio.io/dataplane-mode=ambient").stdout.strip() == \
        "namespace/default labeled"
    wait_for(lambda: all(redirection(p) == "enabled" for p in tutorial.pods()), what="pods enabled")
    assert {p["metadata"]["name"]: p["status"]["podIP"] for p in tutorial.pods()} == before
    # every ztunnel learns from istiod that these workloads speak HBONE now
    wait_for(lambda: all(re.search(rf"{name}\s.*HBONE", workloads(tutorial)) for name in before), timeout=10,
             what="ztunnel-config workloads PROTOCOL HBONE")
    out = curl(tutorial, "deploy/curl", "http://productpage:9080/productpage").stdout
    assert "<title>Simple Bookstore App</title>" in out


def test_access_log_shows_both_identities_across_nodes(tutorial: Lab):
    curl_pod = pod(tutorial, "curl-")
    details = pod(tutorial, "details-")
    assert curl(tutorial, "deploy/curl", "http://details:9080/details/0").returncode == 0
    log = wait_for(lambda: [l for l in ztunnel_log(tutorial).splitlines()
                            if "connection complete" in l and 'direction="inbound"' in l
                            and f"dst.addr={details['status']['podIP']}" in l.replace('"', "")] or None,
                   what="inbound access log line")
    line = log[-1]
    assert 'src.identity="spiffe://cluster.local/ns/default/sa/curl"' in line
    assert 'dst.identity="spiffe://cluster.local/ns/default/sa/bookinfo-details"' in line
    out = ztunnel_log(tutorial)
    assert re.search(r'connection complete .*src\.identity="spiffe://cluster.local/ns/default/sa/curl".*'
                     r'dst\.addr=[\d.]+:15008.*direction="outbound"', out)
    if curl_pod["spec"]["nodeName"] == details["spec"]["nodeName"]:
        pytest.fail("the scenario should put curl and details on different nodes")


def test_source_ip_is_preserved_through_hbone(tutorial: Lab):
    curl_pod = pod(tutorial, "curl-")
    out = curl(tutorial, "deploy/curl", "http://httpbin:8000/ip").stdout
    assert json.loads(out)["origin"].split(":")[0] == curl_pod["status"]["podIP"]


def test_the_wire_carries_only_tls_to_15008(tutorial: Lab):
    details = pod(tutorial, "details-")
    netns = f"{tutorial.name}-default-{details['metadata']['name']}"
    cap = subprocess.Popen(["ip", "netns", "exec", netns, "tcpdump", "-i", "eth0", "-n", "-l", "-c", "30", "-A", "tcp"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    time.sleep(0.5)
    try:
        for _ in range(3):
            curl(tutorial, "deploy/curl", "http://details:9080/details/0")
        out, _ = cap.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        cap.kill()
        out, _ = cap.communicate()
    assert ".15008" in out
    assert ".9080:" not in out and "GET /details" not in out  # no plaintext on the pod's wire


def test_decrypted_capture_shows_the_connect(tutorial: Lab):
    ratings = pod(tutorial, "ratings-")
    cap = subprocess.Popen([*LAB_CMD, "capture", "--name", tutorial.name, ratings["spec"]["nodeName"], "--decrypt",
                            "-c", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    try:
        for _ in range(3):  # a destination curl has not used yet: a new tunnel, its handshake in the capture
            curl(tutorial, "deploy/curl", "http://ratings:9080/ratings/0")
        out, err = cap.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        cap.kill()
        out, err = cap.communicate()
    assert ":method: CONNECT" in out, out + err
    assert f":authority: {ratings['status']['podIP']}:9080" in out, out
    assert "traceparent: 00-" in out and 'forwarded: for="' in out


LAB_CMD = [sys.executable, "-m", "lab"]


def test_step3_l4_policy_denies_with_a_reset(tutorial: Lab):
    policy = require_conformance() / "getting-started" / "10-l4-policy-productpage-ztunnel.yaml"
    assert "authorizationpolicy.security.istio.io/productpage-ztunnel created" in tutorial("apply", "-f", str(policy)).stdout
    try:
        p = wait_for(lambda: (r := tutorial.exec("deploy/curl", "curl", "-s", "http://productpage:9080/productpage",
                                                 check=False)).returncode == 56 and r, timeout=10, what="exit code 56")
        assert "command terminated with exit code 56" in p.stderr
        assert "allow policies exist, but none allowed" in ztunnel_log(tutorial)
    finally:
        tutorial("delete", "-f", str(policy))
    wait_for(lambda: curl(tutorial, "deploy/curl", "http://productpage:9080/productpage").returncode == 0,
             what="traffic again")


def test_policy_change_closes_a_live_connection(tutorial: Lab, tmp_path):
    deny = tmp_path / "deny.yaml"
    deny.write_text("""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-curl, namespace: default}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/curl"]}}]
""")
    slow = subprocess.Popen([*LAB_CMD, "exec", "--name", tutorial.name, "deploy/curl", "--", "curl", "-s",
                             "http://httpbin:8000/delay/8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    t0 = time.monotonic()
    try:
        tutorial("apply", "-f", str(deny))
        slow.wait(timeout=7)
        assert slow.returncode != 0 and time.monotonic() - t0 < 6
        assert "connection closed due to policy change" in ztunnel_log(tutorial)
    finally:
        if slow.poll() is None:
            slow.kill()
        tutorial("delete", "-f", str(deny))


def test_peer_authentication_strict_denies_plaintext(tutorial: Lab, tmp_path):
    f = tmp_path / "strict.yaml"
    f.write_text("""apiVersion: v1
kind: Namespace
metadata: {name: outside}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: client, namespace: outside}
spec:
  selector: {matchLabels: {app: client}}
  template:
    metadata: {labels: {app: client}}
    spec:
      containers: [{name: c, image: curlimages/curl}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec:
  mtls: {mode: STRICT}
""")
    url = "http://details.default:9080/details/0"
    tutorial("apply", "-f", str(f))
    try:
        wait_for(lambda: lab_cli("exec", "--name", tutorial.name, "-n", "outside", "deploy/client", "--", "curl", "-s",
                                 "--max-time", "3", url, check=False).returncode != 0, timeout=10, what="plaintext denied")
        assert curl(tutorial, "deploy/curl", "http://details:9080/details/0").returncode == 0  # mTLS still fine
    finally:
        tutorial("delete", "-f", str(f))


def test_ztunnel_config_tables(tutorial: Lab):
    out = tutorial("ztunnel-config", "workloads").stdout
    assert out.splitlines()[1].split() == ["NAMESPACE", "POD", "NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"]
    certs = tutorial("ztunnel-config", "certificates").stdout
    assert "spiffe://cluster.local/ns/default/sa/curl" in certs and "Leaf" in certs and "Available" in certs
    svcs = tutorial("ztunnel-config", "services").stdout
    assert re.search(r"default\s+reviews\s+10\.96\.[\d.]+\s+None\s+3/3", svcs), svcs
    metrics = tutorial("metrics").stdout
    assert 'istio_tcp_connections_opened_total{' in metrics and 'connection_security_policy="mutual_tls"' in metrics


def test_ca_signs_only_identities_on_the_callers_node(tutorial: Lab):
    """A ztunnel's credential gets certificates for its own node's workloads only (istiod's node authorization)."""
    nodes = {p["metadata"]["name"].split("-")[0]: p["spec"]["nodeName"] for p in tutorial.pods()}
    here, there = nodes["curl"], next(n for k, n in nodes.items() if n != nodes["curl"])
    script = f"""
import asyncio, sys
sys.path.insert(0, '.')
from lab.tls.identity import Identity
from lab.ztunnel.identity_manager import CaClient
from lab.tls.csr import generate_key, build_csr
async def main():
    root = open('/run/ambient-lab/{tutorial.name}/istiod/root-cert.pem', 'rb').read()
    token = open('/run/ambient-lab/{tutorial.name}/nodes/{there.removeprefix(tutorial.name + "-")}/token').read().strip()
    ca = CaClient('172.18.0.2:15012', root, token)
    ident = Identity.parse('spiffe://cluster.local/ns/default/sa/curl')
    try:
        chain = await ca.create_certificate(build_csr(generate_key(), ident), ident, 600)
        print('SIGNED', len(chain))
    except Exception as e:
        print('REFUSED', e)
asyncio.run(main())
"""
    out = subprocess.run(["ip", "netns", "exec", there, sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    assert "REFUSED" in out.stdout and "SIGNED" not in out.stdout, out.stdout + out.stderr
    assert here != there


def test_certificates_rotate_at_half_life(root, tmp_path):
    """With a 6 s TTL, ztunnel fetches a new certificate at half-life and keeps serving throughout."""
    name = new_lab_name("o")
    try:
        lab = up(name, "--nodes", "1", "--cert-ttl", "6")
        lab("label", "namespace", "default", "istio.io/dataplane-mode=ambient")
        wait_for(lambda: all(redirection(p) == "enabled" for p in lab.pods()), what="pods enabled")

        def serial_of_curl() -> str:
            out = lab("ztunnel-config", "certificates").stdout
            rows = [l.split() for l in out.splitlines() if l.startswith("spiffe://cluster.local/ns/default/sa/curl ")]
            leaf = [r for r in rows if r[1] == "Leaf" and r[2] == "Available"]
            return leaf[0][4] if leaf else ""

        first = wait_for(serial_of_curl, what="curl's certificate")
        second = wait_for(lambda: (s := serial_of_curl()) and s != first and s, timeout=12, what="a rotated certificate")
        assert second != first
        assert "Simple Bookstore App" in curl(lab, "deploy/curl", "http://productpage:9080/productpage").stdout
        out = lab("trace", "-o", "json").stdout
        assert '"ztunnel.cert.rotated"' in out or out.count('"ztunnel.cert.received"') >= 2
    finally:
        down(name)
