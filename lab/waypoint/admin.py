"""The waypoint's admin interface: what Envoy serves on its admin port 15000 (`/config_dump`,
`/stats`, `/stats/prometheus`, `/ready`), read by `istioctl proxy-config` and by Prometheus.

The lab serves it on a unix stream socket, `<state dir>/admin.sock`, one JSON object per line
in each direction:

    {"op": "config"}   -> {"config": {...}}   the waypoint's configuration (below)
    {"op": "metrics"}  -> {"metrics": "<Prometheus text>"}  istio_requests_total and
                          istio_request_duration_milliseconds, reporter="waypoint"
    {"op": "stats"}    -> {"stats": {...}}    Envoy-style counters: downstream_*, upstream_*,
                          rbac_*, and per cluster its circuit breaker and outlier detection
    {"op": "ready"}    -> {"ready": true|false}  config received and certificate held
    {"op": "step_mode", "on": true|false[, "timeout": s]}, {"op": "release", "flow": id|"*",
    "scope": "step"|"flow"}, {"op": "held"}: step mode, exactly as ztunnel's (lab/ztunnel/stepper.py)
    anything else      -> {"error": "..."}

`config` is what `istioctl proxy-config all <waypoint>` would show, as plain data: the three
listeners (connect_terminate, main_internal with one filter chain per served Service port,
connect_originate with its SAN matcher), the served Services with their HTTPRoutes (producer
and consumer), the clusters `inbound-vip|<port>|http|<hostname>` with their endpoints and
DestinationRule settings, the L7 AuthorizationPolicies, and the routes' Gateway API status.
`config_dump` builds it from a WaypointConfig (a pure function).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from lab.waypoint import filters as flt
from lab.waypoint.config import Backend, RouteStatus, ServiceConfig, WaypointConfig
from lab.waypoint.routes import Route, RouteRule

OPS = ("config", "metrics", "stats", "ready")


# ------------------------------------------------------------------------------------ config
def _match(m: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"path": {"type": m.path.type, "value": m.path.value}}
    if m.method:
        out["method"] = m.method
    if m.headers:
        out["headers"] = [{"name": h.name, "type": h.type, "value": h.value} for h in m.headers]
    if m.query_params:
        out["queryParams"] = [{"name": q.name, "type": q.type, "value": q.value} for q in m.query_params]
    return out


def _filter(f: flt.Filter) -> dict[str, Any]:
    return {"type": type(f).__name__, **asdict(f)}  # type: ignore[call-overload]


def _rule(route: Route, rule: RouteRule) -> dict[str, Any]:
    r = rule.retry
    return {"name": route.route_name(rule), "matches": [_match(m) for m in rule.matches],
            "backends": [{"backend": str(b), "weight": b.weight, "problem": b.problem,
                          "filters": [_filter(f) for f in b.filters]} for b in rule.backends],
            "filters": [_filter(f) for f in rule.filters], "timeout": rule.timeout,
            "retry": {"attempts": r.attempts, "retry_on": list(r.retry_on),
                      "retriable_status_codes": list(r.retriable_status_codes),
                      "per_try_timeout": r.per_try_timeout, "backoff_base": r.backoff_base}}


def _route(route: Route, parent: Any) -> dict[str, Any]:
    return {"route": route.key, "parent": str(parent), "accepted": route.accepted,
            "problems": list(route.problems), "warnings": list(route.warnings),
            "rules": [_rule(route, rule) for rule in route.rules]}


def _service(svc: ServiceConfig) -> dict[str, Any]:
    return {"hostname": svc.hostname, "namespace": svc.namespace, "name": svc.name, "vip": svc.vip,
            "ports": [{"name": p.get("name", ""), "port": p["port"], "target_port": p.get("target_port", p["port"])}
                      for p in svc.ports],
            "routes": [_route(r, p) for r, p in svc.producer_routes],
            "consumer_routes": {ns: [_route(r, p) for r, p in rs] for ns, rs in sorted(svc.consumer_routes.items())},
            "policies": [p.key for p in svc.policies]}


def _cluster(b: Backend) -> dict[str, Any]:
    pol = b.policy
    return {"name": b.cluster_name, "service": f"{b.namespace}/{b.name}", "vip": b.vip, "port": b.port,
            "target_port": b.target_port,
            "endpoints": [{"pod": e.pod, "address": e.address, "node": e.node, "identity": e.identity.uri,
                           "app": e.app, "version": e.version} for e in b.endpoints],
            "destination_rule": pol.source, "load_balancer": pol.load_balancer,
            "connection_pool": asdict(pol.connection_pool),
            "outlier_detection": asdict(pol.outlier_detection) if pol.outlier_detection else None}


def _status(st: RouteStatus) -> dict[str, Any]:
    return {parent: [asdict(c) for c in conds] for parent, conds in sorted(st.parents.items())}


def config_dump(cfg: WaypointConfig | None, *, san_prefix: str = "", listen: str = "0.0.0.0:15008") -> dict[str, Any]:
    """The waypoint's configuration as plain data (empty until the first config arrived)."""
    if cfg is None:
        return {"waypoint": "", "listeners": [], "services": [], "clusters": [], "policies": []}
    chains = []
    for svc in cfg.services.values():
        for p in svc.ports:
            chains.append({"destination": f"{svc.vip}:{p['port']}", "service": svc.hostname,
                           "cluster": f"inbound-vip|{p['port']}|http|{svc.hostname}"})
    for ip, ep in sorted(cfg.workloads.items()):
        chains.append({"destination": ip, "pod": f"{ep.namespace}/{ep.pod}", "direct": True})
    gateway_keys = {p.key for p in cfg.gateway_policies}
    policies = list({p.key: p for p in cfg.gateway_policies + [p for s in cfg.services.values()
                                                                for p in s.policies]}.values())
    return {
        "waypoint": f"{cfg.namespace}/{cfg.name}",
        "waypoint_for": cfg.waypoint_for,
        "identity": cfg.identity.uri,
        "listeners": [
            {"name": "connect_terminate", "address": listen, "tls": "mutual, client certificate required",
             "protocol": "HTTP/2 CONNECT"},
            {"name": "main_internal", "filter_chains": chains},
            {"name": "connect_originate", "port": 15008, "san_prefix": san_prefix},
        ],
        "services": [_service(s) for _, s in sorted(cfg.services.items())],
        "workloads": [{"ip": ip, "pod": f"{e.namespace}/{e.pod}", "identity": e.identity.uri}
                      for ip, e in sorted(cfg.workloads.items())],
        "clusters": [_cluster(b) for _, b in sorted(cfg.backends.items())],
        "policies": [{"policy": p.key, "action": p.action, "dry_run": p.dry_run, "rules": len(p.rules),
                      "scope": "waypoint" if p.key in gateway_keys else "service",
                      "warnings": list(p.warnings)} for p in policies],
        "route_status": {k: _status(v) for k, v in sorted(cfg.route_status.items())},
        "policy_status": dict(sorted(cfg.policy_status.items())),
    }
