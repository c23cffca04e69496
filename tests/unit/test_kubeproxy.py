"""Unit tests for lab.kube.kubeproxy: kube-proxy's iptables rendering, without root.

Chain names and rule lines marked "real" are taken from `iptables-save` dumps of real
clusters (kind, kube-proxy in iptables mode) published in public write-ups.
"""

from __future__ import annotations

import random
import re
from fractions import Fraction

import pytest

from lab.kube.kubeproxy import (
    ServiceEndpoint,
    ServicePortRule,
    compute_probability,
    parse_tables,
    render_rules,
    restore_payload,
    service_port_chain_name,
    service_port_endpoint_chain_name,
)

EP = ServiceEndpoint


def productpage(*endpoints: ServiceEndpoint) -> ServicePortRule:
    return ServicePortRule("default", "productpage", "http", "10.96.12.34", 9080, "TCP", list(endpoints))


def rules_of(text: str, table: str, chain: str) -> list[str]:
    return [r for r in parse_tables(text)[table].rules if r.split()[1] == chain]


# --- chain names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "service_port_name, protocol, chain",
    [  # real
        ("default/kubernetes:https", "TCP", "KUBE-SVC-NPX46M4PTMTKRN6Y"),
        ("kube-system/kube-dns:dns", "UDP", "KUBE-SVC-TCOU7JCQXEZGVUNU"),
        ("kube-system/kube-dns:dns-tcp", "TCP", "KUBE-SVC-ERIFXISQEP7F7OF4"),
        ("kube-system/kube-dns:metrics", "TCP", "KUBE-SVC-JD5MR3NA4I4DYORP"),
        ("default/nginx", "TCP", "KUBE-SVC-2CMXP7HKUVJN7L6M"),  # unnamed port
    ],
)
def test_service_chain_names_match_real_clusters(service_port_name, protocol, chain):
    assert service_port_chain_name(service_port_name, protocol) == chain


@pytest.mark.parametrize(
    "service_port_name, protocol, endpoint, chain",
    [  # real
        ("default/kubernetes:https", "TCP", "172.18.0.2:6443", "KUBE-SEP-V2PECCYPB6X2GSCW"),
        ("kube-system/kube-dns:dns", "UDP", "10.244.0.5:53", "KUBE-SEP-LPGSDLJ3FDW46N4W"),
        ("kube-system/kube-dns:dns", "UDP", "10.244.0.8:53", "KUBE-SEP-SISP6ORRA37L3ZYK"),
        ("kube-system/kube-dns:dns-tcp", "TCP", "10.244.0.8:53", "KUBE-SEP-XRFUWCXKVCLGWYQC"),
        ("kube-system/kube-dns:metrics", "TCP", "10.244.0.8:9153", "KUBE-SEP-XNZERJBNXRGRQGMS"),
    ],
)
def test_endpoint_chain_names_match_real_clusters(service_port_name, protocol, endpoint, chain):
    assert service_port_endpoint_chain_name(service_port_name, protocol, endpoint) == chain


def test_chain_names_fit_iptables_limit_and_differ_per_protocol():
    tcp = service_port_chain_name("default/productpage:http", "TCP")
    udp = service_port_chain_name("default/productpage:http", "UDP")
    assert tcp != udp and len(tcp) == len(udp) == 25 <= 28


def test_service_port_name_of_unnamed_port():
    svc = ServicePortRule("default", "nginx", "", "10.96.0.9", 80, "TCP", [EP("10.244.1.2", 80)])
    assert svc.service_port_name == "default/nginx"
    assert '"default/nginx cluster IP"' in render_rules([svc])


# --- probabilities ----------------------------------------------------------------------


def test_probability_has_ten_decimals_like_kube_proxy():
    assert compute_probability(2) == "0.5000000000"
    assert compute_probability(3) == "0.3333333333"
    assert compute_probability(7) == "0.1428571429"


@pytest.mark.parametrize("n", [2, 3, 5])
def test_statistic_chain_gives_every_endpoint_an_equal_share(n):
    endpoints = [EP(f"10.244.{i}.7", 9080) for i in range(1, n + 1)]
    text = render_rules([productpage(*endpoints)])
    svc_chain = service_port_chain_name("default/productpage:http", "tcp")
    jumps = [r for r in rules_of(text, "nat", svc_chain) if "KUBE-SEP-" in r]
    assert len(jumps) == n
    remaining, shares = Fraction(1), []
    for rule in jumps:
        m = re.search(r"--probability (\S+)", rule)
        p = Fraction(m.group(1)) if m else Fraction(1)
        shares.append(remaining * p)
        remaining -= remaining * p
    assert remaining == 0
    assert all(abs(float(s) - 1 / n) < 1e-9 for s in shares)
    assert "--probability" not in jumps[-1]


# --- 0, 1 and 3 endpoints ----------------------------------------------------------------


