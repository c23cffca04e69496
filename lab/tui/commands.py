"""What the TUI's keys and actions turn into: command lines and supervisor requests, as data.

The TUI never changes the lab itself: it asks the supervisor (label, apply, kill, restart), or
runs the same commands a learner would type in a second terminal (`ip netns exec <pod netns>
...`). Building those is kept here, pure, so tests check the exact command a key resolves to
without running it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lab.kube.model import DATAPLANE_MODE_LABEL
from lab.tui.resources import resolve_view

# The pod view's tabs that read the kernel inside the pod's network namespace.
POD_TABS = ("iptables", "sockets", "network")

# `:word` -> a top-level screen that is not a resource table.
SCREENS = {"cluster": "cluster", "flows": "flows", "flow": "flows", "istiod": "istiod", "cp": "istiod",
           "controlplane": "istiod", "events": "events", "ev": "events", "wire": "wire", "ex": "ex",
           "exercise": "ex", "exercises": "ex"}


def in_netns(netns: str, *argv: str) -> list[str]:
    """Run a command inside a pod's (or node's) network namespace, as a learner would."""
    return ["ip", "netns", "exec", netns, *argv]


def shell_command(netns: str) -> list[str]:
    """The `s` key: a shell inside the pod's network namespace (k9s's shell, without a container)."""
    return in_netns(netns, "bash")


def pod_tab_commands(netns: str, tab: str) -> list[list[str]]:
    """The commands behind each kernel tab of the pod view.

    iptables: the in-pod rules istio-cni installed, with packet counters (legacy xtables, as
    istio-cni writes them); sockets: ztunnel's listeners 15001/15006/15008 inside the pod and the
    app's connections; network: the pod's veth, routes, and the fwmark rule for source-IP
    preservation.
    """
    if tab == "iptables":
        return [in_netns(netns, "iptables-legacy-save", "-c")]
    if tab == "sockets":
        return [in_netns(netns, "ss", "-tanp")]
    if tab == "network":
        return [in_netns(netns, "ip", "-br", "addr"), in_netns(netns, "ip", "route"), in_netns(netns, "ip", "rule")]
    raise ValueError(f"unknown pod tab {tab!r}")


def curl_command(netns: str, service: str, namespace: str, port: int, path: str = "/") -> list[str]:
    """`curl` from inside a pod to a service by its cluster DNS name, printing status and time."""
    url = f"http://{service}.{namespace}:{port}{path}"
    return in_netns(netns, "curl", "-s", "-o", "/dev/null", "--max-time", "5",
                    "-w", "%{http_code} in %{time_total}s\n", url)


@dataclass
class Request:
    """One supervisor request (see lab/supervisor/server.py `op_*`)."""

    op: str
    fields: dict = field(default_factory=dict)

    def describe(self) -> str:
        return self.op + " " + " ".join(f"{k}={v!r}" for k, v in self.fields.items())


def label_namespace(namespace: str, ambient: bool) -> Request:
    """`ambient-lab label namespace NS istio.io/dataplane-mode=ambient` (or `...-` to remove it)."""
    return Request("label", {"kind": "namespace", "name": namespace, "namespace": "",
                             "changes": {DATAPLANE_MODE_LABEL: "ambient" if ambient else None}, "overwrite": True})


def apply_file(path: str, namespace: str = "") -> Request:
    """`ambient-lab apply -f PATH`: the supervisor validates and applies the documents."""
    p = Path(path).expanduser()
    files = sorted(p.glob("*.y*ml")) if p.is_dir() else [p]
    if not files:
        raise FileNotFoundError(f"no YAML files in {p}")
    return Request("apply", {"docs": [{"text": f.read_text(), "file": str(f)} for f in files],
                             "namespace": namespace})


def component_action(verb: str, component: str, node: str) -> Request:
    """`ambient-lab kill|restart COMPONENT NODE`."""
    if verb not in ("kill", "restart"):
        raise ValueError(verb)
    return Request(verb, {"component": component, "node": node})


@dataclass
class CommandLine:
    """What a k9s-style `:` command asks for."""

    action: str  # "view" | "screen" | "quit" | "unknown"
    target: str = ""
    argument: str = ""


def parse_command_line(text: str) -> CommandLine:
    """`:pods`, `:svc default`, `:flows`, `:istiod`, `:q` ..."""
    words = text.strip().lstrip(":").split()
    if not words:
        return CommandLine("unknown")
    word, rest = words[0].lower(), " ".join(words[1:])
    if word in ("q", "q!", "quit", "exit"):
        return CommandLine("quit")
    view = resolve_view(word)
    if view:
        return CommandLine("view", view, rest)
    if word in SCREENS:
        return CommandLine("screen", SCREENS[word], rest)
    return CommandLine("unknown", word)
