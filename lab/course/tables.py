"""Truth tables a "build it" exercise's function is graded on, before it meets live traffic.

Each case is named in words a learner recognises, so the hint for a wrong answer can say which
situation the learner's code got wrong and what ztunnel does there.
"""

from __future__ import annotations

from lab.tls.identity import Identity
from lab.ztunnel.rbac import Authorization, Connection

CURL = Identity("cluster.local", "default", "curl")
SLEEP = Identity("cluster.local", "default", "sleep")
FROM_CURL = Connection("10.244.1.2", CURL, "10.244.2.3", 9080)
FROM_SLEEP = Connection("10.244.1.4", SLEEP, "10.244.2.3", 9080)
PLAINTEXT = Connection("10.244.1.9", None, "10.244.2.3", 9080)


def policy(name: str, action: str, matches: list[dict], dry_run: bool = False) -> Authorization:
    return Authorization.from_resource({"name": name, "namespace": "default", "scope": "NAMESPACE", "action": action,
                                        "rules": [{"clauses": [{"matches": matches}]}] if matches is not None else [],
                                        "dry_run": dry_run})


ALLOW_CURL = policy("allow-curl", "ALLOW", [{"principals": [{"exact": "cluster.local/ns/default/sa/curl"}]}])
DENY_SLEEP = policy("deny-sleep", "DENY", [{"principals": [{"exact": "cluster.local/ns/default/sa/sleep"}]}])
DENY_CURL = policy("deny-curl", "DENY", [{"principals": [{"exact": "cluster.local/ns/default/sa/curl"}]}])
DENY_PLAINTEXT = policy("deny-plaintext", "DENY", [{"not_principals": [{"presence": {}}]}])
ALLOW_NOTHING = policy("allow-nothing", "ALLOW", None)
DRY_DENY_ALL = policy("dry-deny", "DENY", [{}], dry_run=True)


def rbac_cases() -> list[tuple[str, list[Authorization], Connection]]:
    """(situation, the destination's policies, the connection)."""
    return [
        ("no policy at all, curl connecting", [], FROM_CURL),
        ("an ALLOW for curl, curl connecting", [ALLOW_CURL], FROM_CURL),
        ("an ALLOW for curl, sleep connecting", [ALLOW_CURL], FROM_SLEEP),
        ("a DENY for sleep and no ALLOW, curl connecting", [DENY_SLEEP], FROM_CURL),
        ("a DENY for sleep and no ALLOW, sleep connecting", [DENY_SLEEP], FROM_SLEEP),
        ("an ALLOW and a DENY both for curl, curl connecting (DENY is checked first)", [ALLOW_CURL, DENY_CURL],
         FROM_CURL),
        ("a DENY for plaintext, a client without identity", [DENY_PLAINTEXT], PLAINTEXT),
        ("a DENY for plaintext, curl with its certificate", [DENY_PLAINTEXT], FROM_CURL),
        ("an ALLOW policy with no rules (it allows nothing), curl connecting", [ALLOW_NOTHING], FROM_CURL),
        ("a dry-run DENY of everything, curl connecting (dry-run is never enforced)", [DRY_DENY_ALL], FROM_CURL),
    ]


def hbone_request_cases() -> list[tuple[str, dict]]:
    """(situation, the arguments ztunnel passes to create_hbone_request)."""
    from lab.hbone.headers import Baggage

    bag = Baggage(cluster_name="Kubernetes", namespace="default", workload_kind="deployment", workload_name="curl",
                  service_name="curl", service_version="latest")
    return [
        ("a connection from 10.244.1.2:43210 to pod 10.244.2.3 port 9080, for Service productpage",
         dict(dst_ip="10.244.2.3", dst_port=9080, src_ip="10.244.1.2", src_port=43210,
              service_host="productpage.default.svc.cluster.local", baggage=bag, trace_id="4bf92f3577b34da6a3ce929d0e0e4736")),
        ("a connection to a pod's IP (no Service), from 10.244.1.2:50000",
         dict(dst_ip="10.244.2.7", dst_port=8080, src_ip="10.244.1.2", src_port=50000, service_host=None, baggage=bag,
              trace_id="0af7651916cd43dd8448eb211c80319c")),
        ("an IPv6 pod, fd00::7 port 9080, from fd00::2 port 41000",
         dict(dst_ip="fd00::7", dst_port=9080, src_ip="fd00::2", src_port=41000, service_host=None, baggage=bag,
              trace_id="a3ce929d0e0e47364bf92f3577b34da6")),
    ]


