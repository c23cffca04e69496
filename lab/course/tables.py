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
