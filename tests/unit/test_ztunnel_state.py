"""ztunnel's ProxyState (lab/ztunnel/state.py) and outbound decision (lab/ztunnel/proxy/decision.py).

Resources are the dicts istiod pushes (workload.proto / authorization.proto field names, the
shapes of lab/istiod/registry.py and authorization.py).
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from lab.proto.xds import ADDRESS_TYPE, AUTHORIZATION_TYPE, Resource
from lab.tls.identity import Identity
from lab.ztunnel.proxy.decision import Hbone, NoHealthyUpstream, Passthrough, Tcp, UnknownWaypoint, build_request
from lab.ztunnel.rbac import Connection
from lab.ztunnel.state import ProxyState, Service, Workload, weighted_choice

PP_HOST = "productpage.default.svc.cluster.local"
PP_KEY = f"default/{PP_HOST}"
REVIEWS_HOST = "reviews.default.svc.cluster.local"
REVIEWS_KEY = f"default/{REVIEWS_HOST}"


def workload(uid: str, ip: str | None, *, ns: str = "default", sa: str = "", protocol: str = "HBONE",
             services: dict | None = None, capacity: int | None = None, status: str = "HEALTHY",
             policies: list[str] | None = None, waypoint: dict | None = None, node: str = "node-1") -> dict:
    w = {"uid": uid, "name": uid.rsplit("/", 1)[-1], "namespace": ns, "addresses": [ip] if ip else [],
         "node": node, "service_account": sa, "trust_domain": "", "tunnel_protocol": protocol,
         "canonical_name": "x", "canonical_revision": "v1", "workload_type": "deployment",
         "workload_name": "x", "services": services or {}, "authorization_policies": policies or [],
         "status": status, "waypoint": waypoint}
    if capacity is not None:
        w["capacity"] = capacity
    return {"workload": w}


def service(name: str, vip: str, ports: list[tuple[int, int]], *, ns: str = "default",
            waypoint: dict | None = None, lb: dict | None = None, sans: list[str] | None = None) -> dict:
    return {"service": {"name": name, "namespace": ns, "hostname": f"{name}.{ns}.svc.cluster.local",
                        "addresses": [vip], "ports": [{"service_port": s, "target_port": t} for s, t in ports],
                        "subject_alt_names": sans or [], "waypoint": waypoint, "load_balancing": lb}}


def res(name: str, body: dict) -> Resource:
    return Resource(name, "v1", body)


def address_resources(*bodies: dict) -> list[Resource]:
    out = []
    for b in bodies:
        if "workload" in b:
            out.append(res(b["workload"]["uid"], b))
        else:
            s = b["service"]
            out.append(res(f"{s['namespace']}/{s['hostname']}", b))
    return out


def authz(name: str, ns: str, scope: str, action: str = "ALLOW", ports: list[int] | None = None) -> Resource:
    return res(f"{ns}/{name}", {"name": name, "namespace": ns, "scope": scope, "action": action,
                                "rules": [{"clauses": [{"matches": [{"destination_ports": ports or [1]}]}]}],
                                "dry_run": False})


@pytest.fixture
def bookinfo() -> ProxyState:
    """productpage (1 HBONE pod), reviews (3 pods, capacities 1/1/2, one of them not meshed),
    a legacy pod not in the mesh, a curl pod."""
    st = ProxyState()
    result = st.apply(ADDRESS_TYPE, address_resources(
        service("productpage", "10.96.0.10", [(9080, 9080)]),
        service("reviews", "10.96.0.20", [(9080, 9080)]),
        workload("Kubernetes//Pod/default/productpage-v1", "10.244.1.10", sa="bookinfo-productpage",
                 services={PP_KEY: {"9080": 9080}}),
        workload("Kubernetes//Pod/default/reviews-v1", "10.244.1.11", sa="bookinfo-reviews",
                 services={REVIEWS_KEY: {"9080": 9080}}),
        workload("Kubernetes//Pod/default/reviews-v2", "10.244.2.11", sa="bookinfo-reviews",
                 services={REVIEWS_KEY: {"9080": 9080}}),
        workload("Kubernetes//Pod/default/reviews-v3", "10.244.2.12", sa="bookinfo-reviews", capacity=2,
                 services={REVIEWS_KEY: {"9080": 9080}}),
        workload("Kubernetes//Pod/default/legacy", "10.244.2.30", protocol="NONE"),
        workload("Kubernetes//Pod/default/curl", "10.244.1.20", sa="curl"),
    ))
    assert not result.rejected and len(result.added) == 8
    return st


# ------------------------------------------------------------------------------ apply / lookup


def test_apply_indexes_workloads_and_services(bookinfo):
    w = bookinfo.find_destination("10.244.1.10")
    assert isinstance(w, Workload) and w.name == "productpage-v1"
    assert bookinfo.workload_by_ip("10.244.1.10") is w
    s = bookinfo.find_destination("10.96.0.20")
    assert isinstance(s, Service) and s.key == REVIEWS_KEY and s.target_port(9080) == 9080
    assert bookinfo.find_destination("10.244.9.9") is None
    assert bookinfo.identity(w) == Identity.of("default", "bookinfo-productpage")
    assert w.hbone and w.workload_type == "DEPLOYMENT" and w.capacity == 1
    assert sorted(bookinfo.endpoints(s)) == ["Kubernetes//Pod/default/reviews-v1",
                                             "Kubernetes//Pod/default/reviews-v2",
                                             "Kubernetes//Pod/default/reviews-v3"]


def test_elided_defaults_come_back(bookinfo):
    legacy = bookinfo.workload_by_ip("10.244.2.30")
    assert legacy.identity.uri == "spiffe://cluster.local/ns/default/sa/default"
    assert not legacy.hbone


def test_update_moves_ip_and_service_membership(bookinfo):
    r = bookinfo.apply(ADDRESS_TYPE, address_resources(
        workload("Kubernetes//Pod/default/reviews-v1", "10.244.1.99", sa="bookinfo-reviews")))
    assert r.updated == ["Kubernetes//Pod/default/reviews-v1"] and r.added == []
    assert bookinfo.workload_by_ip("10.244.1.11") is None
    assert bookinfo.workload_by_ip("10.244.1.99").name == "reviews-v1"
    assert "Kubernetes//Pod/default/reviews-v1" not in bookinfo.endpoints(bookinfo.services[REVIEWS_KEY])


def test_remove_by_uid_and_by_service_key(bookinfo):
    r = bookinfo.apply(ADDRESS_TYPE, [], ["Kubernetes//Pod/default/curl", REVIEWS_KEY, "unknown"])
    assert r.removed == ["Kubernetes//Pod/default/curl", REVIEWS_KEY]
    assert bookinfo.find_destination("10.244.1.20") is None
    assert bookinfo.find_destination("10.96.0.20") is None


@pytest.mark.parametrize("name,body,fragment", [
    ("u", {"workload": {"uid": "u", "name": "n"}}, "namespace is required"),
    ("u", {"workload": {"uid": "u", "name": "n", "namespace": "d", "addresses": ["10.0.0.300"]}}, "not an IP"),
    ("u", {"workload": {"uid": "u", "name": "n", "namespace": "d", "tunnel_protocol": "QUIC"}}, "tunnel_protocol"),
    ("u", {"workload": {"uid": "u", "name": "n", "namespace": "d", "services": {"a/b": {"x": 1}}}}, "port"),
    ("other", {"workload": {"uid": "u", "name": "n", "namespace": "d"}}, "not the workload uid"),
    ("d/h", {"service": {"name": "n", "namespace": "d", "hostname": "h", "ports": [{"service_port": -1}]}}, "port"),
    ("x", {"workload": {}, "service": {}}, "exactly one"),
    ("x", "not an object", "exactly one"),
])
def test_unparseable_resources_are_rejected_others_applied(name, body, fragment):
    st = ProxyState()
    r = st.apply(ADDRESS_TYPE, [res(name, body)] + address_resources(workload("good", "10.244.1.1")))
    assert r.added == ["good"]
    assert fragment in r.rejected[name]


def test_unknown_type_url_raises():
    with pytest.raises(ValueError):
        ProxyState().apply("type.googleapis.com/envoy.Cluster", [])


# ------------------------------------------------------------------------------ policies


def test_policies_for_namespace_global_and_selector(bookinfo):
    bookinfo.apply(AUTHORIZATION_TYPE, [
        authz("ns-wide", "default", "NAMESPACE"),
        authz("other-ns", "foo", "NAMESPACE"),
        authz("mesh-wide", "istio-system", "GLOBAL"),
        authz("pp-only", "default", "WORKLOAD_SELECTOR"),
        authz("unreferenced", "default", "WORKLOAD_SELECTOR"),
    ])
    bookinfo.apply(ADDRESS_TYPE, address_resources(workload(
        "Kubernetes//Pod/default/productpage-v1", "10.244.1.10", sa="bookinfo-productpage",
        services={PP_KEY: {"9080": 9080}}, policies=["default/pp-only", "default/missing"])))
    pp = bookinfo.workload_by_ip("10.244.1.10")
    assert [p.key for p in bookinfo.policies_for(pp)] == ["default/ns-wide", "istio-system/mesh-wide",
                                                          "default/pp-only"]
    curl = bookinfo.workload_by_ip("10.244.1.20")
    assert [p.key for p in bookinfo.policies_for(curl)] == ["default/ns-wide", "istio-system/mesh-wide"]
    r = bookinfo.apply(AUTHORIZATION_TYPE, [], ["default/ns-wide"])
    assert r.removed == ["default/ns-wide"]
    assert [p.key for p in bookinfo.policies_for(curl)] == ["istio-system/mesh-wide"]


def test_state_assert_rbac_uses_destination_workload(bookinfo):
    bookinfo.apply(AUTHORIZATION_TYPE, [authz("allow-9080", "default", "NAMESPACE", ports=[9080])])
    curl = Identity.of("default", "curl")
    assert bookinfo.assert_rbac(Connection("10.244.1.20", curl, "10.244.1.10", 9080)).allowed
    d = bookinfo.assert_rbac(Connection("10.244.1.20", curl, "10.244.1.10", 9081))
    assert (d.allowed, d.reason) == (False, "allow policies exist, but none allowed")
    assert bookinfo.assert_rbac(Connection("10.244.1.20", curl, "10.244.7.7", 9080)).reason == "workload not found"


def test_policy_rejected_on_bad_action():
    r = ProxyState().apply(AUTHORIZATION_TYPE, [res("a/b", {"name": "b", "namespace": "a", "action": "CUSTOM"})])
    assert "action" in r.rejected["a/b"]


# ------------------------------------------------------------------------------ load balancing


def test_load_balance_weighted_by_capacity(bookinfo):
    reviews = bookinfo.services[REVIEWS_KEY]
    rng = random.Random(7)
    picks = Counter(bookinfo.load_balance(reviews, 9080, rng)[0].name for _ in range(8000))
    # capacities 1, 1, 2 -> 25 %, 25 %, 50 %
    assert set(picks) == {"reviews-v1", "reviews-v2", "reviews-v3"}
    assert abs(picks["reviews-v3"] / 8000 - 0.5) < 0.03
    assert abs(picks["reviews-v1"] / 8000 - 0.25) < 0.03
    # deterministic for a given seed
    again = [bookinfo.load_balance(reviews, 9080, random.Random(3))[0].uid for _ in range(5)]
    assert len(set(again)) == 1


def test_load_balance_filters_endpoints():
    st = ProxyState()
    st.apply(ADDRESS_TYPE, address_resources(
        service("svc", "10.96.1.1", [(80, 8080), (81, 0)]),
        workload("no-address", None, services={"default/svc.default.svc.cluster.local": {"80": 8080}}),
        workload("unhealthy", "10.244.1.2", status="UNHEALTHY",
                 services={"default/svc.default.svc.cluster.local": {"80": 8080}}),
        workload("zero", "10.244.1.3", capacity=0, services={"default/svc.default.svc.cluster.local": {"80": 8080}}),
        workload("named", "10.244.1.4", services={"default/svc.default.svc.cluster.local": {"80": 8080, "81": 9999}}),
        workload("plain", "10.244.1.5", services={"default/svc.default.svc.cluster.local": {}}),
    ))
    svc = st.services["default/svc.default.svc.cluster.local"]
    rng = random.Random(1)
    seen = Counter()
    for _ in range(200):
        w, port = st.load_balance(svc, 80, rng)
        seen[(w.name, port)] += 1
    # "plain" has no port of its own for 80: the service's target port 8080 applies.
    assert set(seen) == {("named", 8080), ("plain", 8080)}
    # port 81 is a named port (target 0): only the endpoint that resolved it serves it.
    assert {st.load_balance(svc, 81, rng) for _ in range(20)} == {(st.workloads["named"], 9999)}
    assert st.load_balance(svc, 82, rng) is None  # not a service port
    # a workload referenced by an endpoint but unknown is skipped
    st.apply(ADDRESS_TYPE, [], ["named", "plain"])
    assert st.load_balance(svc, 80, rng) is None  # left: no address, unhealthy, capacity 0


def test_load_balance_allow_all_health_policy_keeps_unhealthy():
    st = ProxyState()
    st.apply(ADDRESS_TYPE, address_resources(
        service("svc", "10.96.1.1", [(80, 8080)], lb={"health_policy": "ALLOW_ALL"}),
        workload("unhealthy", "10.244.1.2", status="UNHEALTHY",
                 services={"default/svc.default.svc.cluster.local": {"80": 8080}})))
    w, port = st.load_balance(st.services["default/svc.default.svc.cluster.local"], 80, random.Random(0))
    assert (w.name, port) == ("unhealthy", 8080)


def test_weighted_choice():
    rng = random.Random(0)
    assert weighted_choice([], [], rng) is None
    assert weighted_choice(["a", "b"], [0, 0], rng) is None
    assert {weighted_choice(["a", "b", "c"], [0, 5, 0], rng) for _ in range(50)} == {"b"}


# ------------------------------------------------------------------------------ build_request

WAYPOINT_KEY = "default/waypoint.default.svc.cluster.local"


@pytest.fixture
def mesh(bookinfo) -> ProxyState:
    """bookinfo plus: a waypoint (service + pod), a service `ratings` that uses it, a pod with a
    workload waypoint, an empty service, a PASSTHROUGH service, a service whose waypoint is gone,
    and a service with subject_alt_names."""
    wp = {"address": "10.96.0.50", "hbone_mtls_port": 15008}
    bookinfo.apply(ADDRESS_TYPE, address_resources(
        service("waypoint", "10.96.0.50", [(15008, 15008)]),
        workload("Kubernetes//Pod/default/waypoint-abc", "10.244.2.50", sa="waypoint", protocol="NONE",
                 services={WAYPOINT_KEY: {"15008": 15008}}),
        service("ratings", "10.96.0.30", [(9080, 9080)], waypoint=wp),
        workload("Kubernetes//Pod/default/ratings-v1", "10.244.2.31", sa="bookinfo-ratings",
                 services={"default/ratings.default.svc.cluster.local": {"9080": 9080}}),
        workload("Kubernetes//Pod/default/details-v1", "10.244.2.40", sa="bookinfo-details", waypoint=wp),
        service("empty", "10.96.0.60", [(80, 8080)]),
        service("external", "10.96.0.61", [(443, 443)], lb={"mode": "PASSTHROUGH"}),
        service("orphan", "10.96.0.62", [(80, 80)],
                waypoint={"hostname": {"namespace": "default", "hostname": "gone.default.svc.cluster.local"}}),
        service("web", "10.96.0.70", [(80, 8080)], sans=["spiffe://cluster.local/ns/default/sa/web-canary"]),
        workload("Kubernetes//Pod/default/web-1", "10.244.1.70", sa="web",
                 services={"default/web.default.svc.cluster.local": {"80": 8080}}),
        workload("Kubernetes//Pod/default/legacy-web", "10.244.2.71", protocol="NONE",
                 services={"default/legacy.default.svc.cluster.local": {"80": 8080}}),
        service("legacy", "10.96.0.71", [(80, 8080)]),
    ))
    return bookinfo


def sa(name: str) -> Identity:
    return Identity.of("default", name)


# original dst -> (plan type, upstream, authority, expected identities, dst workload, dst service, waypoint)
DECISIONS = [
    (("10.96.0.10", 9080), Hbone, ("10.244.1.10", 15008), "10.244.1.10:9080", [sa("bookinfo-productpage")],
     "productpage-v1", PP_HOST, None),
    (("10.244.1.10", 9080), Hbone, ("10.244.1.10", 15008), "10.244.1.10:9080", [sa("bookinfo-productpage")],
     "productpage-v1", None, None),
    (("10.244.1.10", 1234), Hbone, ("10.244.1.10", 15008), "10.244.1.10:1234", [sa("bookinfo-productpage")],
     "productpage-v1", None, None),
    (("10.96.0.70", 80), Hbone, ("10.244.1.70", 15008), "10.244.1.70:8080", [sa("web"), sa("web-canary")],
     "web-1", "web.default.svc.cluster.local", None),
    (("10.244.2.30", 8080), Tcp, ("10.244.2.30", 8080), None, None, "legacy", None, None),
    (("10.96.0.71", 80), Tcp, ("10.244.2.71", 8080), None, None, "legacy-web", "legacy.default.svc.cluster.local",
     None),
    (("1.2.3.4", 443), Passthrough, ("1.2.3.4", 443), None, None, None, None, None),
    # a PASSTHROUGH service: the original destination, and no intended service (zt build_request)
    (("10.96.0.61", 443), Passthrough, ("10.96.0.61", 443), None, None, None, None, None),
    (("10.96.0.60", 80), NoHealthyUpstream, None, None, None, None, "empty.default.svc.cluster.local", None),
    (("10.96.0.10", 9999), NoHealthyUpstream, None, None, None, None, PP_HOST, None),
    (("10.96.0.30", 9080), Hbone, ("10.244.2.50", 15008), "10.96.0.30:9080", [sa("waypoint")], None,
     "ratings.default.svc.cluster.local", "waypoint-abc"),
    (("10.244.2.40", 9080), Hbone, ("10.244.2.50", 15008), "10.244.2.40:9080", [sa("waypoint")], "details-v1",
     None, "waypoint-abc"),
    (("10.96.0.62", 80), UnknownWaypoint, None, None, None, None, "orphan.default.svc.cluster.local", None),
]


@pytest.mark.parametrize("dst,kind,upstream,authority,expected,dst_workload,dst_service,waypoint", DECISIONS,
                         ids=[f"{d[0]}:{d[1]}" for d, *_ in DECISIONS])
def test_build_request_decisions(mesh, dst, kind, upstream, authority, expected, dst_workload, dst_service,
                                 waypoint):
    curl = mesh.workload_by_ip("10.244.1.20")
    plan = build_request(mesh, curl, dst, random.Random(0))
    assert type(plan) is kind, plan.reason
    assert plan.original_dst == dst
    assert plan.upstream == upstream
    assert plan.source_identity == sa("curl")
    assert (plan.destination_workload.name if plan.destination_workload else None) == dst_workload
    assert (plan.destination_service.hostname if plan.destination_service else None) == dst_service
    if kind is Hbone:
        assert plan.protocol == "HBONE"
        assert plan.authority == authority
        assert list(plan.expected_identities) == expected
        assert (plan.waypoint.name if plan.waypoint else None) == waypoint
    # what the source's access log and metrics name as the destination: via a waypoint, the waypoint
    actual = plan.actual_destination_workload
    assert (actual.name if actual else None) == (waypoint or dst_workload)
    fields = plan.event_fields()
    json.dumps(fields)  # events must be plain JSON
    assert fields["plan"] == kind.__name__ and fields["reason"] == plan.reason


def test_error_plans_carry_ztunnel_messages(mesh):
    plan = build_request(mesh, None, ("10.96.0.60", 80))
    assert isinstance(plan, NoHealthyUpstream) and plan.error == "no healthy upstream"
    assert plan.event_fields()["error"] == "no healthy upstream"
    assert plan.upstream is None and plan.protocol == ""


def test_reason_sentences_name_what_happened(mesh):
    hb = build_request(mesh, None, ("10.96.0.10", 9080), random.Random(0))
    assert "tunnel_protocol HBONE" in hb.reason and "10.244.1.10:15008" in hb.reason
    tcp = build_request(mesh, None, ("10.244.2.30", 8080))
    assert "not in the mesh" in tcp.reason
    pt = build_request(mesh, None, ("1.2.3.4", 443))
    assert "outside the mesh" in pt.reason
    wp = build_request(mesh, None, ("10.96.0.30", 9080), random.Random(0))
    assert "waypoint" in wp.reason


def test_traffic_from_the_waypoint_is_not_sent_back_to_it(mesh):
    waypoint = mesh.workload_by_ip("10.244.2.50")
    plan = build_request(mesh, waypoint, ("10.96.0.30", 9080), random.Random(0))
    assert isinstance(plan, Hbone) and plan.waypoint is None
    assert plan.upstream == ("10.244.2.31", 15008) and plan.authority == "10.244.2.31:9080"
    plan = build_request(mesh, waypoint, ("10.244.2.40", 9080))
    assert isinstance(plan, Hbone) and plan.waypoint is None and plan.upstream == ("10.244.2.40", 15008)


def test_service_load_balancing_follows_capacity(mesh):
    rng = random.Random(11)
    counts = Counter(build_request(mesh, None, ("10.96.0.20", 9080), rng).destination_workload.name
                     for _ in range(4000))
    assert abs(counts["reviews-v3"] / 4000 - 0.5) < 0.04
