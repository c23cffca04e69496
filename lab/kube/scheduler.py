"""The kube-scheduler and the Deployment controller, reduced to deterministic pure functions.

Pod names follow Kubernetes' form `<deployment>-<pod-template-hash>-<5 chars>`, with the hash
taken from the template (as the ReplicaSet controller does) and the suffix from the replica
index, so a scenario always yields the same names and placements: outputs in the course
material stay true.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from lab.kube.model import Node, PodTemplate

# Kubernetes' "safe" alphabet for generated names (no vowels, no confusable characters).
ALPHABET = "bcdfghjklmnpqrstvwxz2456789"


def _encode(data: str, length: int) -> str:
    n = int.from_bytes(hashlib.sha256(data.encode()).digest(), "big")
    out = []
    for _ in range(length):
        n, r = divmod(n, len(ALPHABET))
        out.append(ALPHABET[r])
    return "".join(out)


def pod_template_hash(namespace: str, deployment: str, template: PodTemplate) -> str:
    """The ReplicaSet's `pod-template-hash` label: changes when the template changes."""
    return _encode(namespace + "/" + deployment + json.dumps(asdict(template), sort_keys=True), 10)


def pod_name(deployment: str, template_hash: str, replica: int) -> str:
    return f"{deployment}-{template_hash}-{_encode(f'{deployment}/{template_hash}/{replica}', 5)}"


def schedule(node_name: str, node_selector: dict[str, str], nodes: list[Node], load: dict[str, int]) -> str | None:
    """Pick a node: `nodeName` is honoured as written; otherwise the least-loaded schedulable node
    whose labels match `nodeSelector`, ties broken by node order. None: nothing fits (Pending).
    """
    if node_name:
        return node_name if any(n.name == node_name for n in nodes) else None
    # Every taint the lab sets is NoSchedule (control-plane, cni.istio.io/not-ready) and ordinary pods
    # tolerate none of them.
    fits = [n for n in nodes if not n.taints and all(n.labels.get(k) == v for k, v in node_selector.items())]
    if not fits:
        return None
    return min(fits, key=lambda n: (load.get(n.name, 0), n.index)).name
