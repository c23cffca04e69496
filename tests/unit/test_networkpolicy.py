"""NetworkPolicy as the node's filter rules (pure): who is isolated, who is admitted, on which port."""

from __future__ import annotations

from lab.kube.networkpolicy import PodInfo, render_rules, selects

PODS = [PodInfo("productpage", "default", "10.244.2.3", {"app": "productpage"}),
        PodInfo("curl", "default", "10.244.1.2", {"app": "curl"}),
        PodInfo("sleep", "default", "10.244.1.4", {"app": "sleep"}),
        PodInfo("legacy", "legacy", "10.244.2.9", {"app": "legacy"})]
NS = {"default": {"kubernetes.io/metadata.name": "default"}, "legacy": {"team": "old"}}


def policy(spec: dict, name: str = "p", namespace: str = "default") -> dict:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


def rules(*policies: dict) -> list[str]:
    text, _ = render_rules(list(policies), PODS, NS)
    return [line for line in text.splitlines() if line.startswith("-A KUBE-NWPLCY -") and "conntrack" not in line]


def test_no_policy_isolates_nothing():
    assert rules() == []


def test_a_policy_isolates_the_pods_it_selects_and_admits_its_peers_on_its_ports():
    assert rules(policy({"podSelector": {"matchLabels": {"app": "productpage"}},
                         "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "curl"}}}],
                                      "ports": [{"port": 9080}]}]})) == [
        "-A KUBE-NWPLCY -s 10.244.1.2/32 -d 10.244.2.3/32 -p tcp -m tcp --dport 9080 -j ACCEPT",
        "-A KUBE-NWPLCY -d 10.244.2.3/32 -j DROP",
    ]


def test_deny_all_and_allow_all_ingress():
    assert rules(policy({"podSelector": {}, "policyTypes": ["Ingress"]})) == [
        f"-A KUBE-NWPLCY -d {ip}/32 -j DROP" for ip in ("10.244.1.2", "10.244.1.4", "10.244.2.3")]
    assert rules(policy({"podSelector": {"matchLabels": {"app": "sleep"}}, "ingress": [{}]})) == [
        "-A KUBE-NWPLCY -d 10.244.1.4/32 -j ACCEPT", "-A KUBE-NWPLCY -d 10.244.1.4/32 -j DROP"]


def test_namespace_selector_and_ip_block():
    out = rules(policy({"podSelector": {"matchLabels": {"app": "productpage"}},
                        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "old"}}},
                                              {"ipBlock": {"cidr": "10.244.1.0/24"}}]}]}))
    assert out == ["-A KUBE-NWPLCY -s 10.244.2.9/32 -d 10.244.2.3/32 -j ACCEPT",
                   "-A KUBE-NWPLCY -s 10.244.1.0/24 -d 10.244.2.3/32 -j ACCEPT",
                   "-A KUBE-NWPLCY -d 10.244.2.3/32 -j DROP"]


def test_egress_only_policies_isolate_no_ingress_and_say_they_are_not_enforced():
    text, warnings = render_rules([policy({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{}]})], PODS, NS)
    assert "DROP" not in text and "egress rules are not enforced" in warnings[0]


def test_selectors():
    assert selects({}, {"a": "1"}) and selects(None, {})
    assert selects({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "1"})
    assert not selects({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": "1"})


def test_a_malformed_selector_ignores_the_policy_and_says_so():
    bad = policy({"podSelector": {"matchExpressions": [{"key": "app", "operator": "Like"}]}, "ingress": [{}]}, "bad")
    text, warnings = render_rules([bad], PODS, NS)
    assert "DROP" not in text and "unknown label selector operator 'Like'" in warnings[0]
