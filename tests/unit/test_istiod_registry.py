"""istiod's ambient registry: cluster snapshot -> Workload and Service resources (no root).

Snapshots come from the supervisor's own `cluster_snapshot` over an ApiServer loaded with Istio's
samples (through JSON, as istiod receives them), or are written by hand for the corner cases.
"""

from __future__ import annotations

import json

import pytest

from lab.istiod import registry
from lab.istiod.registry import build_addresses
from lab.kube.manifests import load_files, load_text
from lab.kube.model import REDIRECTION_ANNOTATION
from lab.supervisor.server import Supervisor
from tests.conftest import CONFORMANCE, require_conformance

SAMPLES = CONFORMANCE / "samples"


def snapshot_of(sup: Supervisor) -> dict:
    """What istiod receives: the supervisor's snapshot, through JSON."""
    return json.loads(json.dumps(sup.cluster_snapshot(), default=str))


@pytest.fixture
def sup() -> Supervisor:
    require_conformance()
    s = Supervisor("regtest", 2, [])
    s.api.apply(load_files([SAMPLES / "bookinfo_bookinfo.yaml", SAMPLES / "curl_curl.yaml"]).resources)
    for p in s.api.pods():
        p.phase = "Running"
    return s


def workloads(addresses: dict) -> dict[str, dict]:
    """Workloads by pod name."""
    return {r["workload"]["name"]: r["workload"] for r in addresses.values() if "workload" in r}


def by_prefix(wls: dict[str, dict], prefix: str) -> dict:
    (name,) = [n for n in wls if n.startswith(prefix)]
    return wls[name]


def test_every_pod_and_clusterip_service_becomes_a_resource(sup: Supervisor) -> None:
    snap = snapshot_of(sup)
    addresses = build_addresses(snap)
    pods = [p for p in snap["pods"] if p["ip"]]
    assert len(workloads(addresses)) == len(pods) == 7
    for p in pods:
        assert addresses[p["uid"]]["workload"]["addresses"] == [p["ip"]]
    services = {k: r["service"] for k, r in addresses.items() if "service" in r}
    assert set(services) == {f"default/{n}.default.svc.cluster.local"
                             for n in ("details", "ratings", "reviews", "productpage", "curl")}
    pp = services["default/productpage.default.svc.cluster.local"]
    vip = next(s["cluster_ip"] for s in snap["services"] if s["name"] == "productpage")
    assert pp == {"name": "productpage", "namespace": "default", "hostname": "productpage.default.svc.cluster.local",
                  "addresses": [vip], "ports": [{"service_port": 9080, "target_port": 9080}],
                  "subject_alt_names": [], "waypoint": None, "load_balancing": None}


def test_workload_fields_follow_workload_proto(sup: Supervisor) -> None:
    snap = snapshot_of(sup)
    wl = by_prefix(workloads(build_addresses(snap)), "reviews-v2-")
    assert wl["namespace"] == "default"
    assert wl["service_account"] == "bookinfo-reviews"
    assert wl["trust_domain"] == "cluster.local"
    assert wl["canonical_name"] == "reviews" and wl["canonical_revision"] == "v2"
    assert wl["workload_type"] == "deployment" and wl["workload_name"] == "reviews-v2"
    assert wl["services"] == {"default/reviews.default.svc.cluster.local": {"9080": 9080}}
    assert wl["status"] == "HEALTHY" and wl["capacity"] == 1
    assert wl["waypoint"] is None and wl["authorization_policies"] == []
    pod = next(p for p in snap["pods"] if p["name"] == wl["name"])
    assert wl["node"] == pod["node"] and wl["uid"] == pod["uid"]
    assert wl["tunnel_protocol"] == "NONE" and wl["native_tunnel"] is False


