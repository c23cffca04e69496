"""The HBONE CONNECT request, as data (ztunnel src/proxy/outbound.rs `create_hbone_request`,
src/baggage.rs, inbound.rs `build_response`).

An HBONE tunnel is one HTTP/2 CONNECT stream per application TCP connection. The request
carries, besides the pseudo-headers:

- `:method CONNECT` and `:authority` = the destination as `ip:port` (`[v6]:port` for IPv6):
  the pod IP and *target* port when going straight to a pod, the service VIP and port when
  going to a waypoint. A plain CONNECT has no `:scheme` and no `:path` (RFC 9113 8.5).
- `baggage`: who sends (cluster, namespace, workload, canonical service name and revision).
- `forwarded`: `for="<client ip:port>"`, plus `;host=<service FQDN>` when the client
  addressed a service.
- `traceparent`: W3C trace context `00-<32 hex trace id>-<16 hex span id>-00`. ztunnel makes
  a random one per outbound connection; the lab puts its flow id in the trace id so that the
  events of the source ztunnel, the waypoint and the destination ztunnel tie together.

Everything here is a pure function over strings: no sockets, no HTTP/2.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import uuid
from dataclasses import dataclass, field

#: The response codes an HBONE server sends (inbound.rs `build_response`).
STATUS_OK = 200
STATUS_BAD_REQUEST = 400  # not CONNECT, bad authority, destination IP mismatch
STATUS_UNAUTHORIZED = 401  # authorization policy denied the connection
STATUS_HEADERS_TOO_LARGE = 431  # header list over SETTINGS_MAX_HEADER_LIST_SIZE
STATUS_SERVICE_UNAVAILABLE = 503  # upstream connect failed, no local workload

#: Header carrying the source network on the inner CONNECT of double HBONE (zt:src/proxy.rs).
X_FORWARDED_NETWORK = "x-forwarded-network"

#: Kubernetes workload kinds that appear as `k8s.<kind>.name` in baggage.
WORKLOAD_KINDS = ("deployment", "replicaset", "statefulset", "daemonset", "job", "cronjob", "pod")

Header = tuple[str, str]


class AuthorityError(ValueError):
    """A CONNECT `:authority` that is not `ip:port` / `[v6]:port` (ztunnel answers 400)."""


class TraceparentError(ValueError):
    """A `traceparent` header that is not W3C trace context version 00."""


# --------------------------------------------------------------------------- authority

def format_authority(ip: str, port: int) -> str:
    """The `:authority` of a CONNECT to a socket address: `10.244.1.10:9080`, `[fd00::a]:9080`."""
    addr = ipaddress.ip_address(ip)
    if not 0 < port < 65536:
        raise AuthorityError(f"port out of range: {port}")
    if addr.version == 6:
        return f"[{addr.compressed}]:{port}"
    return f"{addr}:{port}"


_PORT_RE = re.compile(r"[0-9]{1,5}")


def _split_host_port(authority: str) -> tuple[str, int]:
    if not authority or authority != authority.strip():
        raise AuthorityError(f"malformed authority {authority!r}")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0 or authority[end + 1:end + 2] != ":":
            raise AuthorityError(f"malformed authority {authority!r}")
        host, port_text = authority[1:end], authority[end + 2:]
        if ":" not in host:
            raise AuthorityError(f"brackets around a non-IPv6 host in {authority!r}")
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep or not host or ":" in host:
            raise AuthorityError(f"malformed authority {authority!r} (want ip:port or [v6]:port)")
    if not _PORT_RE.fullmatch(port_text):
        raise AuthorityError(f"bad port in authority {authority!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise AuthorityError(f"port out of range in authority {authority!r}")
    return host, port


def parse_authority(authority: str) -> tuple[str, int]:
    """Parse a CONNECT `:authority` that must be a socket address, as ztunnel's inbound does.

    Returns `(ip, port)` with the IP in canonical text form. Raises AuthorityError for
    anything else: missing or zero port, hostnames, IPv6 without brackets, zone ids.
    """
    host, port = _split_host_port(authority)
    if "%" in host:
        raise AuthorityError(f"zone id not allowed in authority {authority!r}")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError as err:
        raise AuthorityError(f"not an IP address in authority {authority!r}") from err
    if addr.version == 6 and not authority.startswith("["):
        raise AuthorityError(f"IPv6 authority needs brackets: {authority!r}")
    return str(addr), port


_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class HboneAddress:
    """ztunnel's `HboneAddress`: a socket address, or a service hostname plus port (the
    latter only on the outer CONNECT of double HBONE)."""

    host: str
    port: int
    is_ip: bool

    def __str__(self) -> str:
        return format_authority(self.host, self.port) if self.is_ip else f"{self.host}:{self.port}"


def parse_hbone_address(authority: str) -> HboneAddress:
    """Parse an authority that may also be `svc-hostname:port` (double HBONE)."""
    try:
        ip, port = parse_authority(authority)
        return HboneAddress(ip, port, True)
    except AuthorityError:
        pass
    host, port = _split_host_port(authority)
    name = host.lower().rstrip(".")
    if len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in name.split(".")):
        raise AuthorityError(f"neither an IP nor a DNS name in authority {authority!r}")
    if all(label.isdigit() for label in name.split(".")):
        raise AuthorityError(f"not a valid IP address in authority {authority!r}")
    return HboneAddress(name, port, False)


# --------------------------------------------------------------------------- baggage

@dataclass(frozen=True)
class Baggage:
    """The fields ztunnel puts in the `baggage` header (src/baggage.rs), all optional."""

    cluster_name: str | None = None
    namespace: str | None = None
    workload_kind: str | None = None  # one of WORKLOAD_KINDS, e.g. "deployment"
    workload_name: str | None = None
    service_name: str | None = None  # canonical service (service.istio.io/canonical-name)
    service_version: str | None = None  # canonical revision
    region: str | None = None
    zone: str | None = None


def format_baggage(b: Baggage) -> str:
    """`k8s.cluster.name=...,k8s.namespace.name=...,k8s.deployment.name=...,service.name=...`."""
    pairs: list[tuple[str, str | None]] = [
        ("k8s.cluster.name", b.cluster_name),
        ("k8s.namespace.name", b.namespace),
    ]
    if b.workload_name:
        kind = b.workload_kind or "pod"
        if kind not in WORKLOAD_KINDS:
            raise ValueError(f"unknown workload kind {kind!r}")
        pairs.append((f"k8s.{kind}.name", b.workload_name))
    pairs += [
        ("service.name", b.service_name),
        ("service.version", b.service_version),
        ("cloud.region", b.region),
        ("cloud.availability_zone", b.zone),
    ]
    for key, value in pairs:
        if value and any(c in value for c in ",;= \t"):
            raise ValueError(f"baggage value for {key} must not contain separators: {value!r}")
    return ",".join(f"{k}={v}" for k, v in pairs if v)


def parse_baggage(value: str) -> Baggage:
    """Read the fields of a `baggage` header back; unknown members are ignored."""
    fields: dict[str, str] = {}
    kind = name = None
    for member in value.split(","):
        key, sep, val = member.split(";", 1)[0].partition("=")
        key, val = key.strip(), val.strip()
        if not sep or not key:
            continue
        if key == "k8s.cluster.name":
            fields["cluster_name"] = val
        elif key == "k8s.namespace.name":
            fields["namespace"] = val
        elif key == "service.name":
            fields["service_name"] = val
        elif key == "service.version":
            fields["service_version"] = val
        elif key == "cloud.region":
            fields["region"] = val
        elif key == "cloud.availability_zone":
            fields["zone"] = val
        elif key.startswith("k8s.") and key.endswith(".name"):
            middle = key[len("k8s."):-len(".name")]
            if middle in WORKLOAD_KINDS:
                kind, name = middle, val
    return Baggage(workload_kind=kind, workload_name=name, **fields)


# --------------------------------------------------------------------------- forwarded

@dataclass(frozen=True)
class Forwarded:
    """The first element of a `forwarded` header (RFC 7239) as ztunnel writes it."""

    for_addr: str | None  # "ip:port" or "[v6]:port", the original client
    host: str | None = None  # the service FQDN the client addressed, if any

    def for_ip_port(self) -> tuple[str, int]:
        if self.for_addr is None:
            raise AuthorityError("forwarded header has no for=")
        return parse_authority(self.for_addr)


def format_forwarded(src_ip: str, src_port: int, host: str | None = None) -> str:
    """`for="10.244.1.5:43210"` plus `;host=reviews.default.svc.cluster.local` for a service."""
    value = f'for="{format_authority(src_ip, src_port)}"'
    if host:
        value += f";host={host}"
    return value


def parse_forwarded(value: str) -> Forwarded:
    """Parse the first forwarded-element of a `forwarded` header."""
    element = value.split(",", 1)[0]
    found: dict[str, str] = {}
    for pair in element.split(";"):
        key, sep, val = pair.strip().partition("=")
        if not sep:
            continue
        val = val.strip()
        if len(val) >= 2 and val[0] == val[-1] == '"':
            val = val[1:-1]
        found[key.strip().lower()] = val
    return Forwarded(for_addr=found.get("for"), host=found.get("host"))


# --------------------------------------------------------------------------- traceparent

_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


@dataclass(frozen=True)
class TraceParent:
    """W3C trace context: `version-traceid-parentid-flags`."""

    trace_id: str
    parent_id: str
    flags: int = 0
    version: int = 0

    def __str__(self) -> str:
        return f"{self.version:02x}-{self.trace_id}-{self.parent_id}-{self.flags:02x}"


def new_trace_id() -> str:
    """A random 128-bit trace id, 32 lowercase hex digits (never all zero)."""
    while True:
        tid = secrets.token_hex(16)
        if tid != "0" * 32:
            return tid


def trace_id_from(flow_id: str | int | uuid.UUID) -> str:
    """Turn a lab flow id into a trace id: a UUID, 32 hex digits, or an int below 2**128."""
    if isinstance(flow_id, uuid.UUID):
        tid = flow_id.hex
    elif isinstance(flow_id, int):
        if not 0 < flow_id < 2**128:
            raise TraceparentError(f"trace id out of range: {flow_id}")
        tid = f"{flow_id:032x}"
    else:
        tid = flow_id.replace("-", "").lower()
    if not _HEX32.fullmatch(tid) or tid == "0" * 32:
        raise TraceparentError(f"not a usable trace id: {flow_id!r}")
    return tid


def format_traceparent(trace_id: str | int | uuid.UUID | None = None,
                       span_id: str | None = None) -> str:
    """`00-<trace id>-<span id>-00`; random parts when not given (one per connection)."""
    tid = new_trace_id() if trace_id is None else trace_id_from(trace_id)
    sid = span_id if span_id is not None else secrets.token_hex(8)
    if not _HEX16.fullmatch(sid) or sid == "0" * 16:
        raise TraceparentError(f"not a usable span id: {sid!r}")
    return str(TraceParent(trace_id=tid, parent_id=sid))


def parse_traceparent(value: str) -> TraceParent:
    """Parse a `traceparent` header; raises TraceparentError if it is not valid."""
    m = _TRACEPARENT.fullmatch(value.strip())
    if not m:
        raise TraceparentError(f"malformed traceparent {value!r}")
    version, tid, pid, flags = m.groups()
    if version == "ff":
        raise TraceparentError("traceparent version ff is invalid")
    if version == "00" and len(value.strip()) != 55:
        raise TraceparentError("traceparent version 00 has exactly four fields")
    if tid == "0" * 32 or pid == "0" * 16:
        raise TraceparentError(f"all-zero id in traceparent {value!r}")
    return TraceParent(trace_id=tid, parent_id=pid, flags=int(flags, 16), version=int(version, 16))


# --------------------------------------------------------------------------- the request

@dataclass(frozen=True)
class HboneRequest:
    """One CONNECT request: the authority and the regular (non-pseudo) headers."""

    authority: str
    headers: list[Header] = field(default_factory=list)

    def header_list(self) -> list[Header]:
        """The full HTTP/2 header list, pseudo-headers first; no :scheme, no :path."""
        return connect_header_list(self.authority, self.headers)

    def get(self, name: str) -> str | None:
        return header_value(self.headers, name)


def connect_header_list(authority: str, headers: list[Header] | tuple[Header, ...] = ()) -> list[Header]:
    """`:method CONNECT`, `:authority`, then the regular headers (names lower-cased)."""
    regular = [(k.lower(), v) for k, v in headers]
    if any(k.startswith(":") for k, _ in regular):
        raise ValueError("pseudo-headers are set by connect_header_list itself")
    return [(":method", "CONNECT"), (":authority", authority), *regular]


def header_value(headers: list[Header] | tuple[Header, ...], name: str) -> str | None:
    """The first value of a header (case-insensitive name), or None."""
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def create_hbone_request(dst_ip: str, dst_port: int, *, src_ip: str, src_port: int,
                         service_host: str | None = None, baggage: Baggage | None = None,
                         trace_id: str | int | uuid.UUID | None = None,
                         forwarded_network: str | None = None) -> HboneRequest:
    """Build the CONNECT request the source ztunnel sends (outbound.rs `create_hbone_request`).

    `dst_ip:dst_port` is the HBONE target: pod IP and target port, or the service VIP and
    port when the next hop is a waypoint. `service_host` is the FQDN of the service the
    client addressed (goes into `forwarded;host=`). `trace_id` ties the flow's events
    together; random when not given. `forwarded_network` is only for the inner CONNECT of
    double HBONE.
    """
    headers: list[Header] = []
    if baggage is not None:
        text = format_baggage(baggage)
        if text:
            headers.append(("baggage", text))
    headers.append(("forwarded", format_forwarded(src_ip, src_port, service_host)))
    headers.append(("traceparent", format_traceparent(trace_id)))
    if forwarded_network:
        headers.append((X_FORWARDED_NETWORK, forwarded_network))
    return HboneRequest(authority=format_authority(dst_ip, dst_port), headers=headers)
