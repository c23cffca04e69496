"""Kubernetes NetworkPolicy, enforced as a primary CNI enforces it: filter rules in each node.

Real counterparts: the NetworkPolicy API (k8s.io/api networking/v1) and the CNIs that enforce it
on the node, such as kindnet's kube-network-policies or kube-router (iptables in the node's
FORWARD path). Istio does not enforce NetworkPolicy; it must live with it, and ambient mode has a
classic trap here: a meshed pod's traffic arrives as HBONE on port **15008** (from the client
pod's own IP), so a policy that admits only the app's port silently drops mesh traffic, and calls
time out (Istio's docs, "Ambient and Kubernetes NetworkPolicy").

What the lab enforces, in the node's filter table (every node gets the same rules: they name pod
IPs, and every packet to a pod crosses the FORWARD chain of that pod's node):

    -A FORWARD -j KUBE-NWPLCY
    -A KUBE-NWPLCY -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT      replies pass
    -A KUBE-NWPLCY -s PEER/32 -d POD/32 -p tcp --dport PORT -j ACCEPT       one per allowed peer and port
    -A KUBE-NWPLCY -d POD/32 -j DROP                                         then the pod is isolated

A pod is isolated for ingress as soon as one policy with `policyTypes: [Ingress]` (the default
when `ingress` is given or `egress` is not) selects it; what is allowed is the union of every
selecting policy's rules. Peers: `podSelector` (in the policy's namespace), `namespaceSelector`
(optionally with a `podSelector`), `ipBlock.cidr` (without `except`). Ports: numbers, TCP. Lab
simplifications: egress rules are not enforced, named ports and `except` are not supported
(reported), and the node itself (kubelet's probes) is never filtered.

Pure: `render_rules` returns iptables-restore text; lab/kube/kubeproxy.py's `install_rules`
installs it (the same atomic --noflush transaction, the same "ensure" of the FORWARD jump).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lab.kube.model import LabelSelector

CHAIN = "KUBE-NWPLCY"


@dataclass(frozen=True)
class PodInfo:
    name: str
    namespace: str
    ip: str
    labels: dict[str, str] = field(default_factory=dict, hash=False, compare=False)


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A LabelSelector as a manifest writes it; {} selects all (Kubernetes' metav1.LabelSelector)."""
    return LabelSelector.from_dict(selector).matches(labels)


def is_ingress_policy(spec: dict[str, Any]) -> bool:
    types = spec.get("policyTypes")
    return "Ingress" in types if types else True  # Kubernetes: Ingress is always implied when unset


def peer_ips(peer: dict[str, Any], policy_ns: str, pods: list[PodInfo],
             namespaces: dict[str, dict[str, str]]) -> list[str]:
    """The sources one `from` entry admits, as /32s or CIDRs."""
    if "ipBlock" in peer:
        return [str((peer.get("ipBlock") or {}).get("cidr", ""))]
    ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
    out = []
    for p in pods:
        in_ns = selects(ns_sel, namespaces.get(p.namespace, {})) if ns_sel is not None else p.namespace == policy_ns
        if in_ns and (pod_sel is None or selects(pod_sel, p.labels)) and p.ip:
            out.append(f"{p.ip}/32")
    return out


def render_rules(policies: list[dict[str, Any]], pods: list[PodInfo],
                 namespaces: dict[str, dict[str, str]]) -> tuple[str, list[str]]:
    """(iptables-restore text for the filter table, warnings about what the lab does not enforce)."""
    allows: dict[str, list[tuple[str, int | None]]] = {}  # isolated pod IP -> (source, port or None)
    warnings: list[str] = []
    for pol in policies:
        md, spec = pol.get("metadata") or {}, pol.get("spec") or {}
        ns = md.get("namespace", "default")
        if spec.get("egress"):
            warnings.append(f"networkpolicy {ns}/{md.get('name')}: egress rules are not enforced by the lab")
        if not is_ingress_policy(spec):
            continue
        try:
            targets = [p for p in pods if p.namespace == ns and p.ip and selects(spec.get("podSelector"), p.labels)]
            peers_of = {id(peer): peer_ips(peer, ns, pods, namespaces)
                        for rule in spec.get("ingress") or [] for peer in rule.get("from") or []}
        except ValueError as e:
            warnings.append(f"networkpolicy {ns}/{md.get('name')}: {e}; the policy is ignored")
            continue
        for t in targets:
            allows.setdefault(t.ip, [])
        for rule in spec.get("ingress") or []:
            sources = ["0.0.0.0/0"] if not rule.get("from") else [ip for peer in rule["from"] for ip in peers_of[id(peer)]]
            ports: list[int | None] = []
            for port in rule.get("ports") or [{}]:
                value = port.get("port")
                if isinstance(value, str):
                    warnings.append(f"networkpolicy {ns}/{md.get('name')}: named port {value!r} is not supported")
                    continue
                ports.append(int(value) if value is not None else None)
            for t in targets:
                allows[t.ip] += [(s, p) for s in sources for p in ports]
    lines = ["*filter", f":{CHAIN} - [0:0]", f"-A FORWARD -j {CHAIN}",
             f"-A {CHAIN} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"]
    for ip in sorted(allows):
        for src, port in dict.fromkeys(allows[ip]):
            match = f"-s {src} " if src != "0.0.0.0/0" else ""
            dport = f" -p tcp -m tcp --dport {port}" if port is not None else ""
            lines.append(f"-A {CHAIN} {match}-d {ip}/32{dport} -j ACCEPT")
        lines.append(f"-A {CHAIN} -d {ip}/32 -j DROP")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n", warnings