def test_hbone_only_once_istio_cni_annotated_the_pod(sup: Supervisor) -> None:
    """Labelling the namespace is not enough: istiod switches a workload to HBONE only when the
    node agent wrote `ambient.istio.io/redirection: enabled` (reference §1.4)."""
    sup.api.set_labels("Namespace", "", "default", {"istio.io/dataplane-mode": "ambient"})
    wls = workloads(build_addresses(snapshot_of(sup)))
    assert {w["tunnel_protocol"] for w in wls.values()} == {"NONE"}

    pods = {p.name: p for p in sup.api.pods()}
    pp = next(p for n, p in pods.items() if n.startswith("productpage-"))
    details = next(p for n, p in pods.items() if n.startswith("details-"))
    pp.meta.annotations[REDIRECTION_ANNOTATION] = "enabled"
    details.meta.annotations[REDIRECTION_ANNOTATION] = "pending"  # ztunnel not reachable yet
    wls = workloads(build_addresses(snapshot_of(sup)))
    assert wls[pp.name]["tunnel_protocol"] == "HBONE"
    assert wls[details.name]["tunnel_protocol"] == "NONE"
    assert sorted(n for n, w in wls.items() if w["tunnel_protocol"] == "HBONE") == [pp.name]


def test_native_tunnel_label() -> None:
    pod = {"name": "p", "namespace": "ns", "uid": "u1", "ip": "10.244.0.9", "node": "n", "phase": "Running",
           "labels": {"networking.istio.io/tunnel": "http"}, "annotations": {}, "owner": "",
           "service_account": "sa", "ports": {}}
    wl = build_addresses({"pods": [pod]})["u1"]["workload"]
    assert (wl["tunnel_protocol"], wl["native_tunnel"]) == ("HBONE", True)
    assert (wl["workload_type"], wl["workload_name"], wl["canonical_name"]) == ("pod", "p", "p")


def hand_snapshot() -> dict:
    def pod(name: str, ip: str, labels: dict, ports: dict, phase: str = "Running", **extra) -> dict:
        return {"name": name, "namespace": "web", "uid": f"uid-{name}" if ip else "", "ip": ip, "node": "n1",
                "phase": phase, "labels": labels, "annotations": {}, "owner": extra.get("owner", ""),
                "service_account": extra.get("sa", "default"), "ports": ports}

    return {
        "generation": 3,
        "namespaces": [{"name": "web", "labels": {"istio.io/dataplane-mode": "ambient"}}],
        "pods": [
            pod("a", "10.244.0.2", {"app": "web", "version": "v1"}, {"http": 8080}, owner="Deployment/web-v1"),
            pod("b", "10.244.0.3", {"app": "web", "service.istio.io/canonical-name": "frontend",
                                    "app.kubernetes.io/version": "2.0"}, {"http": 9090}),
            pod("c", "10.244.0.4", {"app": "web"}, {}, phase="ContainerCreating"),  # no port named http
            pod("pending", "", {"app": "web"}, {}, phase="Pending"),
            pod("dead", "10.244.0.5", {"app": "web"}, {"http": 8080}, phase="Failed"),
        ],
        "services": [
            {"name": "web", "namespace": "web", "cluster_ip": "10.96.0.20", "labels": {}, "selector": {"app": "web"},
             "ports": [{"name": "http", "port": 80, "target_port": "http", "protocol": "TCP"},
                       {"name": "admin", "port": 81, "target_port": 15000, "protocol": "TCP"}]},
            {"name": "headless", "namespace": "web", "cluster_ip": "None", "labels": {}, "selector": {"app": "web"},
             "ports": [{"name": "http", "port": 80, "target_port": 80, "protocol": "TCP"}]},
            {"name": "other-ns", "namespace": "elsewhere", "cluster_ip": "10.96.0.21", "labels": {},
             "selector": {"app": "web"}, "ports": [{"name": "x", "port": 1, "target_port": 1, "protocol": "TCP"}]},
        ],
        "objects": [],
    }


