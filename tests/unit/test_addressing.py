"""The network plan and the scheduler: pure, deterministic, within the kind-like address ranges."""

from __future__ import annotations

import ipaddress

from lab.kube import addressing, scheduler
from lab.kube.apiserver import ApiServer
from lab.kube.manifests import load_files
from lab.supervisor.lifecycle import default_scenario


def test_nodes_follow_kind():
    nodes = addressing.plan_nodes("demo", 2)
    assert [(n.name, n.ip, n.pod_cidr) for n in nodes] == [
        ("demo-control-plane", "172.18.0.2", "10.244.0.0/24"),
        ("demo-worker", "172.18.0.3", "10.244.1.0/24"),
        ("demo-worker2", "172.18.0.4", "10.244.2.0/24"),
    ]
    assert nodes[0].taints and not nodes[1].taints


def test_pod_ip_allocation_skips_gateway_and_used():
    assert addressing.pod_gateway("10.244.1.0/24") == "10.244.1.1"
    assert addressing.allocate_pod_ip("10.244.1.0/24", set()) == "10.244.1.2"
    assert addressing.allocate_pod_ip("10.244.1.0/24", {"10.244.1.2"}) == "10.244.1.3"


def test_service_ips_are_stable_unique_and_in_range():
    used: set[str] = set()
    ips = [addressing.allocate_service_ip("default", f"svc{i}", used) for i in range(300) if not used.add("x")]
    assert addressing.allocate_service_ip("default", "svc0", set()) == ips[0]
    for ip in ips:
        assert ipaddress.ip_address(ip) in addressing.SERVICE_NETWORK
        assert ip not in (addressing.CLUSTER_DNS_IP, addressing.KUBERNETES_SERVICE_IP)


def test_interface_names_fit_linux_limit():
    assert len(addressing.veth_name("10.244.250.254")) <= 15
    assert len(addressing.fabric_port_name(19)) <= 15


def test_default_scenario_spreads_pods_deterministically():
    def plan():
        api = ApiServer(lab="t", nodes=addressing.plan_nodes("t", 2))
        api.apply(load_files([default_scenario()]).resources)
        return {(p.name, p.node, p.ip) for p in api.pods()}

    first = plan()
    assert first == plan()
    nodes = [n for _, n, _ in first]
    assert len(first) == 8
    assert nodes.count("t-worker") == 4 and nodes.count("t-worker2") == 4  # control-plane is tainted
    assert len({ip for *_, ip in first}) == 8


def test_node_name_is_honoured_and_unknown_node_leaves_pod_pending():
    text = """
apiVersion: v1
kind: Pod
metadata: {name: pinned}
spec:
  nodeName: t-worker2
  containers: [{name: c, image: nginx}]
---
apiVersion: v1
kind: Pod
metadata: {name: lost}
spec:
  nodeName: nowhere
  containers: [{name: c, image: nginx}]
"""
    from lab.kube.manifests import load_text

    api = ApiServer(lab="t", nodes=addressing.plan_nodes("t", 2))
    api.apply(load_text(text).resources)
    pinned = api.get("Pod", "default", "pinned")
    lost = api.get("Pod", "default", "lost")
    assert pinned.node == "t-worker2" and pinned.ip.startswith("10.244.2.")
    assert lost.node == "" and lost.phase == "Pending"


def test_pod_names_look_like_kubernetes():
    api = ApiServer(lab="t", nodes=addressing.plan_nodes("t", 2))
    api.apply(load_files([default_scenario()]).resources)
    name = next(p.name for p in api.pods() if p.owner == "Deployment/reviews-v2")
    prefix, h, suffix = name.rsplit("-", 2)
    assert prefix == "reviews-v2" and len(h) == 10 and len(suffix) == 5
    assert set(h + suffix) <= set(scheduler.ALPHABET)
