"""The inbound HBONE listener (15008): where peers' mTLS + HTTP/2 CONNECT tunnels arrive.

Real counterpart: zt:src/proxy/inbound.rs (``Inbound``).

Port 15008 is the one inbound TCP port the in-pod rules do NOT redirect: peers' ztunnels (and
waypoints) connect to ``podIP:15008`` directly, and ztunnel's listener inside the pod accepts.
Terminating HBONE (TLS with the pod's SPIFFE certificate, the CONNECT request, authorization,
the connect to the app) is the next step of the lab. Until then this listener is real, so the
port is owned by ztunnel and visible in ``ss -tlnp``, but every connection is closed at once
and logged as a failure saying why.
"""

from __future__ import annotations

import asyncio

from lab.ztunnel.proxy import Flow, HboneNotServed
from lab.ztunnel.socket import format_addr


async def handle(flow: Flow, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accept a connection on 15008 and close it (HBONE is not terminated yet)."""
    flow.captured(f"from {format_addr(flow.src)} on pod {flow.pi.workload.name}'s HBONE port")
    flow.original_dst(flow.local, f"{format_addr(flow.src)} connected to {format_addr(flow.local)}: port "
                                  f"15008 is never redirected, so this is the real destination")
    raise HboneNotServed()
