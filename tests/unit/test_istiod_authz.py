"""AuthorizationPolicy / PeerAuthentication -> ztunnel Authorization (reference §3.6), no root.

Two kinds of tests: the conversion itself (resource by resource), and truth tables over the
getting-started manifests, where istiod's resources are loaded into the lab ztunnel's
ProxyState and its `assert_rbac` decides, as the destination ztunnel would.
"""

from __future__ import annotations

import json

import pytest

from lab.istiod.authorization import (
    DRY_RUN_DISABLED,
    STATIC_STRICT_POLICY,
    build_authorizations,
    convert_policy,
    dry_run_feature_enabled,
    peer_authentication_mode,
    workload_policy_names,
)
from lab.istiod.server import build_config
from lab.kube.manifests import load_files, load_text
from lab.proto.xds import ADDRESS_TYPE, AUTHORIZATION_TYPE
from lab.supervisor.server import Supervisor
from lab.tls.identity import Identity
from lab.ztunnel.rbac import Connection
from lab.ztunnel.state import ProxyState
from tests.conftest import CONFORMANCE, require_conformance

GETTING_STARTED = CONFORMANCE / "getting-started"
SAMPLES = CONFORMANCE / "samples"

GATEWAY = Identity.of("default", "bookinfo-gateway-istio")
WAYPOINT = Identity.of("default", "waypoint")
CURL = Identity.of("default", "curl")
PLAINTEXT = None


def policy(yaml_text: str, dry_run_enabled: bool = True) -> tuple[dict | None, list[str]]:
    (obj,) = load_text(yaml_text).resources
    return convert_policy(obj.namespace, obj.name, obj.raw, dry_run_enabled=dry_run_enabled)


DRY_RUN = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: dry, namespace: shop, annotations: {istio.io/dry-run: "true"}}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{to: [{operation: {ports: ["9080"]}}]}]
"""


def test_dry_run_policies_stay_in_istiod_unless_its_feature_is_on() -> None:
    """AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY is off by default: the policy is not sent to
    ztunnel, no workload lists it, and its status says why."""
    converted, warnings = policy(DRY_RUN, dry_run_enabled=False)
    assert converted is None and warnings == [DRY_RUN_DISABLED]
    assert "support for ambient dry-run authorizationPolicies isn't enabled" in warnings[0]
    snap = snapshot_with(DRY_RUN)
    resources, statuses = build_authorizations(snap)
    assert "shop/dry" not in resources and statuses["shop/dry"] == [DRY_RUN_DISABLED]
    assert workload_policy_names(snap, "shop", {"app": "web"}) == []
    # with the feature on: sent with dry_run set, and listed by the workloads it selects
    resources, statuses = build_authorizations(snap, dry_run_enabled=True)
    assert resources["shop/dry"]["dry_run"] is True and statuses["shop/dry"] == []
    assert workload_policy_names(snap, "shop", {"app": "web"}, dry_run_enabled=True) == ["shop/dry"]


def test_the_dry_run_feature_is_read_from_istiods_environment() -> None:
    assert dry_run_feature_enabled({}) is False
    assert dry_run_feature_enabled({"AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY": "true"}) is True
    assert dry_run_feature_enabled({"AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY": "false"}) is False


def snapshot_with(*objects: str) -> dict:
    """A snapshot holding only the given manifests' objects (no pods needed for conversions)."""
    objs = []
    for text in objects:
        for r in load_text(text).resources:
            objs.append({"kind": r.kind, "api_version": r.api_version, "namespace": r.namespace, "name": r.name,
                         "labels": r.meta.labels, "raw": r.raw})
    return json.loads(json.dumps({"objects": objs}))


# ---------------------------------------------------------------------------------------------
# The conversion