def test_service_without_endpoints_is_rejected_in_filter_and_absent_from_nat():
    text = render_rules([productpage()])
    assert rules_of(text, "filter", "KUBE-SERVICES") == [
        '-A KUBE-SERVICES -d 10.96.12.34/32 -p tcp -m comment --comment '
        '"default/productpage:http has no endpoints" -m tcp --dport 9080 '
        "-j REJECT --reject-with icmp-port-unreachable"
    ]
    nat = parse_tables(text)["nat"]
    assert not [c for c in nat.chains if c.startswith(("KUBE-SVC-", "KUBE-SEP-"))]
    assert "10.96.12.34" not in "\n".join(nat.rules)


def test_service_with_one_endpoint():
    text = render_rules([productpage(EP("10.244.1.5", 9080))])
    svc = service_port_chain_name("default/productpage:http", "tcp")
    sep = service_port_endpoint_chain_name("default/productpage:http", "tcp", "10.244.1.5:9080")
    assert rules_of(text, "nat", "KUBE-SERVICES")[0] == (
        '-A KUBE-SERVICES -d 10.96.12.34/32 -p tcp -m comment --comment '
        f'"default/productpage:http cluster IP" -m tcp --dport 9080 -j {svc}'
    )
    assert rules_of(text, "nat", svc) == [
        f'-A {svc} ! -s 10.244.0.0/16 -d 10.96.12.34/32 -p tcp -m comment --comment '
        '"default/productpage:http cluster IP" -m tcp --dport 9080 -j KUBE-MARK-MASQ',
        f'-A {svc} -m comment --comment "default/productpage:http -> 10.244.1.5:9080" -j {sep}',
    ]
    assert rules_of(text, "nat", sep) == [
        f'-A {sep} -s 10.244.1.5/32 -m comment --comment "default/productpage:http" -j KUBE-MARK-MASQ',
        f'-A {sep} -p tcp -m comment --comment "default/productpage:http" -m tcp '
        "-j DNAT --to-destination 10.244.1.5:9080",
    ]
    assert rules_of(text, "filter", "KUBE-SERVICES") == []


def test_service_with_three_endpoints_sorted_like_kube_proxy():
    # kube-proxy sorts endpoints as "ip:port" strings: 10.244.10.x comes before 10.244.2.x.
    eps = [EP("10.244.2.5", 9080), EP("10.244.10.5", 9080), EP("10.244.1.5", 9080)]
    text = render_rules([productpage(*eps)])
    svc = service_port_chain_name("default/productpage:http", "tcp")
    jumps = [r for r in rules_of(text, "nat", svc) if "KUBE-SEP-" in r]
    order = [re.search(r"-> (\S+)\"", r).group(1) for r in jumps]
    assert order == ["10.244.1.5:9080", "10.244.10.5:9080", "10.244.2.5:9080"]
    assert "--probability 0.3333333333 " in jumps[0]
    assert "--probability 0.5000000000 " in jumps[1]
    assert "-m statistic" not in jumps[2]
    seps = [c for c in parse_tables(text)["nat"].chains if c.startswith("KUBE-SEP-")]
    assert len(seps) == 3


def test_udp_service_matches_real_rule_lines():
    dns = ServicePortRule("kube-system", "kube-dns", "dns", "10.96.0.10", 53, "UDP", [EP("10.244.0.8", 53)])
    lines = render_rules([dns]).splitlines()
    for real in (
        '-A KUBE-SEP-SISP6ORRA37L3ZYK -s 10.244.0.8/32 -m comment --comment "kube-system/kube-dns:dns" -j KUBE-MARK-MASQ',
        '-A KUBE-SEP-SISP6ORRA37L3ZYK -p udp -m comment --comment "kube-system/kube-dns:dns" -m udp -j DNAT --to-destination 10.244.0.8:53',
        '-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m comment --comment "kube-system/kube-dns:dns cluster IP" -m udp --dport 53 -j KUBE-SVC-TCOU7JCQXEZGVUNU',
    ):
        assert real in lines


def test_fixed_chains_match_real_rule_lines():
    lines = render_rules([]).splitlines()
    for real in (  # real
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully',
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    ):
        assert real in lines
    nat_services = rules_of(render_rules([productpage(EP("10.244.1.5", 80))]), "nat", "KUBE-SERVICES")
    assert "KUBE-NODEPORTS" in nat_services[-1] and "--dst-type LOCAL" in nat_services[-1]


def test_no_cluster_cidr_means_no_masquerade_rule():
    text = render_rules([productpage(EP("10.244.1.5", 80))], cluster_cidr=None)
    assert "! -s" not in text
    text = render_rules([productpage(EP("10.244.1.5", 80))], cluster_cidr="10.244.0.0/16")
    assert text.count("! -s 10.244.0.0/16 ") == 1


# --- shape and determinism --------------------------------------------------------------


