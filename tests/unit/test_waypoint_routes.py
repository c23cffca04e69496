"""The waypoint's HTTPRoute handling and its configuration from the cluster (no root).

Snapshots come from the supervisor's own `cluster_snapshot()` over Istio's bookinfo samples and
the getting-started manifests (through JSON, as a component receives them); small routes are
written inline for the corner cases of the Gateway API spec.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from lab.kube.manifests import load_files, load_text
from lab.supervisor.server import Supervisor
from lab.waypoint import routes as rt
from lab.waypoint.config import WaypointNotFound, attached_waypoint, build_waypoint_config, route_status_document
from lab.waypoint.routes import (
    BackendRef,
    Request,
    RetryPolicy,
    parse_duration,
    parse_retry,
    parse_route,
    route_request,
)
from tests.conftest import CONFORMANCE, require_conformance

SAMPLES = CONFORMANCE / "samples"
GETTING_STARTED = CONFORMANCE / "getting-started"
BOOKINFO = [SAMPLES / "bookinfo_bookinfo.yaml", SAMPLES / "bookinfo_bookinfo-versions.yaml", SAMPLES / "curl_curl.yaml"]
ENROL_NAMESPACE = """
apiVersion: v1
kind: Namespace
metadata:
  name: default
  labels:
    istio.io/use-waypoint: waypoint
"""


def bookinfo_snapshot(*files: Path, yaml: str = "", enrol: bool = True, waypoint: bool = True) -> dict:
    """Bookinfo + curl, the getting-started waypoint (default/waypoint) and the namespace label
    `istioctl waypoint apply --enroll-namespace` sets, plus `files` and inline `yaml`."""
    require_conformance()
    sup = Supervisor("wptest", 2, [])
    paths = list(BOOKINFO) + ([GETTING_STARTED / "20-waypoint.yaml"] if waypoint else []) + list(files)
    sup.api.apply(load_files(paths).resources)
    text = (ENROL_NAMESPACE if enrol else "") + ("\n---\n" + yaml if yaml else "")
    if text.strip():
        sup.api.apply(load_text(text).resources)
    for p in sup.api.pods():
        p.phase = "Running"
    return json.loads(json.dumps(sup.cluster_snapshot(), default=str))


def route_of(yaml: str, namespace: str = "default") -> rt.Route:
    import yaml as pyyaml

    doc = pyyaml.safe_load(yaml)
    return parse_route(namespace, doc["metadata"]["name"], doc)


def req(path: str = "/", method: str = "GET", headers: dict | None = None) -> Request:
    return Request(method=method, path=path, headers=tuple((headers or {}).items()), authority="svc:9080")


SELF = BackendRef(name="svc", namespace="default", port=9080)


# ---------------------------------------------------------------------------------------------
# Durations


@pytest.mark.parametrize("text,seconds", [("10s", 10), ("500ms", 0.5), ("1h30m", 5400), ("1.5s", 1.5),
                                          ("0s", 0), ("2m", 120), (3, 3)])
def test_parse_duration(text, seconds) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "10", "ten", "10x", "-1s", "s10"])
def test_parse_duration_rejects(bad) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


# ---------------------------------------------------------------------------------------------
# Matching


def test_path_prefix_is_element_wise() -> None:
    m = rt.PathMatch("PathPrefix", "/abc")
    assert m.matches("/abc") and m.matches("/abc/") and m.matches("/abc/def")
    assert not m.matches("/abcd") and not m.matches("/ab")
    slash = rt.PathMatch("PathPrefix", "/abc/")  # a trailing slash in the prefix is ignored
    assert slash.matches("/abc") and slash.matches("/abc/x") and not slash.matches("/abcd")
    root = rt.PathMatch("PathPrefix", "/")
    assert root.matches("/") and root.matches("/anything/at/all")


def test_request_path_is_matched_without_query_and_normalized() -> None:
    r = req("/static/../productpage?u=normal")
    assert r.path_only == "/productpage"
    assert rt.PathMatch("Exact", "/productpage").matches(r.path_only)
    assert r.query_param("u") == "normal"
    assert Request("GET", "/a/./b/").path_only == "/a/b/"


def test_bookinfo_gateway_route_matches() -> None:
    require_conformance()
    docs = load_files([SAMPLES / "bookinfo_gwapi_bookinfo-gateway.yaml"]).resources
    raw = next(r for r in docs if r.kind == "HTTPRoute").raw
    route = parse_route("default", "bookinfo", raw)
    assert route.accepted and len(route.rules[0].matches) == 5
    for path, hit in [("/productpage", True), ("/productpage/x", False), ("/static/css/a.css", True),
                      ("/staticx", False), ("/login", True), ("/api/v1/products/1/reviews", True),
                      ("/api/v1/productsX", False), ("/", False)]:
        assert (rt.select_rule([route], req(path)) is not None) is hit, path


def test_header_query_and_method_conditions() -> None:
    route = route_of("""
