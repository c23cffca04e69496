"""Loading Kubernetes manifests: multi-document YAML, as kubectl reads it, into the lab's model.

The lab accepts a strict subset of the real schemas, never a dialect: a manifest that loads here
applies unchanged to a real cluster with Istio ambient. Fields the lab does not model are kept
in `Resource.raw` and ignored. Every error names the file and line of the offending document.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

import yaml

from lab.common.errors import ManifestError
from lab.kube.model import (
    CLUSTER_SCOPED_KINDS,
    STORED_KINDS,
    Container,
    ContainerPort,
    Deployment,
    Namespace,
    ObjectMeta,
    Pod,
    PodTemplate,
    Resource,
    Service,
    ServiceAccount,
    ServicePort,
    Source,
)

KNOWN_KINDS = {"Namespace", "ServiceAccount", "Deployment", "Pod", "Service", "Cluster"} | STORED_KINDS
DEFAULT_NAMESPACE = "default"


@dataclasses.dataclass
class ClusterConfig:
    """A kind-style cluster file (`kind: Cluster`, `nodes: [{role: ...}]`): how many nodes of each role."""

    workers: int = 2
    control_plane: bool = True
    source: Source = dataclasses.field(default_factory=Source)


@dataclasses.dataclass
class Manifests:
    """What a set of files contained: objects in file order, and an optional cluster file."""

    resources: list[Resource] = dataclasses.field(default_factory=list)
    cluster: ClusterConfig | None = None


def manifest_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand `-f FILE|DIR` arguments as kubectl does: a directory means its .yaml/.yml/.json files, sorted."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml", ".json"))
        elif p.exists():
            files.append(p)
        else:
            raise ManifestError(p, "no such file or directory", "check the path given with -f")
    return files


def load_files(paths: Iterable[str | Path], namespace: str = "") -> Manifests:
    """Load every document of every file; raise ManifestError at the first bad one."""
    out = Manifests()
    for f in manifest_files(paths):
        part = load_text(f.read_text(), str(f), namespace)
        out.resources += part.resources
        if part.cluster:
            out.cluster = part.cluster
    check_duplicates(out.resources)
    return out


def load_text(text: str, filename: str = "<inline>", namespace: str = "") -> Manifests:
    """Parse multi-document YAML text. Each document becomes a Resource (typed where the lab models it)."""
    out = Manifests()
    loader = yaml.SafeLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            where = Source(filename, node.start_mark.line + 1)
            doc = loader.construct_document(node)
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise ManifestError(where, f"expected a Kubernetes object (a mapping), found {type(doc).__name__}")
            if doc.get("kind") == "List":
                for item in doc.get("items") or []:
                    out.resources.append(parse_object(item, where, namespace))
                continue
            if doc.get("kind") == "Cluster":
                out.cluster = parse_cluster(doc, where)
                continue
            out.resources.append(parse_object(doc, where, namespace))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        problem = e.problem or e.context or "malformed YAML"
        if e.context and e.context_mark and e.problem_mark and e.context_mark.line != e.problem_mark.line:
            problem += f" ({e.context} started at line {e.context_mark.line + 1})"
        raise ManifestError(Source(filename, line), f"invalid YAML: {problem}",
                            "fix the indentation or syntax at that line") from None
    finally:
        loader.dispose()
    return out


def parse_cluster(doc: dict, where: Source) -> ClusterConfig:
    """kind's cluster file: count the worker nodes; a control-plane node always exists in the lab."""
    nodes = doc.get("nodes") or [{"role": "control-plane"}, {"role": "worker"}, {"role": "worker"}]
    workers = 0
    for n in nodes:
        role = (n or {}).get("role", "control-plane")
        if role == "worker":
            workers += 1
        elif role != "control-plane":
            raise ManifestError(where, f"unknown node role {role!r}", "use role: control-plane or role: worker")
    return ClusterConfig(workers=max(workers, 1) if workers else 1, source=where)


