"""The waypoint's telemetry: Envoy's access log line, Istio's standard HTTP metrics, and trace
context propagation.

- **Access log** (`format_access_log`): Istio's default text format for Envoy
  (meshConfig.accessLogFormat unset), the same fields in the same order:

      [START_TIME] "METHOD PATH PROTOCOL" CODE FLAGS DETAILS TERMINATION "UPSTREAM_FAILURE"
      BYTES_RECEIVED BYTES_SENT DURATION UPSTREAM_SERVICE_TIME "X-FORWARDED-FOR" "USER-AGENT"
      "X-REQUEST-ID" "AUTHORITY" "UPSTREAM_HOST" UPSTREAM_CLUSTER UPSTREAM_LOCAL_ADDRESS
      DOWNSTREAM_LOCAL_ADDRESS DOWNSTREAM_REMOTE_ADDRESS REQUESTED_SERVER_NAME ROUTE_NAME

  (one line), followed by what the lab adds for learners, as key=value: the upstream pod, the
  source and destination identities, the authorization policy that decided, the flow id.
  Absent values are `-`, as in Envoy.
- **Metrics** (`Metrics`): `istio_requests_total` (counter) and
  `istio_request_duration_milliseconds` (histogram with Istio's buckets) in Prometheus text
  format, with Istio's standard labels; at a waypoint `reporter="waypoint"`. The destination is
  the chosen backend pod, the source the client pod (identity from the first HBONE hop);
  `connection_security_policy` is `mutual_tls` (the waypoint only speaks HBONE).
- **Trace context** (`next_hop`): Envoy keeps the trace id of an incoming W3C `traceparent`
  and sends a new span id for the next hop (itself a span). The lab's trace id *is* its flow id
  (lab/hbone/headers.py), so the waypoint's events join the ztunnels' ones.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from lab.hbone.headers import TraceParent, TraceparentError, new_trace_id, parse_traceparent

#: Istio's buckets for istio_request_duration_milliseconds.
DURATION_BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
                       600000, 1800000, 3600000)
#: Istio's standard labels, in the order they are printed.
METRIC_LABELS = (
    "reporter", "source_workload", "source_workload_namespace", "source_principal", "source_app", "source_version",
    "source_canonical_service", "source_canonical_revision", "source_cluster",
    "destination_workload", "destination_workload_namespace", "destination_principal", "destination_app",
    "destination_version", "destination_service", "destination_service_name", "destination_service_namespace",
    "destination_canonical_service", "destination_canonical_revision", "destination_cluster",
    "request_protocol", "response_code", "grpc_response_status", "response_flags", "connection_security_policy",
)
UNKNOWN = "unknown"
CLUSTER_ID = "Kubernetes"


@dataclass(frozen=True)
class Peer:
    """One side of a request, as Istio's metrics name it."""

    workload: str = UNKNOWN
    namespace: str = UNKNOWN
    principal: str = UNKNOWN  # spiffe://... or "unknown"
    app: str = UNKNOWN
    version: str = UNKNOWN
    pod: str = ""


@dataclass
class RequestRecord:
    """The facts of one request through the waypoint, for the log, the metrics and the flow file."""

    method: str
    path: str
    status: int
    start_time: float = field(default_factory=time.time)  # epoch seconds
    duration_ms: float = 0.0
    protocol: str = "HTTP/1.1"
    response_flags: str = "-"
    response_code_details: str = "via_upstream"
    connection_termination: str = "-"
    upstream_failure: str = "-"
    bytes_received: int = 0
    bytes_sent: int = 0
    upstream_service_time_ms: float | None = None
    x_forwarded_for: str = ""
    user_agent: str = ""
    request_id: str = ""
    authority: str = ""
    upstream_host: str = ""  # podIP:targetPort
    upstream_cluster: str = ""  # inbound-vip|9080|http|reviews.default.svc.cluster.local
    upstream_local: str = ""
    downstream_local: str = ""  # VIP:port the client addressed
    downstream_remote: str = ""  # client ip:port
    requested_server_name: str = ""
    route_name: str = ""
    source: Peer = field(default_factory=Peer)
    destination: Peer = field(default_factory=Peer)
    destination_service: str = UNKNOWN  # FQDN of the Service addressed
    destination_service_name: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    policy: str = ""  # the authorization outcome, e.g. "allowed by: default/productpage-waypoint"
    connection_security_policy: str = "mutual_tls"
    flow_id: str = ""
    attempts: int = 1


def _dash(value: object) -> str:
    return "-" if value in (None, "") else str(value)


