"""Circuit breaking and outlier detection at the waypoint, as Envoy does them for an upstream
cluster configured from an Istio DestinationRule (is:pilot/pkg/networking/core/cluster_traffic_policy.go;
Envoy's cluster `circuit_breakers` and `outlier_detection`).

**Connection pool (`trafficPolicy.connectionPool`) -> `CircuitBreaker`**, one per backend:

    tcp.maxConnections             -> max_connections      connections open to the backend
    http.http1MaxPendingRequests   -> max_pending_requests requests waiting for a connection
    http.http2MaxRequests          -> max_requests         requests in flight (waiting included)
    http.maxRequestsPerConnection  -> max_requests_per_connection (0: no limit; 1: no keep-alive)
    http.maxRetries                -> max_retries          retries in flight

Istio leaves every unset limit at 2^32-1 (in effect: no limit). The lab's pool behaves like
Envoy's HTTP/1.1 pool: a connection carries one request at a time. A request takes an idle
connection, else opens a new one if `max_connections` allows, else waits as *pending*. When
`max_requests` or `max_pending_requests` is full the request is not queued: it **overflows** and
the waypoint answers 503 with response flag `UO` ("upstream overflow (circuit breaking)" in
Envoy's flag table). An overflow is never retried.

**Outlier detection (`trafficPolicy.outlierDetection`) -> `OutlierDetector`**, per backend:

    consecutive5xxErrors      (Istio default 5; 0 = off)  any 5xx, and connect failures / resets
    consecutiveGatewayErrors  (default off)                502, 503, 504, and connect failures / resets
    interval                  (default 10s)   the sweep that returns ejected endpoints
    baseEjectionTime          (default 30s)   ejection time = base x times ejected (max 300s)
    maxEjectionPercent        (default 10)    no ejection while this share is already out
    minHealthPercent          (default 0)     below it, ignore ejections ("panic")

Like Envoy: reaching a consecutive-error threshold ejects the endpoint at once (if the ejected
share is still below `maxEjectionPercent`, so one endpoint can always go); a success resets the
counters (a non-gateway 5xx resets only the gateway counter). Every `interval` a sweep returns
the endpoints whose ejection time is over, and lowers the ejection multiplier of endpoints that
stayed healthy. Ejected endpoints are left out of load balancing; when none is left the
waypoint answers 503 `UH` (no healthy upstream).

The clock is injected (`clock=`), so tests step time by hand. No sockets here: the waypoint
process calls `acquire` / `release` / `record` around each upstream request.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lab.waypoint.routes import GATEWAY_ERRORS, parse_duration

#: Istio's "unset" for every circuit breaker threshold (math.MaxUint32).
UNLIMITED = 2**32 - 1
#: Envoy's response flags.
OVERFLOW_FLAG = "UO"
NO_HEALTHY_UPSTREAM_FLAG = "UH"
OVERFLOW_DETAILS = "upstream_reset_before_response_started{overflow}"
NO_HEALTHY_UPSTREAM_BODY = "no healthy upstream"
#: Envoy's cap on one ejection (outlier_detection.max_ejection_time default).
MAX_EJECTION_TIME = 300.0


def _limit(value: Any) -> int:
    return UNLIMITED if value in (None, "", 0) else int(value)


@dataclass(frozen=True)
class ConnectionPoolSettings:
    """The circuit breaker thresholds of one upstream cluster."""

    max_connections: int = UNLIMITED
    max_pending_requests: int = UNLIMITED
    max_requests: int = UNLIMITED
    max_requests_per_connection: int = 0
    max_retries: int = UNLIMITED

    @classmethod
    def from_traffic_policy(cls, traffic_policy: dict | None) -> ConnectionPoolSettings:
        pool = (traffic_policy or {}).get("connectionPool") or {}
        tcp, http = pool.get("tcp") or {}, pool.get("http") or {}
        return cls(max_connections=_limit(tcp.get("maxConnections")),
                   max_pending_requests=_limit(http.get("http1MaxPendingRequests")),
                   max_requests=_limit(http.get("http2MaxRequests")),
                   max_requests_per_connection=int(http.get("maxRequestsPerConnection") or 0),
                   max_retries=_limit(http.get("maxRetries")))


# ---------------------------------------------------------------------------------------------
# The connection pool and its circuit breaker


ACTIVE, PENDING, OVERFLOW, DONE = "active", "pending", "overflow", "done"


@dataclass(eq=False)
class Ticket:
    """One request's place in the pool: `active` on `connection` (a new one if
    `new_connection`), `pending` (waiting), `overflow` (503 UO), or `done`."""

    id: int
    state: str
    connection: int | None = None
    new_connection: bool = False
    reason: str = ""

    @property
    def overflowed(self) -> bool:
        return self.state == OVERFLOW


@dataclass
class _Connection:
    id: int
    requests: int = 0  # requests it has carried
    busy: bool = False


class CircuitBreaker:
    """Envoy's HTTP/1.1 connection pool for one backend, with its circuit breaker counters."""

    def __init__(self, settings: ConnectionPoolSettings | None = None, name: str = "") -> None:
        self.settings = settings or ConnectionPoolSettings()
        self.name = name
        self._ids = itertools.count(1)
        self._conn_ids = itertools.count(1)
        self.connections: dict[int, _Connection] = {}
        self.pending: deque[Ticket] = deque()
        self.active: dict[int, Ticket] = {}
        self.retries_in_flight = 0
        self.stats = {"upstream_rq_total": 0, "upstream_rq_pending_overflow": 0, "upstream_rq_overflow": 0,
                      "upstream_cx_total": 0, "upstream_cx_overflow": 0, "upstream_rq_retry_overflow": 0,
                      "upstream_cx_max_requests": 0}

    # -- counters -------------------------------------------------------------------------
    @property
    def open_connections(self) -> int:
        return len(self.connections)

    @property
    def idle_connections(self) -> int:
        return sum(1 for c in self.connections.values() if not c.busy)

    @property
    def in_flight(self) -> int:
        return len(self.active) + len(self.pending)

    # -- requests -------------------------------------------------------------------------
    def acquire(self) -> Ticket:
        """A request wants to go upstream. Returns its Ticket (check `.state`)."""
        s = self.settings
        ticket = Ticket(next(self._ids), PENDING)
        self.stats["upstream_rq_total"] += 1
        if self.in_flight >= s.max_requests:
            self.stats["upstream_rq_overflow"] += 1
            ticket.state, ticket.reason = OVERFLOW, f"max_requests ({s.max_requests}) reached"
            return ticket
        if self._assign(ticket):
            return ticket
        if len(self.pending) >= s.max_pending_requests:
            self.stats["upstream_rq_pending_overflow"] += 1
            ticket.state = OVERFLOW
            ticket.reason = (f"max_connections ({s.max_connections}) open and "
                             f"max_pending_requests ({s.max_pending_requests}) waiting")
            return ticket
        self.pending.append(ticket)
        return ticket

    def _assign(self, ticket: Ticket) -> bool:
        """Put a request on an idle connection, or on a new one if the limit allows."""
        for conn in self.connections.values():
            if not conn.busy:
                conn.busy = True
                ticket.state, ticket.connection, ticket.new_connection = ACTIVE, conn.id, False
                self.active[ticket.id] = ticket
                return True
        if len(self.connections) < self.settings.max_connections:
            conn = _Connection(next(self._conn_ids), busy=True)
            self.connections[conn.id] = conn
            self.stats["upstream_cx_total"] += 1
            ticket.state, ticket.connection, ticket.new_connection = ACTIVE, conn.id, True
            self.active[ticket.id] = ticket
            return True
        self.stats["upstream_cx_overflow"] += 1
        return False

    def release(self, ticket: Ticket, *, keep_alive: bool = True) -> list[Ticket]:
        """The request on `ticket` finished (or failed). Its connection goes back to the pool
        unless `keep_alive` is False (closed by either side, or a failed connect) or it reached
        max_requests_per_connection. Returns the pending tickets that just became active."""
        if ticket.state == PENDING:
            self.cancel(ticket)
            return []
        if ticket.state != ACTIVE:
            return []
        self.active.pop(ticket.id, None)
        ticket.state = DONE
        conn = self.connections.get(ticket.connection or -1)
        if conn is not None:
            conn.requests += 1
            conn.busy = False
            limit = self.settings.max_requests_per_connection
            if not keep_alive or (limit and conn.requests >= limit):
                if limit and conn.requests >= limit:
                    self.stats["upstream_cx_max_requests"] += 1
                del self.connections[conn.id]
        return self._drain()

    def cancel(self, ticket: Ticket) -> None:
        """A pending request gave up (its timeout, or the client left)."""
        if ticket.state == PENDING:
            try:
                self.pending.remove(ticket)
            except ValueError:
                pass
            ticket.state = DONE

    def _drain(self) -> list[Ticket]:
        promoted = []
        while self.pending and self._assign(self.pending[0]):
            promoted.append(self.pending.popleft())
        return promoted

    # -- retries --------------------------------------------------------------------------
    def try_retry(self) -> bool:
        """Take a retry slot (max_retries); False means the retry overflows and is not made."""
        if self.retries_in_flight >= self.settings.max_retries:
            self.stats["upstream_rq_retry_overflow"] += 1
            return False
        self.retries_in_flight += 1
        return True

    def retry_done(self) -> None:
        self.retries_in_flight = max(0, self.retries_in_flight - 1)


