"""The cluster's objects as plain data: the lab's slice of the Kubernetes API.

Only the fields the lab acts on are modelled; everything else a manifest carries (volumes, env,
securityContext, resources...) is kept in `raw` and otherwise ignored, so that Istio's own sample
manifests load unchanged. Objects are dataclasses with no behaviour that touches the kernel:
the cluster builder, kube-proxy and later istiod read them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# Label and annotation keys the lab acts on (their meaning is in reference/istio-ambient.md §1.4, §3.5).
DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
USE_WAYPOINT_LABEL = "istio.io/use-waypoint"
WAYPOINT_FOR_LABEL = "istio.io/waypoint-for"
CNI_NOT_READY_TAINT = "cni.istio.io/not-ready"


@dataclass
class Source:
    """Where an object came from, so errors can say `file:line`."""

    file: str = "<inline>"
    line: int = 1

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class ObjectMeta:
    name: str
    namespace: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class Resource:
    """Any Kubernetes object: kind, apiVersion, metadata, and the manifest as written."""

    kind: str
    api_version: str
    meta: ObjectMeta
    raw: dict[str, Any] = field(default_factory=dict)
    source: Source = field(default_factory=Source)

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def namespace(self) -> str:
        return self.meta.namespace

    @property
    def key(self) -> tuple[str, str, str]:
        """Identity of the object in the store: (kind, namespace, name)."""
        return (self.kind, self.meta.namespace, self.meta.name)

    @property
    def spec(self) -> dict[str, Any]:
        return self.raw.get("spec") or {}


@dataclass
class ContainerPort:
    container_port: int
    name: str = ""
    protocol: str = "TCP"


@dataclass
class Container:
    name: str
    image: str
    ports: list[ContainerPort] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # literal values only; valueFrom is not modelled


@dataclass
class PodTemplate:
    """What a Deployment stamps out: labels, annotations and a pod spec."""

    labels: dict[str, str]
    annotations: dict[str, str]
    service_account: str
    containers: list[Container]
    node_name: str = ""
    node_selector: dict[str, str] = field(default_factory=dict)


@dataclass
class Deployment(Resource):
    replicas: int = 1
    selector: dict[str, str] = field(default_factory=dict)
    template: PodTemplate | None = None


@dataclass
class Pod(Resource):
    """A pod: its template, and what the lab's kubelet gave it (node, IP, netns, app)."""

    template: PodTemplate | None = None
    owner: str = ""  # "Deployment/<name>" or "" for a bare Pod
    node: str = ""
    ip: str = ""
    netns: str = ""
    phase: str = "Pending"
    app: str = ""  # the built-in stand-in app that plays the container image
    pid: int = 0
    restarts: int = 0


@dataclass
class ServicePort:
    port: int
    target_port: int | str
    name: str = ""
    protocol: str = "TCP"
    app_protocol: str = ""  # `appProtocol`: what Istio reads first to choose HTTP or TCP handling


@dataclass
class Service(Resource):
    selector: dict[str, str] = field(default_factory=dict)
    ports: list[ServicePort] = field(default_factory=list)
    cluster_ip: str = ""
    type: str = "ClusterIP"


@dataclass
class Namespace(Resource):
    pass


@dataclass
class ServiceAccount(Resource):
    pass


@dataclass
class Node:
    """A kind-style node: a network namespace with its own IP, pod CIDR and per-node agents."""

    name: str
    index: int
    role: str  # "control-plane" | "worker"
    ip: str
    pod_cidr: str
    netns: str
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[str] = field(default_factory=list)


# Kinds the lab models as typed objects; every other accepted kind is stored as a plain Resource.
TYPED_KINDS = {"Namespace", "ServiceAccount", "Deployment", "Pod", "Service"}
# Kinds accepted and stored now, acted on by later parts of the lab (waypoints, policies, routes).
STORED_KINDS = {
    "Gateway",
    "HTTPRoute",
    "GRPCRoute",
    "TCPRoute",
    "AuthorizationPolicy",
    "PeerAuthentication",
    "DestinationRule",
    "NetworkPolicy",
    "ConfigMap",
    "Secret",
}
CLUSTER_SCOPED_KINDS = {"Namespace", "Cluster"}


def pod_labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Kubernetes equality-based selector: every key=value of the selector is in the labels.

    An empty selector selects nothing for a Service (Kubernetes then manages no endpoints).
    """
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# -- label selectors (metav1.LabelSelector) ---------------------------------------------------------
Labels = Mapping[str, str]


@dataclass(frozen=True)
class Requirement:
    """One ``matchExpressions`` entry of a Kubernetes label selector.

    Operators as in Kubernetes: ``In`` / ``NotIn`` (a missing key satisfies ``NotIn``),
    ``Exists`` / ``DoesNotExist``.
    """

    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[str, ...] = ()

    def matches(self, labels: Labels) -> bool:
        present = self.key in labels
        if self.operator == "In":
            return present and labels[self.key] in self.values
        if self.operator == "NotIn":
            return not present or labels[self.key] not in self.values
        if self.operator == "Exists":
            return present
        if self.operator == "DoesNotExist":
            return not present
        raise ValueError(f"unknown label selector operator {self.operator!r}")


@dataclass(frozen=True)
class LabelSelector:
    """A Kubernetes ``LabelSelector``: every matchLabels pair and every expression must hold.

    An empty selector matches everything (Kubernetes' rule for ``metav1.LabelSelector``).
    """

    match_labels: Mapping[str, str] = field(default_factory=dict)
    match_expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Labels) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items()) and all(
            r.matches(labels) for r in self.match_expressions
        )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> "LabelSelector":
        """A selector as manifests write it (`matchLabels`, `matchExpressions`); ValueError if malformed."""
        raw = raw or {}
        exprs = []
        for e in raw.get("matchExpressions") or []:
            if e.get("operator") not in ("In", "NotIn", "Exists", "DoesNotExist"):
                raise ValueError(f"unknown label selector operator {e.get('operator')!r}")
            exprs.append(Requirement(str(e.get("key", "")), e["operator"], tuple(str(v) for v in e.get("values") or ())))
        return cls(dict(raw.get("matchLabels") or {}), tuple(exprs))