metadata: {name: r}
spec:
  parentRefs: [{kind: Service, group: "", name: svc}]
  rules:
  - matches:
    - headers: [{name: End-User, value: jason}]
      queryParams: [{name: v, type: RegularExpression, value: "[0-9]+"}]
      method: POST
    backendRefs: [{name: a, port: 9080}]
""")
    m = route.rules[0].matches[0]
    assert m.matches(req("/x?v=12", "POST", {"end-user": "jason"}))  # header names are case-insensitive
    assert not m.matches(req("/x?v=12", "GET", {"end-user": "jason"}))
    assert not m.matches(req("/x?v=12a", "POST", {"end-user": "jason"}))  # the whole value must match
    assert not m.matches(req("/x?v=12", "POST", {"end-user": "Jason"}))  # values are case-sensitive
    assert not m.matches(req("/x", "POST", {"end-user": "jason"}))


def test_repeated_headers_are_joined_with_commas() -> None:
    m = rt.ValueMatch("x-a", "1,2")
    r = Request("GET", "/", headers=(("X-A", "1"), ("x-a", "2")))
    assert m.matches(r.header("x-a"))


def test_regex_path_must_match_whole_path() -> None:
    m = rt.PathMatch("RegularExpression", "/api/v[0-9]+", rt.compile_regex("/api/v[0-9]+", "t"))
    assert m.matches("/api/v2") and not m.matches("/api/v2/x")


@pytest.mark.parametrize("pattern", ["(unclosed", "a(?=b)", "(a)\\1"])
def test_invalid_or_non_re2_regex_makes_route_not_accepted(pattern) -> None:
    route = route_of(f"""
metadata: {{name: r}}
spec:
  parentRefs: [{{kind: Service, name: svc}}]
  rules:
  - matches: [{{path: {{type: RegularExpression, value: '{pattern}'}}}}]
""")
    assert not route.accepted and "regular expression" in route.problems[0]
    assert route_request([route], req("/"), SELF).backend == SELF  # not accepted: as if absent


# ---------------------------------------------------------------------------------------------
# Precedence


def _routes(*docs: str) -> list[rt.Route]:
    return [route_of(d) for d in docs]


def _backend(routes, request) -> str:
    d = route_request(routes, request, SELF, random.Random(1))
    return d.backend.name if d.backend else str(d.status)


def test_precedence_exact_then_longest_prefix_across_routes() -> None:
    routes = _routes(
        "{metadata: {name: a}, spec: {rules: [{matches: [{path: {type: PathPrefix, value: /api}}], backendRefs: [{name: short, port: 1}]}]}}",
        "{metadata: {name: b}, spec: {rules: [{matches: [{path: {type: PathPrefix, value: /api/v1}}], backendRefs: [{name: long, port: 1}]}]}}",
        "{metadata: {name: c}, spec: {rules: [{matches: [{path: {type: Exact, value: /api/v1/x}}], backendRefs: [{name: exact, port: 1}]}]}}",
        "{metadata: {name: d}, spec: {rules: [{matches: [{path: {type: RegularExpression, value: /api/.*}}], backendRefs: [{name: regex, port: 1}]}]}}",
    )
    assert _backend(routes, req("/api/v1/x")) == "exact"
    assert _backend(routes, req("/api/v1/y")) == "regex"  # Istio ranks regex above any prefix
    assert _backend(routes[:3], req("/api/v1/y")) == "long"
    assert _backend(routes[:3], req("/api/v2")) == "short"
    assert _backend(routes[:3], req("/other")) == "404"


def test_precedence_method_then_headers_then_query() -> None:
    routes = _routes("""
