"""The waypoint's configuration: what istiod computes for one Envoy waypoint, from the cluster.

Real istiod builds the waypoint's listeners, routes and clusters from its registry and the
Gateway API / Istio objects (is:pilot/pkg/serviceregistry/ambient/waypoints.go for attachment,
is:pilot/pkg/networking/core/listener_waypoint.go, cluster_waypoint.go, and the Gateway API
conversion in is:pilot/pkg/config/kube/gateway/). The lab computes the same facts as plain data
from the supervisor's cluster snapshot (`cluster_snapshot()`), in one pure function,
`build_waypoint_config(snapshot, namespace, name)`:

- **Which Services the waypoint serves** (reference §3.5). The waypoint is a `Gateway` of class
  `istio-waypoint`; its label `istio.io/waypoint-for` is `service` (default), `workload`, `all`
  or `none`. A Service uses it when its own label `istio.io/use-waypoint` names it, or, without
  such a label, its namespace's label does (the object's own label wins; the value `none` opts
  out; `istio.io/use-waypoint-namespace` points to a waypoint in another namespace, which its
  listener must allow with `allowedRoutes.namespaces`). Services need `waypoint-for` service or
  all; pods addressed directly (`workloads`) need workload or all. Waypoint objects themselves
  never use a waypoint.
- **Per Service**: its HTTPRoutes (`parentRefs` of kind Service, group "" or `core`, optionally
  one port or port name). A route in the Service's namespace is a *producer* route (for every
  client); one in another namespace is a *consumer* route, used only by clients of that
  namespace, instead of the producer routes (GAMMA).
- **Backends** (Envoy clusters `inbound-vip|<port>|http|<hostname>`): the served Services
  themselves and every Service a backendRef names (reviews-v1 resolves to its own endpoints),
  each with its endpoints (pod IP, target port resolved per pod, node, identity, app and
  version labels) and its DestinationRule (connection pool, outlier detection, load balancer).
- **L7 AuthorizationPolicies**: those with `targetRefs` to a served Service, to this waypoint
  (`kind: Gateway`), or to the `istio-waypoint` GatewayClass from the root namespace.
- **Route status**, as Gateway API conditions per parent: `Accepted` (False when the route has
  something Istio rejects, e.g. an invalid regular expression, or names a port the Service
  lacks) and `ResolvedRefs` (False with `BackendNotFound` when a backend Service or its port
  does not exist, `InvalidKind` for other kinds). An unresolved backend does not stop the
  route: requests that would go to it get 500, the others are routed as before.
  `route_status_document` renders it as the route's `status` on a cluster (what istiod writes
  back to the API server).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from lab.istiod.authorization import ROOT_NAMESPACE
from lab.istiod.registry import (
    DOMAIN_SUFFIX,
    canonical_name,
    canonical_revision,
    has_cluster_ip,
    resolve_target_port,
    service_hostname,
    workload_name,
)
from lab.kube.model import USE_WAYPOINT_LABEL, WAYPOINT_FOR_LABEL, pod_labels_match
from lab.tls.identity import DEFAULT_TRUST_DOMAIN, Identity
from lab.waypoint import authz
from lab.waypoint import filters as flt
from lab.waypoint.breaker import DestinationPolicy
from lab.waypoint.routes import BackendRef, Route, parse_route

WAYPOINT_CLASS = "istio-waypoint"
USE_WAYPOINT_NAMESPACE_LABEL = "istio.io/use-waypoint-namespace"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
WAYPOINT_FOR_VALUES = ("service", "workload", "all", "none")
GATEWAY_GROUP = "gateway.networking.k8s.io"
CORE_GROUPS = ("", "core")


class WaypointNotFound(LookupError):
    """No Gateway of class istio-waypoint with that namespace/name."""


# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Condition:
    """A Gateway API status condition."""

    type: str
    status: str  # "True" | "False"
    reason: str
    message: str = ""


#: The controllerName Istio writes in the status of routes attached to Services (mesh/GAMMA).
MESH_CONTROLLER = "istio.io/mesh-controller"


@dataclass
class RouteStatus:
    """`status.parents[]` of one HTTPRoute: conditions per parent ("Service/ns/name[:port]"),
    and the parentRef each key stands for."""

    namespace: str
    name: str
    parents: dict[str, list[Condition]] = field(default_factory=dict)
    parent_refs: dict[str, Any] = field(default_factory=dict)

    def condition(self, parent: str, type_: str) -> Condition | None:
        return next((c for c in self.parents.get(parent, []) if c.type == type_), None)


def route_status_document(status: RouteStatus, controller: str = MESH_CONTROLLER) -> dict[str, Any]:
    """The HTTPRoute's `status` as `kubectl get httproute NAME -o yaml` shows it on a cluster
    (Gateway API RouteStatus: one entry per parentRef, each with its conditions)."""
    parents = []
    for key, conditions in sorted(status.parents.items()):
        ref = status.parent_refs.get(key)
        parent_ref: dict[str, Any] = {"group": ref.group, "kind": ref.kind, "name": ref.name,
                                      "namespace": ref.namespace} if ref is not None else {"name": key}
        if ref is not None and ref.port is not None:
            parent_ref["port"] = ref.port
        if ref is not None and ref.section_name:
            parent_ref["sectionName"] = ref.section_name
        parents.append({"parentRef": parent_ref, "controllerName": controller,
                        "conditions": [{"type": c.type, "status": c.status, "reason": c.reason, "message": c.message}
                                       for c in conditions]})
    return {"parents": parents}


@dataclass(frozen=True)
class Endpoint:
    """One pod behind a Service port (an EDS endpoint of the backend cluster)."""

    pod: str
    namespace: str
    ip: str
    port: int
    node: str = ""
    service_account: str = "default"
    workload: str = ""  # the Deployment (or the pod)
    app: str = ""  # canonical service
    version: str = ""  # canonical revision
    uid: str = ""
    trust_domain: str = DEFAULT_TRUST_DOMAIN

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def identity(self) -> Identity:
        return Identity(self.trust_domain, self.namespace, self.service_account)


@dataclass
class Backend:
    """One upstream cluster: a Service port and its endpoints."""

    namespace: str
    name: str
    hostname: str
    vip: str
    port: int
    target_port: int | str
    endpoints: list[Endpoint] = field(default_factory=list)
    policy: DestinationPolicy = field(default_factory=DestinationPolicy)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.namespace, self.name, self.port)

    @property
    def cluster_name(self) -> str:
        """Envoy's name of the cluster in the waypoint (cluster_waypoint.go)."""
        return f"inbound-vip|{self.port}|http|{self.hostname}"