def format_start_time(ts: float) -> str:
    """Envoy's %START_TIME%: `2026-01-02T03:04:05.678Z` (UTC, milliseconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


def format_access_log(r: RequestRecord) -> str:
    """One access log line, Istio's default format plus the lab's key=value fields."""
    service_time = _dash(None if r.upstream_service_time_ms is None else int(r.upstream_service_time_ms))
    line = (f'[{format_start_time(r.start_time)}] "{r.method} {r.path} {r.protocol}" {r.status} '
            f'{_dash(r.response_flags)} {_dash(r.response_code_details)} {_dash(r.connection_termination)} '
            f'"{_dash(r.upstream_failure)}" {r.bytes_received} {r.bytes_sent} {int(r.duration_ms)} {service_time} '
            f'"{_dash(r.x_forwarded_for)}" "{_dash(r.user_agent)}" "{_dash(r.request_id)}" "{_dash(r.authority)}" '
            f'"{_dash(r.upstream_host)}" {_dash(r.upstream_cluster)} {_dash(r.upstream_local)} '
            f'{_dash(r.downstream_local)} {_dash(r.downstream_remote)} {_dash(r.requested_server_name)} '
            f'{_dash(r.route_name)}')
    extras = [("upstream.pod", r.destination.pod), ("src.identity", r.source.principal),
              ("dst.identity", r.destination.principal), ("policy", r.policy), ("flow", r.flow_id)]
    if r.attempts > 1:
        extras.append(("attempts", str(r.attempts)))
    return line + "".join(f' {k}="{_dash(v if v != UNKNOWN else "")}"' for k, v in extras)


# ---------------------------------------------------------------------------------------------
# Metrics


def metric_labels(r: RequestRecord, reporter: str = "waypoint") -> dict[str, str]:
    """Istio's standard labels of one request."""
    return {
        "reporter": reporter,
        "source_workload": r.source.workload, "source_workload_namespace": r.source.namespace,
        "source_principal": r.source.principal, "source_app": r.source.app, "source_version": r.source.version,
        "source_canonical_service": r.source.app, "source_canonical_revision": r.source.version,
        "source_cluster": CLUSTER_ID,
        "destination_workload": r.destination.workload, "destination_workload_namespace": r.destination.namespace,
        "destination_principal": r.destination.principal, "destination_app": r.destination.app,
        "destination_version": r.destination.version, "destination_service": r.destination_service,
        "destination_service_name": r.destination_service_name,
        "destination_service_namespace": r.destination_service_namespace,
        "destination_canonical_service": r.destination.app, "destination_canonical_revision": r.destination.version,
        "destination_cluster": CLUSTER_ID,
        "request_protocol": "http", "response_code": str(r.status), "grpc_response_status": "",
        "response_flags": r.response_flags or "-", "connection_security_policy": r.connection_security_policy,
    }


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels_text(labels: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in labels)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclass
class _Histogram:
    buckets: list[int]
    sum: float = 0.0
    count: int = 0


class Metrics:
    """Counters and histograms of the waypoint, rendered as Prometheus text (thread-safe)."""

    def __init__(self, reporter: str = "waypoint", buckets: tuple[float, ...] = DURATION_BUCKETS_MS) -> None:
        self.reporter = reporter
        self.buckets = buckets
        self.requests: dict[tuple[tuple[str, str], ...], int] = {}
        self.durations: dict[tuple[tuple[str, str], ...], _Histogram] = {}
        self._lock = threading.Lock()

    def record(self, r: RequestRecord) -> None:
        labels = metric_labels(r, self.reporter)
        key = tuple((k, labels[k]) for k in METRIC_LABELS)
        with self._lock:
            self.requests[key] = self.requests.get(key, 0) + 1
            h = self.durations.setdefault(key, _Histogram([0] * len(self.buckets)))
            for i, bound in enumerate(self.buckets):
                if r.duration_ms <= bound:
                    h.buckets[i] += 1
            h.sum += r.duration_ms
            h.count += 1

    def requests_total(self, **match: str) -> int:
        """Sum of istio_requests_total over the series whose labels include `match`."""
        with self._lock:
            return sum(n for key, n in self.requests.items() if match.items() <= dict(key).items())

    def render(self) -> str:
        """The Prometheus text exposition of both metrics."""
        out = ["# HELP istio_requests_total Total requests.", "# TYPE istio_requests_total counter"]
        with self._lock:
            for key in sorted(self.requests):
                out.append(f"istio_requests_total{{{_labels_text(key)}}} {self.requests[key]}")
            out += ["# HELP istio_request_duration_milliseconds Request duration.",
                    "# TYPE istio_request_duration_milliseconds histogram"]
            for key in sorted(self.durations):
                h = self.durations[key]
                name = "istio_request_duration_milliseconds_bucket"
                for bound, n in zip(self.buckets, h.buckets):
                    out.append(f'{name}{{{_labels_text(key)},le="{_number(bound)}"}} {n}')
                out.append(f'{name}{{{_labels_text(key)},le="+Inf"}} {h.count}')
                out.append(f"istio_request_duration_milliseconds_sum{{{_labels_text(key)}}} {_number(round(h.sum, 3))}")
                out.append(f"istio_request_duration_milliseconds_count{{{_labels_text(key)}}} {h.count}")
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# Trace context


@dataclass(frozen=True)
class TraceContext:
    """The trace context of one hop: the incoming parent span (if any) and the outgoing header."""

    trace_id: str
    span_id: str  # this hop's span: the parent id of the next hop
    parent_id: str | None  # the span of the previous hop, None when this hop started the trace
    flags: int = 0

    @property
    def traceparent(self) -> str:
        """The header to send to the next hop."""
        return str(TraceParent(trace_id=self.trace_id, parent_id=self.span_id, flags=self.flags))

    @property
    def flow_id(self) -> str:
        """The lab's flow id (the trace id)."""
        return self.trace_id


def new_span_id(rng: random.Random | None = None) -> str:
    while True:
        sid = f"{(rng or random.SystemRandom()).getrandbits(64):016x}"
        if sid != "0" * 16:
            return sid


def next_hop(incoming: str | None, rng: random.Random | None = None) -> TraceContext:
    """Continue the incoming `traceparent` (same trace id and flags, a new span id), or start a
    new trace when it is absent or invalid."""
    if incoming:
        try:
            tp = parse_traceparent(incoming)
            return TraceContext(tp.trace_id, new_span_id(rng), tp.parent_id, tp.flags)
        except TraceparentError:
            pass
    trace_id = f"{rng.getrandbits(128):032x}" if rng is not None else new_trace_id()
    if trace_id == "0" * 32:
        trace_id = new_trace_id()
    return TraceContext(trace_id, new_span_id(rng), None, 0)