def identity_cases() -> list[tuple[str, list[Identity], list[Identity]]]:
    """(situation, identities the server presented, identities the client expected)."""
    pp = Identity("cluster.local", "default", "bookinfo-productpage")
    return [
        ("the server proves exactly the expected identity", [pp], [pp]),
        ("the server proves one of two expected identities (a service's SANs)", [pp],
         [Identity("cluster.local", "default", "web"), pp]),
        ("an impostor whose service account only starts with the expected one",
         [Identity("cluster.local", "default", "bookinfo-productpage-evil")], [pp]),
        ("the right namespace and trust domain, another service account", [Identity("cluster.local", "default", "curl")],
         [pp]),
        ("the right service account in another namespace", [Identity("cluster.local", "other", "bookinfo-productpage")],
         [pp]),
        ("the right name in another trust domain", [Identity("evil.example", "default", "bookinfo-productpage")], [pp]),
        ("a certificate with no SPIFFE identity at all", [], [pp]),
    ]


def decision_state():
    """A small mesh as ztunnel holds it (xDS resources): productpage and reviews in the mesh, a
    legacy pod outside it, ratings behind a waypoint, an empty service (see decision_cases)."""
    from lab.proto.xds import ADDRESS_TYPE, Resource
    from lab.ztunnel.state import ProxyState

    def workload(name, ip, sa, protocol="HBONE", services=None):
        return {"workload": {"uid": f"Kubernetes//Pod/default/{name}", "name": name, "namespace": "default",
                             "addresses": [ip], "node": "n1", "service_account": sa, "trust_domain": "",
                             "tunnel_protocol": protocol, "canonical_name": name, "canonical_revision": "v1",
                             "workload_type": "deployment", "workload_name": name, "services": services or {},
                             "authorization_policies": [], "status": "HEALTHY", "waypoint": None}}

    def service(name, vip, ports, waypoint=None):
        return {"service": {"name": name, "namespace": "default", "hostname": f"{name}.default.svc.cluster.local",
                            "addresses": [vip], "ports": [{"service_port": s, "target_port": t} for s, t in ports],
                            "subject_alt_names": [], "waypoint": waypoint, "load_balancing": None}}

    def key(name):
        return f"default/{name}.default.svc.cluster.local"

    bodies = [
        service("productpage", "10.96.0.10", [(9080, 9080)]),
        workload("productpage-v1", "10.244.1.10", "bookinfo-productpage", services={key("productpage"): {"9080": 9080}}),
        service("legacy", "10.96.0.71", [(80, 8080)]),
        workload("legacy-web", "10.244.2.71", "default", protocol="NONE", services={key("legacy"): {"80": 8080}}),
        service("waypoint", "10.96.0.50", [(15008, 15008)]),
        workload("waypoint-abc", "10.244.2.50", "waypoint", protocol="NONE", services={key("waypoint"): {"15008": 15008}}),
        service("ratings", "10.96.0.30", [(9080, 9080)], waypoint={"address": "10.96.0.50", "hbone_mtls_port": 15008}),
        workload("ratings-v1", "10.244.2.31", "bookinfo-ratings", services={key("ratings"): {"9080": 9080}}),
        service("empty", "10.96.0.60", [(80, 8080)]),
        workload("curl", "10.244.1.20", "curl"),
    ]
    state = ProxyState()
    state.apply(ADDRESS_TYPE, [Resource(b["workload"]["uid"] if "workload" in b else key(b["service"]["name"]), "v1", b)
                               for b in bodies])
    return state


def decision_cases() -> list[tuple[str, tuple[str, int]]]:
    """(situation, the original destination the app in pod curl connected to)."""
    return [
        ("Service productpage's ClusterIP (its pod is in the mesh)", ("10.96.0.10", 9080)),
        ("pod productpage-v1's own IP", ("10.244.1.10", 9080)),
        ("Service legacy's ClusterIP (its pod is not in the mesh)", ("10.96.0.71", 80)),
        ("Service ratings, which has a waypoint", ("10.96.0.30", 9080)),
        ("Service empty, which has no endpoint", ("10.96.0.60", 80)),
        ("an address outside the cluster", ("192.0.2.7", 443)),
    ]
