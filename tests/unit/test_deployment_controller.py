"""istiod's deployment controller, registered with the lab's API server as a controller is with
Kubernetes: it reads Gateways and writes the waypoint's objects through the API server."""

from __future__ import annotations

from lab.istiod.deployment_controller import DeploymentController
from lab.kube import addressing
from lab.kube.apiserver import ApiServer
from lab.kube.manifests import load_text

GATEWAY = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: default, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"""


def kinds(api: ApiServer) -> set[tuple[str, str]]:
    return {(k, n) for (k, _, n), o in api.objects.items() if o.meta.annotations.get("ambient-lab/owner")}


def test_a_waypoint_gateway_becomes_a_deployment_and_a_service_through_the_api_server():
    api = ApiServer(lab="t", nodes=addressing.plan_nodes("t", 1), controllers=[DeploymentController()])
    api.apply(load_text(GATEWAY, "gw.yaml").resources)
    assert kinds(api) == {("ServiceAccount", "waypoint"), ("Deployment", "waypoint"), ("Service", "waypoint")}
    assert api.get("Service", "default", "waypoint").cluster_ip.startswith("10.96.")
    pods = [p for p in api.pods("default") if p.meta.labels.get("gateway.networking.k8s.io/gateway-name")]
    assert len(pods) == 1 and pods[0].meta.labels["istio.io/dataplane-mode"] == "none"
    api.delete(load_text(GATEWAY, "gw.yaml").resources)
    assert kinds(api) == set() and not api.pods("default")


def test_without_istiod_a_gateway_is_only_an_object():
    """Kubernetes alone knows nothing of waypoints: the Gateway is stored, nothing is deployed."""
    api = ApiServer(lab="t", nodes=addressing.plan_nodes("t", 1))
    api.apply(load_text(GATEWAY, "gw.yaml").resources)
    assert kinds(api) == set() and api.list("Gateway")
