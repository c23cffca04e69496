"""`kubectl get` output, reproduced: the table printers and `-o yaml|json|name`.

Real counterpart: kubectl's printers (k8s.io/cli-runtime `pkg/printers` tabwriter and table
printer) and the API server's table conversion for built-in kinds (k8s.io/kubernetes
`pkg/printers/internalversion/printers.go`: printPod, printService, printNode, ...), plus the
`additionalPrinterColumns` of the Gateway API CRD for `kubectl get gtw`.

Everything here is a pure function over the lab's model objects: no kernel, no sockets, no clock.
The caller passes `now` and the creation times, and whatever runtime data the objects do not
carry (`extra`, see `derive_extra`), and prints the returned `Printed` texts.

Layout rules kept from kubectl:
- columns are separated by at least 3 spaces and left-aligned (Go's text/tabwriter with
  minwidth 6, padding 3); the last column is not padded, so no line ends in spaces;
- headers in capitals; `-A` puts NAMESPACE first (not for cluster-scoped kinds: nodes, ns);
- an empty value prints as `<none>`; `--show-labels` adds LABELS as the last column;
- AGE is duration.HumanDuration of now - creationTimestamp (`format_age`).

`extra` maps an object's key (`object_key(obj)`, i.e. `(kind, namespace, name)`; a node's key is
`("Node", "", name)`) to a dict of derived fields. Fields read, all optional:

    Node:       status ("Ready"), version ("v1.34.0-lab"), os_image, kernel_version,
                container_runtime ("netns://ambient-lab")
    Pod:        host_ip (the node's IP, status.hostIP), restarts (0), status (a STATUS override,
                e.g. "Terminating"), pod_spec (the owning Deployment's template spec, for -o yaml)
    Deployment: ready, up_to_date, available (pod counts, 0 when absent)
    Gateway:    address (""), programmed ("Unknown")

`derive_extra(api, ...)` computes everything except the Gateway fields from an ApiServer.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import yaml

from lab.common.errors import LabError
from lab.kube.model import (
    CLUSTER_SCOPED_KINDS,
    CNI_NOT_READY_TAINT,
    REDIRECTION_ANNOTATION,
    Deployment,
    Node,
    Pod,
    PodTemplate,
    Resource,
    Service,
)

if TYPE_CHECKING:
    from lab.kube.apiserver import ApiServer

Key = tuple[str, str, str]
Extra = Mapping[Key, Mapping[str, Any]]

NONE = "<none>"
# Go text/tabwriter as kubectl configures it (cli-runtime printers.GetNewTabWriter).
TAB_MINWIDTH = 6
TAB_PADDING = 3

LAB_KUBELET_VERSION = "v1.34.0-lab"
LAB_CONTAINER_RUNTIME = "netns://ambient-lab"
GENERIC_APP = "echo"  # the stand-in the kubelet runs for an image the lab does not play

OUTPUT_FORMATS = ("", "wide", "yaml", "json", "name")


@dataclass(frozen=True)
class Printed:
    """What `kubectl get` writes: `stdout` (the table or document) and `stderr` (messages such as
    "No resources found in default namespace." and the lab's notes). Each is "" or ends in a
    newline; the caller writes stdout first, then stderr."""

    stdout: str
    stderr: str = ""


# -- small formatters ------------------------------------------------------------------------


def format_age(seconds: float) -> str:
    """kubectl's AGE: k8s.io/apimachinery `duration.HumanDuration`, limited precision for people.

    <2m: `45s`; <10m: `3m12s` (or `5m` on the minute); <3h: minutes only (`133m`);
    <8h: `2h13m` (or `5h`); <2d: hours (`26h`); <8d: `3d4h` (or `3d`); <2y: days (`45d`);
    <8y: `3y12d` (or `3y`); then years. Up to 2 s in the future counts as `0s` (clock skew),
    more is `<invalid>`.
    """
    s = int(seconds)  # Go's int(d.Seconds()) truncates toward zero
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        rest = s % 60
        return f"{minutes}m{rest}s" if rest else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h{rest}m" if rest else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    days = hours // 24
    if hours < 24 * 8:
        rest = hours % 24
        return f"{days}d{rest}h" if rest else f"{days}d"
    if hours < 24 * 365 * 2:
        return f"{days}d"
    years = days // 365
    if hours < 24 * 365 * 8:
        rest = days % 365
        return f"{years}y{rest}d" if rest else f"{years}y"
    return f"{years}y"


def format_labels(labels: Mapping[str, str]) -> str:
    """labels.FormatLabels: `k=v,k2=v2` sorted by key, `<none>` when there are none."""
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels)) or NONE


def tabulate(rows: Sequence[Sequence[str]]) -> str:
    """Align rows like Go's text/tabwriter as kubectl uses it (minwidth 6, padding 3, spaces).

    Every column but the last is padded to its widest cell + 3 (at least 6); the last column
    is written as is.
    """
    if not rows:
        return ""
    ncols = len(rows[0])
    widths = [max(TAB_MINWIDTH, max(len(r[i]) for r in rows) + TAB_PADDING) for i in range(ncols - 1)]
    lines = ["".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + r[-1] for r in rows]
    return "\n".join(lines) + "\n"


def object_key(obj: Resource | Node) -> Key:
    """The store key of an object; nodes are not in the ApiServer store and get ("Node", "", name)."""
    if isinstance(obj, Node):
        return ("Node", "", obj.name)
    return obj.key


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _or_none(value: str) -> str:
    return value if value else NONE


# -- derived data ----------------------------------------------------------------------------


def deployment_counts(deploy: Deployment, pods: Sequence[Pod]) -> dict[str, int]:
    """The Deployment controller's status: pods it owns, and how many are Running (= ready).

    The lab replaces pods whenever the template changes, so every pod it owns is up to date;
    with minReadySeconds 0 a ready pod is also available.
    """
    owned = [p for p in pods if p.namespace == deploy.namespace and p.owner == f"Deployment/{deploy.name}"]
    ready = sum(1 for p in owned if p.phase == "Running")
    return {"ready": ready, "up_to_date": len(owned), "available": ready}


def derive_extra(api: "ApiServer", *, os_image: str = "", kernel_version: str = "") -> dict[Key, dict[str, Any]]:
    """Per-object derived fields for `render`, computed from an ApiServer's state.

    `os_image` (the host's /etc/os-release PRETTY_NAME) and `kernel_version` (uname -r) are read
    by the caller: every lab node shares the host's kernel. Gateway address/programmed come from
    the waypoint controller and are merged in by the caller.
    """
    extra: dict[Key, dict[str, Any]] = {}
    node_ips = {n.name: n.ip for n in api.nodes}
    for n in api.nodes:
        extra[object_key(n)] = {"os_image": os_image, "kernel_version": kernel_version}
    pods = api.pods()
    for p in pods:
        fields: dict[str, Any] = {"host_ip": node_ips.get(p.node, ""), "restarts": getattr(p, "restarts", 0)}
        kind, _, owner = p.owner.partition("/")
        if kind == "Deployment":
            d = api.objects.get(("Deployment", p.namespace, owner))
            tpl_spec = ((d.raw.get("spec") or {}).get("template") or {}).get("spec") if d else None
            if tpl_spec:
                fields["pod_spec"] = copy.deepcopy(tpl_spec)
        extra[p.key] = fields
    for d in api.list("Deployment"):
        assert isinstance(d, Deployment)
        extra[d.key] = deployment_counts(d, pods)
    return extra


# -- columns per kind ------------------------------------------------------------------------

Row = list[str]
RowFn = Callable[[Any, Mapping[str, Any], str], Row]  # (object, its extra fields, AGE) -> cells
Columns = tuple[Row, RowFn]  # (header, row function)


def _node_taints(n: Node) -> str:
    return ",".join(n.taints) or NONE


def _node_roles(n: Node) -> str:
    """kubectl's findNodeRoles: `node-role.kubernetes.io/<role>` labels (and `kubernetes.io/role`)."""
    roles = set()
    for k, v in n.labels.items():
        if k.startswith("node-role.kubernetes.io/"):
            roles.add(k.removeprefix("node-role.kubernetes.io/"))
        elif k == "kubernetes.io/role" and v:
            roles.add(v)
    return ",".join(sorted(r for r in roles if r)) or NONE


def _node_columns(objs: Sequence[Node], wide: bool) -> Columns:
    header = ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
    show_taints = wide and any(CNI_NOT_READY_TAINT in t for n in objs for t in n.taints)
    if wide:
        header += ["INTERNAL-IP", "EXTERNAL-IP", "OS-IMAGE", "KERNEL-VERSION", "CONTAINER-RUNTIME"]
        if show_taints:
            header.append("TAINTS")

    def row(n: Node, x: Mapping[str, Any], age: str) -> Row:
        r = [n.name, x.get("status", "Ready"), _node_roles(n), age, x.get("version", LAB_KUBELET_VERSION)]
        if wide:
            r += [_or_none(n.ip), NONE, x.get("os_image") or "<unknown>", x.get("kernel_version") or "<unknown>",
                  x.get("container_runtime", LAB_CONTAINER_RUNTIME)]
            if show_taints:
                r.append(_node_taints(n))
        return r

    return header, row


def _pod_status(p: Pod, x: Mapping[str, Any]) -> str:
    """STATUS: the phase, or what kubectl shows instead (ContainerCreating while a scheduled pod
    waits for its sandbox)."""
    if x.get("status"):
        return x["status"]
    if p.phase == "Pending" and p.node:
        return "ContainerCreating"
    return p.phase


def _pod_columns(objs: Sequence[Pod], wide: bool) -> Columns:
    header = ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    if wide:
        header += ["IP", "NODE", "NOMINATED NODE", "READINESS GATES", "APP", "REDIRECTION"]

    def row(p: Pod, x: Mapping[str, Any], age: str) -> Row:
        total = len(p.template.containers) if p.template else 1
        ready = total if p.phase == "Running" else 0
        r = [p.name, f"{ready}/{total}", _pod_status(p, x), str(x.get("restarts", 0)), age]
        if wide:
            r += [_or_none(p.ip), _or_none(p.node), NONE, NONE, _or_none(p.app),
                  _or_none(p.meta.annotations.get(REDIRECTION_ANNOTATION, ""))]
        return r

    return header, row


def _service_ports(svc: Service) -> str:
    """PORT(S): `9080/TCP`, or `80:30080/TCP` when a nodePort is set, comma-joined."""
    raw_ports = svc.spec.get("ports") or []
    out = []
    for i, sp in enumerate(svc.ports):
        node_port = raw_ports[i].get("nodePort") if i < len(raw_ports) else None
        out.append(f"{sp.port}:{node_port}/{sp.protocol}" if node_port else f"{sp.port}/{sp.protocol}")
    return ",".join(out) or NONE


def _service_external_ip(svc: Service) -> str:
    ips = list(svc.spec.get("externalIPs") or [])
    if svc.type == "LoadBalancer" and not ips:
        return "<pending>"
    return ",".join(ips) or NONE


def _service_columns(objs: Sequence[Service], wide: bool) -> Columns:
    header = ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
    if wide:
        header.append("SELECTOR")

    def row(s: Service, x: Mapping[str, Any], age: str) -> Row:
        r = [s.name, s.type, _or_none(s.cluster_ip), _service_external_ip(s), _service_ports(s), age]
        if wide:
            r.append(format_labels(s.selector))
        return r

    return header, row


def _deployment_columns(objs: Sequence[Deployment], wide: bool) -> Columns:
    header = ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    if wide:
        header += ["CONTAINERS", "IMAGES", "SELECTOR"]

    def row(d: Deployment, x: Mapping[str, Any], age: str) -> Row:
        r = [d.name, f"{x.get('ready', 0)}/{d.replicas}", str(x.get("up_to_date", 0)), str(x.get("available", 0)), age]
        if wide:
            containers = d.template.containers if d.template else []
            r += [_or_none(",".join(c.name for c in containers)), _or_none(",".join(c.image for c in containers)),
                  format_labels(d.selector)]
        return r

    return header, row


def _simple_columns(header: Row, cells: Callable[[Resource, Mapping[str, Any]], Row]
                    ) -> Callable[[Sequence[Any], bool], Columns]:
    """Columns NAME, <cells...>, AGE (the same with or without -o wide)."""
    def factory(objs: Sequence[Any], wide: bool) -> Columns:
        def row(o: Resource, x: Mapping[str, Any], age: str) -> Row:
            return [o.name, *cells(o, x), age]
        return ["NAME", *header, "AGE"], row
    return factory


_COLUMNS: dict[str, Callable[[Sequence[Any], bool], Columns]] = {
    "Node": _node_columns,
    "Pod": _pod_columns,
    "Service": _service_columns,
    "Deployment": _deployment_columns,
    "Namespace": _simple_columns(["STATUS"], lambda o, x: ["Active"]),
    "ServiceAccount": _simple_columns(["SECRETS"], lambda o, x: ["0"]),
    # The Gateway CRD's printer columns; an empty CRD cell prints blank, not <none>.
    "Gateway": _simple_columns(["CLASS", "ADDRESS", "PROGRAMMED"],
                               lambda o, x: [o.spec.get("gatewayClassName", ""), x.get("address", ""),
                                             x.get("programmed", "Unknown")]),
}


def _is_cluster_scoped(kind: str) -> bool:
    return kind in CLUSTER_SCOPED_KINDS or kind == "Node"


def _labels_of(obj: Resource | Node) -> Mapping[str, str]:
    return obj.labels if isinstance(obj, Node) else obj.meta.labels


def render_table(kind: str, objects: Sequence[Resource | Node], *, wide: bool, all_namespaces: bool,
                 show_labels: bool, now: float, created: Mapping[Key, float], extra: Extra) -> str:
    """The table `kubectl get <kind>` prints for these objects (header included)."""
    factory = _COLUMNS.get(kind, _simple_columns([], lambda o, x: []))
    header, row = factory(objects, wide)
    ns_col = all_namespaces and not _is_cluster_scoped(kind)
    rows = [(["NAMESPACE"] if ns_col else []) + header + (["LABELS"] if show_labels else [])]
    for obj in objects:
        key = object_key(obj)
        age = format_age(now - created[key]) if key in created else "<unknown>"
        r = row(obj, extra.get(key, {}), age)
        if ns_col:
            r.insert(0, obj.namespace)
        if show_labels:
            r.append(format_labels(_labels_of(obj)))
        rows.append(r)
    return tabulate(rows)


def generic_app_notes(pods: Sequence[Resource], all_namespaces: bool = False) -> list[str]:
    """The lab's own note for each pod whose image the lab does not play (the kubelet then runs
    the generic echo app in its place): a learner must not mistake its replies for the image's."""
    notes = []
    for p in pods:
        if isinstance(p, Pod) and p.app == GENERIC_APP and p.template and p.template.containers:
            where = f" in namespace {p.namespace}" if all_namespaces else ""
            image = p.template.containers[0].image
            notes.append(f'note: pod/{p.name}{where} runs the lab\'s generic echo app: '
                         f'image "{image}" is not one the lab plays')
    return notes


# -- -o yaml / json / name -------------------------------------------------------------------


def _metadata(obj: Resource, created: Mapping[Key, float]) -> dict[str, Any]:
    md = dict(obj.raw.get("metadata") or {})
    md["name"] = obj.name
    if obj.namespace:
        md["namespace"] = obj.namespace
    for field, value in (("labels", obj.meta.labels), ("annotations", obj.meta.annotations)):
        if value:
            md[field] = dict(value)
        else:
            md.pop(field, None)
    if obj.key in created:
        md["creationTimestamp"] = _rfc3339(created[obj.key])
    return md


def template_spec(t: PodTemplate) -> dict[str, Any]:
    """A pod spec written back from the lab's PodTemplate (when no manifest spec is at hand)."""
    containers = []
    for c in t.containers:
        doc: dict[str, Any] = {"name": c.name, "image": c.image}
        if c.command:
            doc["command"] = list(c.command)
        if c.args:
            doc["args"] = list(c.args)
        if c.ports:
            doc["ports"] = [{"containerPort": p.container_port, **({"name": p.name} if p.name else {}),
                             "protocol": p.protocol} for p in c.ports]
        containers.append(doc)
    spec: dict[str, Any] = {"serviceAccountName": t.service_account, "containers": containers}
    if t.node_selector:
        spec["nodeSelector"] = dict(t.node_selector)
    if t.node_name:
        spec["nodeName"] = t.node_name
    return spec


def manifest(obj: Resource | Node, created: Mapping[Key, float], extra: Extra) -> dict[str, Any]:
    """The object as `kubectl get -o yaml` shows it: its manifest, metadata.namespace filled,
    and a `status` from the lab's runtime fields."""
    x = extra.get(object_key(obj), {})
    if isinstance(obj, Node):
        return _node_manifest(obj, created, x)
    doc = copy.deepcopy(obj.raw)
    doc["apiVersion"] = obj.api_version
    doc["kind"] = obj.kind
    doc["metadata"] = _metadata(obj, created)
    if isinstance(obj, Pod):
        written = x.get("pod_spec") or obj.raw.get("spec")
        spec = copy.deepcopy(written) if written else (template_spec(obj.template) if obj.template else {})
        if obj.node:
            spec["nodeName"] = obj.node
        doc["spec"] = spec
        status: dict[str, Any] = {"phase": obj.phase}
        if x.get("host_ip"):
            status["hostIP"] = x["host_ip"]
        if obj.ip:
            status["podIP"] = obj.ip
            status["podIPs"] = [{"ip": obj.ip}]
        doc["status"] = status
    elif isinstance(obj, Service):
        spec = doc.setdefault("spec", {})
        spec["type"] = obj.type
        if obj.cluster_ip:
            spec["clusterIP"] = obj.cluster_ip
            spec["clusterIPs"] = [obj.cluster_ip]
        doc["status"] = {"loadBalancer": {}}
    elif isinstance(obj, Deployment):
        doc["status"] = {"replicas": x.get("up_to_date", 0), "updatedReplicas": x.get("up_to_date", 0),
                         "readyReplicas": x.get("ready", 0), "availableReplicas": x.get("available", 0)}
    elif obj.kind == "Namespace":
        doc["status"] = {"phase": "Active"}
    elif obj.kind == "Gateway":
        status = {}
        if x.get("address"):
            status["addresses"] = [{"type": "IPAddress", "value": x["address"]}]
        status["conditions"] = [{"type": "Programmed", "status": x.get("programmed", "Unknown")}]
        doc["status"] = status
    elif obj.kind == "HTTPRoute" and x.get("route_status"):
        doc["status"] = x["route_status"]
    return doc


def _parse_taint(t: str) -> dict[str, str]:
    """`key[=value]:Effect` (kubectl taint syntax) -> the Taint object."""
    kv, _, effect = t.partition(":")
    key, _, value = kv.partition("=")
    return {"key": key, **({"value": value} if value else {}), "effect": effect or "NoSchedule"}


def _node_manifest(n: Node, created: Mapping[Key, float], x: Mapping[str, Any]) -> dict[str, Any]:
    md: dict[str, Any] = {"name": n.name, "labels": dict(n.labels)}
    if object_key(n) in created:
        md["creationTimestamp"] = _rfc3339(created[object_key(n)])
    spec: dict[str, Any] = {"podCIDR": n.pod_cidr, "podCIDRs": [n.pod_cidr]}
    if n.taints:
        spec["taints"] = [_parse_taint(t) for t in n.taints]
    ready = x.get("status", "Ready") == "Ready"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": md,
        "spec": spec,
        "status": {
            "addresses": [{"type": "InternalIP", "address": n.ip}, {"type": "Hostname", "address": n.name}],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "nodeInfo": {
                "containerRuntimeVersion": x.get("container_runtime", LAB_CONTAINER_RUNTIME),
                "kernelVersion": x.get("kernel_version", ""),
                "kubeletVersion": x.get("version", LAB_KUBELET_VERSION),
                "operatingSystem": "linux",
                "osImage": x.get("os_image", ""),
            },
        },
    }


def as_list(items: list[dict[str, Any]]) -> dict[str, Any]:
    """kubectl's wrapper for several objects (keys in the order kubectl prints them)."""
    return {"apiVersion": "v1", "items": items, "kind": "List", "metadata": {"resourceVersion": ""}}


def resource_name(obj: Resource | Node) -> str:
    """`-o name`: `<kind>[.<group>]/<name>`, e.g. `pod/x`, `deployment.apps/x`."""
    if isinstance(obj, Node):
        return f"node/{obj.name}"
    group = obj.api_version.rpartition("/")[0]
    return f"{obj.kind.lower()}{'.' + group if group else ''}/{obj.name}"


def dump(doc: Any, output: str) -> str:
    if output == "json":
        return json.dumps(doc, indent=4) + "\n"
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


# -- the entry point -------------------------------------------------------------------------


def render(kind: str, objects: Sequence[Resource | Node], *, namespace: str = "default", output: str = "",
           all_namespaces: bool = False, show_labels: bool = False, by_name: bool = False,
           now: float, created: Mapping[Key, float], extra: Extra | None = None) -> Printed:
    """`kubectl get <kind> [NAME] [-n NS | -A] [-o wide|yaml|json|name] [--show-labels]`.

    - kind: the canonical kind (ApiServer.resolve_kind), objects: what the query returned, in the
      order to print (ApiServer.list already sorts by namespace, name).
    - namespace: the namespace queried, for "No resources found in <ns> namespace.".
    - by_name: the objects were asked for by name (`get pod NAME`): with -o yaml|json a single one
      prints as itself; a listing prints as a `kind: List` even with one item, as kubectl does.
    - now / created: AGE is now - created[object_key(obj)] (`<unknown>` when absent).
    - extra: derived per-object fields (module docstring; `derive_extra`).
    Raises LabError for an unknown output format.
    """
    if output not in OUTPUT_FORMATS:
        raise LabError(f'unable to match a printer suitable for the output format "{output}", '
                       f"allowed formats are: {','.join(f for f in OUTPUT_FORMATS if f)}",
                       "use -o wide, -o yaml, -o json or -o name")
    extra = extra or {}
    if output in ("yaml", "json"):
        docs = [manifest(o, created, extra) for o in objects]
        return Printed(dump(docs[0] if by_name and len(docs) == 1 else as_list(docs), output))
    if not objects:
        if all_namespaces or _is_cluster_scoped(kind):
            return Printed("", "No resources found\n")
        return Printed("", f"No resources found in {namespace} namespace.\n")
    if output == "name":
        return Printed("".join(resource_name(o) + "\n" for o in objects))
    table = render_table(kind, objects, wide=output == "wide", all_namespaces=all_namespaces,
                         show_labels=show_labels, now=now, created=created, extra=extra)
    notes = generic_app_notes(objects, all_namespaces) if kind == "Pod" else []  # type: ignore[arg-type]
    return Printed(table, "".join(n + "\n" for n in notes))
