"""Circuit breaking and outlier detection from a DestinationRule (no root): the accounting, with
a clock stepped by hand."""

from __future__ import annotations

import pytest
import yaml

from lab.waypoint.breaker import (
    ACTIVE,
    OVERFLOW,
    PENDING,
    UNLIMITED,
    CircuitBreaker,
    ConnectionPoolSettings,
    DestinationPolicy,
    OutlierDetectionSettings,
    OutlierDetector,
)
from lab.waypoint.config import build_waypoint_config
from tests.unit.test_waypoint_routes import bookinfo_snapshot


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tp(doc: str) -> dict:
    return yaml.safe_load(doc)


# ---------------------------------------------------------------------------------------------
# Settings


def test_unset_limits_are_istio_max() -> None:
    s = ConnectionPoolSettings.from_traffic_policy(None)
    assert (s.max_connections, s.max_pending_requests, s.max_requests, s.max_retries) == (UNLIMITED,) * 4
    assert s.max_requests_per_connection == 0
    assert OutlierDetectionSettings.from_traffic_policy({}) is None


def test_settings_from_destination_rule() -> None:
    p = DestinationPolicy.from_traffic_policy(tp("""
connectionPool:
  tcp: {maxConnections: 1}
  http: {http1MaxPendingRequests: 2, http2MaxRequests: 3, maxRequestsPerConnection: 1, maxRetries: 4}
outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 3m, maxEjectionPercent: 100}
loadBalancer: {simple: ROUND_ROBIN}
"""), "default/reviews")
    assert p.connection_pool == ConnectionPoolSettings(1, 2, 3, 1, 4)
    assert p.outlier_detection == OutlierDetectionSettings(3, 0, 1.0, 180.0, 100.0, 0.0)
    assert p.load_balancer == "ROUND_ROBIN" and p.source == "default/reviews"
    assert OutlierDetectionSettings.from_traffic_policy({"outlierDetection": {}}) == OutlierDetectionSettings()


# ---------------------------------------------------------------------------------------------
# Connection pool


def test_istio_circuit_breaking_task_shape() -> None:
    """maxConnections 1 + http1MaxPendingRequests 1: one request on the connection, one waiting,
    the third overflows (503 UO)."""
    cb = CircuitBreaker(ConnectionPoolSettings(max_connections=1, max_pending_requests=1))
    a, b, c = cb.acquire(), cb.acquire(), cb.acquire()
    assert (a.state, a.new_connection) == (ACTIVE, True)
    assert b.state == PENDING and c.state == OVERFLOW and c.overflowed
    assert cb.stats["upstream_rq_pending_overflow"] == 1 and cb.open_connections == 1
    promoted = cb.release(a)
    assert promoted == [b] and b.state == ACTIVE and b.connection == a.connection and not b.new_connection
    d = cb.acquire()
    assert d.state == PENDING
    assert cb.release(b) == [d]
    cb.release(d)
    assert cb.in_flight == 0 and cb.idle_connections == 1 and cb.stats["upstream_cx_total"] == 1


def test_max_requests_counts_waiting_requests_too() -> None:
    cb = CircuitBreaker(ConnectionPoolSettings(max_connections=1, max_requests=2))
    a, b, c = cb.acquire(), cb.acquire(), cb.acquire()
    assert (a.state, b.state, c.state) == (ACTIVE, PENDING, OVERFLOW)
    assert cb.stats["upstream_rq_overflow"] == 1 and "max_requests" in c.reason


def test_max_requests_per_connection_closes_connections() -> None:
    cb = CircuitBreaker(ConnectionPoolSettings(max_requests_per_connection=1))
    a = cb.acquire()
    cb.release(a)
    assert cb.open_connections == 0 and cb.stats["upstream_cx_max_requests"] == 1
    b = cb.acquire()
    assert b.new_connection and b.connection != a.connection
    keep = CircuitBreaker(ConnectionPoolSettings(max_requests_per_connection=2))
    x = keep.acquire()
    keep.release(x)
    y = keep.acquire()
    assert y.connection == x.connection and not y.new_connection
    keep.release(y)
    assert keep.open_connections == 0


