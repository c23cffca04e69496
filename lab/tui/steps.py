"""The steps of one connection, as a learner reads them: a short title and one plain sentence.

Every event a proxy emits about a connection (ztunnel's `src/proxy/outbound.rs` and `inbound.rs`
steps: captured by the in-pod REDIRECT, original destination, the plan, the certificate, the mTLS
handshake, the HBONE CONNECT, the authorization decision, the upstream connection, the close)
already carries a sentence in `msg`. This module adds the short title the timeline lists, and
decides what a step means for the connection as a whole: was it denied, did it fail, is it over.

Pure functions over plain data; no Textual.
"""

from __future__ import annotations

from typing import Any

# kind -> the short title of the step in a timeline (kinds not listed show their kind).
STEP_TITLES: dict[str, str] = {
    "conn.captured": "captured",
    "conn.original_dst": "original destination",
    "conn.plan": "plan",
    "conn.forwarded": "forwarded",
    "tls.certificate": "certificate",
    "tls.handshake": "mTLS handshake",
    "hbone.connect.sent": "CONNECT sent",
    "hbone.connect.received": "CONNECT received",
    "rbac.decision": "authorization",
    "conn.upstream": "upstream connected",
    "hbone.response": "CONNECT response",
    "conn.closed": "closed",
    "conn.failed": "failed",
}

# kind -> where to read more: the lab's module beside the real source it mirrors, and the docs page.
_DOCS = "istio.io/latest/docs/ambient/architecture"
STEP_REFERENCES: dict[str, str] = {
    "conn.captured": f"lab/cni/iptables.py (istio cni/pkg/iptables/iptables.go); {_DOCS}/traffic-redirection/",
    "conn.original_dst": "lab/ztunnel/socket.py (ztunnel src/socket.rs: SO_ORIGINAL_DST)",
    "conn.plan": "lab/ztunnel/proxy/decision.py (ztunnel src/proxy/outbound.rs build_request)",
    "tls.certificate": "lab/ztunnel/identity_manager.py (ztunnel src/identity/manager.rs)",
    "tls.handshake": f"lab/tls/contexts.py (ztunnel src/tls/); {_DOCS}/hbone/",
    "hbone.connect.sent": f"lab/hbone/headers.py (ztunnel src/proxy/outbound.rs create_hbone_request); {_DOCS}/hbone/",
    "hbone.connect.received": "lab/ztunnel/proxy/inbound.py (ztunnel src/proxy/inbound.rs)",
    "rbac.decision": "lab/ztunnel/rbac.py (ztunnel src/rbac.rs); istio.io/latest/docs/ambient/usage/l4-policy/",
    "conn.upstream": "lab/ztunnel/proxy/inbound.py (ztunnel src/proxy/inbound.rs: the client IP is kept)",
    "hbone.response": "lab/ztunnel/proxy/inbound.py (ztunnel src/proxy/inbound.rs build_response)",
    "conn.closed": "lab/ztunnel/access_log.py (ztunnel src/proxy/metrics.rs: connection complete)",
    "conn.failed": "lab/ztunnel/access_log.py (ztunnel src/proxy.rs: the error texts)",
    "waypoint.route": "lab/waypoint/routes.py (Gateway API HTTPRoute; istio pilot/pkg/networking/core/waypoint.go)",
    "waypoint.authz": "lab/waypoint/authz.py (Envoy RBAC filter); istio.io/latest/docs/ambient/usage/l7-features/",
    "waypoint.tunnel.out": "lab/waypoint/proxy.py (istio cluster_waypoint.go connect_originate)",
}


def step_reference(kind: str) -> str:
    """Where a learner reads more about this step (the lab's module and the real source), or ""."""
    return STEP_REFERENCES.get(kind, "")


# Words in a failure that mean "a policy said no" (ztunnel logs RBAC denials this way).
DENIAL_WORDS = ("rbac", "denied", "authorization", "not allowed", "forbidden", "401")


def step_title(kind: str) -> str:
    """The timeline's short name for one step."""
    return STEP_TITLES.get(kind, kind)


def is_denial(kind: str, fields: dict[str, Any]) -> bool:
    """Did this step refuse the connection because of an AuthorizationPolicy?

    ztunnel's `assert_rbac` either allows or denies; the destination answers the CONNECT with
    401 on a deny (reference §2.1), and the connection then fails with an RBAC error.
    """
    if kind == "rbac.decision":
        if "allowed" in fields:
            return not fields["allowed"]
        decision = str(fields.get("decision") or fields.get("result") or fields.get("action") or "").lower()
        return decision in ("deny", "denied", "reject")
    if kind == "hbone.response":
        return str(fields.get("status", "")) == "401"
    if kind == "conn.failed":
        err = str(fields.get("error", "")).lower()
        return any(w in err for w in DENIAL_WORDS)
    return False


def decisive_policy(fields: dict[str, Any]) -> str:
    """The policy an authorization step names: the one that decided, or else the ALLOW policies
    evaluated without a match ("allow policies exist, but none allowed")."""
    for key in ("policy", "policies", "matched", "rule", "evaluated"):
        v = fields.get(key)
        if v:
            return ", ".join(v) if isinstance(v, (list, tuple)) else str(v)
    return ""


def format_details(fields: dict[str, Any]) -> list[tuple[str, str]]:
    """The fields of a step as (name, value) lines, lists and dicts flattened readably."""
    out = []
    for k, v in fields.items():
        if v in (None, "", [], {}):
            continue
        if isinstance(v, dict):
            text = ", ".join(f"{a}={b}" for a, b in v.items())
        elif isinstance(v, (list, tuple)):
            text = ", ".join(str(x) for x in v)
        else:
            text = str(v)
        out.append((k, text))
    return out