def test_getting_started_l4_policy() -> None:
    require_conformance()
    (obj,) = load_files([GETTING_STARTED / "10-l4-policy-productpage-ztunnel.yaml"]).resources
    converted, warnings = convert_policy(obj.namespace, obj.name, obj.raw)
    assert warnings == []
    assert converted == {
        "name": "productpage-ztunnel", "namespace": "default", "scope": "WORKLOAD_SELECTOR", "action": "ALLOW",
        "rules": [{"clauses": [{"matches": [{"principals": [{"exact": "cluster.local/ns/default/sa/bookinfo-gateway-istio"}]}]}]}],
        "dry_run": False}


def test_target_refs_policy_is_for_the_waypoint_only() -> None:
    require_conformance()
    (obj,) = load_files([GETTING_STARTED / "30-l7-policy-productpage-waypoint.yaml"]).resources
    assert convert_policy(obj.namespace, obj.name, obj.raw) == (None, [])


@pytest.mark.parametrize("namespace,selector,scope", [
    ("istio-system", "", "GLOBAL"),
    ("default", "", "NAMESPACE"),
    ("default", "selector: {matchLabels: {app: x}}", "WORKLOAD_SELECTOR"),
    ("istio-system", "selector: {matchLabels: {app: x}}", "WORKLOAD_SELECTOR"),
])
def test_scope(namespace: str, selector: str, scope: str) -> None:
    converted, _ = policy(f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: p, namespace: {namespace}}}
spec:
  {selector or 'action: ALLOW'}
""")
    assert converted is not None and converted["scope"] == scope and converted["action"] == "ALLOW"
    assert converted["rules"] == []  # no rules: an ALLOW that matches nothing (deny all)


@pytest.mark.parametrize("action", ["CUSTOM", "AUDIT"])
def test_unsupported_actions_are_not_sent(action: str) -> None:
    converted, warnings = policy(f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: p, namespace: default}}
spec:
  action: {action}
  rules: [{{}}]
""")
    assert converted is None and warnings == [f"ztunnel does not support the {action} action"]


def test_every_l4_field() -> None:
    converted, warnings = policy("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop, annotations: {istio.io/dry-run: "true"}}
spec:
  action: DENY
  rules:
  - from:
    - source:
        principals: ["*"]
        notPrincipals: ["cluster.local/ns/shop/sa/*"]
        namespaces: ["*-prod"]
        notNamespaces: ["kube-system"]
        ipBlocks: ["10.244.1.0/24", "10.244.2.7"]
        notIpBlocks: ["10.244.1.9"]
        serviceAccounts: ["other/sa1", "sa2"]
    - source: {namespaces: [default]}
    to:
    - operation: {ports: ["9080", "8080"], notPorts: ["15000"]}
    when:
    - {key: source.ip, values: ["10.0.0.0/8"], notValues: ["10.1.0.0/16"]}
    - {key: destination.port, values: ["9080"]}
    - {key: source.principal, notValues: ["cluster.local/ns/a/sa/b"]}
""")
    assert warnings == []
    assert converted["dry_run"] is True and converted["action"] == "DENY" and converted["scope"] == "NAMESPACE"
    assert converted["rules"] == [{"clauses": [
        {"matches": [
            {"principals": [{"presence": {}}],
             "not_principals": [{"prefix": "cluster.local/ns/shop/sa/"}],
             "namespaces": [{"suffix": "-prod"}],
             "not_namespaces": [{"exact": "kube-system"}],
             "service_accounts": [{"namespace": "other", "service_account": "sa1"},
                                  {"namespace": "shop", "service_account": "sa2"}],
             "source_ips": [{"address": "10.244.1.0", "length": 24}, {"address": "10.244.2.7", "length": 32}],
             "not_source_ips": [{"address": "10.244.1.9", "length": 32}]},
            {"namespaces": [{"exact": "default"}]}]},
        {"matches": [{"destination_ports": [9080, 8080], "not_destination_ports": [15000]}]},
        {"matches": [{"source_ips": [{"address": "10.0.0.0", "length": 8}],
                      "not_source_ips": [{"address": "10.1.0.0", "length": 16}]}]},
        {"matches": [{"destination_ports": [9080]}]},
        {"matches": [{"not_principals": [{"exact": "cluster.local/ns/a/sa/b"}]}]},
    ]}]


def test_allow_rule_with_http_attributes_is_dropped_with_a_warning() -> None:
    converted, warnings = policy("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: default}
spec:
  selector: {matchLabels: {app: productpage}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/curl]}}]
    to: [{operation: {methods: [GET], paths: ["/api/*"]}}]
  - from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]
""")
    assert converted["rules"] == [{"clauses": [{"matches": [{"principals": [{"exact": "cluster.local/ns/default/sa/sleep"}]}]}]}]
    (w,) = warnings
    assert w.startswith("ztunnel does not support HTTP attributes (found: methods, paths).")
    assert "waypoint" in w and "ALLOW" in w


