"""ztunnel's configuration: the ports, the mark, the sockets, the control plane (zt:src/config.rs).

Real ztunnel reads environment variables (``PACKET_MARK``, ``INPOD_UDS``, ``INPOD_PORT_REUSE``,
``XDS_ADDRESS``, ``CA_ADDRESS``, ``SECRET_TTL``, ...). The lab process takes the per-node parts on
its command line, as the supervisor starts one ztunnel per node, and honours the same environment
variables for the rest::

    python -m lab.ztunnel --lab LAB --node NODE --zds-socket PATH [--admin-socket PATH]
        [--xds-address IP:15012 --token-file PATH --root-cert PATH] [--keylog PATH]
        [--cert-ttl SECONDS]

Without ``--xds-address`` ztunnel knows nothing about the mesh: every connection is passed
through as plain TCP (the capture-only stage of the lab). With it, ztunnel subscribes to istiod
(workloads, services, policies), asks istiod's CA for the certificates of its node's workloads,
and carries mesh traffic over HBONE.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
#: SECRET_TTL: the lifetime ztunnel asks istiod for (24 h).
DEFAULT_CERT_TTL = 24 * 3600
#: zt:src/state.rs wait_for_workload: how long a connection waits for its pod to appear in xDS.
WORKLOAD_WAIT = 5.0
#: POOL_MAX_STREAMS_PER_CONNECTION
POOL_MAX_STREAMS = 100
#: The directory, next to the admin socket, where the workload certificates are written.
CERT_DIR_NAME = "ztunnel-certs"


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
    xds_address: str = ""  # XDS_ADDRESS (and CA_ADDRESS): istiod's IP:15012, "" = no control plane
    token_file: str = ""  # the node's credential towards istiod (ztunnel's service-account token)
    root_cert: str = ""  # the mesh's trust bundle (istio-ca-root-cert), written by istiod
    keylog: str = ""  # SSLKEYLOGFILE: NSS key log of every TLS session, "" = none
    cert_ttl: int = DEFAULT_CERT_TTL  # SECRET_TTL, seconds
    workload_wait: float = WORKLOAD_WAIT
    pool_max_streams: int = POOL_MAX_STREAMS

    @property
    def mesh(self) -> bool:
        """Whether ztunnel has a control plane (xDS + CA) and so carries mesh traffic over HBONE."""
        return bool(self.xds_address)

    @property
    def cert_dir(self) -> str:
        """Where the workload certificates are written (0700), next to the admin socket; "" when
        there is no admin socket."""
        if not self.admin_socket:
            return ""
        return os.path.join(os.path.dirname(self.admin_socket) or ".", CERT_DIR_NAME)


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
                    "istio-cni node agent hands over via ZDS, HBONE between meshed pods.")
    parser.add_argument("--lab", required=True, help="lab name (where events go)")
    parser.add_argument("--node", required=True, help="the node this ztunnel serves")
    parser.add_argument("--zds-socket", required=True, help="the node agent's ZDS socket (INPOD_UDS)")
    parser.add_argument("--admin-socket", default="", help="unix socket for the admin requests")
    parser.add_argument("--xds-address", default="", help="istiod's IP:PORT (XDS_ADDRESS); none: plain TCP only")
    parser.add_argument("--token-file", default="", help="the node's token for istiod (with --xds-address)")
    parser.add_argument("--root-cert", default="", help="the mesh root certificate (with --xds-address)")
    parser.add_argument("--keylog", default=env.get("SSLKEYLOGFILE", ""),
                        help="append the NSS key log of every TLS session here (for tshark/Wireshark)")
    parser.add_argument("--cert-ttl", type=int, default=None,
                        help=f"workload certificate lifetime to ask for, seconds (SECRET_TTL, {DEFAULT_CERT_TTL})")
    ns = parser.parse_args(list(argv))
    try:
        mark = int(env.get("PACKET_MARK", str(ZTUNNEL_DEFAULT_INPOD_MARK)), 0)
        reuse = _env_bool(env.get("INPOD_PORT_REUSE", "true"))
        ttl = ns.cert_ttl if ns.cert_ttl is not None else int(env.get("SECRET_TTL", str(DEFAULT_CERT_TTL)))
    except ValueError as e:
        parser.error(str(e))
    if ttl <= 0:
        parser.error(f"--cert-ttl must be positive, got {ttl}")
    if ns.xds_address:
        missing = [flag for flag, value in (("--token-file", ns.token_file), ("--root-cert", ns.root_cert))
                   if not value]
        if missing:
            parser.error(f"--xds-address needs {' and '.join(missing)}")
        host, sep, port = ns.xds_address.rpartition(":")
        if not sep or not host or not port.isdigit():
            parser.error(f"--xds-address wants IP:PORT, got {ns.xds_address!r}")
    return Config(lab=ns.lab, node=ns.node, zds_socket=ns.zds_socket, admin_socket=ns.admin_socket,
                  packet_mark=mark, port_reuse=reuse, xds_address=ns.xds_address, token_file=ns.token_file,
                  root_cert=ns.root_cert, keylog=ns.keylog, cert_ttl=ttl)