def test_closed_connection_lets_a_pending_request_open_a_new_one() -> None:
    cb = CircuitBreaker(ConnectionPoolSettings(max_connections=1))
    a, b = cb.acquire(), cb.acquire()
    assert b.state == PENDING
    assert cb.release(a, keep_alive=False) == [b]
    assert b.new_connection and b.connection != a.connection and cb.open_connections == 1


def test_unlimited_pool_opens_a_connection_per_concurrent_request() -> None:
    cb = CircuitBreaker()
    tickets = [cb.acquire() for _ in range(50)]
    assert all(t.state == ACTIVE for t in tickets) and cb.open_connections == 50
    for t in tickets:
        cb.release(t)
    assert cb.idle_connections == 50 and cb.acquire().new_connection is False


def test_cancel_pending_and_release_twice() -> None:
    cb = CircuitBreaker(ConnectionPoolSettings(max_connections=1, max_pending_requests=1))
    a, b = cb.acquire(), cb.acquire()
    cb.cancel(b)
    assert cb.in_flight == 1 and cb.acquire().state == PENDING
    cb.release(a)
    assert cb.release(a) == []  # already done


def test_retry_budget() -> None:
    cb = CircuitBreaker(ConnectionPoolSettings(max_retries=1))
    assert cb.try_retry() and not cb.try_retry()
    assert cb.stats["upstream_rq_retry_overflow"] == 1
    cb.retry_done()
    assert cb.try_retry()


# ---------------------------------------------------------------------------------------------
# Outlier detection


class Ep:
    def __init__(self, address: str) -> None:
        self.address = address


HOSTS = [f"10.244.1.{i}:9080" for i in range(1, 5)]


def detector(**kw) -> tuple[OutlierDetector, Clock]:
    clock = Clock()
    d = OutlierDetector(OutlierDetectionSettings(**kw), clock=clock)
    d.update_hosts(HOSTS)
    return d, clock


def test_consecutive_5xx_ejects_and_the_sweep_brings_it_back() -> None:
    d, clock = detector(consecutive_5xx=3, interval=1.0, base_ejection_time=10.0, max_ejection_percent=100)
    bad = HOSTS[0]
    assert not d.record(bad, 500) and not d.record(bad, 503)
    assert d.record(bad, 502)  # third in a row
    eps = [Ep(h) for h in HOSTS]
    assert [e.address for e in d.available(eps)] == HOSTS[1:]
    clock.now += 9.5
    assert d.is_ejected(bad)
    clock.now += 1.0  # the first sweep after the ejection time
    assert not d.is_ejected(bad) and len(d.available(eps)) == 4
    for _ in range(3):
        d.record(bad, 500)
    assert d.is_ejected(bad)
    clock.now += 15.0  # the second ejection lasts 2 x base
    assert d.is_ejected(bad)
    clock.now += 6.0
    assert not d.is_ejected(bad)
    assert d.stats["ejections_enforced_consecutive_5xx"] == 2


def test_success_resets_the_count() -> None:
    d, _ = detector(consecutive_5xx=2, max_ejection_percent=100)
    d.record(HOSTS[0], 500)
    d.record(HOSTS[0], 200)
    assert not d.record(HOSTS[0], 500)
    assert d.record(HOSTS[0], "connect-failure")  # a failed connect counts as a 5xx (503)
    assert not d.record(HOSTS[1], "overflow")  # a circuit-breaker overflow is not the endpoint's fault


def test_gateway_errors() -> None:
    d, _ = detector(consecutive_5xx=0, consecutive_gateway=2, max_ejection_percent=100)
    d.record(HOSTS[0], 502)
    d.record(HOSTS[0], 500)  # a non-gateway 5xx resets the gateway count
    assert not d.record(HOSTS[0], 504)
    assert d.record(HOSTS[0], "timeout")
    assert d.stats["ejections_enforced_consecutive_gateway_failure"] == 1
    for _ in range(10):
        assert not d.record(HOSTS[1], 500)  # consecutive 5xx is off


