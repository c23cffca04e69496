"""The cluster's machines: a fabric network and one network namespace per node.

This plays kind's role: kind runs each node as a container on a docker bridge network
(172.18.0.0/16). Here each node is a network namespace whose `eth0` plugs into a bridge in the
lab's "fabric" namespace. Every node routes the other nodes' pod CIDRs to them (as kindnet
programs routes), forwards packets (it is a router for its pods), and answers cluster DNS on
10.96.0.10 itself (a node-local cache standing in for kube-dns).

Nothing here touches the host's own network namespace: the fabric has no link to it.
"""

from __future__ import annotations

from pyroute2 import IPRoute

from lab.common import netns
from lab.common.state import LabRecord
from lab.kube import addressing
from lab.kube.model import Node


def build_fabric(lab: str, record: LabRecord) -> str:
    """The fabric namespace with bridge `br0` (172.18.0.1/16, kind's docker network gateway)."""
    name = addressing.fabric_netns(lab)
    record.add_netns(name)
    netns.create(name)
    with netns.entered(name), IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        ipr.link("add", ifname="br0", kind="bridge")
        br = ipr.link_lookup(ifname="br0")[0]
        ipr.addr("add", index=br, address=addressing.FABRIC_GATEWAY, prefixlen=16)
        ipr.link("set", index=br, state="up")
    return name


def build_node(lab: str, node: Node, nodes: list[Node], record: LabRecord) -> None:
    """A node namespace: `eth0` on the fabric, routes to every other node's pod CIDR, forwarding on."""
    record.add_netns(node.netns)
    netns.create(node.netns)
    fabric = addressing.fabric_netns(lab)
    port = addressing.fabric_port_name(node.index)
    with netns.entered(fabric), IPRoute() as ipr:
        ipr.link("add", ifname=port, kind="veth", peer={"ifname": "eth0", "net_ns_fd": netns.path(node.netns)})
        idx = ipr.link_lookup(ifname=port)[0]
        ipr.link("set", index=idx, master=ipr.link_lookup(ifname="br0")[0], state="up")
    with netns.entered(node.netns), IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        # kube-dns answers on every node (see module docstring).
        ipr.addr("add", index=lo, address=addressing.CLUSTER_DNS_IP, prefixlen=32)
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=eth0, address=node.ip, prefixlen=16)
        ipr.link("set", index=eth0, state="up")
        ipr.route("add", dst="default", gateway=addressing.FABRIC_GATEWAY)
        for other in nodes:
            if other.name != node.name:
                ipr.route("add", dst=other.pod_cidr, gateway=other.ip)
    netns.write_sysctl(node.netns, "net.ipv4.ip_forward", "1")
    netns.write_sysctl(node.netns, "net.ipv4.conf.all.rp_filter", "0")
    netns.write_sysctl(node.netns, "net.ipv4.conf.default.rp_filter", "0")
