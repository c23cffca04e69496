"""ztunnel's access log: one ``connection complete`` (or ``connection failed``) line per connection.

Real counterpart: zt:src/proxy/metrics.rs (``ConnectionResult``, logged with target ``access``).
ztunnel prints through ``tracing`` as ``<time>\\t<level>\\taccess\\t<message> key=value ...``;
strings are quoted, addresses and numbers are not::

    2026-01-02T03:04:05.678901Z	info	access	connection complete src.addr=10.244.1.12:58508
    src.workload="curl-7d9c" src.namespace="default" dst.addr=10.244.2.7:9080
    direction="outbound" bytes_sent=80 bytes_recv=175 duration="1ms"

(one line in reality). Fields the lab's ztunnel cannot know yet (identities before mTLS, service
and destination workload before xDS) are left out, as ztunnel leaves out what it does not know.
``bytes_sent``/``bytes_recv`` are from the reporting ztunnel's point of view: outbound, "sent"
is what the app sent to the destination; inbound, "recv" is what arrived from the client.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from lab.ztunnel.socket import Addr, format_addr


@dataclass(frozen=True)
class ConnectionResult:
    """The facts of one proxied connection, as ztunnel reports them at its end."""

    direction: str  # "outbound" (reporter = source) | "inbound" (reporter = destination)
    src_addr: Addr | None = None
    dst_addr: Addr | None = None
    src_workload: str | None = None
    src_namespace: str | None = None
    src_identity: str | None = None
    dst_hbone_addr: Addr | None = None
    dst_service: str | None = None
    dst_workload: str | None = None
    dst_namespace: str | None = None
    dst_identity: str | None = None
    bytes_sent: int | None = None
    bytes_recv: int | None = None
    duration_ms: float | None = None
    error: str | None = None


def _quoted(value: str) -> str:
    """A string field the way ztunnel's log prints it: double-quoted, escaped."""
    return json.dumps(value, ensure_ascii=False)


def log_fields(r: ConnectionResult) -> list[tuple[str, str]]:
    """The key=value pairs of a log line, in ztunnel's order, unknown fields left out (pure)."""
    fields: list[tuple[str, Any]] = [
        ("src.addr", format_addr(r.src_addr) if r.src_addr else None),
        ("src.workload", _quoted(r.src_workload) if r.src_workload else None),
        ("src.namespace", _quoted(r.src_namespace) if r.src_namespace else None),
        ("src.identity", _quoted(r.src_identity) if r.src_identity else None),
        ("dst.addr", format_addr(r.dst_addr) if r.dst_addr else None),
        ("dst.hbone_addr", _quoted(format_addr(r.dst_hbone_addr)) if r.dst_hbone_addr else None),
        ("dst.service", _quoted(r.dst_service) if r.dst_service else None),
        ("dst.workload", _quoted(r.dst_workload) if r.dst_workload else None),
        ("dst.namespace", _quoted(r.dst_namespace) if r.dst_namespace else None),
        ("dst.identity", _quoted(r.dst_identity) if r.dst_identity else None),
        ("direction", _quoted(r.direction)),
        ("bytes_sent", str(r.bytes_sent) if r.bytes_sent is not None else None),
        ("bytes_recv", str(r.bytes_recv) if r.bytes_recv is not None else None),
        ("duration", _quoted(f"{round(r.duration_ms)}ms") if r.duration_ms is not None else None),
        ("error", _quoted(r.error) if r.error else None),
    ]
    return [(k, v) for k, v in fields if v is not None]


#: What ztunnel's early ``connection failed`` line carries: no workloads, bytes or duration.
FAILED_FIELDS = ("src.addr", "dst.addr", "direction", "error")


def message(r: ConnectionResult, *, failed: bool = False) -> str:
    """``connection complete k=v ...`` or, for a connection refused before anything was proxied,
    the shorter ``connection failed src.addr=.. dst.addr=.. direction=.. error=..`` (pure)."""
    fields = log_fields(r)
    if failed:
        fields = [(k, v) for k, v in fields if k in FAILED_FIELDS]
    head = "connection failed" if failed else "connection complete"
    return " ".join([head, *(f"{k}={v}" for k, v in fields)])


def level(r: ConnectionResult, *, failed: bool = False) -> str:
    """ztunnel's level: info for a clean close, warn for an early refusal, error otherwise."""
    if r.error is None:
        return "info"
    return "warn" if failed else "error"


def timestamp(now: float) -> str:
    """RFC 3339 in UTC with microseconds, as ztunnel's tracing output prints time (pure)."""
    whole = int(now)
    micros = int(round((now - whole) * 1_000_000))
    if micros == 1_000_000:
        whole, micros = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{micros:06d}Z"


def format_line(r: ConnectionResult, *, failed: bool = False, now: float | None = None) -> str:
    """The whole access-log line: time, level, target ``access``, message (pure given `now`)."""
    ts = timestamp(time.time() if now is None else now)
    return f"{ts}\t{level(r, failed=failed)}\taccess\t{message(r, failed=failed)}"