@dataclass
class ServiceConfig:
    """A Service the waypoint serves: its VIP and ports, routes and L7 policies."""

    namespace: str
    name: str
    hostname: str
    vip: str
    ports: list[dict[str, Any]]
    producer_routes: list[tuple[Route, Any]] = field(default_factory=list)  # (route, parent ref)
    consumer_routes: dict[str, list[tuple[Route, Any]]] = field(default_factory=dict)
    policies: list[authz.L7Policy] = field(default_factory=list)

    def port_named(self, port: int) -> dict[str, Any] | None:
        return next((p for p in self.ports if p["port"] == port), None)

    def routes_for(self, port: int, client_namespace: str = "") -> list[Route]:
        """The routes for a request to `port` from a client in `client_namespace`: the consumer
        routes of that namespace if it has any, else the producer routes."""
        sp = self.port_named(port)
        name = (sp or {}).get("name", "")

        def applies(parent: Any) -> bool:
            return parent.port in (None, port) and parent.section_name in ("", name)

        consumer = [r for r, p in self.consumer_routes.get(client_namespace, []) if applies(p)]
        chosen = consumer or [r for r, p in self.producer_routes if applies(p)]
        return sorted(dict.fromkeys(chosen), key=lambda r: (r.namespace, r.name))

    def backend_ref(self, port: int) -> BackendRef:
        """The Service itself as a backend: where traffic goes without a route."""
        return BackendRef(name=self.name, namespace=self.namespace, port=port)


