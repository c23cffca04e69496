"""The outbound listener (15001): the app's own outgoing TCP, captured in its pod.

Real counterpart: zt:src/proxy/outbound.rs (``Outbound``, ``OutboundConnection::proxy_to``,
``build_request``).

The path of one connection, as the events show it:

1. The app in pod A connects to, say, 10.244.2.7:9080. The pod's nat OUTPUT rule REDIRECTs the
   SYN to 127.0.0.1:15001, where ztunnel's listener (made inside pod A) accepts it.
2. ``SO_ORIGINAL_DST`` gives back 10.244.2.7:9080: where the app meant to go.
3. :func:`build_request` decides how to get there (a plan, pure data).
4. ztunnel connects to the plan's upstream from INSIDE pod A's netns, with ``SO_MARK`` 1337:
   the pod's rules skip marked packets, so this connection leaves the pod with the pod's own IP
   instead of being captured again.
5. Bytes are relayed both ways until both sides closed; one access-log line is written.

This ztunnel has no xDS yet, so it knows no workload or service: every destination takes the
passthrough branch of ztunnel's decision (plain TCP to the original destination). The HBONE plan
(``podIP:15008`` with an ``:authority``) replaces it in the next step, inside :func:`build_request`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AbstractSet

from lab.ztunnel.config import ILLEGAL_PORTS
from lab.ztunnel.proxy import Flow, NoOriginalDst, SelfCall
from lab.ztunnel.proxy.relay import copy_bidirectional
from lab.ztunnel.socket import Addr, format_addr, orig_dst_addr, upstream_socket


@dataclass(frozen=True)
class Passthrough:
    """Plain TCP straight to the original destination: it is not a known mesh workload.

    ztunnel's ``build_request`` ends here when neither a service nor a workload matches the
    destination address (and no service demands a healthy upstream).
    """

    target: Addr

    @property
    def upstream(self) -> Addr:
        """The TCP next hop: the original destination itself."""
        return self.target

    protocol = "TCP"
    reason = "the destination is not a known mesh workload, so ztunnel passes the connection through as plain TCP"


#: Every plan :func:`build_request` can return (``Passthrough | Hbone`` when HBONE lands).
Request = Passthrough


def build_request(target: Addr, *, illegal_ports: AbstractSet[int] = ILLEGAL_PORTS) -> Request:
    """Decide how ztunnel reaches the app's original destination `target` (pure).

    ztunnel's order (reference 3.3): refuse its own ports; then waypoint of a service VIP; then a
    service or workload lookup (HBONE if the workload speaks HBONE, plain TCP if not); nothing
    found -> passthrough. The lab has no workload state yet, so after the first check every
    destination is a :class:`Passthrough`.

    Raises :class:`SelfCall` when `target` is on one of ztunnel's own ports: connecting there
    from inside the pod would land in ztunnel again.
    """
    ip, port = target
    if port in illegal_ports:
        raise SelfCall()
    return Passthrough((ip, port))


async def handle(flow: Flow, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Proxy one connection accepted on 15001 (the steps in the module docstring)."""
    pi = flow.pi
    pod = pi.workload.name
    flow.captured(f"redirected from pod {pod}")
    try:
        target = orig_dst_addr(flow.sock)
    except OSError as e:
        raise NoOriginalDst(e) from e
    flow.original_dst(target, f"the app in pod {pod} wanted to reach {format_addr(target)} "
                              f"(SO_ORIGINAL_DST: the destination before the REDIRECT to 15001)")
    req = build_request(target, illegal_ports=pi.cfg.illegal_ports)

    sock = pi.netns.run(lambda: upstream_socket(mark=pi.cfg.packet_mark))
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, req.upstream),
                               pi.cfg.connect_timeout)
    except BaseException:
        sock.close()
        raise
    local = sock.getsockname()[:2]
    flow.forwarded(req.upstream, local,
                   f"ztunnel connected to {format_addr(req.upstream)} from inside pod {pod} (source "
                   f"{format_addr(local)}) with mark {pi.cfg.packet_mark}, so the pod's rules let it out "
                   f"instead of capturing it again; {req.reason}", plan=type(req).__name__)
    up_reader, up_writer = await asyncio.open_connection(sock=sock, limit=256 * 1024)
    await copy_bidirectional((reader, writer), (up_reader, up_writer), flow.counts)
