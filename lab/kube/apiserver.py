"""The lab's API server: an object store plus the controllers that turn objects into pods.

Real Kubernetes splits this over the API server, the Deployment and ReplicaSet controllers,
the scheduler, the EndpointSlice controller and IPAM. The lab keeps them as pure code over one
store so that a whole cluster state can be computed (and tested) without touching the kernel;
the supervisor then makes the kernel match it (lab/kube/kubelet.py, lab/kube/kubeproxy.py).

Controllers from outside Kubernetes (istiod's deployment controller, which turns a waypoint
Gateway into a Deployment and a Service) are registered with `ApiServer(controllers=[...])` and
write through the same store, as a real controller watches the API server and writes through it:
the API server knows nothing of Istio.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from lab.apps import app_for_image
from lab.common.errors import LabError, ManifestError, NotFound
from lab.kube import addressing, scheduler
from lab.kube.model import (
    Deployment,
    Namespace,
    Node,
    ObjectMeta,
    Pod,
    Resource,
    Service,
    pod_labels_match,
)

# Short names and plurals, as `kubectl get` accepts them.
KIND_ALIASES = {
    "po": "Pod", "pod": "Pod", "pods": "Pod",
    "svc": "Service", "service": "Service", "services": "Service",
    "deploy": "Deployment", "deployment": "Deployment", "deployments": "Deployment",
    "ns": "Namespace", "namespace": "Namespace", "namespaces": "Namespace",
    "sa": "ServiceAccount", "serviceaccount": "ServiceAccount", "serviceaccounts": "ServiceAccount",
    "no": "Node", "node": "Node", "nodes": "Node",
    "gtw": "Gateway", "gateway": "Gateway", "gateways": "Gateway",
    "httproute": "HTTPRoute", "httproutes": "HTTPRoute",
    "networkpolicy": "NetworkPolicy", "networkpolicies": "NetworkPolicy", "netpol": "NetworkPolicy",
    "authorizationpolicy": "AuthorizationPolicy", "authorizationpolicies": "AuthorizationPolicy", "ap": "AuthorizationPolicy",
    "peerauthentication": "PeerAuthentication", "peerauthentications": "PeerAuthentication", "pa": "PeerAuthentication",
    "destinationrule": "DestinationRule", "destinationrules": "DestinationRule", "dr": "DestinationRule",
}

SYSTEM_NAMESPACES = ("default", "kube-system", "istio-system")


def resolve_kind(word: str) -> str:
    kind = KIND_ALIASES.get(word.lower())
    if not kind:
        raise LabError(f'the server doesn\'t have a resource type "{word}"',
                       "try: " + ", ".join(sorted({"pods", "svc", "deploy", "ns", "sa", "nodes", "gtw"})))
    return kind


@dataclass
class Endpoint:
    """One ready pod behind one service port (an EndpointSlice entry)."""

    pod: str
    namespace: str
    ip: str
    port: int
    node: str


@dataclass
class ApplyResult:
    resource: Resource
    action: str  # created | configured | unchanged


class Controller(Protocol):
    """A controller in the Kubernetes sense: it reads objects from the API server and creates,
    updates or deletes the objects it owns through it, until what exists is what it wants."""

    def reconcile(self, api: "ApiServer") -> None: ...


@dataclass
class ApiServer:
    """The desired state of one lab's cluster, and the derived pods, addresses and endpoints."""

    lab: str
    nodes: list[Node]
    controllers: list[Controller] = field(default_factory=list)  # run before the built-in ones
    objects: dict[tuple[str, str, str], Resource] = field(default_factory=dict)
    created: dict[tuple[str, str, str], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for ns in SYSTEM_NAMESPACES:
            self._put(Namespace(kind="Namespace", api_version="v1", meta=ObjectMeta(name=ns),
                                raw={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
        self._used_service_ips = {addressing.KUBERNETES_SERVICE_IP, addressing.CLUSTER_DNS_IP}

    # -- the store ---------------------------------------------------------------------------
    def _put(self, obj: Resource) -> None:
        self.created.setdefault(obj.key, time.time())
        self.objects[obj.key] = obj

    def list(self, kind: str, namespace: str | None = None) -> list[Resource]:
        """Objects of a kind, in one namespace or (None) all, sorted as kubectl sorts: namespace, name."""
        out = [o for (k, ns, _), o in self.objects.items() if k == kind and (namespace is None or ns == namespace)]
        return sorted(out, key=lambda o: (o.namespace, o.name))

    def get(self, kind: str, namespace: str, name: str) -> Resource:
        ns = "" if kind == "Namespace" else namespace
        obj = self.objects.get((kind, ns, name))
        if obj is None:
            raise NotFound(f'{kind.lower()}s "{name}" not found' + (f" in namespace {namespace!r}" if ns else ""))
        return obj

    def create(self, obj: Resource) -> None:
        """Create an object on a controller's behalf (a Service gets its ClusterIP, as on apply)."""
        if isinstance(obj, Service):
            self._assign_cluster_ip(obj, None)
        self._put(obj)

    def remove(self, obj: Resource) -> None:
        """Delete an object on a controller's behalf."""
        self.objects.pop(obj.key, None)

    def pods(self, namespace: str | None = None) -> list[Pod]:
        return self.list("Pod", namespace)  # type: ignore[return-value]

    def services(self, namespace: str | None = None) -> list[Service]:
        return self.list("Service", namespace)  # type: ignore[return-value]

    # -- apply / delete -----------------------------------------------------------------------
    def check_namespaces(self, resources: list[Resource]) -> None:
        """Objects in a namespace that neither exists nor is created by the same apply are refused."""
        known = {o.name for o in self.list("Namespace")} | {r.name for r in resources if r.kind == "Namespace"}
        for r in resources:
            if r.namespace and r.namespace not in known:
                raise ManifestError(r.source, f'namespaces "{r.namespace}" not found',
                                    f"create it first: add a Namespace named {r.namespace} or apply it with -n")

    def apply(self, resources: list[Resource]) -> list[ApplyResult]:
        """`kubectl apply`: create or replace each object, then run the controllers."""
        self.check_namespaces(resources)
        results = []
        for r in resources:
            old = self.objects.get(r.key)
            if old is not None and old.raw == r.raw:
                results.append(ApplyResult(r, "unchanged"))
                continue
            if isinstance(r, Service):
                self._assign_cluster_ip(r, old)
            self._put(r)
            results.append(ApplyResult(r, "configured" if old is not None else "created"))
        self.reconcile()
        return results

    def delete(self, resources: list[Resource]) -> list[Resource]:
        """`kubectl delete -f`: remove each object that exists; a namespace takes its contents along
        (those named in the same file are reported deleted too, as kubectl reports them)."""
        gone = []
        cascaded: dict[tuple, Resource] = {}
        for r in resources:
            if r.key in self.objects:
                gone.append(self.objects.pop(r.key))
                if r.kind == "Namespace":
                    for key in [k for k in self.objects if k[1] == r.name]:
                        cascaded[key] = self.objects.pop(key)
            elif r.key in cascaded:
                gone.append(cascaded[r.key])
        self.reconcile()
        return gone

    def set_labels(self, kind: str, namespace: str, name: str, changes: dict[str, str | None]) -> Resource:
        """`kubectl label`: set (value) or remove (None) labels; returns the object."""
        obj = self.get(kind, namespace, name)
        for k, v in changes.items():
            if v is None:
                obj.meta.labels.pop(k, None)
            else:
                obj.meta.labels[k] = v
        obj.raw.setdefault("metadata", {})["labels"] = dict(obj.meta.labels)
        return obj

    def _assign_cluster_ip(self, svc: Service, old: Resource | None) -> None:
        if svc.type == "ClusterIP" and svc.cluster_ip == "None":
            return  # headless
        if isinstance(old, Service) and old.cluster_ip and not svc.cluster_ip:
            svc.cluster_ip = old.cluster_ip
        if not svc.cluster_ip:
            svc.cluster_ip = addressing.allocate_service_ip(svc.namespace, svc.name, self._used_service_ips)
        self._used_service_ips.add(svc.cluster_ip)

    # -- controllers --------------------------------------------------------------------------
    def reconcile(self) -> None:
        """The registered controllers, then the Deployment controller, the scheduler and IPAM."""
        for controller in self.controllers:
            controller.reconcile(self)
        wanted: dict[tuple, Pod] = {}
        for d in self.list("Deployment"):
            assert isinstance(d, Deployment) and d.template
            h = scheduler.pod_template_hash(d.namespace, d.name, d.template)
            for i in range(d.replicas):
                name = scheduler.pod_name(d.name, h, i)
                labels = {**d.template.labels, "pod-template-hash": h}
                meta = ObjectMeta(name=name, namespace=d.namespace, labels=labels,
                                  annotations=dict(d.template.annotations))
                wanted[("Pod", d.namespace, name)] = Pod(
                    kind="Pod", api_version="v1", meta=meta, template=d.template, owner=f"Deployment/{d.name}",
                    raw={"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": d.namespace}},
                    source=d.source)
        # Pods owned by deployments that no longer want them go away; bare pods stay.
        for key, pod in list(self.objects.items()):
            if key[0] == "Pod" and isinstance(pod, Pod) and pod.owner and key not in wanted:
                del self.objects[key]
        for key, pod in wanted.items():
            if key not in self.objects:
                self._put(pod)
        self._place_pods()

    def _place_pods(self) -> None:
        load: dict[str, int] = {}
        used: set[str] = set()
        for p in self.pods():
            if p.node:
                load[p.node] = load.get(p.node, 0) + 1
                used.add(p.ip)
        order = {key: i for i, key in enumerate(self.created)}  # creation order, never a clock tie
        for p in sorted(self.pods(), key=lambda p: order.get(p.key, 0)):
            if p.node or p.template is None:
                continue
            node_name = scheduler.schedule(p.template.node_name, p.template.node_selector, self.nodes, load)
            if node_name is None:
                p.phase = "Pending"
                continue
            node = next(n for n in self.nodes if n.name == node_name)
            p.node = node.name
            p.ip = addressing.allocate_pod_ip(node.pod_cidr, used)
            used.add(p.ip)
            load[node.name] = load.get(node.name, 0) + 1
            p.netns = addressing.pod_netns(self.lab, p.namespace, p.name)
            image = p.template.containers[0].image
            p.app, _ = app_for_image(image)
            if "gateway.networking.k8s.io/gateway-name" in p.meta.labels and "proxyv2" in image:
                p.app = "waypoint"  # the Envoy of a waypoint: played by lab/waypoint

    def endpoints(self, svc: Service) -> dict[str, list[Endpoint]]:
        """EndpointSlice controller: per service port name, the running pods its selector picks."""
        out: dict[str, list[Endpoint]] = {}
        pods = [p for p in self.pods(svc.namespace) if p.phase == "Running" and pod_labels_match(svc.selector, p.meta.labels)]
        for sp in svc.ports:
            eps = []
            for p in pods:
                port = resolve_target_port(sp.target_port, p)
                if port:
                    eps.append(Endpoint(pod=p.name, namespace=p.namespace, ip=p.ip, port=port, node=p.node))
            out[sp.name] = sorted(eps, key=lambda e: (e.ip, e.port))
        return out

    def selector_warnings(self) -> list[str]:
        """Services whose selector matches no pod: legal in Kubernetes, but usually a typo."""
        warnings = []
        for svc in self.services():
            if svc.selector and not any(pod_labels_match(svc.selector, p.meta.labels) for p in self.pods(svc.namespace)):
                sel = ",".join(f"{k}={v}" for k, v in svc.selector.items())
                warnings.append(f"service {svc.namespace}/{svc.name}: selector {sel} matches no pod (at {svc.source})")
        return warnings


def resolve_target_port(target: int | str, pod: Pod) -> int:
    """A Service's targetPort: a number as is, a name looked up in the pod's container ports."""
    if isinstance(target, int):
        return target
    for c in pod.template.containers if pod.template else []:
        for p in c.ports:
            if p.name == target:
                return p.container_port
    return 0

