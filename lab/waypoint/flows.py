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

Writing is on the waypoint's data path, so it is kept cheap without changing a byte of the
format: `flow_state` builds the plain-data state of the flow directly (the dict mitmproxy's
`HTTPFlow.get_state()` would return, flow format version 21, without creating the mitmproxy
objects first), `tnetstring_dumps` serializes it exactly as mitmproxy's `io.tnetstring.dumps`
does (one pass, no per-chunk deque), and the file stays open, one `write` per flow.
`make_flow` returns the same flow as a real `http.HTTPFlow` (mitmproxy's `from_state`), for
readers and tests; the unit tests check that both paths give mitmproxy's own bytes.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mitmproxy import http, io
from mitmproxy.utils import human

from lab.waypoint.telemetry import Peer, RequestRecord

#: The key of the lab's data in `flow.metadata`.
METADATA_KEY = "ambient-lab"
#: The HBONE port the waypoint connects to on a backend pod.
HBONE_PORT = 15008
#: mitmproxy's flow file format version that `flow_state` writes (mitmproxy reads older
#: versions too, migrating them on load).
FLOW_FORMAT_VERSION = 21

Header = tuple[str, str]
State = dict[str, Any]


def split_address(text: str) -> tuple[str, int] | None:
    """"10.244.1.5:9080" / "[fd00::1]:9080" -> (host, port); None for "" or "-"."""
    if not text or text == "-":
        return None
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _headers(pairs: Iterable[Header]) -> tuple[tuple[bytes, bytes], ...]:
    """Header pairs as mitmproxy keeps them in a flow's state: (name, value) bytes, latin-1."""
    return tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in pairs)


def _peer(p: Peer) -> dict[str, Any]:
    return dict(vars(p))


