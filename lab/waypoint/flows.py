"""Every request through the waypoint, saved as a mitmproxy flow.

Envoy has its tap filter for capturing whole requests; the lab uses mitmproxy's own flow file
format instead, so the learner can open what the waypoint saw with the real tools:
`mitmdump -nr waypoint.flows` lists the requests, `mitmweb -nr waypoint.flows` shows them in a
browser, `mitmproxy -nr` in a terminal UI (add `--set confdir=<dir>`: even reading a file,
mitmproxy creates its CA under ~/.mitmproxy otherwise).

One flow per request: `http.HTTPFlow` with

- `client_conn`: the client pod (`peername` = its ip:port, `sockname` = the Service VIP:port it
  addressed, as the waypoint learnt it from the CONNECT authority);
- `server_conn`: the backend pod chosen (`address` = podIP:targetPort, `peername` =
  podIP:15008, the HBONE port the waypoint really connected to); no address when the waypoint
  answered itself (403 RBAC, 404 no route, 503 overflow);
- `request` as the client sent it (host = the VIP, Host header = what the client wrote),
  `response` as the client received it, both with their timestamps;
- `metadata["ambient-lab"]`: the lab's view: flow id (the trace id shared with the ztunnels'
  events), source and destination identities and workloads, Service, route, backend cluster,
  upstream pod, the authorization outcome, response flags.

Writing appends (`FlowFile.append`): mitmproxy's format is a sequence of tnetstrings, so a file
can grow request by request and be read at any time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mitmproxy import connection, http, io
from mitmproxy.utils import human

from lab.waypoint.telemetry import RequestRecord

#: The key of the lab's data in `flow.metadata`.
METADATA_KEY = "ambient-lab"
#: The HBONE port the waypoint connects to on a backend pod.
HBONE_PORT = 15008

Header = tuple[str, str]


def split_address(text: str) -> tuple[str, int] | None:
    """"10.244.1.5:9080" / "[fd00::1]:9080" -> (host, port); None for "" or "-"."""
    if not text or text == "-":
        return None
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _headers(pairs: Iterable[Header]) -> http.Headers:
    return http.Headers([(k.encode("latin-1"), v.encode("latin-1")) for k, v in pairs])


def lab_metadata(record: RequestRecord, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the lab stores in `flow.metadata["ambient-lab"]` (plain JSON-able values)."""
    data = {
        "flow_id": record.flow_id,
        "source": asdict(record.source),
        "destination": asdict(record.destination),
        "service": record.destination_service,
        "route": record.route_name,
        "backend": record.upstream_cluster,
        "upstream_host": record.upstream_host,
        "upstream_pod": record.destination.pod,
        "policy": record.policy,
        "response_flags": record.response_flags,
        "response_code_details": record.response_code_details,
        "attempts": record.attempts,
    }
    data.update(extra or {})
    return data


def make_flow(record: RequestRecord, *, request_headers: Sequence[Header] = (), request_body: bytes = b"",
              response_headers: Sequence[Header] = (), response_body: bytes = b"", response_reason: str = "",
              extra: dict[str, Any] | None = None) -> http.HTTPFlow:
    """One request through the waypoint -> an `http.HTTPFlow` ready for `FlowFile.append`."""
    start = record.start_time
    end = start + record.duration_ms / 1000.0
    client_addr = split_address(record.downstream_remote) or ("0.0.0.0", 0)
    vip = split_address(record.downstream_local) or split_address(record.authority) or ("0.0.0.0", 0)
    upstream = split_address(record.upstream_host)
    client = connection.Client(peername=client_addr, sockname=vip, timestamp_start=start, timestamp_end=end)
    server = connection.Server(address=upstream, peername=(upstream[0], HBONE_PORT) if upstream else None,
                               timestamp_start=start if upstream else None, timestamp_end=end if upstream else None)
    http_version = record.protocol.encode() if record.protocol.startswith("HTTP/") else b"HTTP/1.1"
    headers = list(request_headers)
    if record.authority and not any(k.lower() == "host" for k, _ in headers):
        headers.insert(0, ("host", record.authority))
    request = http.Request(host=vip[0], port=vip[1], method=record.method.encode(), scheme=b"http",
                           authority=b"", path=record.path.encode(), http_version=http_version,
                           headers=_headers(headers), content=request_body, trailers=None,
                           timestamp_start=start, timestamp_end=start)
    reason = response_reason or http.status_codes.RESPONSES.get(record.status, "")
    response = http.Response(http_version=http_version, status_code=record.status, reason=reason.encode(),
                             headers=_headers(response_headers), content=response_body, trailers=None,
                             timestamp_start=end, timestamp_end=end)
    flow = http.HTTPFlow(client, server)
    flow.request = request
    flow.response = response
    flow.metadata[METADATA_KEY] = lab_metadata(record, extra)
    return flow


class FlowFile:
    """A mitmproxy flow file the waypoint appends to, one flow per request (thread-safe)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def append(self, flow: http.HTTPFlow) -> None:
        with self._lock:
            with open(self.path, "ab") as fo:
                io.FlowWriter(fo).add(flow)

    def read(self) -> list[http.HTTPFlow]:
        return read_flows(self.path)


def read_flows(path: str | Path) -> list[http.HTTPFlow]:
    """Every HTTP flow in a flow file (mitmproxy's io.FlowReader)."""
    with open(path, "rb") as fo:
        return [f for f in io.FlowReader(fo).stream() if isinstance(f, http.HTTPFlow)]


def format_flow_line(flow: http.HTTPFlow) -> str:
    """The two lines `mitmdump` prints for a flow (no colours):

        10.244.1.5:40000: GET http://10.96.0.10:9080/productpage
                       << 200 OK 4.2k
    """
    client = human.format_address(flow.client_conn.peername)
    req = flow.request
    version = ""
    if flow.response is not None and req.http_version != flow.response.http_version:
        version = " " + req.http_version
    elif not (req.is_http10 or req.is_http11):
        version = " " + req.http_version
    lines = [f"{client}: {req.method} {req.url}{version}"]
    if flow.response is not None:
        resp = flow.response
        size = "(content missing)" if resp.raw_content is None else human.pretty_size(len(resp.raw_content))
        pad = " " * max(0, len(client) - 2)
        lines.append(f"{pad} << {resp.status_code} {resp.reason} {size}")
    if flow.error is not None:
        lines.append(f" << {flow.error.msg}")
    return "\n".join(lines)
