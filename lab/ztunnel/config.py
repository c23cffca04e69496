"""ztunnel's configuration: the ports, the mark, the sockets (zt:src/config.rs).

Real ztunnel reads environment variables (``PACKET_MARK``, ``INPOD_UDS``, ``INPOD_PORT_REUSE``,
...). The lab process takes the per-node parts on its command line, as the supervisor starts one
ztunnel per node, and honours the same environment variables for the rest::

    python -m lab.ztunnel --lab LAB --node NODE --zds-socket PATH [--admin-socket PATH]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from lab.cni.constants import (
    ZTUNNEL_DEFAULT_INPOD_MARK,
    ZTUNNEL_INBOUND_PLAINTEXT_PORT,
    ZTUNNEL_INBOUND_PORT,
    ZTUNNEL_OUTBOUND_PORT,
)

#: ztunnel's socks5 port (127.0.0.1:15080 in the pod); the lab does not serve it, but like
#: ztunnel it refuses to proxy to it.
SOCKS5_PORT = 15080
#: ``illegal_ports``: a destination on one of these is ztunnel itself ("attempted recursive call
#: to ourselves"); proxying there would loop.
ILLEGAL_PORTS: frozenset[int] = frozenset(
    {ZTUNNEL_OUTBOUND_PORT, ZTUNNEL_INBOUND_PLAINTEXT_PORT, ZTUNNEL_INBOUND_PORT, SOCKS5_PORT})
#: How long an upstream TCP connect may take (ztunnel's default connect timeout).
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Config:
    """Everything one lab ztunnel needs to know; plain data."""

    lab: str
    node: str
    zds_socket: str  # INPOD_UDS: the istio-cni node agent's ZDS socket
    admin_socket: str = ""  # the lab's stand-in for localhost:15000 (admin), "" = none
    packet_mark: int = ZTUNNEL_DEFAULT_INPOD_MARK  # PACKET_MARK (must match istio-cni's InpodMark)
    port_reuse: bool = True  # INPOD_PORT_REUSE: SO_REUSEPORT on the in-pod listeners
    outbound_port: int = ZTUNNEL_OUTBOUND_PORT
    inbound_plaintext_port: int = ZTUNNEL_INBOUND_PLAINTEXT_PORT
    inbound_port: int = ZTUNNEL_INBOUND_PORT
    illegal_ports: frozenset[int] = field(default=ILLEGAL_PORTS)
    connect_timeout: float = CONNECT_TIMEOUT


def _env_bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def parse_config(argv: Sequence[str], env: Mapping[str, str]) -> Config:
    """Command line + environment -> Config (pure; exits with status 2 on a usage error)."""
    parser = argparse.ArgumentParser(
        prog="python -m lab.ztunnel",
        description="The lab's ztunnel for one node: in-pod listeners for every meshed pod the "
                    "istio-cni node agent hands over via ZDS.")
    parser.add_argument("--lab", required=True, help="lab name (where events go)")
    parser.add_argument("--node", required=True, help="the node this ztunnel serves")
    parser.add_argument("--zds-socket", required=True, help="the node agent's ZDS socket (INPOD_UDS)")
    parser.add_argument("--admin-socket", default="", help="unix socket for the admin requests")
    ns = parser.parse_args(list(argv))
    try:
        mark = int(env.get("PACKET_MARK", str(ZTUNNEL_DEFAULT_INPOD_MARK)), 0)
        reuse = _env_bool(env.get("INPOD_PORT_REUSE", "true"))
    except ValueError as e:
        parser.error(str(e))
    return Config(lab=ns.lab, node=ns.node, zds_socket=ns.zds_socket, admin_socket=ns.admin_socket,
                  packet_mark=mark, port_reuse=reuse)
