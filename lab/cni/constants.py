"""Constants of the istio-cni node agent's in-pod redirection.

Mirrors istio/istio ``cni/pkg/config/config.go`` (the ``Inpod*`` marks, the ports and the route
table), the chain names of ``cni/pkg/iptables``, and ztunnel's ``DEFAULT_INPOD_MARK``
(istio/ztunnel ``src/config.rs``). Both sides must agree on the mark: ztunnel sets it on every
socket it opens inside a pod, and the CNI's rules use it to tell ztunnel's packets from the app's.
"""

from __future__ import annotations

# --- marks (packet mark / conntrack mark) -------------------------------------------------------

# SO_MARK that ztunnel puts on every socket it creates in the pod netns; rules skip such packets.
INPOD_MARK: int = 0x539  # 1337
# Only these bits of the packet mark belong to Istio; other bits stay free for other software.
INPOD_MASK: int = 0xFFF
# Connmark (and, restored, fwmark) for connections ztunnel opened to the app: routes replies back.
INPOD_TPROXY_MARK: int = 0x111  # the name is historical: inbound capture once used TPROXY
# Mask of INPOD_TPROXY_MARK, same bits as INPOD_MASK.
INPOD_TPROXY_MASK: int = 0xFFF
# nfmask/ctmask of CONNMARK --restore-mark: copy the whole connmark into the packet mark.
INPOD_RESTORE_MASK: int = 0xFFFFFFFF

# ztunnel's own default for INPOD_MARK (env PACKET_MARK); must equal INPOD_MARK.
ZTUNNEL_DEFAULT_INPOD_MARK: int = 1337

# --- policy routing ------------------------------------------------------------------------------

# Routing table holding "local 0.0.0.0/0 dev lo": marked replies are delivered inside the pod.
ROUTE_TABLE_INBOUND: int = 100
# Priority of "ip rule fwmark 0x111/0xfff lookup 100" (just before the main table's 32766).
INPOD_RULE_PRIORITY: int = 32764

# --- ztunnel ports inside the pod netns ------------------------------------------------------------

# ztunnel's outbound listener: the app's outgoing TCP is REDIRECTed here.
ZTUNNEL_OUTBOUND_PORT: int = 15001
# ztunnel's inbound plaintext listener: incoming non-HBONE TCP is REDIRECTed here.
ZTUNNEL_INBOUND_PLAINTEXT_PORT: int = 15006
# ztunnel's inbound HBONE (mTLS + HTTP/2 CONNECT) listener: reached directly, never redirected.
ZTUNNEL_INBOUND_PORT: int = 15008
# ztunnel's DNS proxy: the app's port-53 traffic goes here when DNS capture is on.
DNS_CAPTURE_PORT: int = 15053
# The port DNS capture matches (queries out, replies in).
DNS_PORT: int = 53
# Conntrack zone that keeps ztunnel's own upstream DNS flows apart from the app's captured ones.
DNS_CONNTRACK_ZONE: int = 1

# --- addresses -------------------------------------------------------------------------------------

# Source address kubelet's probes get (SNAT on the node); the pod ACCEPTs them, bypassing ztunnel.
HOST_PROBE_SNAT_IP: str = "169.254.7.127"
# IPv6 twin of HOST_PROBE_SNAT_IP (the lab is IPv4-only; kept for reference).
HOST_PROBE_SNAT_IPV6: str = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
# Loopback as written in the rules: traffic to it is never captured.
LOCALHOST_CIDR: str = "127.0.0.1/32"
# ipset (on the node) of ambient pod IPs whose probes get SNATed (host rule, not in-pod).
PROBE_IPSET: str = "istio-inpod-probes"

# --- chain names -----------------------------------------------------------------------------------

# Istio's chain hooked from PREROUTING in the pod netns (mangle, nat, raw).
CHAIN_INPOD_PREROUTING: str = "ISTIO_PRERT"
# Istio's chain hooked from OUTPUT in the pod netns (mangle, nat, raw).
CHAIN_INPOD_OUTPUT: str = "ISTIO_OUTPUT"
# Istio's chain hooked from POSTROUTING in the node netns (kubelet probe SNAT).
CHAIN_HOST_POSTROUTING: str = "ISTIO_POSTRT"
# Every chain the in-pod rules create, in any table.
INPOD_CHAINS: tuple[str, ...] = (CHAIN_INPOD_PREROUTING, CHAIN_INPOD_OUTPUT)
