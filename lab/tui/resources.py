"""k9s-style resource views as data: one table builder per resource, plus describe text.

k9s keeps one file per resource view (`internal/view/pod.go`, `svc.go`, ...); here each view is
one small function from the view model (lab/tui/model.py) to a `Table`, so the screens stay thin
and the tables are tested without a terminal. The columns follow `kubectl get` for Kubernetes
kinds and `istioctl ztunnel-config workloads` for `:workloads`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import yaml

from lab.kube.model import DATAPLANE_MODE_LABEL, REDIRECTION_ANNOTATION
from lab.tui.model import BYPASSED, HBONE, OUT_OF_MESH, PENDING, LabModel, PodState

MESH_EXPLAINED = {
    HBONE: "captured: istio-cni installed the in-pod REDIRECT rules and handed the pod's netns to ztunnel; "
           "its traffic to other meshed pods goes over HBONE (mTLS + HTTP/2 CONNECT to port 15008)",
    PENDING: "captured, but ztunnel has not acknowledged the pod yet: its traffic is redirected to "
             "ztunnel ports that are not listening, so it fails until ztunnel takes the pod",
    BYPASSED: "its labels select it for ambient, yet istio-cni has not captured it (it started before "
              "istio-cni was installed on its node): its traffic bypasses ztunnel until the agent's "
              "informer enrols it, and connections it opened before stay outside the mesh",
    OUT_OF_MESH: "not selected for ambient (no istio.io/dataplane-mode=ambient on the pod or its namespace): "
                 "plain TCP, kube-proxy's DNAT only",
}


@dataclass
class Row:
    key: str
    cells: list[str]


@dataclass
class Table:
    kind: str
    columns: list[str]
    rows: list[Row] = field(default_factory=list)

    def filtered(self, text: str) -> "Table":
        return Table(self.kind, self.columns, filter_rows(self.rows, text))


def filter_rows(rows: list[Row], text: str) -> list[Row]:
    """k9s's `/` filter: rows where any cell contains the text (case-insensitive); `!text` inverts."""
    text = text.strip()
    if not text:
        return list(rows)
    invert = text.startswith("!")
    needle = text.lstrip("!").lower()
    return [r for r in rows if any(needle in c.lower() for c in r.cells) != invert]


def _labels(d: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted((d or {}).items())) or "<none>"


def pods_table(m: LabModel) -> Table:
    t = Table("pods", ["NAMESPACE", "NAME", "STATUS", "MESH", "IP", "NODE"])
    for p in sorted(m.pods.values(), key=lambda p: (p.namespace, p.name)):
        t.rows.append(Row(p.key, [p.namespace, p.name, p.phase or "Pending", p.mesh, p.ip or "<none>",
                                  p.node or "<none>"]))
    return t


def services_table(m: LabModel) -> Table:
    t = Table("svc", ["NAMESPACE", "NAME", "CLUSTER-IP", "PORTS", "SELECTOR"])
    for s in sorted(m.services, key=lambda s: (s["namespace"], s["name"])):
        ports = ",".join(f"{p['port']}/{p.get('protocol', 'TCP')}" for p in s.get("ports", [])) or "<none>"
        t.rows.append(Row(f"{s['namespace']}/{s['name']}",
                          [s["namespace"], s["name"], s.get("cluster_ip") or "None", ports, _labels(s.get("selector"))]))
    return t


def nodes_table(m: LabModel) -> Table:
    t = Table("nodes", ["NAME", "ROLE", "IP", "PODS", "ZTUNNEL", "ISTIO-CNI"])
    for n in m.nodes:
        comps = {c.component: c for c in m.components_on(n["name"])}

        def up(what: str) -> str:
            c = comps.get(what)
            return "up" if c and c.running else "down"

        t.rows.append(Row(n["name"], [n["name"], n.get("role", ""), n.get("ip", ""), str(len(m.pods_on(n["name"]))),
                                      up("ztunnel"), up("istio-cni")]))
    return t