@dataclass
class WaypointConfig:
    """Everything one waypoint needs to handle L7 traffic."""

    namespace: str
    name: str
    waypoint_for: str
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    services: dict[str, ServiceConfig] = field(default_factory=dict)  # by hostname
    workloads: dict[str, Endpoint] = field(default_factory=dict)  # by pod IP (waypoint-for workload/all)
    backends: dict[tuple[str, str, int], Backend] = field(default_factory=dict)
    gateway_policies: list[authz.L7Policy] = field(default_factory=list)
    route_status: dict[str, RouteStatus] = field(default_factory=dict)
    policy_status: dict[str, list[str]] = field(default_factory=dict)

    @property
    def service_account(self) -> str:
        """Istio runs a waypoint as a service account named after its Gateway."""
        return self.name

    @property
    def identity(self) -> Identity:
        return Identity(self.trust_domain, self.namespace, self.service_account)

    def service_at(self, ip: str, port: int) -> ServiceConfig | None:
        """The served Service a CONNECT authority `VIP:port` addresses."""
        for svc in self.services.values():
            if svc.vip == ip and svc.port_named(port) is not None:
                return svc
        return None

    def policies_for(self, service: ServiceConfig | None) -> list[authz.L7Policy]:
        """The L7 policies for a request: the waypoint-wide ones plus the Service's."""
        return list(self.gateway_policies) + (list(service.policies) if service else [])

    def backend(self, ref: BackendRef | tuple[str, str, int | None]) -> Backend | None:
        key = ref.key if isinstance(ref, BackendRef) else ref
        return self.backends.get(key)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Attachment


def attached_waypoint(labels: dict[str, str], namespace: str,
                      namespace_labels: dict[str, str]) -> tuple[str, str] | None:
    """(namespace, name) of the waypoint an object (Service or Pod) uses, or None: its own
    `istio.io/use-waypoint` label, else its namespace's; `none` (or empty) opts out."""
    source = labels if USE_WAYPOINT_LABEL in labels else namespace_labels if USE_WAYPOINT_LABEL in namespace_labels \
        else None
    if source is None:
        return None
    name = source[USE_WAYPOINT_LABEL]
    if name in ("", "none"):
        return None
    return source.get(USE_WAYPOINT_NAMESPACE_LABEL) or namespace, name


def waypoint_for(gateway: dict) -> str:
    """The Gateway's `istio.io/waypoint-for` (default `service`)."""
    value = (gateway.get("labels") or {}).get(WAYPOINT_FOR_LABEL) or "service"
    return value if value in WAYPOINT_FOR_VALUES else "service"


def is_waypoint_object(labels: dict[str, str]) -> bool:
    """Waypoint pods and services never use a waypoint themselves."""
    return GATEWAY_NAME_LABEL in labels


def allows_namespace(gateway: dict, namespace: str, namespace_labels: dict[str, str]) -> bool:
    """Can objects of `namespace` use this waypoint? Its own namespace always; others when the
    mesh listener's allowedRoutes says `All`, or `Selector` matching the namespace's labels."""
    if namespace == gateway.get("namespace"):
        return True
    for listener in ((gateway.get("raw") or {}).get("spec") or {}).get("listeners") or []:
        allowed = ((listener.get("allowedRoutes") or {}).get("namespaces")) or {}
        frm = allowed.get("from") or "Same"
        if frm == "All":
            return True
        if frm == "Selector":
            wanted = (allowed.get("selector") or {}).get("matchLabels") or {}
            if all(namespace_labels.get(k) == v for k, v in wanted.items()):
                return True
    return False


def waypoints(snapshot: dict) -> list[dict]:
    """Every Gateway of class istio-waypoint in the snapshot."""
    return [o for o in _objects(snapshot, "Gateway")
            if ((o.get("raw") or {}).get("spec") or {}).get("gatewayClassName") == WAYPOINT_CLASS]


def _objects(snapshot: dict, kind: str) -> list[dict]:
    return sorted((o for o in snapshot.get("objects") or [] if o.get("kind") == kind),
                  key=lambda o: (o.get("namespace", ""), o.get("name", "")))


def _namespace_labels(snapshot: dict) -> dict[str, dict[str, str]]:
    return {n["name"]: n.get("labels") or {} for n in snapshot.get("namespaces") or []}


# ---------------------------------------------------------------------------------------------
# Endpoints and backends