def test_deny_rule_keeps_its_l4_part() -> None:
    converted, warnings = policy("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: default}
spec:
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/curl], requestPrincipals: ["*"]}}]
    to: [{operation: {methods: [POST], ports: ["9080"]}}]
    when: [{key: "request.headers[x-user]", values: [bob]}]
""")
    assert converted["rules"] == [{"clauses": [
        {"matches": [{"principals": [{"exact": "cluster.local/ns/default/sa/curl"}]}]},
        {"matches": [{"destination_ports": [9080]}]},
        {"matches": [{}]},  # the HTTP-only condition: an empty Match, skipped by ztunnel
    ]}]
    (w,) = warnings
    assert "found: methods, request.headers[x-user], requestPrincipals" in w and "DENY" in w


def test_invalid_values_are_skipped_with_a_warning() -> None:
    converted, warnings = policy("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: p, namespace: default}
spec:
  rules: [{to: [{operation: {ports: ["http", "70000", "80"]}}], from: [{source: {ipBlocks: [not-an-ip]}}]}]
""")
    assert converted["rules"][0]["clauses"] == [{"matches": [{}]}, {"matches": [{"destination_ports": [80]}]}]
    assert len(warnings) == 3


def test_statuses_and_static_strict_policy() -> None:
    snap = snapshot_with("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: default}
spec: {rules: [{to: [{operation: {methods: [GET]}}]}]}
""", """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ok, namespace: default}
spec: {}
""")
    resources, statuses = build_authorizations(snap)
    assert sorted(resources) == ["default/l7", "default/ok"]
    assert statuses["default/ok"] == [] and len(statuses["default/l7"]) == 1

    snap = snapshot_with("""
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec: {mtls: {mode: PERMISSIVE}}
""")
    resources, _ = build_authorizations(snap)
    assert resources == {f"istio-system/{STATIC_STRICT_POLICY}": {
        "name": STATIC_STRICT_POLICY, "namespace": "istio-system", "scope": "WORKLOAD_SELECTOR", "action": "DENY",
        "rules": [{"clauses": [{"matches": [{"not_principals": [{"presence": {}}]}]}]}], "dry_run": False}}


PA = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: {name}, namespace: {ns}}}
spec:
  {selector}
  mtls: {{mode: {mode}}}
"""


