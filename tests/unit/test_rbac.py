"""ztunnel's L4 authorization (lab/ztunnel/rbac.py): matcher truth tables and the decision order.

The connections and expectations mirror the semantics of zt:src/rbac.rs: plaintext has no
identity, principals are compared without spiffe://, not_* means "none of", an empty Match is
skipped, an empty clause matches, a policy without rules never matches.
"""

from __future__ import annotations

import pytest
import yaml

from lab.tls.identity import Identity
from lab.ztunnel import rbac
from lab.ztunnel.rbac import NOT_ALLOWED, Authorization, Connection, InvalidAuthorization, assert_rbac, matches
from tests.conftest import require_conformance

PLAINTEXT = Connection("10.244.1.1", None, "10.244.2.2", 8080)
TLS = Connection("10.244.1.1", Identity("td", "namespace", "account"), "10.244.2.2", 8080)
TLS_ALT = Connection("10.244.1.3", Identity("td-alt", "ns-alt", "sa-alt"), "10.244.2.4", 9090)


def policy(matches_: list[dict] | None = None, *, action: str = "ALLOW", rules: list | None = None,
           name: str = "p", namespace: str = "ns", scope: str = "NAMESPACE", dry_run: bool = False) -> Authorization:
    if rules is None:
        rules = [{"clauses": [{"matches": matches_ or []}]}]
    return Authorization.from_resource({"name": name, "namespace": namespace, "scope": scope,
                                        "action": action, "rules": rules, "dry_run": dry_run})


# One Match field at a time: (field, values) -> expected for (PLAINTEXT, TLS, TLS_ALT).
FIELD_TABLE = [
    ("namespaces", [{"exact": "namespace"}], (False, True, False)),
    ("not_namespaces", [{"exact": "namespace"}], (True, False, True)),
    ("namespaces", [{"prefix": "name"}], (False, True, False)),
    ("namespaces", [{"suffix": "-alt"}], (False, False, True)),
    ("namespaces", [{"presence": {}}], (False, True, True)),
    ("not_namespaces", [{"presence": {}}], (True, False, False)),
    ("namespaces", [{"exact": "nope"}, {"exact": "ns-alt"}], (False, False, True)),  # values OR
    ("service_accounts", [{"namespace": "namespace", "service_account": "account"}], (False, True, False)),
    ("not_service_accounts", [{"namespace": "namespace", "service_account": "account"}], (True, False, True)),
    ("principals", [{"exact": "td/ns/namespace/sa/account"}], (False, True, False)),
    ("principals", [{"exact": "spiffe://td/ns/namespace/sa/account"}], (False, False, False)),
    ("not_principals", [{"exact": "td/ns/namespace/sa/account"}], (True, False, True)),
    ("principals", [{"presence": {}}], (False, True, True)),
    ("not_principals", [{"presence": {}}], (True, False, False)),  # Istio's "deny plaintext"
    ("principals", [{"suffix": "/sa/sa-alt"}], (False, False, True)),
    ("principals", [{"prefix": "td/"}], (False, True, False)),
    ("source_ips", ["10.244.1.1"], (True, True, False)),
    ("source_ips", [{"address": "10.244.1.0", "length": 24}], (True, True, True)),
    ("not_source_ips", ["10.244.1.1/32"], (False, False, True)),
    ("destination_ips", [{"address": "10.244.2.2", "length": 32}], (True, True, False)),
    ("not_destination_ips", ["10.244.2.2"], (False, False, True)),
    ("destination_ips", ["10.244.2.0/24"], (True, True, True)),
    ("destination_ips", ["10.0.0.0/8", "192.168.0.0/16"], (True, True, True)),
    ("destination_ips", ["fd00::/8"], (False, False, False)),
    ("destination_ports", [8080], (True, True, False)),
    ("not_destination_ports", [8080], (False, False, True)),
    ("destination_ports", [15008], (False, False, False)),
    ("destination_ports", [1, 9090], (False, False, True)),
]


@pytest.mark.parametrize("field_name,values,expected", FIELD_TABLE,
                         ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(FIELD_TABLE)])
def test_single_field_truth_table(field_name, values, expected):
    p = policy([{field_name: values}])
    got = tuple(matches(p, c) for c in (PLAINTEXT, TLS, TLS_ALT))
    assert got == expected


def test_fields_within_a_match_are_anded():
    p = policy([{"namespaces": [{"exact": "namespace"}], "destination_ports": [9090]}])
    assert not matches(p, TLS)            # namespace yes, port no
    assert not matches(p, TLS_ALT)        # port yes, namespace no
    assert matches(p, Connection("1.1.1.1", Identity("td", "namespace", "x"), "2.2.2.2", 9090))


def test_positive_and_negative_of_one_field_both_apply():
    p = policy([{"namespaces": [{"prefix": "n"}], "not_namespaces": [{"exact": "namespace"}]}])
    assert not matches(p, TLS)
    assert matches(p, Connection("1.1.1.1", Identity("td", "ns-2", "x"), "2.2.2.2", 1))