metadata: {name: r}
spec:
  rules:
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: plain, port: 1}]
  - matches: [{path: {type: PathPrefix, value: /}, queryParams: [{name: q, value: "1"}]}]
    backendRefs: [{name: query, port: 1}]
  - matches: [{path: {type: PathPrefix, value: /}, headers: [{name: h, value: "1"}]}]
    backendRefs: [{name: header, port: 1}]
  - matches: [{path: {type: PathPrefix, value: /}, headers: [{name: h, value: "1"}, {name: g, value: "1"}]}]
    backendRefs: [{name: two-headers, port: 1}]
  - matches: [{path: {type: PathPrefix, value: /}, method: DELETE}]
    backendRefs: [{name: method, port: 1}]
""")
    assert _backend(routes, req("/x?q=1", "DELETE", {"h": "1", "g": "1"})) == "method"
    assert _backend(routes, req("/x?q=1", "GET", {"h": "1", "g": "1"})) == "two-headers"
    assert _backend(routes, req("/x?q=1", "GET", {"h": "1"})) == "header"
    assert _backend(routes, req("/x?q=1")) == "query"
    assert _backend(routes, req("/x")) == "plain"


def test_ties_go_to_the_first_route_then_first_rule() -> None:
    a, b = _routes(
        "{metadata: {name: a}, spec: {rules: [{backendRefs: [{name: a0, port: 1}]}, {backendRefs: [{name: a1, port: 1}]}]}}",
        "{metadata: {name: b}, spec: {rules: [{backendRefs: [{name: b0, port: 1}]}]}}")
    assert _backend([a, b], req("/")) == "a0"
    assert _backend([b, a], req("/")) == "b0"


# ---------------------------------------------------------------------------------------------
# Backends


def test_weighted_choice_follows_weights_and_skips_zero() -> None:
    refs = [BackendRef("v1", "default", 9080, 90), BackendRef("v2", "default", 9080, 10),
            BackendRef("v3", "default", 9080, 0)]
    rng = random.Random(7)
    counts = Counter(rt.choose_backend(refs, rng).name for _ in range(10000))
    assert counts["v3"] == 0
    assert 0.88 < counts["v1"] / 10000 < 0.92


def test_all_zero_weights_answer_500() -> None:
    route = route_of("{metadata: {name: r}, spec: {rules: [{backendRefs: [{name: a, port: 1, weight: 0}]}]}}")
    assert "weight 0" in route.warnings[0]
    d = route_request([route], req("/"), SELF)
    assert d.status == 500 and d.backend is None and d.route_name == "default.r.0"


def test_no_route_goes_to_the_service_and_unmatched_gets_404() -> None:
    d = route_request([], req("/"), SELF)
    assert d.status is None and d.backend == SELF and d.route_name == "default"
    route = route_of("{metadata: {name: r}, spec: {rules: [{matches: [{path: {type: Exact, value: /a}}], backendRefs: [{name: a, port: 1}]}]}}")
    d = route_request([route], req("/b"), SELF)
    assert (d.status, d.response_flags, d.details) == (404, "NR", "route_not_found")


def test_rule_without_backends_goes_to_the_parent_service() -> None:
    route = route_of("{metadata: {name: r}, spec: {rules: [{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x, value: y}]}}]}]}}")
    d = route_request([route], req("/"), SELF)
    assert d.status is None and d.backend == SELF and len(d.filters) == 1


def test_invalid_backend_gets_its_share_of_500s() -> None:
    snap = bookinfo_snapshot(yaml="""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 9080}, {name: reviews-v9, port: 9080}]
