"""istiod attaches a waypoint only once it is ready (its Gateway has an address), as
waypoints.go's gatewayToWaypointTransform does; until then traffic goes straight to the pods."""

from __future__ import annotations

from lab.istiod.server import build_config
from lab.kube.manifests import load_text
from lab.proto.xds import ADDRESS_TYPE
from lab.supervisor.server import Supervisor

MANIFESTS = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: web, image: nginx, ports: [{containerPort: 8080}]}]}
"""


def web_waypoint(sup: Supervisor):
    config, _ = build_config(sup.cluster_snapshot())
    return config[ADDRESS_TYPE]["shop/web.shop.svc.cluster.local"]["service"]["waypoint"]


def set_waypoint_pod_phase(sup: Supervisor, phase: str) -> None:
    for p in sup.api.pods("shop"):
        if p.meta.labels.get("gateway.networking.k8s.io/gateway-name") == "waypoint":
            p.phase = phase


def test_a_waypoint_is_attached_only_once_its_gateway_has_an_address():
    sup = Supervisor("wptest", 1, [])
    sup.api.apply(load_text(MANIFESTS).resources)
    for p in sup.api.pods():
        p.phase = "Running"
    set_waypoint_pod_phase(sup, "ContainerCreating")
    # not ready: no address in the Gateway's status, so ztunnel is told nothing of the waypoint
    assert sup.gateway_status()[("Gateway", "shop", "waypoint")]["status"] == {"addresses": []}
    assert web_waypoint(sup) is None
    set_waypoint_pod_phase(sup, "Running")
    gw_ip = sup.api.get("Service", "shop", "waypoint").cluster_ip
    assert web_waypoint(sup) == {"hostname": {"namespace": "shop", "hostname": "waypoint.shop.svc.cluster.local"},
                                 "hbone_mtls_port": 15008}
    assert sup.gateway_status()[("Gateway", "shop", "waypoint")]["address"] == gw_ip
    # a waypoint pod that dies later does not detach it: the address stays (its traffic fails closed)
    set_waypoint_pod_phase(sup, "Error")
    assert web_waypoint(sup) is not None
    assert sup.gateway_status()[("Gateway", "shop", "waypoint")]["programmed"] == "False"
