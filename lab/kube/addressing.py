"""The network plan of a kind-like cluster, as pure functions (no kernel calls).

- Node IPs in 172.18.0.0/16, as kind's docker network: 172.18.0.1 is the fabric's gateway,
  the control-plane node is 172.18.0.2 and worker N is 172.18.0.(2+N).
- Pod CIDR 10.244.<node index>.0/24 per node (kind's kube-controller-manager allocates these);
  the node side of every pod veth holds <cidr>.1, pods get .2 upwards (point-to-point routing, as
  kindnet's ptp plugin does: the pod has a /32 and a default route via <cidr>.1).
- Service CIDR 10.96.0.0/16: 10.96.0.1 is the API server, 10.96.0.10 is cluster DNS (kube-dns).

Names: every network namespace starts with the lab's name, so two labs never collide and
`ip netns list` tells whose each one is. Interface names fit Linux's 15-character limit.
"""

from __future__ import annotations

import hashlib
import ipaddress

from lab.kube.model import Node

NODE_NETWORK = ipaddress.ip_network("172.18.0.0/16")
FABRIC_GATEWAY = "172.18.0.1"
POD_NETWORK = ipaddress.ip_network("10.244.0.0/16")
SERVICE_NETWORK = ipaddress.ip_network("10.96.0.0/16")
KUBERNETES_SERVICE_IP = "10.96.0.1"
CLUSTER_DNS_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
MAX_PODS_PER_NODE = 250


def node_names(lab: str, workers: int) -> list[tuple[str, str]]:
    """kind's node names for a cluster called `lab`: (name, role), control-plane first."""
    names = [(f"{lab}-control-plane", "control-plane")]
    for i in range(1, workers + 1):
        names.append((f"{lab}-worker" + ("" if i == 1 else str(i)), "worker"))
    return names


def plan_nodes(lab: str, workers: int) -> list[Node]:
    """The nodes of a lab: index 0 is the control-plane (tainted NoSchedule, as kind does), then workers."""
    nodes = []
    for index, (name, role) in enumerate(node_names(lab, workers)):
        taints = ["node-role.kubernetes.io/control-plane:NoSchedule"] if role == "control-plane" else []
        labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}
        if role == "control-plane":
            labels["node-role.kubernetes.io/control-plane"] = ""
        nodes.append(Node(name=name, index=index, role=role, ip=node_ip(index),
                          pod_cidr=str(pod_cidr(index)), netns=name, labels=labels, taints=taints))
    return nodes


def node_ip(index: int) -> str:
    return str(NODE_NETWORK.network_address + 2 + index)


def pod_cidr(index: int) -> ipaddress.IPv4Network:
    return ipaddress.ip_network(f"10.244.{index}.0/24")


def pod_gateway(cidr: str) -> str:
    """The node side of every pod veth on this node (kindnet's ptp plugin gives it <cidr>.1)."""
    return str(ipaddress.ip_network(cidr).network_address + 1)


def allocate_pod_ip(cidr: str, used: set[str]) -> str:
    """host-local IPAM: the lowest free address of the node's pod CIDR, from .2 upwards."""
    net = ipaddress.ip_network(cidr)
    for offset in range(2, min(net.num_addresses - 1, MAX_PODS_PER_NODE + 2)):
        ip = str(net.network_address + offset)
        if ip not in used:
            return ip
    raise RuntimeError(f"pod CIDR {cidr} is full ({MAX_PODS_PER_NODE} pods per node)")


def allocate_service_ip(namespace: str, name: str, used: set[str]) -> str:
    """A ClusterIP from 10.96.0.0/16, stable for a given namespace/name (hashed, then probed).

    The real API server picks at random; a stable choice makes the lab's outputs repeatable.
    Addresses below 10.96.1.0 are left for well-known services (API server, DNS).
    """
    size = SERVICE_NETWORK.num_addresses
    h = int.from_bytes(hashlib.sha256(f"{namespace}/{name}".encode()).digest()[:4], "big")
    for probe in range(size):
        offset = 256 + (h + probe) % (size - 512)
        ip = str(SERVICE_NETWORK.network_address + offset)
        if ip not in used:
            return ip
    raise RuntimeError("service CIDR 10.96.0.0/16 is full")


def pod_netns(lab: str, namespace: str, pod: str) -> str:
    return f"{lab}-{namespace}-{pod}"


def fabric_netns(lab: str) -> str:
    return f"{lab}-fabric"


def veth_name(pod_ip: str) -> str:
    """Node-side veth name: 'veth' + 8 hex digits of the pod IP (<= 15 characters, unique per node)."""
    return "veth" + ipaddress.ip_address(pod_ip).packed.hex()


def fabric_port_name(node_index: int) -> str:
    """The fabric-side end of node N's uplink."""
    return f"fab-n{node_index}"


def service_fqdn(name: str, namespace: str) -> str:
    return f"{name}.{namespace}.svc.{CLUSTER_DOMAIN}"