def service_endpoints(svc: dict, port: dict, pods: Iterable[dict], trust_domain: str = DEFAULT_TRUST_DOMAIN
                      ) -> list[Endpoint]:
    """The ready endpoints of one Service port: running pods of its namespace that its selector
    picks, with the target port resolved per pod (pods without the named port are left out)."""
    out = []
    for pod in pods:
        if pod.get("namespace") != svc["namespace"] or not pod.get("ip") or pod.get("phase") != "Running":
            continue
        labels = pod.get("labels") or {}
        if not pod_labels_match(svc.get("selector") or {}, labels):
            continue
        target = resolve_target_port(port.get("target_port", port["port"]), pod)
        if not target:
            continue
        _, wl = workload_name(pod)
        out.append(Endpoint(pod=pod["name"], namespace=pod["namespace"], ip=pod["ip"], port=target,
                            node=pod.get("node", ""), service_account=pod.get("service_account") or "default",
                            workload=wl, app=canonical_name(labels, wl), version=canonical_revision(labels),
                            uid=pod.get("uid", ""), trust_domain=trust_domain))
    return sorted(out, key=lambda e: (e.ip, e.port))


def dr_host(host: str, namespace: str, domain_suffix: str = DOMAIN_SUFFIX) -> str:
    """A DestinationRule `host`: short names are relative to the rule's namespace."""
    if host == "*" or host.startswith("*.") or host.endswith(f".svc.{domain_suffix}"):
        return host
    if "." not in host:
        return service_hostname(host, namespace, domain_suffix)
    if host.count(".") == 1:
        return f"{host}.svc.{domain_suffix}"
    return host


def destination_policy(snapshot: dict, hostname: str, service_namespace: str, port: int,
                       root_namespace: str = ROOT_NAMESPACE, domain_suffix: str = DOMAIN_SUFFIX
                       ) -> DestinationPolicy:
    """The DestinationRule that applies to a backend: an exact host beats a wildcard (the
    longest wins); then a rule in the Service's namespace, then the root namespace, then by
    name. Its `portLevelSettings` for the port override the rule's own settings."""
    candidates = []
    for dr in _objects(snapshot, "DestinationRule"):
        spec = (dr.get("raw") or {}).get("spec") or {}
        if spec.get("workloadSelector") or not spec.get("host"):
            continue
        host = dr_host(str(spec["host"]), dr["namespace"], domain_suffix)
        if host == hostname:
            specificity = 10_000
        elif host == "*" or (host.startswith("*.") and hostname.endswith(host[1:])):
            specificity = len(host)
        else:
            continue
        ns_rank = 0 if dr["namespace"] == service_namespace else 1 if dr["namespace"] == root_namespace else 2
        candidates.append((-specificity, ns_rank, dr["namespace"], dr["name"], spec))
    if not candidates:
        return DestinationPolicy()
    *_, ns, name, spec = sorted(candidates, key=lambda c: c[:4])[0]
    tp = dict(spec.get("trafficPolicy") or {})
    for pls in tp.pop("portLevelSettings", None) or []:
        if (pls.get("port") or {}).get("number") == port:
            tp.update({k: v for k, v in pls.items() if k != "port"})
    return DestinationPolicy.from_traffic_policy(tp, f"{ns}/{name}")


# ---------------------------------------------------------------------------------------------
# Routes


def _route_targets(route: Route, svc: dict) -> list[Any]:
    return [p for p in route.parents if p.is_service and p.name == svc["name"] and p.namespace == svc["namespace"]]


def _check_backend(ref: BackendRef | flt.RequestMirror, services: dict[tuple[str, str], dict]) -> tuple[str, str]:
    """("", "") when the reference resolves, else (reason, message)."""
    if ref.kind != "Service" or ref.group not in CORE_GROUPS:
        return "InvalidKind", f"backendRef {ref.name}: kind {ref.group or 'core'}/{ref.kind} is not supported"
    svc = services.get((ref.namespace, ref.name))
    if svc is None:
        return "BackendNotFound", f"backend Service {ref.namespace}/{ref.name} not found"
    if ref.port is None:
        return "BackendNotFound", f"backendRef {ref.namespace}/{ref.name} has no port (required for a Service)"
    if not any(p["port"] == ref.port for p in svc.get("ports") or []):
        return "BackendNotFound", f"backend Service {ref.namespace}/{ref.name} has no port {ref.port}"
    return "", ""


