"""istiod's gateway deployment controller: a Gateway of class `istio-waypoint` becomes a waypoint.

Mirrors is:pilot/pkg/config/kube/gateway/deploymentcontroller.go: for each such Gateway, istiod
creates a ServiceAccount, a Deployment and a Service named after it (from the template
is:manifests/charts/istio-control/istio-discovery/files/waypoint.yaml), labelled
`gateway.networking.k8s.io/gateway-name: <name>` and `istio.io/dataplane-mode: none`: a waypoint
is never captured by ztunnel, and shows PROTOCOL TCP in `ztunnel-config workloads`.

`DeploymentController` is registered with the lab's API server, which runs it on every change,
and it writes only through the API server, as the real one watches Gateways and writes through
the Kubernetes API. The waypoint's pod is played by lab/waypoint (the Envoy that the real image
runs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lab.kube.manifests import parse_object
from lab.kube.model import Resource, Source

if TYPE_CHECKING:
    from lab.kube.apiserver import ApiServer

WAYPOINT_CLASS = "istio-waypoint"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
PROXY_IMAGE = "docker.io/istio/proxyv2:1.28.0"
OWNER_ANNOTATION = "ambient-lab/owner"


def is_waypoint_gateway(obj: Resource) -> bool:
    return obj.kind == "Gateway" and obj.spec.get("gatewayClassName") == WAYPOINT_CLASS


def waypoint_objects(gateway: Resource) -> list[Resource]:
    """The ServiceAccount, Deployment and Service istiod creates for a waypoint Gateway."""
    ns, name = gateway.namespace, gateway.name
    owner = {OWNER_ANNOTATION: f"Gateway/{ns}/{name}"}
    labels = {GATEWAY_NAME_LABEL: name, "gateway.istio.io/managed": "istio.io-mesh-controller"}
    pod_labels = {**labels, "istio.io/dataplane-mode": "none", "sidecar.istio.io/inject": "false"}
    where = Source(f"{gateway.source.file} (generated for Gateway {ns}/{name})", gateway.source.line)
    docs = [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": owner}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": owner},
         "spec": {"replicas": 1, "selector": {"matchLabels": {GATEWAY_NAME_LABEL: name}},
                  "template": {"metadata": {"labels": pod_labels},
                               "spec": {"serviceAccountName": name,
                                        "containers": [{"name": "istio-proxy", "image": PROXY_IMAGE,
                                                        "ports": [{"containerPort": 15008, "name": "mesh"},
                                                                  {"containerPort": 15021, "name": "status-port"}]}]}}}},
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": name, "namespace": ns, "labels": labels, "annotations": owner},
         "spec": {"selector": {GATEWAY_NAME_LABEL: name},
                  "ports": [{"name": "mesh", "port": 15008, "targetPort": 15008},
                            {"name": "status-port", "port": 15021, "targetPort": 15021}]}},
    ]
    return [parse_object(d, where, ns) for d in docs]


def owner_of(obj: Resource) -> str:
    return obj.meta.annotations.get(OWNER_ANNOTATION, "")


class DeploymentController:
    """Keeps each waypoint Gateway's ServiceAccount, Deployment and Service in the API server, and
    removes them when their Gateway goes (deploymentcontroller.go's Reconcile)."""

    def reconcile(self, api: "ApiServer") -> None:
        wanted = {o.key: o for g in api.list("Gateway") if is_waypoint_gateway(g) for o in waypoint_objects(g)}
        for obj in list(api.objects.values()):
            if owner_of(obj) and obj.key not in wanted:
                api.remove(obj)
        for key, obj in wanted.items():
            if key not in api.objects:
                api.create(obj)