def lab_metadata(record: RequestRecord, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the lab stores in `flow.metadata["ambient-lab"]` (plain JSON-able values)."""
    data = {
        "flow_id": record.flow_id,
        "source": _peer(record.source),
        "destination": _peer(record.destination),
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


def _connection_state(peername: tuple[str, int] | None, sockname: tuple[str, int] | None,
                      start: float | None, end: float | None) -> State:
    """The fields mitmproxy's Client and Server connections share in a flow's state, in its
    order (a plain TCP connection: no TLS)."""
    return {"peername": peername, "sockname": sockname, "id": str(uuid.uuid4()), "transport_protocol": "tcp",
            "error": None, "tls": False, "certificate_list": [], "alpn": None, "alpn_offers": [], "cipher": None,
            "cipher_list": [], "tls_version": None, "sni": None, "timestamp_start": start, "timestamp_end": end,
            "timestamp_tls_setup": None}


def flow_state(record: RequestRecord, *, request_headers: Sequence[Header] = (), request_body: bytes = b"",
               response_headers: Sequence[Header] = (), response_body: bytes = b"", response_reason: str = "",
               extra: dict[str, Any] | None = None, error: str = "") -> State:
    """One request through the waypoint as the state of an `http.HTTPFlow` (what
    `HTTPFlow.get_state()` returns): plain data that `FlowFile.append` writes and
    `HTTPFlow.from_state` turns back into a flow. `error` (e.g. a stream reset after the
    response started) becomes the flow's `flow.error`."""
    start = record.start_time
    end = start + record.duration_ms / 1000.0
    client_addr = split_address(record.downstream_remote) or ("0.0.0.0", 0)
    vip = split_address(record.downstream_local) or split_address(record.authority) or ("0.0.0.0", 0)
    upstream = split_address(record.upstream_host)
    client = _connection_state(client_addr, vip, start, end)
    client.update(mitmcert=None, proxy_mode="regular")
    server = _connection_state((upstream[0], HBONE_PORT) if upstream else None, None, start if upstream else None,
                               end if upstream else None)
    server.update(address=upstream, timestamp_tcp_setup=None, via=None)
    http_version = record.protocol.encode() if record.protocol.startswith("HTTP/") else b"HTTP/1.1"
    headers = list(request_headers)
    if record.authority and not any(k.lower() == "host" for k, _ in headers):
        headers.insert(0, ("host", record.authority))
    reason = response_reason or http.status_codes.RESPONSES.get(record.status, "")
    return {
        "version": FLOW_FORMAT_VERSION, "type": "http", "id": str(uuid.uuid4()),
        "error": {"msg": error, "timestamp": end} if error else None,
        "client_conn": client, "server_conn": server, "intercepted": False, "is_replay": None, "marked": "",
        "metadata": {METADATA_KEY: lab_metadata(record, extra)}, "comment": "", "timestamp_created": time.time(),
        "backup": None,
        "request": {"http_version": http_version, "headers": _headers(headers), "content": request_body,
                    "trailers": None, "timestamp_start": start, "timestamp_end": start, "host": vip[0],
                    "port": vip[1], "method": record.method.encode(), "scheme": b"http", "authority": b"",
                    "path": record.path.encode()},
        "response": {"http_version": http_version, "headers": _headers(response_headers), "content": response_body,
                     "trailers": None, "timestamp_start": end, "timestamp_end": end, "status_code": record.status,
                     "reason": reason.encode()},
        "websocket": None,
    }


def make_flow(record: RequestRecord, *, request_headers: Sequence[Header] = (), request_body: bytes = b"",
              response_headers: Sequence[Header] = (), response_body: bytes = b"", response_reason: str = "",
              extra: dict[str, Any] | None = None, error: str = "") -> http.HTTPFlow:
    """One request through the waypoint -> an `http.HTTPFlow` (see `flow_state`)."""
    return http.HTTPFlow.from_state(flow_state(record, request_headers=request_headers, request_body=request_body,
                                               response_headers=response_headers, response_body=response_body,
                                               response_reason=response_reason, extra=extra, error=error))


# ---------------------------------------------------------------------------------------------
# tnetstrings, the framing of mitmproxy's flow files


#: Dict keys already serialized: a flow's state has the same few dozen keys every time.
_KEYS: dict[Any, bytes] = {}


def _key(k: Any) -> bytes:
    data = tnetstring_dumps(k)
    if type(k) is str and len(_KEYS) < 1024:
        _KEYS[k] = data
    return data


def tnetstring_dumps(value: Any) -> bytes:
    """`value` as a tnetstring, byte for byte what mitmproxy's `io.tnetstring.dumps` writes:
    `<length>:<data><type>` with `,` bytes, `;` str (UTF-8), `#` int, `^` float (repr),
    `!` bool, `~` None, `]` list or tuple, `}` dict. Like mitmproxy's writer, a dict's items
    come out last first (it builds the string from the end)."""
    t = type(value)
    if t is bytes:
        return b"%d:%s," % (len(value), value)
    if t is str:
        data = value.encode("utf8")
        return b"%d:%s;" % (len(data), data)
    if value is None:
        return b"0:~"
    if t is bool:
        return b"4:true!" if value else b"5:false!"
    if t is int:
        data = b"%d" % value
        return b"%d:%s#" % (len(data), data)
    if t is dict:
        body = b"".join([(_KEYS.get(k) or _key(k)) + (b"0:~" if v is None else tnetstring_dumps(v))
                         for k, v in reversed(value.items())])
        return b"%d:%s}" % (len(body), body)
    if t is tuple or t is list:
        body = b"".join([tnetstring_dumps(v) for v in value])
        return b"%d:%s]" % (len(body), body)
    if t is float:
        data = repr(value).encode()
        return b"%d:%s^" % (len(data), data)
    # subclasses of the types above (an IntEnum, a str subclass...), in mitmproxy's order
    for base in (bool, int, float, bytes, str, list, tuple, dict):
        if isinstance(value, base):
            return tnetstring_dumps(base(value))
    raise ValueError(f"unserializable object: {value!r} ({t})")


class FlowFile:
    """A mitmproxy flow file the waypoint appends to, one flow per request (thread-safe).

    The file is opened once, in append mode, and each flow is one `write` of its whole
    tnetstring: a reader (`mitmdump -nr`, `ambient-lab flows -f`) sees whole flows only, and two
    writers on the same file do not interleave."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd: int | None = None

    def append(self, flow: http.HTTPFlow | State) -> None:
        """Append a flow, or a flow's state (`flow_state`)."""
        data = tnetstring_dumps(flow if isinstance(flow, dict) else flow.get_state())
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

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
