"""Lab tests (root, real namespaces) for lab.kube.kubeproxy and lab.kube.dns.

Topology, all in namespaces this module creates and removes (prefix ``altest-kp-``)::

    altest-kp-client  eth0 10.244.1.2 --- kp1 10.244.1.1 \\
    altest-kp-ep1     eth0 10.244.2.2 --- kp2 10.244.2.1  >  altest-kp-node (ip_forward=1,
    altest-kp-ep2     eth0 10.244.3.2 --- kp3 10.244.3.1 /    kube-proxy rules, DNS on 10.96.0.10)

The endpoints run a tiny TCP server on :8080 that answers "<name> <peer ip>". The client
reaches them through the ClusterIP 10.96.0.50:80, which exists only as kube-proxy's DNAT
rules in the node. ``altest-kp-check`` is an empty netns for checking renderings.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from lab.kube.dns import resolv_conf
from lab.kube.kubeproxy import (
    ServiceEndpoint,
    ServicePortRule,
    install_rules,
    parse_tables,
    read_rules,
    render_rules,
    service_port_endpoint_chain_name,
    validate_rules,
)

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
CLIENT, NODE, EP1, EP2, CHECK = (f"altest-kp-{n}" for n in ("client", "node", "ep1", "ep2", "check"))
NAMESPACES = (CLIENT, NODE, EP1, EP2, CHECK)
CLUSTER_IP, SERVICE_PORT, TARGET_PORT = "10.96.0.50", 80, 8080
DNS_IP = "10.96.0.10"
ETC_NETNS = Path("/etc/netns")
CLIENT_ETC = ETC_NETNS / CLIENT

ENDPOINT_SERVER = """
import socket, sys
name = sys.argv[1]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[2])))
s.listen(128)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(f"{name} {peer[0]}\\n".encode())
    c.close()
"""

CLIENT_SCRIPT = """
import json, socket, sys
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
answers = []
for _ in range(n):
    try:
        with socket.create_connection((ip, port), timeout=3) as c:
            answers.append(c.makefile().readline().strip())
    except OSError as e:
        answers.append(type(e).__name__ + (f" {e.errno}" if e.errno else ""))
print(json.dumps(answers))
"""


def require_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("lab tests need root in CI")
        pytest.skip("lab tests need root")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {proc.returncode} {proc.stderr}")
    return proc


def in_ns(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns, *argv, check=check)


def delete_namespaces() -> None:
    existing = sh("ip", "netns", "list").stdout
    for ns in NAMESPACES:
        if re.search(rf"^{re.escape(ns)}(\s|$)", existing, re.M):
            sh("ip", "netns", "del", ns, check=False)


def start_in_ns(ns: str, argv: list[str], ready: str, procs: list) -> subprocess.Popen:
    """Start a process inside ``ns`` and wait until it prints a line containing ``ready``."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs.append(proc)
    for line in proc.stdout:
        if ready in line:
            return proc
    raise AssertionError(f"{argv} in {ns} exited with {proc.wait()} before being ready")


