"""The wire view: what one connection looked like on the wire, layer by layer.

HBONE (reference §2) stacks four layers between two ztunnels: TCP from the source pod to the
destination pod's port 15008, mTLS 1.3 with both workloads' SPIFFE identities, HTTP/2, and one
CONNECT stream whose body is the application's TCP bytes. A plain-TCP (passthrough) connection
has none of that: the app's bytes go as they are, through kube-proxy's DNAT. This module reads
the layers off a flow's steps (the proxies put the facts in each event's fields); pure, no Textual.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lab.tui.model import Flow, LabModel, Step


@dataclass
class Layer:
    name: str
    summary: str
    details: list[tuple[str, str]] = field(default_factory=list)


def _steps(flow: Flow, kind: str) -> list[Step]:
    return [s for s in flow.steps if s.kind == kind]


def _field(flow: Flow, kinds: tuple[str, ...], *keys: str, direction: str = "") -> Any:
    """The first value of any of `keys` in the first step of any of `kinds` that has it."""
    for s in flow.steps:
        if s.kind in kinds and (not direction or s.fields.get("direction", direction) == direction):
            for k in keys:
                if s.fields.get(k) not in (None, "", [], {}):
                    return s.fields[k]
    return None


def is_hbone(flow: Flow) -> bool:
    return any(s.kind.startswith(("hbone.", "tls.")) for s in flow.steps)


def layers(flow: Flow, m: LabModel) -> list[Layer]:
    """The layers of `flow`, outermost first."""
    out: list[Layer] = []
    src = flow.src or "?"
    dst = flow.dst or "?"
    app = Layer("application", f"{flow.src_pod or src} opened TCP to {m.name_of(dst)} ({dst})",
                [("bytes sent", str(flow.bytes_sent)), ("bytes received", str(flow.bytes_recv)),
                 ("captured", "the in-pod nat OUTPUT rule REDIRECTed the SYN to ztunnel's port 15001 in the same pod"
                  if _steps(flow, "conn.captured") else "not captured")])
    if not is_hbone(flow):
        legs = ("conn.upstream", "conn.forwarded")
        fwd_src = _field(flow, legs, "src", direction="outbound") or "?"
        upstream = _field(flow, legs, "upstream", direction="outbound") or dst
        inbound = [s for s in flow.steps if s.kind == "conn.captured" and s.fields.get("direction") == "inbound"]
        tcp = Layer("TCP (no tunnel)", f"{fwd_src} -> {upstream}, plain text on the wire",
                    [("why", str(_field(flow, ("conn.plan", *legs), "reason", "plan") or "passthrough")),
                     ("mark", str(_field(flow, legs, "mark", direction="outbound") or "")
                      + " (so the pod's own rules do not capture ztunnel's connection again)"),
                     ("kube-proxy", f"the node's KUBE-SERVICES DNAT turns {upstream} into a pod address"
                      if any(s["cluster_ip"] == upstream.rsplit(':', 1)[0] for s in m.services) else "no DNAT")])
        if inbound:
            tcp.details.append(("destination", f"PREROUTING REDIRECT to 15006 in pod {inbound[0].pod}; ztunnel "
                                               "connects to the app with the client's address (IP_TRANSPARENT)"))
        out += [app, tcp]
        return out
    outer_src = _field(flow, ("tls.handshake",), "local", direction="outbound") or \
        _field(flow, ("tls.handshake",), "remote", direction="inbound") or flow.src_pod or "?"
    outer_dst = _field(flow, ("tls.handshake",), "remote", direction="outbound") or \
        _field(flow, ("tls.handshake",), "local", direction="inbound") or "?"
    mark = _field(flow, ("conn.upstream",), "mark", direction="outbound")
    reused = _field(flow, ("tls.handshake",), "reused", direction="outbound")
    out.append(app)
    tcp = Layer("TCP", f"{outer_src} -> {outer_dst}",
                [("port", "15008: ztunnel's HBONE listener inside the destination pod (never redirected)")])
    if mark is not None:
        tcp.details.append(("mark", f"{mark} (0x{int(mark):x}): the source pod's rules let ztunnel's own "
                                    "connection out instead of capturing it again"))
    if reused is not None:
        tcp.details.append(("pooled", "yes: this connection is one more HTTP/2 stream of an existing tunnel"
                            if reused else "no: a new tunnel for this (source, destination identity) pair"))
    out.append(tcp)
    tls = Layer("mTLS 1.3", "both ends prove a SPIFFE identity with a certificate from istiod's CA")
    for label, keys in (("client identity", ("src_identity", "local_identity", "client_identity", "identity")),
                        ("server identity", ("dst_identity", "peer_identity", "server_identity", "peer")),
                        ("version", ("version", "tls_version", "protocol")), ("cipher", ("cipher",)),
                        ("ALPN", ("alpn",))):
        v = _field(flow, ("tls.handshake", "tls.certificate"), *keys)
        if v is not None:
            tls.details.append((label, str(v)))
    out.append(tls)
    h2 = Layer("HTTP/2 CONNECT", f":authority {_field(flow, ('hbone.connect.sent', 'hbone.connect.received'), 'authority') or '?'}")
    headers = _field(flow, ("hbone.connect.sent", "hbone.connect.received"), "headers")
    if isinstance(headers, dict):
        h2.details += [(k, str(v)) for k, v in headers.items()]
    elif isinstance(headers, list):
        h2.details += [(str(h[0]), str(h[1])) if isinstance(h, (list, tuple)) and len(h) == 2 else ("", str(h))
                       for h in headers]
    for k in ("traceparent", "baggage", "forwarded"):
        v = _field(flow, ("hbone.connect.sent", "hbone.connect.received"), k)
        if v is not None and all(k != d[0] for d in h2.details):
            h2.details.append((k, str(v)))
    status = _field(flow, ("hbone.response",), "status", direction="outbound") or \
        _field(flow, ("hbone.response",), "status")
    if status is not None:
        meaning = {200: "the tunnel is open", 401: "the destination's authorization policy denied it",
                   503: "the destination could not reach the app", 400: "a bad CONNECT"}.get(int(status), "")
        h2.details.append(("response", f":status {status}" + (f" ({meaning})" if meaning else "")))
    out.append(h2)
    if status is not None and int(status) != 200:
        out.append(Layer("inner TCP", f"none: the CONNECT was answered {status}, so no byte of the app's "
                                      "connection crossed; the source ztunnel reset the app's connection"))
    else:
        out.append(Layer("inner TCP", "the app's bytes, carried as DATA frames of the CONNECT stream",
                         [("to the app", str(_field(flow, ("conn.upstream",), "upstream", direction="inbound") or "?"))]))
    return out
