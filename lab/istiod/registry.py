"""istiod's ambient service registry: pods and services -> ztunnel's `Address` resources (WDS).

Real istiod builds these with krt collections over the Kubernetes informers
(is:pilot/pkg/serviceregistry/ambient/workloads.go, services.go, waypoints.go) and pushes them
as `type.googleapis.com/istio.workload.Address`, a `oneof{Workload, Service}`
(zt:proto/workload.proto). The lab does the same from the supervisor's cluster snapshot (the
informers' view), as one pure function:

- a **Workload** for every pod that has an IP (keyed by the pod's uid). Its `tunnel_protocol`
  is what decides, at every source ztunnel, whether traffic to it goes in the mesh: HBONE if and
  only if istio-cni enrolled the pod (annotation `ambient.istio.io/redirection: enabled`), or
  the pod declares it speaks HBONE itself (label `networking.istio.io/tunnel: http`,
  `native_tunnel`); otherwise NONE, plain TCP;
- a **Service** for every Kubernetes Service with a ClusterIP (keyed "namespace/hostname");
  a numeric targetPort is copied, a named one is 0 in the Service and resolved per endpoint,
  in each Workload's `services` map.

Resources are plain dicts with workload.proto's field names, wrapped as `{"workload": {...}}`
or `{"service": {...}}`. IPs are plain strings. In `services`, the port map's keys are the
service ports as strings (JSON object keys), its values the target ports as ints:
`{"default/productpage.default.svc.cluster.local": {"9080": 9080}}`.

Waypoints (next step of the lab) plug in through `waypoint_of`, a function from an object
(kind "workload" or "service" and its snapshot dict, plus the namespace's labels) to a
GatewayAddress dict or None; the default attaches none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lab.istiod import authorization
from lab.kube.model import REDIRECTION_ANNOTATION, pod_labels_match
from lab.tls.identity import DEFAULT_TRUST_DOMAIN

#: The cluster's DNS domain (Kubernetes' cluster domain; not to be confused with the trust domain).
DOMAIN_SUFFIX = "cluster.local"
#: istiod's name for the (only) cluster.
CLUSTER_ID = "Kubernetes"
TUNNEL_LABEL = "networking.istio.io/tunnel"

#: A pod or service (kind, its snapshot dict, its namespace's labels) -> GatewayAddress or None.
WaypointLookup = Callable[[str, dict, dict[str, str]], dict | None]


def no_waypoints(kind: str, obj: dict, namespace_labels: dict[str, str]) -> dict | None:
    """Before waypoints exist: nothing is attached to a waypoint (reference §3.5)."""
    return None


def service_hostname(name: str, namespace: str, domain_suffix: str = DOMAIN_SUFFIX) -> str:
    """A Service's FQDN, `name.namespace.svc.cluster.local`."""
    return f"{name}.{namespace}.svc.{domain_suffix}"


def service_key(namespace: str, hostname: str) -> str:
    """The resource name of a Service, also the key of Workload.services."""
    return f"{namespace}/{hostname}"


def tunnel_protocol(pod: dict) -> tuple[str, bool]:
    """(tunnel_protocol, native_tunnel) of a pod (is:…/ambient/workloads.go): HBONE when the
    node agent has enrolled it, HBONE + native_tunnel when it terminates HBONE itself, NONE
    otherwise."""
    if (pod.get("labels") or {}).get(TUNNEL_LABEL) == "http":
        return "HBONE", True
    if (pod.get("annotations") or {}).get(REDIRECTION_ANNOTATION) == "enabled":
        return "HBONE", False
    return "NONE", False


def workload_name(pod: dict) -> tuple[str, str]:
    """(workload_type, workload_name): the Deployment that owns the pod, or the pod itself."""
    kind, _, name = (pod.get("owner") or "").partition("/")
    if kind == "Deployment" and name:
        return "deployment", name
    return "pod", pod["name"]


def canonical_name(labels: dict[str, str], fallback: str) -> str:
    """The service name telemetry reports (Istio's canonical service labels, then the workload)."""
    for key in ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app"):
        if labels.get(key):
            return labels[key]
    return fallback


def canonical_revision(labels: dict[str, str]) -> str:
    for key in ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"):
        if labels.get(key):
            return labels[key]
    return "latest"


def resolve_target_port(target: int | str, pod: dict) -> int:
    """A Service targetPort for one endpoint: a number as is, a name through the pod's named
    container ports; 0 when the pod has no port of that name."""
    if isinstance(target, int):
        return target
    if isinstance(target, str) and target.isdigit():
        return int(target)
    return int((pod.get("ports") or {}).get(target, 0))


def has_cluster_ip(svc: dict) -> bool:
    return bool(svc.get("cluster_ip")) and svc.get("cluster_ip") != "None"