@pytest.fixture(scope="module")
def cluster():
    require_root()
    procs: list[subprocess.Popen] = []
    created_etc_netns = not ETC_NETNS.exists()
    delete_namespaces()  # leftovers of an interrupted run of this same module
    try:
        for ns in NAMESPACES:
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for idx, peer in ((1, CLIENT), (2, EP1), (3, EP2)):
            sh("ip", "-n", NODE, "link", "add", f"kp{idx}", "type", "veth", "peer", "name", "eth0", "netns", peer)
            sh("ip", "-n", NODE, "addr", "add", f"10.244.{idx}.1/24", "dev", f"kp{idx}")
            sh("ip", "-n", NODE, "link", "set", f"kp{idx}", "up")
            sh("ip", "-n", peer, "addr", "add", f"10.244.{idx}.2/24", "dev", "eth0")
            sh("ip", "-n", peer, "link", "set", "eth0", "up")
            sh("ip", "-n", peer, "route", "add", "default", "via", f"10.244.{idx}.1")
        in_ns(NODE, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # The node's way out (a kind node's eth0), here a veth whose far end stays down:
        # it leads nowhere. Without a route for the ClusterIP the node would answer
        # "network unreachable" before the filter REJECT of a Service without endpoints
        # is ever reached (that REJECT sits in FORWARD, after the routing decision).
        sh("ip", "-n", NODE, "link", "add", "uplink", "type", "veth", "peer", "name", "uplink-end")
        sh("ip", "-n", NODE, "link", "set", "uplink", "up")
        sh("ip", "-n", NODE, "route", "add", "default", "dev", "uplink")
        for ns, name in ((EP1, "ep1"), (EP2, "ep2")):
            start_in_ns(ns, [sys.executable, "-c", ENDPOINT_SERVER, name, str(TARGET_PORT)], "ready", procs)
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stdout:
                proc.stdout.close()
        shutil.rmtree(CLIENT_ETC, ignore_errors=True)
        if created_etc_netns and ETC_NETNS.exists() and not any(ETC_NETNS.iterdir()):
            ETC_NETNS.rmdir()
        delete_namespaces()
    assert not [ns for ns in NAMESPACES if ns in sh("ip", "netns", "list").stdout]


def service(*endpoints: str) -> list[ServicePortRule]:
    eps = [ServiceEndpoint(ip, TARGET_PORT) for ip in endpoints]
    return [ServicePortRule("default", "productpage", "http", CLUSTER_IP, SERVICE_PORT, "TCP", eps)]


def connect_many(n: int = 100) -> list[str]:
    out = in_ns(CLIENT, sys.executable, "-c", CLIENT_SCRIPT, CLUSTER_IP, str(SERVICE_PORT), str(n)).stdout
    return json.loads(out)


def comparable(text: str) -> dict[str, list[str]]:
    """kube-proxy's chains and rules per table; probabilities rounded (iptables-save prints
    the kernel's fixed-point value with 11 decimals, kube-proxy writes 10)."""
    def norm(rule: str) -> str:
        return re.sub(r"--probability (\S+)", lambda m: f"--probability {float(m.group(1)):.6f}", rule)
    out = {}
    for name, table in parse_tables(text).items():
        chains = [f":{c}" for c in table.chains if c.startswith("KUBE-")]
        rules = [norm(r) for r in table.rules if "KUBE-" in r]
        out[name] = chains + rules
    return out


def installed(ns: str) -> dict[str, list[str]]:
    return comparable(read_rules(ns, "filter") + read_rules(ns, "nat"))


# --- tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoints", [(), ("10.244.2.2",), ("10.244.2.2", "10.244.3.2", "10.244.10.2")])
def test_rendering_is_accepted_and_reads_back_identical(cluster, endpoints):
    text = render_rules(service(*endpoints))
    validate_rules(CHECK, text)  # iptables-legacy-restore --test
    install_rules(CHECK, text)
    assert installed(CHECK) == comparable(text)
    install_rules(CHECK, text)  # a second sync changes nothing, duplicates nothing
    assert installed(CHECK) == comparable(text)


def test_clusterip_balances_then_follows_endpoint_changes(cluster):
    install_rules(NODE, render_rules(service("10.244.2.2", "10.244.3.2")))
    answers = connect_many(100)
    counts = Counter(a.split()[0] for a in answers)
    assert set(counts) == {"ep1", "ep2"}, counts
    assert sum(counts.values()) == 100
    # The client is inside the cluster CIDR: not masqueraded, the endpoint sees its own IP.
    assert {a.split()[1] for a in answers} == {"10.244.1.2"}

    # ep1 goes away: one restore rewrites the chains, the stale KUBE-SEP chain is deleted.
    install_rules(NODE, render_rules(service("10.244.3.2")))
    assert Counter(a.split()[0] for a in connect_many(100)) == {"ep2": 100}
    nat = read_rules(NODE, "nat")
    declared = re.findall(r"^:(\S+)", nat, re.M)
    assert len(declared) == len(set(declared))
    assert len([c for c in declared if c.startswith("KUBE-SEP-")]) == 1
    gone = service_port_endpoint_chain_name("default/productpage:http", "tcp", f"10.244.2.2:{TARGET_PORT}")
    assert gone not in nat
    for jump in ("-A PREROUTING ", "-A OUTPUT ", "-A POSTROUTING "):
        assert nat.count(jump) == 1, jump
    assert installed(NODE) == comparable(render_rules(service("10.244.3.2")))

    # No endpoints: the filter table rejects, clients get "connection refused" at once.
    install_rules(NODE, render_rules(service()))
    assert connect_many(1) == ["ConnectionRefusedError 111"]


def test_cluster_dns_resolves_services_through_the_search_path(cluster, tmp_path):
    records = tmp_path / "dns.json"
    records.write_text(json.dumps({
        "services": {"productpage.default.svc.cluster.local": CLUSTER_IP},
        "pods": {"10-244-2-2.default.pod.cluster.local": "10.244.2.2"},
    }))
    sh("ip", "-n", NODE, "addr", "add", f"{DNS_IP}/32", "dev", "lo")
    dns = start_in_ns(NODE, [sys.executable, "-m", "lab.kube.dns", "--records", str(records), "--listen", DNS_IP],
                      "serving", cluster)
    CLIENT_ETC.mkdir(parents=True, exist_ok=True)
    (CLIENT_ETC / "resolv.conf").write_text(resolv_conf("default", DNS_IP))

    def getent(name: str) -> subprocess.CompletedProcess:
        return in_ns(CLIENT, "getent", "hosts", name, check=False)

    full = getent("productpage.default.svc.cluster.local")
    assert full.returncode == 0 and full.stdout.split()[0] == CLUSTER_IP, full
    for short in ("productpage", "productpage.default", "productpage.default.svc"):
        res = getent(short)
        assert res.returncode == 0 and res.stdout.split()[0] == CLUSTER_IP, (short, res)
    pod = getent("10-244-2-2.default.pod.cluster.local")
    assert pod.returncode == 0 and pod.stdout.split()[0] == "10.244.2.2"
    assert getent("ratings").returncode == 2  # not found

    # The supervisor rewrites the file (atomic rename): the new Service resolves.
    tmp = records.with_suffix(".tmp")
    tmp.write_text(json.dumps({"services": {"productpage.default.svc.cluster.local": CLUSTER_IP,
                                            "ratings.default.svc.cluster.local": "10.96.0.77"}}))
    os.replace(tmp, records)
    time.sleep(0.15)  # the server looks at the file at most every 100 ms
    ratings = getent("ratings")
    assert ratings.returncode == 0 and ratings.stdout.split()[0] == "10.96.0.77", ratings

    dns.terminate()
    assert dns.wait(timeout=5) == 0
    log = dns.stdout.read()
    assert re.search(r"10\.244\.1\.2:\d+ - \d+ \"A IN productpage\.default\.svc\.cluster\.local\. udp", log)
    assert "NXDOMAIN" in log  # the search-path misses