def parse_object(doc: dict, where: Source, default_ns: str = "") -> Resource:
    """Turn one document into a Resource, checking what the lab needs: kind, name, ports."""
    kind = doc.get("kind")
    if not kind:
        raise ManifestError(where, "object has no 'kind'", "every document needs apiVersion, kind and metadata.name")
    if kind not in KNOWN_KINDS:
        raise ManifestError(where, f"unknown kind {kind!r}",
                            f"the lab knows: {', '.join(sorted(KNOWN_KINDS - {'Cluster'}))}")
    if not doc.get("apiVersion"):
        raise ManifestError(where, f"{kind} has no 'apiVersion'", "add e.g. apiVersion: v1")
    md = doc.get("metadata") or {}
    name = md.get("name")
    if not name or not isinstance(name, str):
        raise ManifestError(where, f"{kind} has no metadata.name", "give the object a name")
    ns = "" if kind in CLUSTER_SCOPED_KINDS else (md.get("namespace") or default_ns or DEFAULT_NAMESPACE)
    meta = ObjectMeta(name=name, namespace=ns, labels=_strmap(md.get("labels"), where, "labels"),
                      annotations=_strmap(md.get("annotations"), where, "annotations"))
    base = dict(kind=kind, api_version=doc["apiVersion"], meta=meta, raw=doc, source=where)
    spec = doc.get("spec") or {}
    if kind == "Namespace":
        return Namespace(**base)
    if kind == "ServiceAccount":
        return ServiceAccount(**base)
    if kind == "Service":
        return Service(**base, **_service_fields(spec, where, f"service/{name}"))
    if kind == "Deployment":
        tpl_doc = spec.get("template") or {}
        template = _pod_template(tpl_doc, where, f"deployment/{name}")
        selector = ((spec.get("selector") or {}).get("matchLabels")) or {}
        replicas = spec.get("replicas", 1)
        if not isinstance(replicas, int) or replicas < 0:
            raise ManifestError(where, f"deployment/{name}: replicas must be a whole number >= 0")
        if selector and not all(template.labels.get(k) == v for k, v in selector.items()):
            raise ManifestError(where, f"deployment/{name}: selector does not match template labels",
                                "make spec.selector.matchLabels a subset of spec.template.metadata.labels")
        return Deployment(**base, replicas=replicas, selector=selector, template=template)
    if kind == "Pod":
        template = _pod_template({"metadata": md, "spec": spec}, where, f"pod/{name}")
        return Pod(**base, template=template)
    return Resource(**base)


def _strmap(value: Any, where: Source, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ManifestError(where, f"metadata.{what} must be a mapping")
    return {str(k): "" if v is None else str(v) for k, v in value.items()}


def _port(value: Any, where: Source, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ManifestError(where, f"{what}: port {value!r} is out of range", "a port is a number from 1 to 65535")
    return value


def _service_fields(spec: dict, where: Source, what: str) -> dict:
    ports = []
    for p in spec.get("ports") or []:
        port = _port(p.get("port"), where, what)
        target = p.get("targetPort", port)
        if not isinstance(target, str):
            target = _port(target, where, f"{what} targetPort")
        ports.append(ServicePort(port=port, target_port=target, name=str(p.get("name", "")),
                                 protocol=p.get("protocol", "TCP"), app_protocol=str(p.get("appProtocol", "") or "")))
    return dict(selector=_strmap(spec.get("selector"), where, "selector"), ports=ports,
                cluster_ip=spec.get("clusterIP", "") or "", type=spec.get("type", "ClusterIP"))


def _pod_template(tpl: dict, where: Source, what: str) -> PodTemplate:
    md = tpl.get("metadata") or {}
    spec = tpl.get("spec") or {}
    containers = []
    for c in spec.get("containers") or []:
        ports = [ContainerPort(_port(p.get("containerPort"), where, f"{what} containerPort"),
                               str(p.get("name", "")), p.get("protocol", "TCP")) for p in c.get("ports") or []]
        env = {str(e["name"]): str(e["value"]) for e in c.get("env") or []
               if isinstance(e, dict) and "name" in e and "value" in e}
        containers.append(Container(name=c.get("name", ""), image=c.get("image", ""), ports=ports,
                                    command=list(c.get("command") or []), args=[str(a) for a in c.get("args") or []],
                                    env=env))
    if not containers:
        raise ManifestError(where, f"{what} has no containers", "add spec.containers with at least one image")
    return PodTemplate(labels=_strmap(md.get("labels"), where, "labels"),
                       annotations=_strmap(md.get("annotations"), where, "annotations"),
                       service_account=spec.get("serviceAccountName") or spec.get("serviceAccount") or "default",
                       containers=containers, node_name=spec.get("nodeName", "") or "",
                       node_selector=_strmap(spec.get("nodeSelector"), where, "nodeSelector"))


def check_duplicates(resources: list[Resource]) -> None:
    """Two documents naming the same object are an error (kubectl would apply the second over the first)."""
    seen: dict[tuple, Resource] = {}
    for r in resources:
        if r.key in seen:
            first = seen[r.key]
            ns = f" in namespace {r.namespace}" if r.namespace else ""
            raise ManifestError(r.source, f"duplicate {r.kind} {r.name!r}{ns} (first defined at {first.source})",
                                "rename one of them or remove the duplicate")
        seen[r.key] = r