def workload_services(pod: dict, services: list[dict], domain_suffix: str = DOMAIN_SUFFIX) -> dict[str, dict[str, int]]:
    """Workload.services: every ClusterIP service of the pod's namespace whose selector picks the
    pod, with its ports resolved for this pod (unresolvable named ports are left out)."""
    out: dict[str, dict[str, int]] = {}
    for svc in services:
        if svc["namespace"] != pod["namespace"] or not has_cluster_ip(svc):
            continue
        if not pod_labels_match(svc.get("selector") or {}, pod.get("labels") or {}):
            continue
        ports = {}
        for sp in svc.get("ports") or []:
            target = resolve_target_port(sp.get("target_port", sp["port"]), pod)
            if target:
                ports[str(sp["port"])] = target
        out[service_key(svc["namespace"], service_hostname(svc["name"], svc["namespace"], domain_suffix))] = ports
    return out


def build_workload(pod: dict, snapshot: dict, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                   domain_suffix: str = DOMAIN_SUFFIX, waypoint_of: WaypointLookup = no_waypoints,
                   root_namespace: str = authorization.ROOT_NAMESPACE, dry_run_enabled: bool = False
                   ) -> dict[str, Any]:
    """One pod -> Workload (workload.proto field names)."""
    labels = pod.get("labels") or {}
    protocol, native = tunnel_protocol(pod)
    wl_type, wl_name = workload_name(pod)
    ns_labels = _namespace_labels(snapshot, pod["namespace"])
    return {
        "uid": pod["uid"],
        "name": pod["name"],
        "namespace": pod["namespace"],
        "addresses": [pod["ip"]],
        "hostname": "",
        "network": "",
        "node": pod.get("node", ""),
        "service_account": pod.get("service_account") or "default",
        "trust_domain": trust_domain,
        "tunnel_protocol": protocol,
        "native_tunnel": native,
        "canonical_name": canonical_name(labels, wl_name),
        "canonical_revision": canonical_revision(labels),
        "workload_type": wl_type,
        "workload_name": wl_name,
        "services": workload_services(pod, snapshot.get("services") or [], domain_suffix),
        "authorization_policies": authorization.workload_policy_names(snapshot, pod["namespace"], labels,
                                                                      root_namespace, dry_run_enabled),
        "status": "HEALTHY" if pod.get("phase") == "Running" else "UNHEALTHY",
        "capacity": 1,
        "cluster_id": CLUSTER_ID,
        "waypoint": waypoint_of("workload", pod, ns_labels),
    }


def build_service(svc: dict, snapshot: dict, domain_suffix: str = DOMAIN_SUFFIX,
                  waypoint_of: WaypointLookup = no_waypoints) -> dict[str, Any]:
    """One ClusterIP Service -> Service (workload.proto field names)."""
    ports = []
    for sp in svc.get("ports") or []:
        target = sp.get("target_port", sp["port"])
        numeric = target if isinstance(target, int) else int(target) if str(target).isdigit() else 0
        ports.append({"service_port": sp["port"], "target_port": numeric})
    return {
        "name": svc["name"],
        "namespace": svc["namespace"],
        "hostname": service_hostname(svc["name"], svc["namespace"], domain_suffix),
        "addresses": [svc["cluster_ip"]],
        "ports": ports,
        "subject_alt_names": [],
        "waypoint": waypoint_of("service", svc, _namespace_labels(snapshot, svc["namespace"])),
        "load_balancing": None,
    }


def _namespace_labels(snapshot: dict, namespace: str) -> dict[str, str]:
    for ns in snapshot.get("namespaces") or []:
        if ns.get("name") == namespace:
            return ns.get("labels") or {}
    return {}


def is_workload_pod(pod: dict) -> bool:
    """Pods that become Workloads: they have an IP and have not terminated."""
    return bool(pod.get("ip")) and bool(pod.get("uid")) and pod.get("phase") not in ("Failed", "Succeeded")


def build_addresses(snapshot: dict, trust_domain: str = DEFAULT_TRUST_DOMAIN, *,
                    domain_suffix: str = DOMAIN_SUFFIX, waypoint_of: WaypointLookup = no_waypoints,
                    root_namespace: str = authorization.ROOT_NAMESPACE, dry_run_enabled: bool = False
                    ) -> dict[str, dict]:
    """The whole WDS state: resource name -> Address ({"workload": ...} or {"service": ...})."""
    out: dict[str, dict] = {}
    for pod in snapshot.get("pods") or []:
        if is_workload_pod(pod):
            out[pod["uid"]] = {"workload": build_workload(pod, snapshot, trust_domain, domain_suffix, waypoint_of,
                                                          root_namespace, dry_run_enabled)}
    for svc in snapshot.get("services") or []:
        if has_cluster_ip(svc):
            resource = build_service(svc, snapshot, domain_suffix, waypoint_of)
            out[service_key(svc["namespace"], resource["hostname"])] = {"service": resource}
    return out