""")
    cfg = build_waypoint_config(snap, "default", "waypoint")
    status = cfg.route_status["default/reviews"]
    resolved = status.condition("Service/default/reviews:9080", "ResolvedRefs")
    accepted = status.condition("Service/default/reviews:9080", "Accepted")
    assert (resolved.status, resolved.reason) == ("False", "BackendNotFound") and "reviews-v9" in resolved.message
    assert accepted.status == "True"
    svc = cfg.service_at(cfg.services["reviews.default.svc.cluster.local"].vip, 9080)
    rng = random.Random(3)
    outcomes = Counter()
    for _ in range(2000):
        d = route_request(svc.routes_for(9080, "default"), req("/reviews/0"), svc.backend_ref(9080), rng)
        outcomes[d.status or d.backend.name] += 1
    assert set(outcomes) == {500, "reviews-v1"}
    assert 0.45 < outcomes[500] / 2000 < 0.55


def test_missing_backend_port_and_wrong_kind_are_reported() -> None:
    snap = bookinfo_snapshot(yaml="""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ratings, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: ratings}]
  rules:
  - backendRefs: [{name: ratings-v1, port: 9999}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: details, namespace: default}
spec:
  parentRefs: [{group: core, kind: Service, name: details}]
  rules:
  - backendRefs: [{name: details-v1, kind: ServiceImport, group: multicluster.x-k8s.io, port: 9080}]
""")
    cfg = build_waypoint_config(snap, "default", "waypoint")
    c = cfg.route_status["default/ratings"].condition("Service/default/ratings", "ResolvedRefs")
    assert (c.status, c.reason) == ("False", "BackendNotFound") and "no port 9999" in c.message
    c = cfg.route_status["default/details"].condition("Service/default/details", "ResolvedRefs")
    assert (c.status, c.reason) == ("False", "InvalidKind")


def test_parent_port_the_service_lacks_is_not_accepted() -> None:
    snap = bookinfo_snapshot(yaml="""
apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata: {name: reviews, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 8080}]
  rules: [{backendRefs: [{name: reviews-v2, port: 9080}]}]
""")
    cfg = build_waypoint_config(snap, "default", "waypoint")
    c = cfg.route_status["default/reviews"].condition("Service/default/reviews:8080", "Accepted")
    assert (c.status, c.reason) == ("False", "NoMatchingParent")
    assert cfg.services["reviews.default.svc.cluster.local"].routes_for(9080, "default") == []


# ---------------------------------------------------------------------------------------------
# The getting-started 90/10 split, end to end through the config


def test_getting_started_reviews_90_10() -> None:
    snap = bookinfo_snapshot(GETTING_STARTED / "50-httproute-reviews-90-10.yaml")
    cfg = build_waypoint_config(snap, "default", "waypoint")
    assert cfg.route_status["default/reviews"].condition("Service/default/reviews:9080", "ResolvedRefs").status == "True"
    svc = cfg.services["reviews.default.svc.cluster.local"]
    assert cfg.service_at(svc.vip, 9080) is svc and cfg.service_at(svc.vip, 9081) is None
    rng = random.Random(2024)
    pods = Counter()
    for _ in range(1000):
        d = route_request(svc.routes_for(9080, "default"), req("/reviews/0"), svc.backend_ref(9080), rng)
        assert d.status is None and d.route_name == "default.reviews.0"
        backend = cfg.backend(d.backend)
        ep = rt.pick_endpoint(backend.endpoints, rng)
        pods[ep.pod.rsplit("-", 2)[0]] += 1
        assert backend.cluster_name == f"inbound-vip|9080|http|{d.backend.name}.default.svc.cluster.local"
    assert set(pods) == {"reviews-v1", "reviews-v2"}
    assert 0.87 < pods["reviews-v1"] / 1000 < 0.93


def test_route_all_v1_sends_every_service_to_v1() -> None:
    snap = bookinfo_snapshot(SAMPLES / "bookinfo_gwapi_route-all-v1.yaml")
    cfg = build_waypoint_config(snap, "default", "waypoint")
    for name in ("reviews", "productpage", "ratings", "details"):
        svc = cfg.services[f"{name}.default.svc.cluster.local"]
        d = route_request(svc.routes_for(9080, "default"), req("/"), svc.backend_ref(9080), random.Random(0))
        backend = cfg.backend(d.backend)
        assert backend.name == f"{name}-v1"
        assert {e.version for e in backend.endpoints} == {"v1"}
        assert all(e.app == name and e.port == 9080 for e in backend.endpoints)


def test_backend_endpoints_carry_pod_facts() -> None:
    snap = bookinfo_snapshot()
    cfg = build_waypoint_config(snap, "default", "waypoint")
    backend = cfg.backends[("default", "reviews", 9080)]
    pods = {p["name"]: p for p in snap["pods"]}
    assert len(backend.endpoints) == 3
    for ep in backend.endpoints:
        pod = pods[ep.pod]
        assert (ep.ip, ep.node, ep.service_account) == (pod["ip"], pod["node"], "bookinfo-reviews")
        assert ep.identity.uri == "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
        assert ep.address == f"{pod['ip']}:9080" and ep.workload.startswith("reviews-v")
    assert cfg.identity.uri == "spiffe://cluster.local/ns/default/sa/waypoint"


# ---------------------------------------------------------------------------------------------
# Attachment


def test_attached_waypoint_rules() -> None:
    ns = {"istio.io/use-waypoint": "waypoint"}
    assert attached_waypoint({}, "default", ns) == ("default", "waypoint")
    assert attached_waypoint({"istio.io/use-waypoint": "other"}, "default", ns) == ("default", "other")
    assert attached_waypoint({"istio.io/use-waypoint": "none"}, "default", ns) is None
    assert attached_waypoint({}, "default", {}) is None
    assert attached_waypoint({"istio.io/use-waypoint": "wp", "istio.io/use-waypoint-namespace": "infra"},
                             "default", {}) == ("infra", "wp")


def test_service_label_beats_namespace_label_and_none_opts_out() -> None:
    snap = bookinfo_snapshot(yaml="""