def test_named_target_ports_resolve_per_endpoint() -> None:
    addresses = build_addresses(hand_snapshot())
    svc = addresses["web/web.web.svc.cluster.local"]["service"]
    assert svc["ports"] == [{"service_port": 80, "target_port": 0}, {"service_port": 81, "target_port": 15000}]
    key = "web/web.web.svc.cluster.local"
    assert addresses["uid-a"]["workload"]["services"] == {key: {"80": 8080, "81": 15000}}
    assert addresses["uid-b"]["workload"]["services"] == {key: {"80": 9090, "81": 15000}}
    assert addresses["uid-c"]["workload"]["services"] == {key: {"81": 15000}}  # `http` unresolvable: left out


def test_what_is_left_out_and_health() -> None:
    addresses = build_addresses(hand_snapshot())
    # no IP (pending) and Failed pods are no workloads; the headless service is no Service; a
    # service of another namespace is a Service but never among this namespace's pods' services
    assert sorted(addresses) == ["elsewhere/other-ns.elsewhere.svc.cluster.local", "uid-a", "uid-b", "uid-c",
                                 "web/web.web.svc.cluster.local"]
    assert addresses["uid-a"]["workload"]["status"] == "HEALTHY"
    assert addresses["uid-c"]["workload"]["status"] == "UNHEALTHY"  # not Running: not ready
    b = addresses["uid-b"]["workload"]
    assert (b["canonical_name"], b["canonical_revision"]) == ("frontend", "2.0")
    a = addresses["uid-a"]["workload"]
    assert (a["workload_type"], a["workload_name"], a["canonical_revision"]) == ("deployment", "web-v1", "v1")


def test_trust_domain_is_passed_through() -> None:
    wl = build_addresses(hand_snapshot(), trust_domain="example.org")["uid-a"]["workload"]
    assert wl["trust_domain"] == "example.org"


def test_waypoint_seam() -> None:
    """The waypoint step plugs in a lookup; the registry puts its answer on the right objects."""
    calls = []

    def lookup(kind: str, obj: dict, ns_labels: dict) -> dict | None:
        calls.append((kind, obj["name"], ns_labels.get("istio.io/dataplane-mode")))
        if kind == "service":
            return {"address": "10.244.0.50", "hbone_mtls_port": 15008}
        return None

    addresses = build_addresses(hand_snapshot(), waypoint_of=lookup)
    assert addresses["web/web.web.svc.cluster.local"]["service"]["waypoint"] == {"address": "10.244.0.50",
                                                                               "hbone_mtls_port": 15008}
    assert addresses["uid-a"]["workload"]["waypoint"] is None
    assert ("service", "web", "ambient") in calls and ("workload", "a", "ambient") in calls


def test_selector_policies_listed_on_selected_workloads(sup: Supervisor) -> None:
    require_conformance()
    policy = CONFORMANCE / "getting-started" / "10-l4-policy-productpage-ztunnel.yaml"
    sup.api.apply(load_files([policy]).resources)
    wls = workloads(build_addresses(snapshot_of(sup)))
    assert by_prefix(wls, "productpage-")["authorization_policies"] == ["default/productpage-ztunnel"]
    assert all(w["authorization_policies"] == [] for n, w in wls.items() if not n.startswith("productpage-"))


def test_strict_peer_authentication_attaches_the_static_policy(sup: Supervisor) -> None:
    sup.api.apply(load_text("""
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
""").resources)
    wls = workloads(build_addresses(snapshot_of(sup)))
    assert {tuple(w["authorization_policies"]) for w in wls.values()} == {("istio-system/istio_converted_static_strict",)}


def test_resources_are_plain_json(sup: Supervisor) -> None:
    addresses = build_addresses(snapshot_of(sup))
    assert json.loads(json.dumps(addresses)) == addresses


def test_service_hostname() -> None:
    assert registry.service_hostname("productpage", "default") == "productpage.default.svc.cluster.local"