def test_matches_in_a_clause_are_ored_and_clauses_anded():
    rules = [{"clauses": [
        {"matches": [{"namespaces": [{"exact": "a"}]}, {"namespaces": [{"exact": "b"}]}]},
        {"matches": [{"destination_ports": [80]}]},
    ]}]
    p = policy(rules=rules)

    def conn(ns: str, port: int) -> Connection:
        return Connection("1.1.1.1", Identity("td", ns, "sa"), "2.2.2.2", port)

    assert matches(p, conn("a", 80))
    assert matches(p, conn("b", 80))
    assert not matches(p, conn("bad", 80))
    assert not matches(p, conn("a", 81))


def test_rules_are_ored():
    p = policy(rules=[{"clauses": [{"matches": [{"namespaces": [{"exact": "a"}]}]}]},
                      {"clauses": [{"matches": [{"namespaces": [{"exact": "b"}]}]}]}])
    assert matches(p, Connection("1.1.1.1", Identity("td", "b", "sa"), "2.2.2.2", 1))
    assert not matches(p, Connection("1.1.1.1", Identity("td", "c", "sa"), "2.2.2.2", 1))


@pytest.mark.parametrize("rules,expected", [
    ([{"clauses": [{"matches": [{}]}]}], False),   # an empty Match is skipped: clause cannot match
    ([{"clauses": [{"matches": []}]}], True),      # an empty clause matches
    ([{"clauses": []}], True),                     # a rule with no clause matches (rules: [{}])
    ([], False),                                   # no rules: never matches
    ([{"clauses": [{"matches": [{}, {"destination_ports": [8080]}]}]}], True),
])
def test_empty_structures(rules, expected):
    for conn in (PLAINTEXT, TLS):
        assert matches(policy(rules=rules), conn) is expected


def test_string_match_without_kind_is_dropped_like_ztunnel():
    # {"principals": [{}]} becomes an empty Match, which is skipped.
    assert not matches(policy([{"principals": [{}]}]), TLS)


def test_invalid_ip_is_dropped_and_invalid_enums_refused():
    assert matches(policy([{"source_ips": ["not-an-ip"]}]), TLS) is False  # empty match after drop
    with pytest.raises(InvalidAuthorization):
        policy(action="AUDIT")
    with pytest.raises(InvalidAuthorization):
        policy(scope="MESH")
    with pytest.raises(InvalidAuthorization):
        policy([{"destination_ports": ["eighty"]}])
    with pytest.raises(InvalidAuthorization):
        Authorization.from_resource({"namespace": "x"})


def test_matches_accepts_a_resource_dict():
    d = {"name": "p", "namespace": "ns", "scope": "GLOBAL", "action": "DENY",
         "rules": [{"clauses": [{"matches": [{"destination_ports": [8080]}]}]}]}
    assert matches(d, TLS) and not matches(d, TLS_ALT)


# ------------------------------------------------------------------------------ assert_rbac

ALLOW_NS = policy([{"namespaces": [{"exact": "namespace"}]}], name="allow-ns")
ALLOW_PORT_9090 = policy([{"destination_ports": [9090]}], name="allow-9090")
DENY_PLAINTEXT = policy([{"not_principals": [{"presence": {}}]}], action="DENY", name="deny-plaintext")
DENY_ALT = policy([{"namespaces": [{"exact": "ns-alt"}]}], action="DENY", name="deny-alt")
DENY_NOTHING = policy([{"destination_ports": [1]}], action="DENY", name="deny-nothing")

DECISIONS = [
    # policies, connection, allowed, reason, deciding policy
    ([], PLAINTEXT, True, None, None),
    ([], TLS, True, None, None),
    ([DENY_NOTHING], TLS, True, None, None),
    ([DENY_PLAINTEXT], PLAINTEXT, False, "explicitly denied by: ns/deny-plaintext", "ns/deny-plaintext"),
    ([DENY_PLAINTEXT], TLS, True, None, None),
    ([ALLOW_NS], TLS, True, "allowed by: ns/allow-ns", "ns/allow-ns"),
    ([ALLOW_NS], TLS_ALT, False, NOT_ALLOWED, None),
    ([ALLOW_NS], PLAINTEXT, False, NOT_ALLOWED, None),
    ([ALLOW_NS, ALLOW_PORT_9090], TLS_ALT, True, "allowed by: ns/allow-9090", "ns/allow-9090"),
    # DENY wins over a matching ALLOW
    ([ALLOW_PORT_9090, DENY_ALT], TLS_ALT, False, "explicitly denied by: ns/deny-alt", "ns/deny-alt"),
    ([ALLOW_NS, DENY_ALT], TLS, True, "allowed by: ns/allow-ns", "ns/allow-ns"),
    ([DENY_ALT, DENY_PLAINTEXT], PLAINTEXT, False, "explicitly denied by: ns/deny-plaintext", "ns/deny-plaintext"),
    ([DENY_NOTHING, ALLOW_NS], TLS_ALT, False, NOT_ALLOWED, None),
]