apiVersion: v1
kind: Service
metadata: {name: ratings, labels: {istio.io/use-waypoint: none}}
spec: {selector: {app: ratings}, ports: [{port: 9080, name: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: details, labels: {istio.io/use-waypoint: other}}
spec: {selector: {app: details}, ports: [{port: 9080, name: http}]}
""")
    names = {s.name for s in build_waypoint_config(snap, "default", "waypoint").services.values()}
    assert "ratings" not in names and "details" not in names
    assert {"productpage", "reviews", "reviews-v1", "curl"} <= names


def test_service_label_without_namespace_label() -> None:
    snap = bookinfo_snapshot(enrol=False, yaml="""
apiVersion: v1
kind: Service
metadata: {name: reviews, labels: {istio.io/use-waypoint: waypoint}}
spec: {selector: {app: reviews}, ports: [{port: 9080, name: http}]}
""")
    cfg = build_waypoint_config(snap, "default", "waypoint")
    assert list(cfg.services) == ["reviews.default.svc.cluster.local"] and cfg.workloads == {}


@pytest.mark.parametrize("waypoint_for,services,workloads", [("service", True, False), ("workload", False, True),
                                                             ("all", True, True), ("none", False, False)])
def test_waypoint_for(waypoint_for, services, workloads) -> None:
    snap = bookinfo_snapshot(waypoint=False, yaml=f"""
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, labels: {{istio.io/waypoint-for: {waypoint_for}}}}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
""")
    cfg = build_waypoint_config(snap, "default", "waypoint")
    assert bool(cfg.services) is services and bool(cfg.workloads) is workloads
    if workloads:
        assert len(cfg.workloads) == 7 and all(e.ip == ip for ip, e in cfg.workloads.items())


def test_cross_namespace_use_needs_allowed_routes() -> None:
    gateway = """
apiVersion: v1
kind: Namespace
metadata: {{name: infra}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: shared, namespace: infra}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE{allowed}}}]
---
apiVersion: v1
kind: Service
metadata:
  name: reviews
  labels: {{istio.io/use-waypoint: shared, istio.io/use-waypoint-namespace: infra}}