def test_max_ejection_percent() -> None:
    """Envoy checks the share already ejected before ejecting one more."""
    d, _ = detector(consecutive_5xx=1, max_ejection_percent=30)
    assert d.record(HOSTS[0], 500)  # 0 % out
    assert d.record(HOSTS[1], 500)  # 25 % out, below 30 %
    assert not d.record(HOSTS[2], 500)  # 50 % out: refused
    assert d.ejected() == {HOSTS[0], HOSTS[1]}


def test_max_ejection_percent_exact() -> None:
    d, _ = detector(consecutive_5xx=1, max_ejection_percent=25)
    assert d.record(HOSTS[0], 500)
    assert not d.record(HOSTS[1], 500)  # 25 % already out: no more
    assert d.stats["ejections_overflow"] == 1 and d.ejected() == {HOSTS[0]}
    default, _ = detector(consecutive_5xx=1)  # Istio's default 10 %: still one endpoint can go
    assert default.record(HOSTS[0], 500) and not default.record(HOSTS[1], 500)


def test_all_ejected_and_panic_threshold() -> None:
    d, _ = detector(consecutive_5xx=1, max_ejection_percent=100)
    for h in HOSTS:
        d.record(h, 503)
    eps = [Ep(h) for h in HOSTS]
    assert d.available(eps) == []  # -> 503 UH, no healthy upstream
    panic, _ = detector(consecutive_5xx=1, max_ejection_percent=100, min_health_percent=50)
    for h in HOSTS[:3]:
        panic.record(h, 503)
    assert len(panic.available(eps)) == 4  # 25 % healthy < 50 %: use them all


def test_hosts_that_leave_lose_their_state() -> None:
    d, _ = detector(consecutive_5xx=2, max_ejection_percent=100)
    d.record(HOSTS[0], 500)
    d.update_hosts(HOSTS[1:])
    d.update_hosts(HOSTS)
    assert not d.record(HOSTS[0], 500)


# ---------------------------------------------------------------------------------------------
# DestinationRules through the config


def test_destination_rules_reach_the_backends() -> None:
    snap = bookinfo_snapshot(yaml="""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews-cb}
spec:
  host: reviews-v1
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}}
    outlierDetection: {consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 3m, maxEjectionPercent: 100}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: everything, namespace: istio-system}
spec:
  host: "*.default.svc.cluster.local"
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 100}}
    portLevelSettings:
    - port: {number: 80}
      connectionPool: {tcp: {maxConnections: 7}}
""")
    cfg = build_waypoint_config(snap, "default", "waypoint")
    v1 = cfg.backends[("default", "reviews-v1", 9080)].policy
    assert v1.source == "default/reviews-cb" and v1.connection_pool.max_connections == 1
    assert v1.outlier_detection.base_ejection_time == 180
    assert cfg.backends[("default", "reviews", 9080)].policy.connection_pool.max_connections == 100
    assert cfg.backends[("default", "curl", 80)].policy.connection_pool.max_connections == 7
    cb = CircuitBreaker(v1.connection_pool)
    assert [cb.acquire().state for _ in range(3)] == [ACTIVE, PENDING, OVERFLOW]


@pytest.mark.parametrize("host", ["reviews", "reviews.default", "reviews.default.svc.cluster.local"])
def test_destination_rule_host_forms(host) -> None:
    snap = bookinfo_snapshot(yaml=f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: dr}}
spec: {{host: {host}, trafficPolicy: {{connectionPool: {{http: {{http2MaxRequests: 5}}}}}}}}
""")
    cfg = build_waypoint_config(snap, "default", "waypoint")
    assert cfg.backends[("default", "reviews", 9080)].policy.connection_pool.max_requests == 5
    assert cfg.backends[("default", "ratings", 9080)].policy.connection_pool.max_requests == UNLIMITED
