"""The inbound plaintext listener (15006): TCP into a meshed pod that is not HBONE.

Real counterpart: zt:src/proxy/inbound_passthrough.rs (``InboundPassthrough``).

The path of one connection:

1. A client (another pod, a node process) connects to 10.244.2.7:9080 in pod B. Pod B's nat
   PREROUTING rule REDIRECTs it to ztunnel's 15006 listener inside pod B (port 15008 is the
   only TCP port not redirected).
2. ``SO_ORIGINAL_DST`` gives back 10.244.2.7:9080, the app's own address and port.
3. :func:`inbound_target` checks it (never one of ztunnel's own ports).
4. ztunnel connects to the app from inside pod B with ``SO_MARK`` 1337 and ``IP_TRANSPARENT``,
   bound to the CLIENT's address: the app sees the real client IP. The in-pod rules make the
   replies come back: mangle PREROUTING turns mark 1337 into connmark 0x111, mangle OUTPUT
   restores 0x111 on the app's replies, and ``ip rule fwmark 0x111 lookup 100`` (``local
   0.0.0.0/0 dev lo``) delivers them to ztunnel's transparent socket instead of eth0.
5. Bytes are relayed; one ``direction="inbound"`` access-log line is written.

Plaintext carries no identity: later, L4 authorization here sees no principal.
"""

from __future__ import annotations

import asyncio
from typing import AbstractSet

from lab.ztunnel.config import ILLEGAL_PORTS
from lab.ztunnel.proxy import Flow, NoOriginalDst, SelfCall
from lab.ztunnel.proxy.relay import copy_bidirectional
from lab.ztunnel.socket import Addr, format_addr, orig_dst_addr, upstream_socket


def inbound_target(orig_dst: Addr, *, illegal_ports: AbstractSet[int] = ILLEGAL_PORTS) -> Addr:
    """Where an inbound plaintext connection goes: the app at its original destination (pure).

    Raises :class:`SelfCall` for ztunnel's own ports (e.g. a client dialled podIP:15001, which
    the PREROUTING rule redirected here).
    """
    if orig_dst[1] in illegal_ports:
        raise SelfCall()
    return orig_dst


async def handle(flow: Flow, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Proxy one connection accepted on 15006 (the steps in the module docstring)."""
    pi = flow.pi
    pod = pi.workload.name
    client_ip = flow.src[0]
    flow.captured(f"from {format_addr(flow.src)}, redirected inside pod {pod}")
    try:
        orig = orig_dst_addr(flow.sock)
    except OSError as e:
        raise NoOriginalDst(e) from e
    flow.original_dst(orig, f"{format_addr(flow.src)} wanted to reach {format_addr(orig)} in pod {pod} "
                            f"(SO_ORIGINAL_DST: the destination before the REDIRECT to 15006)")
    target = inbound_target(orig, illegal_ports=pi.cfg.illegal_ports)

    sock = pi.netns.run(lambda: upstream_socket(mark=pi.cfg.packet_mark, bind_source=client_ip))
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, target), pi.cfg.connect_timeout)
    except BaseException:
        sock.close()
        raise
    local = sock.getsockname()[:2]
    flow.forwarded(target, local,
                   f"ztunnel connected to the app at {format_addr(target)} inside pod {pod} using the "
                   f"client's address {client_ip} as its source (IP_TRANSPARENT, mark {pi.cfg.packet_mark}), "
                   f"so the app sees the real client", transparent=True)
    up_reader, up_writer = await asyncio.open_connection(sock=sock, limit=256 * 1024)
    await copy_bidirectional((reader, writer), (up_reader, up_writer), flow.counts)