spec: {{selector: {{app: reviews}}, ports: [{{port: 9080, name: http}}]}}
"""
    closed = build_waypoint_config(bookinfo_snapshot(enrol=False, yaml=gateway.format(allowed="")), "infra", "shared")
    assert closed.services == {}
    opened = build_waypoint_config(bookinfo_snapshot(enrol=False, yaml=gateway.format(
        allowed=", allowedRoutes: {namespaces: {from: All}}")), "infra", "shared")
    assert list(opened.services) == ["reviews.default.svc.cluster.local"]


def test_unknown_waypoint_raises() -> None:
    with pytest.raises(WaypointNotFound):
        build_waypoint_config(bookinfo_snapshot(), "default", "nope")


def test_consumer_route_applies_only_to_its_namespace() -> None:
    snap = bookinfo_snapshot(yaml="""
apiVersion: v1
kind: Namespace
metadata: {name: team}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: default}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews}]
  rules: [{backendRefs: [{name: reviews-v1, port: 9080}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: my-reviews, namespace: team}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews, namespace: default}]
  rules: [{backendRefs: [{name: reviews-v3, namespace: default, port: 9080}]}]
""")
    svc = build_waypoint_config(snap, "default", "waypoint").services["reviews.default.svc.cluster.local"]
    pick = lambda ns: route_request(svc.routes_for(9080, ns), req("/"), svc.backend_ref(9080)).backend.name  # noqa: E731
    assert pick("team") == "reviews-v3"
    assert pick("default") == "reviews-v1" and pick("other") == "reviews-v1"


def test_section_name_scopes_a_route_to_one_port() -> None:
    snap = bookinfo_snapshot(yaml="""
