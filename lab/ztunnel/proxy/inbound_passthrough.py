"""The inbound plaintext listener (15006): TCP into a meshed pod that is not HBONE.

Real counterpart: zt:src/proxy/inbound_passthrough.rs (``InboundPassthrough``).

The path of one connection:

1. A client that is not in the mesh (another pod, a node process) connects to 10.244.2.7:9080 in
   pod B. Pod B's nat PREROUTING rule REDIRECTs it to ztunnel's 15006 listener inside pod B (port
   15008 is the only TCP port not redirected).
2. ``SO_ORIGINAL_DST`` gives back 10.244.2.7:9080, the app's own address and port.
3. :func:`inbound_target` checks it (never one of ztunnel's own ports).
4. ``rbac.decision``: L4 authorization with NO identity (plaintext carries none): the RBAC
   context is (client IP, None, pod IP, app port) over the policies of pod B. This is how
   PeerAuthentication STRICT works in ambient: istiod sends a DENY policy matching
   ``not_principals: [presence]``, i.e. every peer without an identity. Denied -> reset.
5. ``conn.upstream``: ztunnel connects to the app from inside pod B with ``SO_MARK`` 1337 and
   ``IP_TRANSPARENT``, bound to the CLIENT's address: the app sees the real client IP. The in-pod
   rules make the replies come back: mangle PREROUTING turns mark 1337 into connmark 0x111,
   mangle OUTPUT restores 0x111 on the app's replies, and ``ip rule fwmark 0x111 lookup 100``
   (``local 0.0.0.0/0 dev lo``) delivers them to ztunnel's transparent socket instead of eth0.
6. Bytes are relayed; one ``direction="inbound"`` access-log line is written. The connection
   stays registered with its RBAC context: a later policy change can close it.

In step mode (lab/ztunnel/stepper.py) a new connection waits before step 4 and before step 5.
"""

from __future__ import annotations

import asyncio
from collections.abc import Set as AbstractSet

from lab.ztunnel.config import ILLEGAL_PORTS
from lab.ztunnel.proxy import (
    POLICY_REJECTION,
    Flow,
    NoOriginalDst,
    ProxyError,
    SelfCall,
    UnknownWorkload,
)
from lab.ztunnel.proxy.relay import copy_bidirectional
from lab.ztunnel.rbac import Connection, Decision
from lab.ztunnel.socket import Addr, format_addr, orig_dst_addr, upstream_socket


def inbound_target(orig_dst: Addr, *, illegal_ports: AbstractSet[int] = ILLEGAL_PORTS) -> Addr:
    """Where an inbound plaintext connection goes: the app at its original destination (pure).

    Raises :class:`SelfCall` for ztunnel's own ports (e.g. a client dialled podIP:15001, which
    the PREROUTING rule redirected here).
    """
    if orig_dst[1] in illegal_ports:
        raise SelfCall()
    return orig_dst


def rbac_message(node: str, decision: Decision, ctx: Connection, pod: str) -> str:
    """The sentence of an ``rbac.decision`` event (pure)."""
    who = f"{ctx.src_identity}" if ctx.src_identity else f"{ctx.src_ip} (plaintext, no identity)"
    verdict = "allowed" if decision.allowed else "denied"
    if decision.policy:
        return (f"ztunnel on {node} checked AuthorizationPolicy {decision.policy} for {who} -> "
                f"{pod} port {ctx.dst_port}: {verdict}")
    if decision.allowed:
        return f"ztunnel on {node} checked the policies of pod {pod} for {who}: allowed ({decision.reason})"
    return f"ztunnel on {node} checked the policies of pod {pod} for {who}: denied ({decision.reason})"


def emit_rbac(flow: Flow, decision: Decision, ctx: Connection) -> None:
    flow.emit("rbac.decision", rbac_message(flow.node, decision, ctx, flow.pod), allowed=decision.allowed,
              policy=decision.policy or "", reason=decision.reason, evaluated=list(decision.evaluated),
              dry_run=[str(d) for d in decision.dry_run], src_ip=ctx.src_ip,
              src_identity=str(ctx.src_identity) if ctx.src_identity else "", dst=f"{ctx.dst_ip}:{ctx.dst_port}")


async def handle(flow: Flow, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Proxy one connection accepted on 15006 (the steps in the module docstring)."""
    pi = flow.pi
    pod = pi.workload.name
    client_ip = flow.src[0]
    flow.captured(f"from {format_addr(flow.src)}, redirected inside pod {pod}")
    if flow.sock is None:
        raise ProxyError("no socket")
    try:
        orig = orig_dst_addr(flow.sock)
    except OSError as e:
        raise NoOriginalDst(e) from e
    flow.original_dst(orig, f"{format_addr(flow.src)} wanted to reach {format_addr(orig)} in pod {pod} "
                            f"(SO_ORIGINAL_DST: the destination before the REDIRECT to 15006)")
    target = inbound_target(orig, illegal_ports=pi.cfg.illegal_ports)

    mesh = pi.mesh
    if mesh is not None:
        dst = await mesh.workload_of(pi.workload, pi.cfg.workload_wait)
        if dst is None:
            raise UnknownWorkload("destination", pi.workload, pi.cfg.workload_wait)
        flow.dst_workload = dst
        flow.src_workload = mesh.state.workload_by_ip(client_ip)
        flow.open()
        ctx = Connection(src_ip=client_ip, src_identity=None, dst_ip=target[0], dst_port=target[1])
        if pi.stepper.on:
            await flow.hold("authorization",
                            f"ztunnel on {pi.cfg.node} will check pod {pod}'s AuthorizationPolicies for "
                            f"{client_ip}, plaintext with no identity, -> port {target[1]}: allowed, or reset")
        decision = mesh.authorize(dst, ctx)
        emit_rbac(flow, decision, ctx)
        if not decision.allowed:
            flow.response_flags = "DENY"
            raise ProxyError(POLICY_REJECTION.format(reason=decision.reason))
        pi.connections.track_rbac(flow, ctx)
    else:
        flow.open()

    if pi.stepper.on:
        await flow.hold("upstream", f"ztunnel will connect to the app at {format_addr(target)} inside pod {pod} "
                                    f"from the client's own address {client_ip} (IP_TRANSPARENT) and copy bytes")
    sock = pi.netns.run(lambda: upstream_socket(mark=pi.cfg.packet_mark, bind_source=client_ip))
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, target), pi.cfg.connect_timeout)
    except BaseException:
        sock.close()
        flow.response_flags = "CONNECT"
        raise
    local = sock.getsockname()[:2]
    flow.connected(target, local,
                   f"ztunnel connected to the app at {format_addr(target)} inside pod {pod} using the "
                   f"client's address {client_ip} as its source (IP_TRANSPARENT, mark {pi.cfg.packet_mark}), "
                   f"so the app sees the real client", transparent=True)
    up_reader, up_writer = await asyncio.open_connection(sock=sock, limit=256 * 1024)
    await copy_bidirectional((reader, writer), (up_reader, up_writer), flow.counts)