# ---------------------------------------------------------------------------------------------
# Outlier detection


@dataclass(frozen=True)
class OutlierDetectionSettings:
    consecutive_5xx: int = 5
    consecutive_gateway: int = 0
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: float = 10.0
    min_health_percent: float = 0.0

    @classmethod
    def from_traffic_policy(cls, traffic_policy: dict | None) -> OutlierDetectionSettings | None:
        """None when the DestinationRule has no outlierDetection (Envoy then ejects nothing)."""
        od = (traffic_policy or {}).get("outlierDetection")
        if od is None:
            return None
        five = od.get("consecutive5xxErrors", od.get("consecutiveErrors"))
        return cls(consecutive_5xx=5 if five is None else int(five),
                   consecutive_gateway=int(od.get("consecutiveGatewayErrors") or 0),
                   interval=parse_duration(od.get("interval", "10s")),
                   base_ejection_time=parse_duration(od.get("baseEjectionTime", "30s")),
                   max_ejection_percent=float(od.get("maxEjectionPercent", 10)),
                   min_health_percent=float(od.get("minHealthPercent", 0)))


@dataclass
class _HostState:
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    ejected_at: float | None = None
    ejection_time: float = 0.0
    multiplier: int = 0


E = TypeVar("E")

#: Failures that are not an HTTP answer, counted as Envoy does without split_external_local_origin_errors.
_LOCAL_FAILURES = {"connect-failure": 503, "reset": 503, "refused-stream": 503, "per-try-timeout": 504,
                   "timeout": 504}