def namespaces_table(m: LabModel) -> Table:
    t = Table("ns", ["NAME", "DATAPLANE-MODE", "PODS", "LABELS"])
    for n in sorted(m.namespaces, key=lambda n: n["name"]):
        labels = n.get("labels") or {}
        pods = sum(p.namespace == n["name"] for p in m.pods.values())
        t.rows.append(Row(n["name"], [n["name"], labels.get(DATAPLANE_MODE_LABEL, "-"), str(pods), _labels(labels)]))
    return t


def objects_of(m: LabModel, kind: str) -> list[dict]:
    return sorted((o for o in m.objects if o.get("kind") == kind), key=lambda o: (o["namespace"], o["name"]))


def _spec(o: dict) -> dict:
    return (o.get("raw") or {}).get("spec") or {}


def policy_target(spec: dict) -> str:
    """Who an AuthorizationPolicy applies to: its selector, its targetRefs, or the whole namespace."""
    if spec.get("targetRefs") or spec.get("targetRef"):
        refs = spec.get("targetRefs") or [spec["targetRef"]]
        return ",".join(f"{r.get('kind', '')}/{r.get('name', '')}" for r in refs)
    sel = (spec.get("selector") or {}).get("matchLabels")
    return _labels(sel) if sel else "namespace-wide"


def policies_table(m: LabModel) -> Table:
    t = Table("policies", ["NAMESPACE", "NAME", "ACTION", "APPLIES-TO", "RULES"])
    for o in objects_of(m, "AuthorizationPolicy"):
        spec = _spec(o)
        t.rows.append(Row(f"{o['namespace']}/{o['name']}",
                          [o["namespace"], o["name"], spec.get("action", "ALLOW"), policy_target(spec),
                           str(len(spec.get("rules") or []))]))
    return t


def routes_table(m: LabModel) -> Table:
    t = Table("routes", ["NAMESPACE", "NAME", "PARENTS", "HOSTNAMES", "BACKENDS"])
    for o in objects_of(m, "HTTPRoute"):
        spec = _spec(o)
        parents = ",".join(f"{p.get('kind', 'Gateway')}/{p.get('name', '')}" for p in spec.get("parentRefs") or [])
        backends = []
        for rule in spec.get("rules") or []:
            for b in rule.get("backendRefs") or []:
                w = f"({b['weight']})" if "weight" in b else ""
                backends.append(f"{b.get('name', '')}:{b.get('port', '')}{w}")
        t.rows.append(Row(f"{o['namespace']}/{o['name']}",
                          [o["namespace"], o["name"], parents or "-", ",".join(spec.get("hostnames") or []) or "*",
                           ",".join(backends) or "-"]))
    return t


def workloads_table(m: LabModel) -> Table:
    """As `istioctl ztunnel-config workloads`: what ztunnel knows of each pod and how it reaches it."""
    t = Table("workloads", ["NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"])
    for p in sorted(m.pods.values(), key=lambda p: (p.namespace, p.name)):
        if not p.ip:
            continue
        t.rows.append(Row(p.key, [p.namespace, p.name, p.ip, p.node, m.waypoint_of(p) or "None",
                                  "HBONE" if p.mesh in (HBONE, PENDING) else "TCP"]))
    return t


# `:name` -> (table builder, aliases). The names k9s users type.
VIEWS: dict[str, Callable[[LabModel], Table]] = {
    "pods": pods_table,
    "svc": services_table,
    "nodes": nodes_table,
    "ns": namespaces_table,
    "policies": policies_table,
    "routes": routes_table,
    "workloads": workloads_table,
}
ALIASES = {
    "po": "pods", "pod": "pods", "service": "svc", "services": "svc", "no": "nodes", "node": "nodes",
    "namespace": "ns", "namespaces": "ns", "ap": "policies", "authorizationpolicies": "policies",
    "policy": "policies", "httproutes": "routes", "httproute": "routes", "route": "routes",
    "workload": "workloads", "wl": "workloads",
}
# view -> the kind `ambient-lab get` knows, for YAML from the supervisor.
GET_KIND = {"pods": "pods", "svc": "svc", "nodes": "nodes", "ns": "ns", "policies": "authorizationpolicies",
            "routes": "httproutes", "workloads": "pods"}