@pytest.mark.parametrize("pas,ns,labels,mode", [
    ([], "a", {}, "PERMISSIVE"),
    ([("istio-system", "", "STRICT")], "a", {}, "STRICT"),
    ([("istio-system", "", "STRICT"), ("a", "", "PERMISSIVE")], "a", {}, "PERMISSIVE"),
    ([("istio-system", "", "STRICT"), ("a", "", "UNSET")], "a", {}, "STRICT"),
    ([("a", "", "STRICT")], "b", {}, "PERMISSIVE"),
    ([("a", "", "STRICT"), ("a", "selector: {matchLabels: {app: web}}", "DISABLE")], "a", {"app": "web"}, "DISABLE"),
    ([("a", "", "STRICT"), ("a", "selector: {matchLabels: {app: web}}", "DISABLE")], "a", {"app": "db"}, "STRICT"),
    ([("a", "selector: {matchLabels: {app: web}}", "STRICT")], "a", {"app": "web"}, "STRICT"),
    ([("a", "", "PERMISSIVE"), ("a", "selector: {matchLabels: {app: web}}", "UNSET")], "a", {"app": "web"},
     "PERMISSIVE"),
])
def test_peer_authentication_mode(pas: list, ns: str, labels: dict, mode: str) -> None:
    texts = [PA.format(name=f"pa{i}", ns=n, selector=sel, mode=m) for i, (n, sel, m) in enumerate(pas)]
    snap = snapshot_with(*texts)
    assert peer_authentication_mode(snap, ns, labels) == mode
    names = workload_policy_names(snap, ns, labels)
    assert (f"istio-system/{STATIC_STRICT_POLICY}" in names) == (mode == "STRICT")


def test_root_namespace_selector_policies_apply_in_every_namespace() -> None:
    snap = snapshot_with("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-sel, namespace: istio-system}
spec: {selector: {matchLabels: {app: web}}}
""", """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a-sel, namespace: a}
spec: {selector: {matchLabels: {app: web}}}
""", """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint-only, namespace: a}
spec: {selector: {matchLabels: {app: web}}, targetRefs: [{kind: Service, group: "", name: web}]}
""")
    assert workload_policy_names(snap, "a", {"app": "web"}) == ["a/a-sel", "istio-system/mesh-sel"]
    assert workload_policy_names(snap, "b", {"app": "web"}) == ["istio-system/mesh-sel"]
    assert workload_policy_names(snap, "a", {"app": "db"}) == []


# ---------------------------------------------------------------------------------------------
# Truth tables: istiod's resources, decided by the lab ztunnel's rbac


def ztunnel_state(*files_or_texts) -> tuple[ProxyState, dict]:
    """Bookinfo + curl + the given policies -> istiod's config -> a ztunnel's ProxyState."""
    require_conformance()
    sup = Supervisor("authztest", 1, [])
    sup.api.apply(load_files([SAMPLES / "bookinfo_bookinfo.yaml", SAMPLES / "curl_curl.yaml"]).resources)
    for item in files_or_texts:
        loaded = load_files([item]) if not isinstance(item, str) else load_text(item)
        sup.api.apply(loaded.resources)
    for p in sup.api.pods():
        p.phase = "Running"
    snap = json.loads(json.dumps(sup.cluster_snapshot(), default=str))
    config, statuses = build_config(snap)
    state = ProxyState()
    for type_url in (ADDRESS_TYPE, AUTHORIZATION_TYPE):
        result = state.apply(type_url, list(config[type_url].items()))
        assert not result.rejected, result.rejected
    ips = {p["name"].rsplit("-", 2)[0]: p["ip"] for p in snap["pods"]}
    return state, {"ips": ips, "statuses": statuses}


def decide(state: ProxyState, ips: dict, src: Identity | None, dst: str, port: int = 9080) -> tuple[bool, str]:
    d = state.assert_rbac(Connection(src_ip=ips["curl"], src_identity=src, dst_ip=ips[dst], dst_port=port))
    return d.allowed, d.reason


NOT_ALLOWED = "allow policies exist, but none allowed"


@pytest.mark.parametrize("files,src,dst,allowed", [
    # no policy: everything allowed
    ([], CURL, "productpage-v1", True),
    ([], PLAINTEXT, "productpage-v1", True),
    # 10: productpage only from the ingress gateway
    (["10-l4-policy-productpage-ztunnel.yaml"], GATEWAY, "productpage-v1", True),
    (["10-l4-policy-productpage-ztunnel.yaml"], CURL, "productpage-v1", False),
    (["10-l4-policy-productpage-ztunnel.yaml"], WAYPOINT, "productpage-v1", False),
    (["10-l4-policy-productpage-ztunnel.yaml"], PLAINTEXT, "productpage-v1", False),
    (["10-l4-policy-productpage-ztunnel.yaml"], CURL, "reviews-v1", True),  # selector: productpage only
    # 30 targets the waypoint: ztunnel still only knows 10
    (["10-l4-policy-productpage-ztunnel.yaml", "30-l7-policy-productpage-waypoint.yaml"], CURL, "productpage-v1", False),
    # 40: the waypoint's identity is allowed too
    (["40-l4-policy-allow-waypoint.yaml"], WAYPOINT, "productpage-v1", True),
    (["40-l4-policy-allow-waypoint.yaml"], GATEWAY, "productpage-v1", True),
    (["40-l4-policy-allow-waypoint.yaml"], CURL, "productpage-v1", False),
])
def test_getting_started_truth_table(files: list[str], src: Identity | None, dst: str, allowed: bool) -> None:
    state, ctx = ztunnel_state(*[GETTING_STARTED / f for f in files])
    got, reason = decide(state, ctx["ips"], src, dst)
    assert got is allowed, reason
    if not allowed:
        assert reason == NOT_ALLOWED


L7_ON_ZTUNNEL = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: l7, namespace: default}}
spec:
  selector: {{matchLabels: {{app: productpage}}}}
  action: {action}
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/default/sa/curl]}}}}]
    to: [{{operation: {{methods: [GET]}}}}]
"""