class OutlierDetector:
    """Passive health checking of one backend's endpoints (addresses "ip:port")."""

    def __init__(self, settings: OutlierDetectionSettings | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings or OutlierDetectionSettings()
        self.clock = clock
        self.hosts: dict[str, _HostState] = {}
        self.next_sweep = clock() + self.settings.interval
        self.stats = {"ejections_enforced_total": 0, "ejections_overflow": 0,
                      "ejections_enforced_consecutive_5xx": 0, "ejections_enforced_consecutive_gateway_failure": 0}

    def update_hosts(self, addresses: Iterable[str]) -> None:
        """The current endpoints (EDS); state of endpoints that are gone is dropped."""
        wanted = list(addresses)
        self.hosts = {a: self.hosts.get(a) or _HostState() for a in wanted}

    def _state(self, address: str) -> _HostState:
        if address not in self.hosts:
            self.hosts[address] = _HostState()
        return self.hosts[address]

    def ejected(self) -> set[str]:
        self.sweep()
        return {a for a, h in self.hosts.items() if h.ejected_at is not None}

    def is_ejected(self, address: str) -> bool:
        return address in self.ejected()

    def record(self, address: str, outcome: int | str) -> bool:
        """Account one result (HTTP status, or "connect-failure"/"reset"/"timeout"...) of a
        request to `address`. Returns True when it ejected the endpoint."""
        self.sweep()
        code = _LOCAL_FAILURES.get(outcome, 0) if isinstance(outcome, str) else int(outcome)
        if isinstance(outcome, str) and code == 0:
            return False  # e.g. "overflow": not the endpoint's fault
        h = self._state(address)
        if not 500 <= code <= 599:
            h.consecutive_5xx = h.consecutive_gateway = 0
            return False
        if code in GATEWAY_ERRORS:
            h.consecutive_gateway += 1
        else:
            h.consecutive_gateway = 0
        h.consecutive_5xx += 1
        s = self.settings
        if s.consecutive_gateway and h.consecutive_gateway >= s.consecutive_gateway:
            if self._eject(address, h, "consecutive_gateway_failure"):
                return True
        if s.consecutive_5xx and h.consecutive_5xx >= s.consecutive_5xx:
            return self._eject(address, h, "consecutive_5xx")
        return False

    def _eject(self, address: str, h: _HostState, why: str) -> bool:
        if h.ejected_at is not None:
            return False
        out = sum(1 for x in self.hosts.values() if x.ejected_at is not None)
        if self.hosts and 100.0 * out / len(self.hosts) >= self.settings.max_ejection_percent:
            self.stats["ejections_overflow"] += 1
            return False
        h.multiplier += 1
        h.ejected_at = self.clock()
        h.ejection_time = min(self.settings.base_ejection_time * h.multiplier,
                              max(MAX_EJECTION_TIME, self.settings.base_ejection_time))
        h.consecutive_5xx = h.consecutive_gateway = 0
        self.stats["ejections_enforced_total"] += 1
        self.stats[f"ejections_enforced_{why}"] += 1
        return True

    def sweep(self) -> list[str]:
        """Run every interval tick up to now: return endpoints whose ejection is over, lower
        the multiplier of healthy ones. Returns the addresses brought back."""
        back = []
        now = self.clock()
        while self.next_sweep <= now:
            tick = self.next_sweep
            for address, h in self.hosts.items():
                if h.ejected_at is not None:
                    if tick >= h.ejected_at + h.ejection_time:
                        h.ejected_at = None
                        back.append(address)
                elif h.multiplier > 0:
                    h.multiplier -= 1
            self.next_sweep = tick + self.settings.interval
        return back

    def available(self, endpoints: Sequence[E], address: Callable[[E], str] = lambda e: e.address) -> list[E]:
        """The endpoints load balancing may use: the ejected ones left out, unless fewer than
        `min_health_percent` % would remain (Envoy's panic mode: then all are used)."""
        out_set = self.ejected()
        healthy = [e for e in endpoints if address(e) not in out_set]
        if endpoints and 100.0 * len(healthy) / len(endpoints) < self.settings.min_health_percent:
            return list(endpoints)
        return healthy


@dataclass
class DestinationPolicy:
    """What a DestinationRule's trafficPolicy sets for one backend (the parts the lab uses)."""

    connection_pool: ConnectionPoolSettings = field(default_factory=ConnectionPoolSettings)
    outlier_detection: OutlierDetectionSettings | None = None
    load_balancer: str = "LEAST_REQUEST"
    source: str = ""  # "ns/name" of the DestinationRule

    @classmethod
    def from_traffic_policy(cls, traffic_policy: dict | None, source: str = "") -> DestinationPolicy:
        lb = ((traffic_policy or {}).get("loadBalancer") or {}).get("simple") or "LEAST_REQUEST"
        lb = {"LEAST_CONN": "LEAST_REQUEST", "UNSPECIFIED": "LEAST_REQUEST", "PASSTHROUGH": "LEAST_REQUEST"}.get(lb, lb)
        return cls(ConnectionPoolSettings.from_traffic_policy(traffic_policy),
                   OutlierDetectionSettings.from_traffic_policy(traffic_policy), lb, source)
