"""L7 AuthorizationPolicy at the waypoint (no root): the getting-started truth table, then the
semantics of each field, then which policies reach the waypoint."""

from __future__ import annotations

import pytest
import yaml

from lab.tls.identity import Identity
from lab.waypoint import authz
from lab.waypoint.authz import Attributes, evaluate, parse_policy
from lab.waypoint.config import build_waypoint_config
from lab.waypoint.routes import Request
from tests.unit.test_waypoint_routes import GETTING_STARTED, bookinfo_snapshot

CURL = Identity.of("default", "curl")
REVIEWS = Identity.of("default", "bookinfo-reviews")


def attrs(method: str = "GET", path: str = "/", *, identity: Identity | None = CURL, host: str = "productpage:9080",
          headers: dict | None = None, src: str = "10.244.1.2", dst: str = "10.96.0.20", port: int = 9080) -> Attributes:
    request = Request(method, path, headers=tuple((headers or {}).items()), authority=host)
    return Attributes(request=request, source_ip=src, source_identity=identity, destination_ip=dst,
                      destination_port=port)


def policy(doc: str, namespace: str = "default", name: str = "p") -> authz.L7Policy:
    return parse_policy(namespace, name, yaml.safe_load(doc))


# ---------------------------------------------------------------------------------------------
# The getting-started tutorial, through the waypoint's config


@pytest.fixture(scope="module")
def getting_started():
    snap = bookinfo_snapshot(GETTING_STARTED / "10-l4-policy-productpage-ztunnel.yaml",
                             GETTING_STARTED / "30-l7-policy-productpage-waypoint.yaml")
    return build_waypoint_config(snap, "default", "waypoint")


@pytest.mark.parametrize("method,identity,allowed", [
    ("DELETE", CURL, False),  # `curl -X DELETE` from curl: RBAC: access denied
    ("GET", REVIEWS, False),  # the GET from deploy/reviews-v1
    ("GET", CURL, True),  # the GET from deploy/curl: the page
    ("GET", None, False),  # plaintext has no principal
    ("POST", CURL, False),
])
def test_getting_started_l7_policy(getting_started, method, identity, allowed) -> None:
    svc = getting_started.services["productpage.default.svc.cluster.local"]
    assert [p.key for p in getting_started.policies_for(svc)] == ["default/productpage-waypoint"]
    d = evaluate(getting_started.policies_for(svc), attrs(method, "/productpage", identity=identity, dst=svc.vip))
    assert d.allowed is allowed
    if allowed:
        assert (d.status, d.policy, d.reason) == (None, "default/productpage-waypoint", "allowed by: default/productpage-waypoint")
    else:
        assert (d.status, d.body) == (403, "RBAC: access denied")
        assert d.reason == "allow policies exist, but none allowed"
        assert d.details == "rbac_access_denied_matched_policy[none]"


def test_getting_started_policy_targets_only_productpage(getting_started) -> None:
    reviews = getting_started.services["reviews.default.svc.cluster.local"]
    assert getting_started.policies_for(reviews) == []
    assert evaluate(getting_started.policies_for(reviews), attrs("DELETE", identity=REVIEWS)).allowed
    # the selector policy (10-l4-...) is ztunnel's, not the waypoint's
    assert "default/productpage-ztunnel" not in getting_started.policy_status


# ---------------------------------------------------------------------------------------------
# Decision order


def test_deny_before_allow() -> None:
    allow = policy("{spec: {action: ALLOW, rules: [{}]}}", name="allow-all")
    deny = policy("{spec: {action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]}}", name="no-delete")
    d = evaluate([allow, deny], attrs("DELETE"))
    assert not d.allowed and d.policy == "default/no-delete" and d.reason == "explicitly denied by: default/no-delete"
    assert d.details == "rbac_access_denied_matched_policy[ns[default]-policy[no-delete]-rule[0]]"
    assert evaluate([allow, deny], attrs("GET")).allowed
    assert evaluate([deny], attrs("GET")).reason == "no ALLOW policy applies"


def test_allow_policy_without_rules_denies_everything_and_empty_rule_allows_everything() -> None:
    assert not evaluate([policy("{spec: {}}")], attrs()).allowed
    assert evaluate([policy("{spec: {rules: [{}]}}")], attrs(identity=None)).allowed
    assert evaluate([policy("{spec: {action: DENY}}")], attrs()).allowed  # a DENY without rules denies nothing


