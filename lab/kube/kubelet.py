"""The kubelet and the primary CNI plugin: a pod's sandbox (network namespace) and its app process.

Networking follows kindnet's point-to-point ("ptp") CNI plugin: the pod gets `eth0` with a /32
address and a default route via <pod CIDR>.1, the node side of the veth holds <pod CIDR>.1 and
a /32 route back to the pod. Every packet a pod sends is therefore routed by its node, where
kube-proxy's rules see it.

The container image is played by one of the lab's built-in apps (lab/apps), started as a real
process inside the pod's namespace with `ip netns exec`, which also bind-mounts the pod's
/etc/resolv.conf (from /etc/netns/<pod netns>/) exactly as `ip netns exec` does for learners.
"""

from __future__ import annotations

import os
import subprocess
import sys

from pyroute2 import IPRoute

from lab.apps import app_for_image
from lab.common import netns
from lab.common.state import LabRecord
from lab.kube import addressing, dns
from lab.kube.model import Node, Pod

ETC_NETNS = "/etc/netns"
# the directory holding the `lab` package: apps start with `python -S` (no site-packages), so they
# find it through PYTHONPATH
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pod_etc_dir(pod: Pod) -> str:
    return os.path.join(ETC_NETNS, pod.netns)


def create_sandbox(pod: Pod, node: Node, record: LabRecord) -> None:
    """CNI ADD: the pod's namespace, its veth to the node, addresses, routes, and resolv.conf."""
    record.add_netns(pod.netns)
    netns.create(pod.netns)
    gateway = addressing.pod_gateway(node.pod_cidr)
    veth = addressing.veth_name(pod.ip)
    with netns.entered(node.netns), IPRoute() as ipr:
        ipr.link("add", ifname=veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": netns.path(pod.netns)})
        idx = ipr.link_lookup(ifname=veth)[0]
        ipr.addr("add", index=idx, address=gateway, prefixlen=32)
        ipr.link("set", index=idx, state="up")
        ipr.route("add", dst=f"{pod.ip}/32", oif=idx, scope="link")
    with netns.entered(pod.netns), IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=eth0, address=pod.ip, prefixlen=32)
        ipr.link("set", index=eth0, state="up")
        ipr.route("add", dst=f"{gateway}/32", oif=eth0, scope="link")
        ipr.route("add", dst="default", gateway=gateway, oif=eth0)
    etc = pod_etc_dir(pod)
    record.add_path(etc)
    os.makedirs(etc, exist_ok=True)
    with open(os.path.join(etc, "resolv.conf"), "w") as f:
        f.write(dns.resolv_conf(pod.namespace))
    with open(os.path.join(etc, "hostname"), "w") as f:
        f.write(pod.name + "\n")


def delete_sandbox(pod: Pod, record: LabRecord) -> None:
    """CNI DEL: removing the namespace removes both veth ends and every address and route."""
    netns.remove(pod.netns)
    record.drop_netns(pod.netns)
    etc = pod_etc_dir(pod)
    for f in ("resolv.conf", "hostname"):
        try:
            os.unlink(os.path.join(etc, f))
        except FileNotFoundError:
            pass
    try:
        os.rmdir(etc)
    except OSError:
        pass
    record.drop_path(etc)


def app_command(pod: Pod) -> list[str]:
    """The command line that plays the pod's first container image."""
    assert pod.template
    container = pod.template.containers[0]
    app, opts = app_for_image(container.image)
    ports = sorted({p.container_port for c in pod.template.containers for p in c.ports})
    # -S: the apps use the standard library only, so skipping site-packages halves their start-up.
    cmd = [sys.executable, "-S", "-m", "lab.apps", app, "--pod", pod.name, "--namespace", pod.namespace]
    if ports:
        cmd += ["--ports", ",".join(map(str, ports))]
    if opts.get("version"):
        cmd += ["--version", opts["version"]]
    if container.args:
        cmd += ["--args", *container.args]
    return cmd


def start_app(pod: Pod, log_path: str, record: LabRecord, command: list[str] | None = None) -> subprocess.Popen:
    """Start the pod's app inside its namespace (`ip netns exec` execs it: same pid), and record it."""
    env = {
        **(pod.template.containers[0].env if pod.template else {}),
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "PYTHONPATH": PACKAGE_PARENT,
        "HOSTNAME": pod.name,
        "POD_NAME": pod.name,
        "POD_NAMESPACE": pod.namespace,
        "POD_IP": pod.ip,
        "NODE_NAME": pod.node,
        "SERVICE_ACCOUNT": pod.template.service_account if pod.template else "default",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(["ip", "netns", "exec", pod.netns, *(command or app_command(pod))],
                                stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                cwd="/")
    record.add_process(proc.pid, f"app {pod.namespace}/{pod.name}")
    pod.pid = proc.pid
    return proc