@pytest.mark.parametrize("policies,conn,allowed,reason,deciding", DECISIONS)
def test_assert_rbac_order(policies, conn, allowed, reason, deciding):
    d = assert_rbac(policies, conn)
    assert d.allowed is allowed
    if reason is not None:
        assert d.reason == reason
    assert d.policy == deciding
    assert d.evaluated == tuple(p.key for p in policies)


def test_dry_run_policies_are_reported_not_enforced():
    dry_deny = policy([{"destination_ports": [8080]}], action="DENY", name="dry-deny", dry_run=True)
    dry_allow = policy([{"destination_ports": [1]}], name="dry-allow", dry_run=True)
    d = assert_rbac([dry_deny, dry_allow], TLS)
    # Not enforced: the DENY that matches does not deny, and the ALLOW does not make "allow
    # policies exist" true.
    assert d.allowed and d.policy is None
    assert [(r.policy, r.action, r.matched) for r in d.dry_run] == [("ns/dry-deny", "DENY", True),
                                                                    ("ns/dry-allow", "ALLOW", False)]
    assert "would deny" in str(d.dry_run[0])
    assert d.evaluated == ()


# ------------------------------------------------------------------------------ getting started

GATEWAY = Identity.of("default", "bookinfo-gateway-istio")
CURL = Identity.of("default", "curl")
WAYPOINT = Identity.of("default", "waypoint")
PRODUCTPAGE = ("10.244.1.10", 9080)


def productpage_ztunnel_as_istiod_converts_it(principals: list[str]) -> Authorization:
    """AuthorizationPolicy productpage-ztunnel (selector app=productpage, ALLOW, from.source.
    principals) as istiod sends it to ztunnel: WORKLOAD_SELECTOR scope, one rule with one clause
    (the `from`) holding one Match per source."""
    return Authorization.from_resource({
        "name": "productpage-ztunnel", "namespace": "default", "scope": "WORKLOAD_SELECTOR",
        "action": "ALLOW", "dry_run": False,
        "rules": [{"clauses": [{"matches": [{"principals": [{"exact": p} for p in principals]}]}]}]})


def _load(name: str) -> dict:
    return yaml.safe_load((require_conformance() / "getting-started" / name).read_text())


def _principals(manifest: dict) -> list[str]:
    return [p for rule in manifest["spec"]["rules"] for src in rule["from"] for p in src["source"]["principals"]]


def conn_from(identity: Identity | None, src_ip: str = "10.244.2.7") -> Connection:
    return Connection(src_ip, identity, *PRODUCTPAGE)


def test_getting_started_l4_policy_productpage_ztunnel():
    manifest = _load("10-l4-policy-productpage-ztunnel.yaml")
    assert manifest["spec"]["action"] == "ALLOW" and manifest["spec"]["selector"]
    p = productpage_ztunnel_as_istiod_converts_it(_principals(manifest))
    table = [
        (GATEWAY, True, "allowed by: default/productpage-ztunnel"),
        (CURL, False, NOT_ALLOWED),          # the curl pod is refused: "allow policies exist, but none allowed"
        (WAYPOINT, False, NOT_ALLOWED),      # a waypoint would be refused too (fixed by 40-...)
        (Identity("other.td", "default", "bookinfo-gateway-istio"), False, NOT_ALLOWED),
        (None, False, NOT_ALLOWED),          # plaintext from outside the mesh
    ]
    for identity, allowed, reason in table:
        d = assert_rbac([p], conn_from(identity))
        assert (d.allowed, d.reason) == (allowed, reason), identity


def test_getting_started_l4_policy_allows_waypoint_after_step_40():
    p = productpage_ztunnel_as_istiod_converts_it(_principals(_load("40-l4-policy-allow-waypoint.yaml")))
    assert assert_rbac([p], conn_from(WAYPOINT)).allowed
    assert assert_rbac([p], conn_from(GATEWAY)).allowed
    assert not assert_rbac([p], conn_from(CURL)).allowed


def test_istiod_conversion_of_getting_started_policy_agrees():
    """The lab's istiod (lab/istiod/authorization.py) converts the same manifest; ztunnel must
    decide the same way on what istiod actually sends."""
    from lab.istiod.authorization import convert_policy
    manifest = _load("10-l4-policy-productpage-ztunnel.yaml")
    resource, warnings = convert_policy("default", "productpage-ztunnel", manifest)
    assert warnings == []
    p = Authorization.from_resource(resource)
    assert p.scope == "WORKLOAD_SELECTOR" and p.key == "default/productpage-ztunnel"
    assert assert_rbac([p], conn_from(GATEWAY)).allowed
    assert assert_rbac([p], conn_from(CURL)).reason == NOT_ALLOWED
    assert not assert_rbac([p], conn_from(None)).allowed


def test_connection_str_and_module_constants():
    assert str(PLAINTEXT) == "10.244.1.1(None)->10.244.2.2:8080"
    assert rbac.EXPLICITLY_DENIED.format(key="a/b") == "explicitly denied by: a/b"