# ---------------------------------------------------------------------------------------------
# Fields


@pytest.mark.parametrize("pattern,path,hit", [
    ("/productpage", "/productpage", True), ("/productpage", "/productpage?u=1", True),
    ("/productpage", "/productpage/x", False), ("/api/*", "/api/v1/products", True), ("/api/*", "/apix", False),
    ("*.css", "/static/site.css", True), ("*", "/anything", True),
    ("/api/{*}/products", "/api/v1/products", True), ("/api/{*}/products", "/api/v1/x/products", False),
    ("/static/{**}", "/static/a/b/c.css", True), ("/static/{**}", "/static/", False),
    ("/a/b", "/a/./x/../b", True),
])
def test_paths(pattern, path, hit) -> None:
    p = policy(f"{{spec: {{rules: [{{to: [{{operation: {{paths: ['{pattern}']}}}}]}}]}}}}")
    assert evaluate([p], attrs(path=path)).allowed is hit


def test_methods_hosts_ports_and_their_negations() -> None:
    p = policy("""
spec:
  rules:
  - to:
    - operation: {methods: [GET, HEAD], hosts: [productpage*], notPorts: ["9090"]}
""")
    assert evaluate([p], attrs("GET", host="ProductPage:9080")).allowed  # hosts ignore case, with a port
    assert evaluate([p], attrs("HEAD", host="productpage.default.svc.cluster.local")).allowed
    assert not evaluate([p], attrs("POST")).allowed
    assert not evaluate([p], attrs("GET", host="reviews:9080")).allowed
    assert not evaluate([p], attrs("GET", port=9090)).allowed
    q = policy("{spec: {rules: [{to: [{operation: {notMethods: [DELETE], ports: ['9080'], notHosts: ['*.evil']}}]}]}}")
    assert evaluate([q], attrs("GET")).allowed
    assert not evaluate([q], attrs("DELETE")).allowed
    assert not evaluate([q], attrs("GET", host="x.evil")).allowed
    exact_host = policy("{spec: {rules: [{to: [{operation: {hosts: [productpage]}}]}]}}")
    assert evaluate([exact_host], attrs(host="productpage:9080")).allowed


def test_sources() -> None:
    p = policy("""
spec:
  rules:
  - from:
    - source: {namespaces: [default], notPrincipals: [cluster.local/ns/default/sa/bookinfo-reviews]}
    - source: {ipBlocks: [10.244.9.0/24], notIpBlocks: [10.244.9.9]}
""")
    assert evaluate([p], attrs(identity=CURL)).allowed
    assert not evaluate([p], attrs(identity=REVIEWS)).allowed
    assert not evaluate([p], attrs(identity=Identity.of("other", "curl"))).allowed
    assert not evaluate([p], attrs(identity=None)).allowed  # namespaces need an identity
    assert evaluate([p], attrs(identity=None, src="10.244.9.1")).allowed  # the second source: by IP
    assert not evaluate([p], attrs(identity=None, src="10.244.9.9")).allowed


def test_presence_and_plaintext() -> None:
    authenticated = policy("{spec: {rules: [{from: [{source: {principals: ['*']}}]}]}}")
    assert evaluate([authenticated], attrs()).allowed and not evaluate([authenticated], attrs(identity=None)).allowed
    deny_plain = policy("{spec: {action: DENY, rules: [{from: [{source: {notPrincipals: ['*']}}]}]}}")
    assert not evaluate([deny_plain], attrs(identity=None)).allowed and evaluate([deny_plain], attrs()).allowed


def test_service_accounts_and_request_principals() -> None:
    p = policy("{spec: {rules: [{from: [{source: {serviceAccounts: [curl, other/x]}}]}]}}")
    assert evaluate([p], attrs(identity=CURL)).allowed
    assert evaluate([p], attrs(identity=Identity.of("other", "x"))).allowed
    assert not evaluate([p], attrs(identity=REVIEWS)).allowed
    jwt = policy("{spec: {rules: [{from: [{source: {requestPrincipals: ['*']}}]}]}}")
    assert not evaluate([jwt], attrs()).allowed  # no RequestAuthentication in the lab: no request principal
    no_jwt = policy("{spec: {action: DENY, rules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]}}")
    assert not evaluate([no_jwt], attrs()).allowed


