"""The per-node DaemonSets of the lab: kube-dns, the istio-cni node agent and ztunnel.

In a real cluster these run as DaemonSet pods with host networking; in the lab each is a
process started inside its node's network namespace (`ip netns exec <node> ...`). The supervisor
starts, kills and restarts them here, so `ambient-lab kill ztunnel NODE` has exactly the blast
radius it has in real ambient: one node's meshed pods.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field

from lab.common.errors import LabError
from lab.common.state import LabRecord, run_dir
from lab.kube import addressing
from lab.kube.model import Node

COMPONENTS = ("kube-dns", "istio-cni", "ztunnel", "istiod")
XDS_PORT = 15012


def node_dir(lab: str, node_name: str) -> str:
    """Per-node sockets; the short node suffix keeps unix socket paths under 108 bytes."""
    return os.path.join(run_dir(lab), "nodes", node_name.removeprefix(lab + "-"))


@dataclass
class NodeSockets:
    plugin: str  # the CNI plugin -> node agent channel (pluginevent.sock)
    zds: str  # node agent <-> ztunnel (ZDS)
    ztunnel_admin: str
    token: str  # the node's credential towards istiod (stands in for ztunnel's service-account token)
    keylog: str  # NSS key log: every TLS session the lab's proxies make or accept (one file per lab)

    @classmethod
    def of(cls, lab: str, node_name: str) -> "NodeSockets":
        d = node_dir(lab, node_name)
        return cls(os.path.join(d, "pluginevent.sock"), os.path.join(d, "ztunnel.sock"),
                   os.path.join(d, "ztunnel-admin.sock"), os.path.join(d, "token"), tls_keylog(lab))


def tls_keylog(lab: str) -> str:
    """One NSS key log for the whole lab: the proxies append to it (line-sized appends do not interleave),
    and tshark reads it as sessions appear, so `capture --decrypt` sees both ends of every tunnel."""
    return os.path.join(run_dir(lab), "tls-keylog.txt")


def waypoint_dir(lab: str, namespace: str, gateway: str) -> str:
    """A waypoint's admin socket and flow file (flows.mitm, mitmproxy's format)."""
    return os.path.join(run_dir(lab), "waypoints", f"{namespace}-{gateway}")


def istiod_dir(lab: str) -> str:
    return os.path.join(run_dir(lab), "istiod")


def write_node_tokens(lab: str, nodes: list[Node]) -> None:
    """One random credential per node: istiod maps a token to the node that presents it, the way it
    maps ztunnel's projected service-account token to the ztunnel pod (and so to its node)."""
    import json
    import secrets

    tokens = {}
    for n in nodes:
        s = NodeSockets.of(lab, n.name)
        os.makedirs(os.path.dirname(s.token), exist_ok=True)
        tokens[n.name] = secrets.token_hex(16)
        fd = os.open(s.token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(tokens[n.name])
    os.makedirs(istiod_dir(lab), mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(istiod_dir(lab), "tokens.json"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(tokens, f)


@dataclass
class Components:
    """Starts and stops the per-node processes, recording each one before anything else."""

    lab: str
    record: LabRecord
    logs_dir: str
    dns_records: str
    dns_capture: bool = False
    istiod_address: str = ""  # control-plane node IP:15012
    cert_ttl: int = 0  # workload certificate TTL in seconds (0: istiod's default, 24h)
    procs: dict[tuple[str, str], subprocess.Popen] = field(default_factory=dict)

    def command(self, what: str, node: Node) -> list[str]:
        s = NodeSockets.of(self.lab, node.name)
        py = [sys.executable, "-m"]
        if what == "kube-dns":
            return py + ["lab.kube.dns", "--records", self.dns_records, "--listen", addressing.CLUSTER_DNS_IP]
        if what == "istio-cni":
            return py + ["lab.cni", "--lab", self.lab, "--node", node.name, "--plugin-socket", s.plugin,
                         "--zds-socket", s.zds] + (["--dns-capture"] if self.dns_capture else [])
        if what == "ztunnel":
            cmd = py + ["lab.ztunnel", "--lab", self.lab, "--node", node.name, "--zds-socket", s.zds,
                        "--admin-socket", s.ztunnel_admin]
            if self.istiod_address:
                cmd += ["--xds-address", self.istiod_address, "--token-file", s.token, "--keylog", s.keylog,
                        "--root-cert", os.path.join(istiod_dir(self.lab), "root-cert.pem")]
                if self.cert_ttl:
                    cmd += ["--cert-ttl", str(self.cert_ttl)]
            return cmd
        if what == "istiod":
            return py + ["lab.istiod", "--lab", self.lab, "--listen", f"{node.ip}:{XDS_PORT}", "--ca-dir",
                         istiod_dir(self.lab), "--tokens", os.path.join(istiod_dir(self.lab), "tokens.json")] + (
                # a short TTL is a rotation demo: no back-dating, or half-life would already be past
                ["--workload-cert-ttl", str(self.cert_ttl), "--clock-skew-grace", "0"] if self.cert_ttl else [])
        raise LabError(f"unknown component {what!r}", f"one of: {', '.join(COMPONENTS)}")

    def waypoint_command(self, pod, node: Node) -> list[str]:
        """The waypoint pod's process (the real pod runs Envoy): HBONE in, L7, HBONE out."""
        s = NodeSockets.of(self.lab, node.name)
        gateway = pod.meta.labels["gateway.networking.k8s.io/gateway-name"]
        return [sys.executable, "-m", "lab.waypoint", "--lab", self.lab, "--namespace", pod.namespace,
                "--name", gateway, "--node", node.name, "--pod", pod.name, "--pod-ip", pod.ip,
                "--xds-address", self.istiod_address, "--token-file", s.token,
                "--root-cert", os.path.join(istiod_dir(self.lab), "root-cert.pem"),
                "--state-dir", waypoint_dir(self.lab, pod.namespace, gateway), "--keylog", s.keylog]

    def log_path(self, what: str, node: Node) -> str:
        return os.path.join(self.logs_dir, f"{what}_{node.name}.log")

    def start(self, what: str, node: Node) -> int:
        os.makedirs(node_dir(self.lab, node.name), exist_ok=True)
        cmd = ["ip", "netns", "exec", node.netns, *self.command(what, node)]
        with open(self.log_path(what, node), "ab") as log:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.record.add_process(p.pid, f"{what} {node.name}")
        self.procs[(what, node.name)] = p
        return p.pid

    def running(self, what: str, node: Node) -> bool:
        p = self.procs.get((what, node.name))
        return p is not None and p.poll() is None

    def pid(self, what: str, node: Node) -> int:
        p = self.procs.get((what, node.name))
        return p.pid if p is not None and p.poll() is None else 0

    def kill(self, what: str, node: Node) -> int:
        """SIGKILL, as a crash or an OOM kill would: nothing gets to clean up."""
        p = self.procs.get((what, node.name))
        if p is None or p.poll() is not None:
            raise LabError(f"{what} on {node.name} is not running", f"start it with: ambient-lab restart {what} {node.name}")
        p.send_signal(signal.SIGKILL)
        p.wait()
        self.record.drop_process(p.pid)
        return p.pid

    def reap(self) -> list[tuple[str, str, int]]:
        """Components that exited on their own since the last look: (what, node, exit code)."""
        gone = []
        for (what, node), p in list(self.procs.items()):
            if p.poll() is not None and any(e.pid == p.pid for e in self.record.processes):
                self.record.drop_process(p.pid)
                gone.append((what, node, p.returncode))
        return gone