apiVersion: v1
kind: Service
metadata: {name: multi}
spec:
  selector: {app: reviews}
  ports: [{port: 9080, name: http}, {port: 9090, name: admin, targetPort: 9080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: admin-only}
spec:
  parentRefs: [{kind: Service, group: "", name: multi, sectionName: admin}]
  rules: [{backendRefs: [{name: reviews-v2, port: 9080}]}]
""")
    svc = build_waypoint_config(snap, "default", "waypoint").services["multi.default.svc.cluster.local"]
    assert [r.name for r in svc.routes_for(9090)] == ["admin-only"]
    assert svc.routes_for(9080) == []


# ---------------------------------------------------------------------------------------------
# Timeouts and retries


def test_timeouts_and_route_retry() -> None:
    route = route_of("""
metadata: {name: r}
spec:
  rules:
  - timeouts: {request: 10s, backendRequest: 2s}
    retry: {attempts: 4, codes: [500, 502], backoff: 100ms}
    backendRefs: [{name: a, port: 1}]
  - timeouts: {request: 0s}
    backendRefs: [{name: b, port: 1}]
""")
    r0, r1 = route.rules
    assert r0.timeout == 10 and r0.retry.per_try_timeout == 2
    assert (r0.retry.attempts, r0.retry.retriable_status_codes, r0.retry.backoff_base) == (4, (500, 502), 0.1)
    assert r1.timeout is None and r1.retry == rt.ISTIO_DEFAULT_RETRY
    d = route_request([route], req("/"), SELF, random.Random(0))
    assert d.timeout == 10 and d.retry.attempts == 4


def test_backend_timeout_longer_than_request_is_rejected() -> None:
    route = route_of("{metadata: {name: r}, spec: {rules: [{timeouts: {request: 1s, backendRequest: 2s}}]}}")
    assert not route.accepted and "backendRequest" in route.problems[0]


def test_istio_default_retry_policy_retries_failures_to_connect_but_no_status_code() -> None:
    p = RetryPolicy()
    assert p.attempts == 2 and p.per_try_timeout is None
    assert p.retriable("connect-failure") and p.retriable("refused-stream")
    assert not p.retriable(503)  # retriable-status-codes with an empty list: Envoy retries no code
    assert not p.retriable(500) and not p.retriable(502) and not p.retriable("reset")
    assert not p.retriable("overflow") and not p.retriable(200)
    assert p.should_retry(0, "connect-failure") and p.should_retry(1, "connect-failure")
    assert not p.should_retry(2, "connect-failure")


def test_an_httproute_retry_retries_a_status_code_only_when_it_lists_it() -> None:
    without = parse_retry({"attempts": 3}, None)
    assert without.attempts == 3 and not without.retriable(503) and without.retriable("connect-failure")
    assert "retriable-status-codes" not in without.retry_on
    with_codes = parse_retry({"attempts": 2, "codes": [503, 504]}, None)
    assert with_codes.retriable(503) and with_codes.retriable(504) and not with_codes.retriable(500)
    assert with_codes.should_retry(1, 503) and not with_codes.should_retry(2, 503)


@pytest.mark.parametrize("retry_on,outcome,expected", [
    ("5xx", 500, True), ("5xx", "reset", True), ("5xx", "per-try-timeout", True), ("5xx", 404, False),
    ("gateway-error", 502, True), ("gateway-error", 500, False), ("gateway-error", "connect-failure", True),
    ("reset", "reset", True), ("reset", 503, False), ("connect-failure", "reset", False),
    ("connect-failure", "connect-failure", True), ("5xx", "overflow", False),
])
def test_retry_conditions(retry_on, outcome, expected) -> None:
    assert RetryPolicy(retry_on=(retry_on,)).retriable(outcome) is expected


def test_backoff_is_jittered_and_capped() -> None:
    p = RetryPolicy(backoff_base=0.1)
    rng = random.Random(5)
    for n in range(6):
        for _ in range(50):
            assert 0 <= p.backoff(n, rng) <= min(1.0, 0.1 * 2 ** n)


# ---------------------------------------------------------------------------------------------
# Load balancing


class Ep:
    def __init__(self, address: str) -> None:
        self.address = address


def test_pick_endpoint_policies() -> None:
    eps = [Ep("10.0.0.1:80"), Ep("10.0.0.2:80"), Ep("10.0.0.3:80")]
    rng = random.Random(9)
    assert rt.pick_endpoint([], rng) is None
    # a retry avoids endpoints already tried, unless none is left
    assert {rt.pick_endpoint(eps, rng, exclude=["10.0.0.1:80", "10.0.0.2:80"]).address for _ in range(20)} == {"10.0.0.3:80"}
    assert rt.pick_endpoint(eps[:1], rng, exclude=["10.0.0.1:80"]).address == "10.0.0.1:80"
    # least request: of two random picks, the one with fewer requests in flight
    busy = {"10.0.0.1:80": 5, "10.0.0.2:80": 5, "10.0.0.3:80": 0}
    picks = Counter(rt.pick_endpoint(eps, rng, active=busy).address for _ in range(300))
    assert picks["10.0.0.3:80"] > 150 and picks["10.0.0.3:80"] > picks["10.0.0.1:80"] * 3
    # uniform random without counts
    picks = Counter(rt.pick_endpoint(eps, rng).address for _ in range(3000))
    assert all(800 < n < 1200 for n in picks.values())
    counter = iter(range(100))
    rr = [rt.pick_endpoint(eps, rng, policy="ROUND_ROBIN", round_robin=lambda: next(counter)).address for _ in range(4)]
    assert rr == ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.1:80"]


def test_route_status_document_is_gateway_apis_route_status() -> None:
    snap = bookinfo_snapshot(yaml="""
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}, {group: "", kind: Service, name: reviews, port: 8080}]
  rules: [{backendRefs: [{name: reviews-v9, port: 9080}]}]
""")
    doc = route_status_document(build_waypoint_config(snap, "default", "waypoint").route_status["default/reviews"])
    assert [p["parentRef"] for p in doc["parents"]] == [
        {"group": "", "kind": "Service", "name": "reviews", "namespace": "default", "port": 8080},
        {"group": "", "kind": "Service", "name": "reviews", "namespace": "default", "port": 9080}]
    assert {p["controllerName"] for p in doc["parents"]} == {"istio.io/mesh-controller"}
    by_port = {p["parentRef"]["port"]: {c["type"]: c for c in p["conditions"]} for p in doc["parents"]}
    assert by_port[8080]["Accepted"]["reason"] == "NoMatchingParent"
    assert by_port[9080]["Accepted"]["status"] == "True"
    assert (by_port[9080]["ResolvedRefs"]["status"], by_port[9080]["ResolvedRefs"]["reason"]) == ("False",
                                                                                                 "BackendNotFound")