@pytest.mark.parametrize("action,src,allowed", [
    # ALLOW with methods: the rule is dropped, nobody gets in (more restrictive than written)
    ("ALLOW", CURL, False),
    ("ALLOW", GATEWAY, False),
    # DENY with methods: `to` named only HTTP attributes -> an empty Match -> the rule never
    # matches: ztunnel denies nothing (the waypoint must enforce it)
    ("DENY", CURL, True),
    ("DENY", GATEWAY, True),
])
def test_l7_policy_bound_to_ztunnel(action: str, src: Identity, allowed: bool) -> None:
    state, ctx = ztunnel_state(L7_ON_ZTUNNEL.format(action=action))
    assert decide(state, ctx["ips"], src, "productpage-v1")[0] is allowed
    assert ctx["statuses"]["default/l7"] and "methods" in ctx["statuses"]["default/l7"][0]


def test_deny_keeps_l4_ports() -> None:
    state, ctx = ztunnel_state("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-curl-9080, namespace: default}
spec:
  action: DENY
  rules:
  - from: [{source: {principals: [cluster.local/ns/default/sa/curl]}}]
    to: [{operation: {ports: ["9080"], methods: [DELETE]}}]
""")
    assert decide(state, ctx["ips"], CURL, "reviews-v2", 9080) == (False, "explicitly denied by: default/no-curl-9080")
    assert decide(state, ctx["ips"], CURL, "reviews-v2", 9081)[0] is True
    assert decide(state, ctx["ips"], GATEWAY, "reviews-v2", 9080)[0] is True


def test_strict_peer_authentication_denies_plaintext_only() -> None:
    state, ctx = ztunnel_state("""
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec: {mtls: {mode: STRICT}}
""")
    assert decide(state, ctx["ips"], PLAINTEXT, "details-v1") == (
        False, f"explicitly denied by: istio-system/{STATIC_STRICT_POLICY}")
    assert decide(state, ctx["ips"], CURL, "details-v1")[0] is True


def test_global_deny_from_root_namespace() -> None:
    state, ctx = ztunnel_state("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-curl, namespace: istio-system}
spec:
  action: DENY
  rules: [{from: [{source: {principals: ["*/sa/curl"]}}]}]
""")
    assert decide(state, ctx["ips"], CURL, "ratings-v1") == (False, "explicitly denied by: istio-system/no-curl")
    assert decide(state, ctx["ips"], GATEWAY, "ratings-v1")[0] is True