def resolve_route(route: Route, services: dict[tuple[str, str], dict]) -> tuple[Route, list[Condition]]:
    """Mark every backendRef that does not resolve (it will answer 500), and compute the
    ResolvedRefs condition."""
    problems: list[tuple[str, str]] = []
    rules = []
    for rule in route.rules:
        backends = []
        for b in rule.backends:
            reason, message = _check_backend(b, services)
            if reason:
                problems.append((reason, message))
                b = replace(b, problem=message)
            backends.append(b)
        for f in list(rule.filters) + [f for b in rule.backends for f in b.filters]:
            if isinstance(f, flt.RequestMirror):
                reason, message = _check_backend(f, services)
                if reason:
                    problems.append((reason, f"mirror: {message}"))
        rules.append(replace(rule, backends=tuple(backends)))
    if problems:
        cond = Condition("ResolvedRefs", "False", problems[0][0], "; ".join(dict.fromkeys(m for _, m in problems)))
    else:
        cond = Condition("ResolvedRefs", "True", "ResolvedRefs", "")
    return replace(route, rules=tuple(rules)), [cond]


def accepted_condition(route: Route, parent: Any, svc: dict) -> Condition:
    if route.problems:
        return Condition("Accepted", "False", "UnsupportedValue", "; ".join(route.problems))
    ports = svc.get("ports") or []
    if parent.port is not None and not any(p["port"] == parent.port for p in ports):
        return Condition("Accepted", "False", "NoMatchingParent",
                         f"Service {svc['namespace']}/{svc['name']} has no port {parent.port}")
    if parent.section_name and not any(p.get("name") == parent.section_name for p in ports):
        return Condition("Accepted", "False", "NoMatchingParent",
                         f"Service {svc['namespace']}/{svc['name']} has no port named {parent.section_name!r}")
    return Condition("Accepted", "True", "Accepted", "; ".join(route.warnings))


# ---------------------------------------------------------------------------------------------
# Policies


def policy_targets(raw: dict) -> list[dict]:
    spec = raw.get("spec") or {}
    refs = list(spec.get("targetRefs") or [])
    if spec.get("targetRef"):
        refs.append(spec["targetRef"])
    return refs


# ---------------------------------------------------------------------------------------------
# The whole config


