"""Answers an exercise asks for, computed from the learner's own lab (so no solution file can
hold them): a PID, a list of pods. Each comes with `explain(given)`, a live hint that says what
the learner's wrong value really is in that lab."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from lab.course.live import LiveLab


@dataclass
class Answer:
    truth: str
    explain: Callable[[str], str]  # a live hint for a wrong answer
    lead: str = ""  # a live hint for no answer yet: where in this lab to look
    normalize: Callable[[str], str] = str.strip


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{int(pid)}/comm") as f:
            return f.read().strip()
    except (OSError, ValueError):
        return ""


def ztunnel_pid(lab: LiveLab, spec: dict[str, Any]) -> Answer:
    """The PID of the process that owns port 15001 inside the pod: the ztunnel of the pod's node."""
    pod = lab.resolve(str(spec["pod"]))
    zt = {c["node"]: c["pid"] for c in lab.components() if c["component"] == "ztunnel"}
    truth = str(zt.get(pod["node"], ""))

    def explain(given: str) -> str:
        if not given.strip().isdigit():
            return f"{given!r} is not a PID: `ss -tlnp` in the pod's netns prints users:((\"name\",pid=N,fd=M))"
        owner = _comm(given)
        other = next((n for n, p in zt.items() if str(p) == given.strip()), None)
        if other:
            return (f"PID {given} is the ztunnel of node {other}, but pod {pod['pod']} runs on {pod['node']}: "
                    f"each node's ztunnel serves only the pods on its node")
        if owner:
            return (f"PID {given} is a process named {owner!r}; the listener on 15001 inside pod {pod['pod']} is "
                    f"owned by a process that does not run in the pod at all")
        return f"no process has PID {given} now; run `sudo ip netns exec {pod['netns']} ss -tlnp` and read the owner"

    return Answer(truth, explain, lead=f"pod {pod['pod']} is network namespace {pod['netns']}, on node {pod['node']}: "
                                       f"`sudo ip netns exec {pod['netns']} ss -tlnp` names the owner of each socket")


def _names(text: str) -> str:
    return ",".join(sorted(w for w in re.split(r"[\s,]+", text.strip()) if w))


def pods_behind_ztunnel(lab: LiveLab, spec: dict[str, Any]) -> Answer:
    """The meshed pods whose node's ztunnel is `node`: the ones that lose traffic when it stops."""
    node = f"{lab.name}-{spec['node']}"
    pods = lab.pods("default")
    meshed = {p["metadata"]["name"]: p["spec"].get("nodeName", "") for p in pods
              if (p["metadata"].get("annotations") or {}).get("ambient.istio.io/redirection") == "enabled"}
    truth = _names(" ".join(n for n, where in meshed.items() if where == node))

    def explain(given: str) -> str:
        named = set(_names(given).split(",")) - {""}
        wanted = set(truth.split(",")) - {""}
        extra = sorted(named - wanted)
        if extra:
            where = meshed.get(extra[0])
            why = (f"runs on {where}, whose ztunnel is up" if where else "is not in the mesh (or not a pod here): "
                   "its traffic never goes through ztunnel")
            return f"{extra[0]} {why}"
        missing = sorted(wanted - named)
        return (f"{len(missing)} pod(s) are missing: a meshed pod on {node} (see `ambient-lab get pods -o wide`) "
                f"has its listeners owned by that node's ztunnel")

    down = [c["node"] for c in lab.components() if c["component"] == "ztunnel" and not c["running"]]
    lead = (f"ztunnel is not running on {', '.join(down)}; `ambient-lab get pods -o wide` shows each pod's node and "
            f"whether it is in the mesh (REDIRECTION)") if down else "`ambient-lab get pods -o wide` shows each pod's node"
    return Answer(truth, explain, lead, _names)


def connect_authority(lab: LiveLab, spec: dict[str, Any]) -> Answer:
    """The `:authority` of the CONNECT that a request to a Service produces at the pod, without a
    waypoint: the chosen pod's own IP and target port (zt build_request), not the Service's VIP."""
    pod = lab.resolve(str(spec["pod"]))
    port = int(spec.get("port", 9080))
    truth = f"{pod['ip']}:{port}"
    services = {s["spec"].get("clusterIP", ""): s["metadata"]["name"] for s in lab.objects("services", "default")}

    def explain(given: str) -> str:
        ip, _, p = given.strip().rpartition(":")
        if ip in services:
            return (f"{ip} is the ClusterIP of Service {services[ip]}: the address curl dialled. Without a waypoint, the "
                    f"source ztunnel picks a pod itself and asks the destination for that pod's IP and target port")
        if p == "15008":
            return "15008 is where the mTLS connection goes (the TCP destination); the CONNECT names where the tunnel leads"
        return f"{given} is not what the CONNECT said: the decrypted capture shows `Header: :authority: ...`"

    return Answer(truth, explain, lead=f"pod {pod['pod']} is {pod['ip']}: capture there with --decrypt, start it "
                                       f"first, then send the request")


ANSWERS: dict[str, Callable[[LiveLab, dict[str, Any]], Answer]] = {
    "connect_authority": connect_authority,
    "ztunnel_pid": ztunnel_pid,
    "pods_behind_ztunnel": pods_behind_ztunnel,
}


