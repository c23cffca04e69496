"""ztunnel's L4 metrics, in the Prometheus text format (zt:src/proxy/metrics.rs, zt:src/metrics.rs).

ztunnel counts every connection it proxies, once per reporter: the source ztunnel reports the
outbound side (``reporter="source"``), the destination ztunnel the inbound side
(``reporter="destination"``). The counters and their labels are Istio's standard TCP metrics::

    istio_tcp_connections_opened_total   a connection started being proxied
    istio_tcp_connections_closed_total   ... and ended (with or without an error)
    istio_tcp_received_bytes_total       bytes from the client towards the server
    istio_tcp_sent_bytes_total           bytes from the server back to the client
    istio_tcp_connections_failed_total   connections that ended with an error, once proxied (unstable in ztunnel)

The byte counters are named from the server's point of view, for both reporters: "received" is
always the request direction (client -> server), "sent" the response direction. (The access log
instead reports bytes from the reporting ztunnel's own point of view.)

Labels: ``reporter``, ``source_workload``, ``source_workload_namespace``, ``source_principal``,
``destination_workload``, ``destination_workload_namespace``, ``destination_principal``,
``destination_service``, ``connection_security_policy`` (``mutual_tls`` when the connection
carried a peer identity, ``unknown`` otherwise), ``response_flags`` (``-``; ``DENY`` for a policy
rejection, reported by the destination only; ``CONNECT`` for a connection that failed upstream, which
is also what the source reports when the destination refused its CONNECT with 401). Values ztunnel does not know are
``unknown``.

Everything here is plain data: `Metrics` holds the counters, `exposition()` renders them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, fields

UNKNOWN = "unknown"

OPENED = "istio_tcp_connections_opened_total"
CLOSED = "istio_tcp_connections_closed_total"
RECEIVED = "istio_tcp_received_bytes_total"
SENT = "istio_tcp_sent_bytes_total"
# A prometheus-client Counter named tcp_connections_failed is exported with `_total`, like the others.
FAILED = "istio_tcp_connections_failed_total"

#: name -> HELP text, in the order they are printed.
COUNTERS: dict[str, str] = {
    OPENED: "The total number of TCP connections opened",
    CLOSED: "The total number of TCP connections closed",
    RECEIVED: "The size of total bytes received during request in case of a TCP connection",
    SENT: "The size of total bytes sent during response in case of a TCP connection",
    FAILED: "The total number of TCP connections that failed to be established",
}

#: response_flags values (zt ResponseFlags)
FLAG_NONE = "-"
FLAG_DENY = "DENY"
FLAG_CONNECT = "CONNECT"


@dataclass(frozen=True)
class ConnectionLabels:
    """The label set of one connection (zt ``CommonTrafficLabels``)."""

    reporter: str  # "source" | "destination"
    source_workload: str = UNKNOWN
    source_workload_namespace: str = UNKNOWN
    source_principal: str = UNKNOWN
    destination_workload: str = UNKNOWN
    destination_workload_namespace: str = UNKNOWN
    destination_principal: str = UNKNOWN
    destination_service: str = UNKNOWN
    connection_security_policy: str = UNKNOWN  # "mutual_tls" | "unknown"
    response_flags: str = FLAG_NONE

    def items(self) -> list[tuple[str, str]]:
        return [(f.name, getattr(self, f.name) or UNKNOWN) for f in fields(self)]


def _escape(value: str) -> str:
    """A label value as the Prometheus text format writes it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_labels(labels: ConnectionLabels) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


class Metrics:
    """The counters of one ztunnel, by metric name and label set."""

    def __init__(self) -> None:
        self.counters: dict[str, dict[ConnectionLabels, int]] = {name: defaultdict(int) for name in COUNTERS}

    def opened(self, labels: ConnectionLabels) -> None:
        """A connection started being proxied (ztunnel: when its ConnectionResult is created)."""
        self.counters[OPENED][labels] += 1

    def closed(self, labels: ConnectionLabels, *, request_bytes: int, response_bytes: int, failed: bool) -> None:
        """A connection ended: count it, its bytes, and whether it failed.

        `request_bytes` went client -> server, `response_bytes` server -> client.
        """
        self.counters[CLOSED][labels] += 1
        self.counters[RECEIVED][labels] += request_bytes
        self.counters[SENT][labels] += response_bytes
        if failed:
            self.counters[FAILED][labels] += 1

    def value(self, name: str, **match: str) -> int:
        """Sum of a counter over the label sets that have every `match` label (for tests and tools)."""
        return sum(v for labels, v in self.counters[name].items()
                   if all(getattr(labels, k) == want for k, want in match.items()))

    def exposition(self) -> str:
        """The Prometheus text exposition format (version 0.0.4) of every counter."""
        return exposition(self.counters)


def exposition(counters: dict[str, dict[ConnectionLabels, int]]) -> str:
    """Render counters as Prometheus text (pure): HELP, TYPE, then one sample per label set,
    sorted so that the output is stable."""
    lines: list[str] = []
    for name, help_text in COUNTERS.items():
        lines.append(f"# HELP {name} {help_text}.")
        lines.append(f"# TYPE {name} counter")
        for labels, value in sorted(counters.get(name, {}).items(), key=lambda kv: kv[0].items()):
            lines.append(f"{name}{format_labels(labels)} {value}")
    return "\n".join(lines) + "\n"


def parse_exposition(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Read Prometheus text back: name -> [(labels, value)] (enough for the lab's own output)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, brace, rest = head.partition("{")
        labels: dict[str, str] = {}
        if brace:
            body = rest[:-1]
            i = 0
            while i < len(body):
                eq = body.index("=", i)
                key = body[i:eq]
                j = eq + 2  # skip ="
                val = []
                while body[j] != '"':
                    if body[j] == "\\":
                        j += 1
                        val.append({"n": "\n"}.get(body[j], body[j]))
                    else:
                        val.append(body[j])
                    j += 1
                labels[key] = "".join(val)
                i = j + 2 if j + 1 < len(body) and body[j + 1] == "," else j + 1
        out.setdefault(name, []).append((labels, float(value)))
    return out