def build_waypoint_config(snapshot: dict, namespace: str, name: str, *, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                          domain_suffix: str = DOMAIN_SUFFIX, root_namespace: str = ROOT_NAMESPACE) -> WaypointConfig:
    """The configuration of waypoint `namespace/name` in this cluster snapshot."""
    gateway = next((g for g in waypoints(snapshot) if g["namespace"] == namespace and g["name"] == name), None)
    if gateway is None:
        raise WaypointNotFound(f"no Gateway {namespace}/{name} of class {WAYPOINT_CLASS}")
    ns_labels = _namespace_labels(snapshot)
    wp_for = waypoint_for(gateway)
    cfg = WaypointConfig(namespace=namespace, name=name, waypoint_for=wp_for, trust_domain=trust_domain)
    pods = snapshot.get("pods") or []
    all_services = {(s["namespace"], s["name"]): s for s in snapshot.get("services") or []}

    def uses_us(labels: dict[str, str], obj_ns: str) -> bool:
        if is_waypoint_object(labels):
            return False
        target = attached_waypoint(labels, obj_ns, ns_labels.get(obj_ns, {}))
        return target == (namespace, name) and allows_namespace(gateway, obj_ns, ns_labels.get(obj_ns, {}))

    # Services and workloads that use this waypoint
    served: list[dict] = []
    if wp_for in ("service", "all"):
        served = [s for s in all_services.values()
                  if has_cluster_ip(s) and uses_us(s.get("labels") or {}, s["namespace"])]
    if wp_for in ("workload", "all"):
        for pod in pods:
            if pod.get("ip") and pod.get("phase") == "Running" and uses_us(pod.get("labels") or {}, pod["namespace"]):
                _, wl = workload_name(pod)
                labels = pod.get("labels") or {}
                cfg.workloads[pod["ip"]] = Endpoint(
                    pod=pod["name"], namespace=pod["namespace"], ip=pod["ip"], port=0, node=pod.get("node", ""),
                    service_account=pod.get("service_account") or "default", workload=wl,
                    app=canonical_name(labels, wl), version=canonical_revision(labels), uid=pod.get("uid", ""),
                    trust_domain=trust_domain)

    def add_backend(svc: dict, port: int) -> None:
        key = (svc["namespace"], svc["name"], port)
        sp = next((p for p in svc.get("ports") or [] if p["port"] == port), None)
        if key in cfg.backends or sp is None:
            return
        hostname = service_hostname(svc["name"], svc["namespace"], domain_suffix)
        cfg.backends[key] = Backend(namespace=svc["namespace"], name=svc["name"], hostname=hostname,
                                    vip=svc.get("cluster_ip") or "", port=port,
                                    target_port=sp.get("target_port", port),
                                    endpoints=service_endpoints(svc, sp, pods, trust_domain),
                                    policy=destination_policy(snapshot, hostname, svc["namespace"], port,
                                                              root_namespace, domain_suffix))

    for svc in sorted(served, key=lambda s: (s["namespace"], s["name"])):
        hostname = service_hostname(svc["name"], svc["namespace"], domain_suffix)
        cfg.services[hostname] = ServiceConfig(namespace=svc["namespace"], name=svc["name"], hostname=hostname,
                                               vip=svc["cluster_ip"], ports=list(svc.get("ports") or []))
        for sp in svc.get("ports") or []:
            add_backend(svc, sp["port"])

    # HTTPRoutes attached to served Services
    by_key = {(s.namespace, s.name): s for s in cfg.services.values()}
    for obj in _objects(snapshot, "HTTPRoute"):
        route = parse_route(obj["namespace"], obj["name"], obj.get("raw") or {})
        resolved, resolved_conds = resolve_route(route, all_services)
        status = RouteStatus(obj["namespace"], obj["name"])
        for key, svc_cfg in by_key.items():
            svc = all_services[key]
            for parent in _route_targets(route, svc):
                accepted = accepted_condition(route, parent, svc)
                status.parents[str(parent)] = [accepted, *resolved_conds]
                status.parent_refs[str(parent)] = parent
                if accepted.status != "True":
                    continue
                if obj["namespace"] == svc["namespace"]:
                    svc_cfg.producer_routes.append((resolved, parent))
                else:
                    svc_cfg.consumer_routes.setdefault(obj["namespace"], []).append((resolved, parent))
                for rule in resolved.rules:
                    refs: list[Any] = [b for b in rule.backends if not b.problem]
                    refs += [f for f in list(rule.filters) + [f for b in rule.backends for f in b.filters]
                             if isinstance(f, flt.RequestMirror)]
                    for ref in refs:
                        target = all_services.get((ref.namespace, ref.name))
                        if target is not None and ref.port is not None:
                            add_backend(target, ref.port)
        if status.parents:
            cfg.route_status[f"{obj['namespace']}/{obj['name']}"] = status

    # L7 AuthorizationPolicies with targetRefs
    for obj in _objects(snapshot, "AuthorizationPolicy"):
        raw = obj.get("raw") or {}
        refs = policy_targets(raw)
        if not refs:
            continue
        policy = authz.parse_policy(obj["namespace"], obj["name"], raw)
        used = False
        for ref in refs:
            kind, group, target = ref.get("kind"), ref.get("group") or "", ref.get("name")
            if kind == "Service" and group in CORE_GROUPS and (obj["namespace"], target) in by_key:
                by_key[(obj["namespace"], target)].policies.append(policy)
                used = True
            elif (kind == "Gateway" and group in (GATEWAY_GROUP, "") and target == name
                  and obj["namespace"] == namespace):
                cfg.gateway_policies.append(policy)
                used = True
            elif kind == "GatewayClass" and target == WAYPOINT_CLASS and obj["namespace"] == root_namespace:
                cfg.gateway_policies.append(policy)
                used = True
        if used:
            cfg.policy_status[f"{obj['namespace']}/{obj['name']}"] = list(policy.warnings)
    return cfg
