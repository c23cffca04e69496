"""Which waypoint a Service or a Pod uses: istiod's waypoint attachment.

Mirrors is:pilot/pkg/serviceregistry/ambient/waypoints.go (reference/istio-ambient.md §3.5):
a Service or Pod uses the waypoint named by its own `istio.io/use-waypoint` label, else by its
namespace's (`none` opts out); the Gateway must be of class `istio-waypoint`, accept that kind of
traffic (`istio.io/waypoint-for`: service by default, workload, all or none) and allow the
object's namespace. Waypoints never get a waypoint themselves. The answer is a GatewayAddress,
which istiod puts in the Service's (or Workload's) `waypoint` field for ztunnel.

A waypoint is attached only once its Gateway has an address in its status, which happens when
its Deployment has a ready pod (`gatewayToWaypointTransform` skips a Gateway while
`status.addresses` is empty; `fetchWaypointForTarget` reports WaypointIsNotReady). Until then
ztunnel sends the traffic straight to the pods and the waypoint's L7 policy is skipped: the
bypass Istio's docs warn about (istio/istio.io#17520). `ambient-lab waypoint apply --wait`
waits for that moment. (The lab keeps the address once assigned, as the Service keeps its IP.)
"""

from __future__ import annotations

from typing import Callable

from lab.waypoint.config import (
    WAYPOINT_CLASS,
    allows_namespace,
    attached_waypoint,
    is_waypoint_object,
    waypoint_for,
)

HBONE_PORT = 15008
ACCEPTS = {"service": ("service", "all"), "workload": ("workload", "all")}


def waypoint_gateways(snapshot: dict) -> dict[tuple[str, str], dict]:
    """(namespace, name) -> the Gateway object, for every Gateway of class istio-waypoint."""
    return {(o["namespace"], o["name"]): o for o in snapshot.get("objects", [])
            if o["kind"] == "Gateway" and ((o.get("raw") or {}).get("spec") or {}).get("gatewayClassName") == WAYPOINT_CLASS}


def gateway_has_address(gateway: dict) -> bool:
    """Is the waypoint ready to be used: does its Gateway's status carry an address?"""
    return bool(((gateway.get("status") or {}).get("addresses")))


def waypoint_lookup(snapshot: dict, domain_suffix: str = "cluster.local") -> Callable[[str, dict, dict], dict | None]:
    """The registry's `waypoint_of(kind, obj, namespace_labels)` for this snapshot."""
    gateways = {k: g for k, g in waypoint_gateways(snapshot).items() if gateway_has_address(g)}

    def waypoint_of(kind: str, obj: dict, namespace_labels: dict[str, str]) -> dict | None:
        labels = obj.get("labels") or {}
        if is_waypoint_object(labels):
            return None
        ref = attached_waypoint(labels, obj["namespace"], namespace_labels)
        gateway = gateways.get(ref) if ref else None
        if gateway is None or waypoint_for(gateway) not in ACCEPTS[kind]:
            return None
        if not allows_namespace(gateway, obj["namespace"], namespace_labels):
            return None
        ns, name = ref
        return {"hostname": {"namespace": ns, "hostname": f"{name}.{ns}.svc.{domain_suffix}"},
                "hbone_mtls_port": HBONE_PORT}

    return waypoint_of