def test_rendering_is_well_formed():
    services = [
        productpage(EP("10.244.1.5", 9080), EP("10.244.2.5", 9080)),
        ServicePortRule("default", "ratings", "http", "10.96.0.77", 9080, "TCP", []),
        ServicePortRule("kube-system", "kube-dns", "dns", "10.96.0.10", 53, "UDP", [EP("10.244.0.8", 53)]),
    ]
    text = render_rules(services)
    assert [l for l in text.splitlines() if l.startswith("*") or l == "COMMIT"] == [
        "*filter", "COMMIT", "*nat", "COMMIT"]
    builtin = {"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"}
    for name, table in parse_tables(text).items():
        assert len(table.chains) == len(set(table.chains)), name
        assert table.chains == sorted(table.chains)
        for rule in table.rules:
            assert rule.startswith("-A ")
            assert rule.split()[1] in set(table.chains) | builtin
            target = rule.split(" -j ")[1].split()[0]
            if target.startswith("KUBE-"):
                assert target in table.chains, rule


def test_rendering_is_deterministic():
    eps = [EP("10.244.1.5", 9080), EP("10.244.2.5", 9080), EP("10.244.3.5", 9080)]
    a = [productpage(*eps), ServicePortRule("default", "reviews", "http", "10.96.0.8", 9080, "TCP", eps[:1])]
    b = [ServicePortRule("default", "reviews", "http", "10.96.0.8", 9080, "TCP", eps[:1]),
         productpage(*random.Random(4).sample(eps, 3), eps[0])]  # shuffled, one duplicate
    assert render_rules(a) == render_rules(b)


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        render_rules([productpage(), productpage()])
    with pytest.raises(ValueError):
        render_rules([ServicePortRule("d", "s", "p", "10.96.0.1", 1, "SCTP", [])])
    with pytest.raises(ValueError):
        render_rules([ServicePortRule("d", "s", "p", "not-an-ip", 1, "TCP", [])])


# --- the restore payload ----------------------------------------------------------------


def as_saved(rendered: str) -> str:
    """What iptables-save would print after installing ``rendered`` into an empty netns."""
    out = []
    for line in rendered.splitlines():
        out.append(line)
        if line == "*filter":
            out += [":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
        elif line == "*nat":
            out += [f":{c} ACCEPT [0:0]" for c in ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")]
    return "# Generated by iptables-save\n" + "\n".join(out) + "\n"


def test_first_install_inserts_jumps_at_the_top_in_rendered_order():
    rendered = render_rules([productpage(EP("10.244.1.5", 9080))])
    payload = parse_tables(restore_payload(rendered, ""))
    inserts = [r for r in payload["filter"].rules if r.startswith("-I ")]
    assert inserts == [  # reversed, since each goes to position 1
        '-I OUTPUT 1 -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-I FORWARD 1 -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-I FORWARD 1 -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
    ]
    assert len([r for r in payload["nat"].rules if r.startswith("-I ")]) == 3
    own = [r for r in parse_tables(rendered)["nat"].rules if r.split()[1].startswith("KUBE-")]
    assert [r for r in payload["nat"].rules if r.startswith("-A ")] == own


def test_resync_adds_no_jump_twice_and_deletes_stale_chains():
    two = render_rules([productpage(EP("10.244.1.5", 9080), EP("10.244.2.5", 9080))])
    one = render_rules([productpage(EP("10.244.2.5", 9080))])
    gone = service_port_endpoint_chain_name("default/productpage:http", "tcp", "10.244.1.5:9080")
    payload = restore_payload(one, as_saved(two))
    assert "-I " not in payload
    nat = parse_tables(payload)["nat"]
    assert gone in nat.chains
    assert nat.rules[-1] == f"-X {gone}"
    assert not [r for r in nat.rules if r.startswith("-A") and gone in r]
    # Removing the only port of a service deletes its KUBE-SVC chain too.
    svc = service_port_chain_name("default/productpage:http", "tcp")
    payload = parse_tables(restore_payload(render_rules([]), as_saved(two)))
    assert {r for r in payload["nat"].rules if r.startswith("-X")} == {
        f"-X {svc}", f"-X {gone}",
        f"-X {service_port_endpoint_chain_name('default/productpage:http', 'tcp', '10.244.2.5:9080')}"}


def test_payload_leaves_other_programs_chains_alone():
    current = as_saved(render_rules([])).replace(
        "*nat\n", "*nat\n:ISTIO_POSTRT - [0:0]\n:KUBE-SEP-LEFTOVER - [0:0]\n")
    payload = parse_tables(restore_payload(render_rules([]), current))
    assert "ISTIO_POSTRT" not in payload["nat"].chains
    assert "-X KUBE-SEP-LEFTOVER" in payload["nat"].rules  # a stale kube-proxy chain


def test_parse_tables_reads_counters_and_skips_comments():
    tables = parse_tables("# x\n*nat\n:PREROUTING ACCEPT [1:60]\n[1:60] -A PREROUTING -j KUBE-SERVICES\nCOMMIT\n")
    assert tables["nat"].chains == ["PREROUTING"]
    assert tables["nat"].rules == ["-A PREROUTING -j KUBE-SERVICES"]
    with pytest.raises(ValueError):
        parse_tables("-A PREROUTING -j X\n")
