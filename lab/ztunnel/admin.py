"""ztunnel's admin interface (zt:src/admin.rs ``localhost:15000``: ``/config_dump``,
``/metrics`` on 15020, readiness on 15021), the source of ``istioctl ztunnel-config`` and of the
lab's ``ambient-lab ztunnel-config`` / ``ambient-lab metrics``.

The lab serves it on a unix stream socket next to the node's other sockets, one JSON object per
line in each direction::

    {"op": "workloads"}    -> {"workloads": [...]}    pods handed over by ZDS: uid, name, namespace,
                              service_account, netns_inode, netns_dev, listeners, started
    {"op": "connections"}  -> {"connections": [...]} flow, uid, workload (name.ns), direction,
                              local, remote, target, protocol (TCP|HBONE)
    {"op": "ready"}        -> {"ready": true|false}   ZDS snapshot received (and, with istiod,
                              the first full xDS config)
    {"op": "config_dump"}  -> {"config_dump": {"workloads", "services", "policies",
                              "certificates", "connections"}}
    {"op": "metrics"}      -> {"metrics": "<Prometheus text exposition>"}
    {"op": "step_mode", "on": true|false[, "timeout": s]}
                           -> {"step_mode": {"on", "changed", "released": [...], "held", "timeout"}}
    {"op": "release", "flow": id|"*", "scope": "step"|"flow"}
                           -> {"release": {"released": [...], "held": [...]}}
    {"op": "held"}         -> {"held": [{flow, step, next, node, pod, since, held_s, ...}]}
    anything else          -> {"error": "..."}

The three step-mode operations (the lab's mesh debugger, not in ztunnel) are lab/ztunnel/stepper.py.

config_dump entries (what ``istioctl zc`` prints as columns):

- workloads: uid, name, namespace, workload_name, addresses, node, service_account,
  trust_domain, protocol (HBONE|TCP), waypoint ("" or ip:15008), status, canonical_name,
  canonical_revision, services (["ns/hostname"]), authorization_policies;
- services: name, namespace, hostname, vips, ports [{service_port, target_port}], waypoint,
  endpoints [{uid, workload, status}], healthy, total (ENDPOINTS = healthy/total);
- policies: name, namespace, action (Allow|Deny), scope (Global|Namespace|WorkloadSelector),
  dry_run, rules (how many);
- certificates: one row per certificate of each identity's chain: identity (spiffe URI), type
  (Leaf|Intermediate|Root, NA while there is none), status (Available|Initializing|Unavailable),
  valid, serial (hex), not_before, not_after (RFC 3339), error;
- connections: as the ``connections`` op.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cryptography import x509

from lab.tls.identity import Identity
from lab.ztunnel.rbac import Authorization
from lab.ztunnel.state import GatewayAddress, ProxyState, Service, Workload

if TYPE_CHECKING:
    from lab.ztunnel.identity_manager import IdentityManager

OPS = ("workloads", "connections", "ready", "config_dump", "metrics")


# ------------------------------------------------------------------------------------ answers
def rfc3339(moment: datetime) -> str:
    """`2026-01-02T03:04:05Z`, the time format of istioctl's certificate columns."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _gateway(gw: GatewayAddress | None) -> str:
    return "" if gw is None else str(gw)


def workload_dump(w: Workload) -> dict[str, Any]:
    return {"uid": w.uid, "name": w.name, "namespace": w.namespace, "workload_name": w.workload_name or w.name,
            "addresses": list(w.addresses), "node": w.node, "service_account": w.service_account,
            "trust_domain": w.trust_domain, "protocol": "HBONE" if w.hbone else "TCP",
            "waypoint": _gateway(w.waypoint), "status": w.status, "canonical_name": w.canonical_name,
            "canonical_revision": w.canonical_revision, "services": sorted(w.services),
            "authorization_policies": list(w.authorization_policies)}


def service_dump(s: Service, state: ProxyState) -> dict[str, Any]:
    endpoints = []
    for uid in sorted(state.endpoints(s)):
        w = state.workloads.get(uid)
        endpoints.append({"uid": uid, "workload": f"{w.name}.{w.namespace}" if w else "",
                          "status": w.status if w else "UNKNOWN"})
    healthy = sum(1 for e in endpoints if e["status"] == "HEALTHY")
    return {"name": s.name, "namespace": s.namespace, "hostname": s.hostname, "vips": list(s.addresses),
            "ports": [{"service_port": p.service_port, "target_port": p.target_port} for p in s.ports],
            "waypoint": _gateway(s.waypoint), "endpoints": endpoints, "healthy": healthy, "total": len(endpoints)}


_SCOPES = {"GLOBAL": "Global", "NAMESPACE": "Namespace", "WORKLOAD_SELECTOR": "WorkloadSelector"}


def policy_dump(p: Authorization) -> dict[str, Any]:
    return {"name": p.name, "namespace": p.namespace, "action": p.action.capitalize(),
            "scope": _SCOPES.get(p.scope, p.scope), "dry_run": p.dry_run, "rules": len(p.rules)}


def chain_rows(identity: Identity, chain_pem: list[bytes], status: str, now: datetime,
               error: str = "") -> list[dict[str, Any]]:
    """One row per certificate of a chain (leaf first, root last), as istioctl lists them (pure)."""
    rows = []
    for i, pem in enumerate(chain_pem):
        cert = x509.load_pem_x509_certificate(pem)
        kind = "Leaf" if i == 0 else ("Root" if i == len(chain_pem) - 1 else "Intermediate")
        rows.append({"identity": identity.uri, "type": kind, "status": status,
                     "valid": cert.not_valid_before_utc <= now <= cert.not_valid_after_utc,
                     "serial": format(cert.serial_number, "x"), "not_before": rfc3339(cert.not_valid_before_utc),
                     "not_after": rfc3339(cert.not_valid_after_utc), "error": error})
    return rows


def certificate_dump(manager: IdentityManager, now: datetime | None = None) -> list[dict[str, Any]]:
    """The certificates section: every identity the manager holds or is fetching."""
    now = now or datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    for identity in manager.identities():
        usable = manager.store.get(identity, now)
        current = manager.store.current(identity)
        error = manager.last_error(identity) or ""
        status = "Available" if usable is not None else ("Unavailable" if error else "Initializing")
        cert = usable or current
        if cert is None:
            rows.append({"identity": identity.uri, "type": "NA", "status": status, "valid": False, "serial": "",
                         "not_before": "", "not_after": "", "error": error})
        else:
            rows += chain_rows(identity, cert.chain_pem, status, now, error)
    return rows


def config_dump(state: ProxyState, certificates: list[dict[str, Any]],
                connections: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """ztunnel's /config_dump as plain data (pure given its inputs)."""
    return {
        "workloads": [workload_dump(w) for w in sorted(state.workloads.values(),
                                                       key=lambda w: (w.namespace, w.name, w.uid))],
        "services": [service_dump(s, state) for _, s in sorted(state.services.items())],
        "policies": [policy_dump(p) for _, p in sorted(state.policies.items())],
        "certificates": certificates,
        "connections": list(connections),
    }