def resolve_view(word: str) -> str | None:
    w = word.strip().lower().lstrip(":")
    if w in VIEWS:
        return w
    return ALIASES.get(w)


def build(view: str, m: LabModel) -> Table:
    return VIEWS[view](m)


# -- describe ----------------------------------------------------------------------------------
def _events_section(m: LabModel, pod_name: str, limit: int = 15) -> list[str]:
    evs = list(m.pod_events.get(pod_name, []))[-limit:]
    if not evs:
        return ["Events:  <none>"]
    now = m.clock()
    lines = ["Events:", f"  {'AGE':>6}  {'FROM':<22} {'STEP':<26} MESSAGE"]
    for ev in evs:
        where = ev.component + (f"@{ev.node.rsplit('-', 1)[-1]}" if ev.node else "")
        lines.append(f"  {_age(now - ev.ts):>6}  {where:<22} {ev.kind:<26} {ev.msg}")
    return lines


def _age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h"


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def describe_pod(m: LabModel, p: PodState) -> str:
    lines = [f"Name:             {p.name}", f"Namespace:        {p.namespace}", f"Node:             {p.node or '<none>'}",
             f"Service Account:  {p.service_account}", f"Status:           {p.phase}", f"IP:               {p.ip}",
             f"Controlled By:    {p.owner or '<none>'}", f"Network netns:    {p.netns or '<unknown>'}",
             f"Labels:           {_labels(p.labels)}", f"Annotations:      {_labels(p.annotations)}",
             f"Mesh:             {p.mesh}", f"                  {MESH_EXPLAINED[p.mesh]}"]
    if p.mesh in (HBONE, PENDING):
        lines.append(f"                  ({REDIRECTION_ANNOTATION}={p.annotations.get(REDIRECTION_ANNOTATION)})")
    services = [s["name"] for s in m.services if s["namespace"] == p.namespace and selects(s.get("selector"), p.labels)]
    lines.append(f"Services:         {', '.join(services) or '<none>'}")
    policies = [o["name"] for o in objects_of(m, "AuthorizationPolicy") if o["namespace"] in (p.namespace, "istio-system")
                and (policy_target(_spec(o)) == "namespace-wide"
                     or selects((_spec(o).get("selector") or {}).get("matchLabels") or {}, p.labels))]
    lines.append(f"Policies:         {', '.join(policies) or '<none>'}")
    return "\n".join(lines + [""] + _events_section(m, p.name))


def describe_service(m: LabModel, s: dict) -> str:
    backends = [p for p in m.pods.values() if p.namespace == s["namespace"] and selects(s.get("selector"), p.labels)]
    ports = [f"{p.get('name') or '<unset>'} {p['port']}/{p.get('protocol', 'TCP')} -> {p.get('target_port')}"
             for p in s.get("ports", [])]
    lines = [f"Name:         {s['name']}", f"Namespace:    {s['namespace']}", f"Labels:       {_labels(s.get('labels'))}",
             f"Selector:     {_labels(s.get('selector'))}", f"IP:           {s.get('cluster_ip')}",
             "Ports:        " + ("\n              ".join(ports) or "<none>"),
             "Endpoints:    " + (", ".join(f"{p.ip} ({p.name}, {p.mesh})" for p in backends if p.ip) or "<none>"),
             "",
             "Out of mesh, kube-proxy DNATs the ClusterIP to one endpoint in the client's node; in the mesh,",
             "ztunnel of the client picks the endpoint itself and opens HBONE to it (no kube-proxy)."]
    return "\n".join(lines)