def test_when_conditions() -> None:
    p = policy("""
spec:
  rules:
  - when:
    - {key: "request.headers[x-user]", values: [jason, "admin*"]}
    - {key: source.ip, notValues: [10.244.1.0/24]}
    - {key: destination.port, values: ["9080"]}
""")
    assert evaluate([p], attrs(headers={"X-User": "jason"}, src="10.244.2.5")).allowed
    assert evaluate([p], attrs(headers={"x-user": "admin-bob"}, src="10.244.2.5")).allowed
    assert not evaluate([p], attrs(headers={"x-user": "bob"}, src="10.244.2.5")).allowed
    assert not evaluate([p], attrs(src="10.244.2.5")).allowed  # header absent
    assert not evaluate([p], attrs(headers={"x-user": "jason"}, src="10.244.1.7")).allowed
    assert not evaluate([p], attrs(headers={"x-user": "jason"}, src="10.244.2.5", port=9090)).allowed
    ns = policy("{spec: {rules: [{when: [{key: source.principal, values: [cluster.local/ns/default/sa/curl]}, {key: source.namespace, values: [default]}]}]}}")
    assert evaluate([ns], attrs()).allowed and not evaluate([ns], attrs(identity=REVIEWS)).allowed


def test_unknown_when_key_is_handled_restrictively() -> None:
    allow = policy("{spec: {rules: [{when: [{key: experimental.foo, values: [x]}]}]}}")
    assert allow.rules == () and "experimental.foo" in allow.warnings[0]
    assert not evaluate([allow], attrs()).allowed  # the rule is gone: nothing is allowed
    deny = policy("{spec: {action: DENY, rules: [{to: [{operation: {methods: [GET]}}], when: [{key: experimental.foo, values: [x]}]}]}}")
    assert not evaluate([deny], attrs("GET")).allowed  # the condition is gone: denies more
    assert evaluate([deny], attrs("POST")).allowed


def test_dry_run_audit_and_custom() -> None:
    dry = policy("{metadata: {annotations: {istio.io/dry-run: 'true'}}, spec: {action: DENY, rules: [{}]}}", name="dry")
    d = evaluate([dry], attrs())
    assert d.allowed and d.shadow == ("default/dry: would deny",)
    audit = policy("{spec: {action: AUDIT, rules: [{to: [{operation: {methods: [GET]}}]}]}}", name="audit")
    d = evaluate([audit], attrs())
    assert d.allowed and d.audit == ("default/audit",)
    custom = policy("{spec: {action: CUSTOM, provider: {name: ext}, rules: [{}]}}")
    assert "CUSTOM" in custom.warnings[0] and evaluate([custom], attrs()).allowed


# ---------------------------------------------------------------------------------------------
# Which policies reach the waypoint


def test_policy_targets() -> None:
    snap = bookinfo_snapshot(yaml="""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: whole-waypoint, namespace: default}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: [/admin*]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: all-waypoints, namespace: istio-system}
spec:
  targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]
  action: DENY
  rules: [{to: [{operation: {methods: [TRACE]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: other-waypoint, namespace: default}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: other}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-only, namespace: default}
spec:
  targetRef: {kind: Service, group: "", name: ratings}
  rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/bookinfo-reviews]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: selector, namespace: default}
spec:
  selector: {matchLabels: {app: ratings}}
""")
    cfg = build_waypoint_config(snap, "default", "waypoint")
    assert [p.key for p in cfg.gateway_policies] == ["default/whole-waypoint", "istio-system/all-waypoints"]
    ratings = cfg.services["ratings.default.svc.cluster.local"]
    details = cfg.services["details.default.svc.cluster.local"]
    assert [p.key for p in ratings.policies] == ["default/ratings-only"]
    assert set(cfg.policy_status) == {"default/whole-waypoint", "istio-system/all-waypoints", "default/ratings-only"}
    assert not evaluate(cfg.policies_for(details), attrs(path="/admin/x")).allowed
    assert not evaluate(cfg.policies_for(details), attrs("TRACE")).allowed
    assert evaluate(cfg.policies_for(details), attrs()).allowed
    assert not evaluate(cfg.policies_for(ratings), attrs()).allowed
    assert evaluate(cfg.policies_for(ratings), attrs(identity=REVIEWS)).allowed
