"""The pod view's sockets tab: who owns each listener inside the pod.

In ambient mode the node's ztunnel opens its listeners inside every meshed pod's network
namespace (istio/ztunnel `src/inpod`: the istio-cni node agent hands ztunnel the pod's netns over
ZDS). So `ss -tlnp` in the pod shows ports 15001, 15006 and 15008 owned by a process named
`ztunnel` that is not in the pod at all, beside the app's own port. This module reads `ss -tanp`
output and says that in plain words; pure, no Textual, no kernel.
"""

from __future__ import annotations

import re

ZTUNNEL_PORTS = {
    15001: "outbound: the in-pod rules redirect the app's outgoing TCP here",
    15006: "inbound plaintext: traffic from outside the mesh, redirected in PREROUTING",
    15008: "HBONE: mutual-TLS HTTP/2 CONNECT tunnels from other ztunnels and waypoints",
}
_LISTEN = re.compile(r"^LISTEN\s+\d+\s+\d+\s+\S*:(\d+)\s+\S+(?:\s+users:\(\(\"([^\"]+)\",pid=(\d+))?")


def listeners(ss_output: str) -> list[tuple[int, str, int]]:
    """(port, process name, pid) of each listening socket, sorted by port (pid 0: not shown)."""
    found = set()
    for line in ss_output.splitlines():
        m = _LISTEN.match(line)
        if m:
            found.add((int(m.group(1)), m.group(2) or "?", int(m.group(3) or 0)))
    return sorted(found)


def summary(ss_output: str) -> str:
    """A few lines above the raw output: each listener, its owner, and what it is for."""
    rows = listeners(ss_output)
    if not rows:
        return ""
    lines = ["Listening in this pod (ss -p shows the kernel's name of the owning process):"]
    for port, name, pid in rows:
        role = ZTUNNEL_PORTS.get(port, "the app's own port") if name == "ztunnel" or port not in ZTUNNEL_PORTS \
            else ZTUNNEL_PORTS[port]
        lines.append(f"  :{port:<6} {name} (pid {pid})  {role}")
    if any(name == "ztunnel" for _, name, _ in rows):
        lines.append("ztunnel runs on the node, not in this pod: it opened these sockets inside the pod's "
                     "network namespace (read: lab/ztunnel/inpod/, ztunnel src/inpod/).")
    else:
        lines.append("No ztunnel listeners: this pod is not in the mesh "
                     "(label its namespace istio.io/dataplane-mode=ambient).")
    return "\n".join(lines)