def describe_node(m: LabModel, node: dict) -> str:
    lines = [f"Name:   {node['name']}", f"Role:   {node.get('role', '')}", f"IP:     {node.get('ip', '')}", "",
             "Components (each a process in the node's network namespace, as a DaemonSet pod would be):"]
    for c in m.components_on(node["name"]):
        state = f"up, pid {c.pid}" if c.running and c.pid else ("up" if c.running else "DOWN")
        lines.append(f"  {c.component:<10} {state}" + (f"  - {c.note}" if c.note else ""))
    lines += ["", "Pods:"]
    for p in m.pods_on(node["name"]):
        lines.append(f"  {p.namespace}/{p.name:<40} {p.ip:<12} {p.mesh}")
    return "\n".join(lines)


def describe_namespace(m: LabModel, ns: dict) -> str:
    labels = ns.get("labels") or {}
    pods = [p for p in m.pods.values() if p.namespace == ns["name"]]
    ambient = labels.get(DATAPLANE_MODE_LABEL) == "ambient"
    lines = [f"Name:    {ns['name']}", f"Labels:  {_labels(labels)}",
             f"Ambient: {'yes: istio-cni captures every pod here (except pods labelled dataplane-mode=none)' if ambient else 'no'}",
             "", "Pods:"]
    lines += [f"  {p.name:<44} {p.mesh}" for p in sorted(pods, key=lambda p: p.name)] or ["  <none>"]
    return "\n".join(lines)


def describe_object(m: LabModel, o: dict) -> str:
    spec = _spec(o)
    lines = [f"Name:       {o['name']}", f"Namespace:  {o['namespace']}", f"Kind:       {o['kind']} ({o.get('api_version', '')})"]
    if o["kind"] == "AuthorizationPolicy":
        sel = (spec.get("selector") or {}).get("matchLabels") or {}
        target = policy_target(spec)
        if target == "namespace-wide":
            pods = [p for p in m.pods.values() if p.namespace == o["namespace"] or o["namespace"] == "istio-system"]
        else:
            pods = [p for p in m.pods.values() if p.namespace == o["namespace"] and selects(sel, p.labels)]
        lines += [f"Action:     {spec.get('action', 'ALLOW')}", f"Applies to: {target}",
                  "Enforced by: " + ("the waypoint (targetRefs)" if "/" in target else
                                     "the destination pod's ztunnel (L4 authorization)"),
                  "Pods:       " + (", ".join(sorted(p.name for p in pods)) or "<none>")]
    lines += ["", "Spec:", yaml.safe_dump(spec, sort_keys=False, default_flow_style=False).rstrip()]
    return "\n".join(lines)


def describe(view: str, m: LabModel, key: str) -> str:
    """The `d` key: kubectl-describe-like text for one row, with the pod's events from the stream."""
    if view in ("pods", "workloads"):
        p = m.pods.get(key)
        return describe_pod(m, p) if p else f"pod {key} is gone"
    if view == "svc":
        s = next((s for s in m.services if f"{s['namespace']}/{s['name']}" == key), None)
        return describe_service(m, s) if s else f"service {key} is gone"
    if view == "nodes":
        n = next((n for n in m.nodes if n["name"] == key), None)
        return describe_node(m, n) if n else f"node {key} is gone"
    if view == "ns":
        n = next((n for n in m.namespaces if n["name"] == key), None)
        return describe_namespace(m, n) if n else f"namespace {key} is gone"
    kind = {"policies": "AuthorizationPolicy", "routes": "HTTPRoute"}.get(view, "")
    o = next((o for o in objects_of(m, kind) if f"{o['namespace']}/{o['name']}" == key), None)
    return describe_object(m, o) if o else f"{view} {key} is gone"


def object_yaml(m: LabModel, view: str, key: str) -> str | None:
    """YAML of an Istio/Gateway API object straight from the snapshot (pods and services come from
    the supervisor's `get -o yaml`, which knows their full Kubernetes shape)."""
    kind = {"policies": "AuthorizationPolicy", "routes": "HTTPRoute"}.get(view)
    if not kind:
        return None
    o = next((o for o in objects_of(m, kind) if f"{o['namespace']}/{o['name']}" == key), None)
    return yaml.safe_dump(o.get("raw") or {}, sort_keys=False) if o else None
