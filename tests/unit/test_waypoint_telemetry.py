"""The waypoint's access log, metrics and trace context (no root)."""

from __future__ import annotations

import calendar
import random
import re

import pytest

from lab.hbone.headers import parse_traceparent
from lab.waypoint.telemetry import (
    DURATION_BUCKETS_MS,
    METRIC_LABELS,
    Metrics,
    Peer,
    RequestRecord,
    format_access_log,
    format_start_time,
    next_hop,
)

T0 = calendar.timegm((2026, 1, 2, 3, 4, 5)) + 0.678


def record(**kw) -> RequestRecord:
    base = dict(
        method="GET", path="/reviews/0", status=200, start_time=T0, duration_ms=12.7, bytes_received=0,
        bytes_sent=358, upstream_service_time_ms=11, user_agent="curl/8.5.0", request_id="rid-1",
        authority="reviews:9080", upstream_host="10.244.1.4:9080",
        upstream_cluster="inbound-vip|9080|http|reviews-v1.default.svc.cluster.local",
        downstream_local="10.96.190.108:9080", downstream_remote="10.244.1.3:51234", route_name="default.reviews.0",
        source=Peer("productpage-v1", "default", "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
                    "productpage", "v1", "productpage-v1-abc"),
        destination=Peer("reviews-v1", "default", "spiffe://cluster.local/ns/default/sa/bookinfo-reviews",
                         "reviews", "v1", "reviews-v1-xyz"),
        destination_service="reviews.default.svc.cluster.local", destination_service_name="reviews",
        destination_service_namespace="default", policy="no ALLOW policy applies", flow_id="ab" * 16)
    base.update(kw)
    return RequestRecord(**base)


def test_start_time_format() -> None:
    assert format_start_time(T0) == "2026-01-02T03:04:05.678Z"


def test_access_log_line() -> None:
    line = format_access_log(record())
    assert line == (
        '[2026-01-02T03:04:05.678Z] "GET /reviews/0 HTTP/1.1" 200 - via_upstream - "-" 0 358 12 11 "-" '
        '"curl/8.5.0" "rid-1" "reviews:9080" "10.244.1.4:9080" '
        'inbound-vip|9080|http|reviews-v1.default.svc.cluster.local - 10.96.190.108:9080 10.244.1.3:51234 - '
        'default.reviews.0 upstream.pod="reviews-v1-xyz" '
        'src.identity="spiffe://cluster.local/ns/default/sa/bookinfo-productpage" '
        'dst.identity="spiffe://cluster.local/ns/default/sa/bookinfo-reviews" policy="no ALLOW policy applies" '
        f'flow="{"ab" * 16}"')


def test_access_log_of_a_denied_request() -> None:
    line = format_access_log(record(method="DELETE", path="/productpage", status=403, response_flags="-",
                                    response_code_details="rbac_access_denied_matched_policy[none]", bytes_sent=19,
                                    upstream_host="", upstream_cluster="", upstream_service_time_ms=None,
                                    destination=Peer(), policy="allow policies exist, but none allowed",
                                    attempts=1))
    assert '"DELETE /productpage HTTP/1.1" 403 - rbac_access_denied_matched_policy[none] - "-" 0 19 12 - ' in line
    assert '"-" - -' in line and 'upstream.pod="-"' in line and 'dst.identity="-"' in line
    assert "attempts" not in line
    assert 'attempts="3"' in format_access_log(record(attempts=3, response_flags="URX", status=503))


def test_metrics_counter_and_histogram() -> None:
    m = Metrics()
    m.record(record(duration_ms=3))
    m.record(record(duration_ms=40))
    m.record(record(status=503, response_flags="UO", duration_ms=0.2))
    text = m.render()
    lines = text.splitlines()
    assert lines[:2] == ["# HELP istio_requests_total Total requests.", "# TYPE istio_requests_total counter"]
    assert "# TYPE istio_request_duration_milliseconds histogram" in lines
    ok = [line for line in lines if line.startswith("istio_requests_total{") and 'response_code="200"' in line]
    assert len(ok) == 1 and ok[0].endswith("} 2")
    labels = dict(re.findall(r'(\w+)="([^"]*)"', ok[0]))
    assert list(labels) == list(METRIC_LABELS)
    assert labels["reporter"] == "waypoint" and labels["connection_security_policy"] == "mutual_tls"
    assert labels["source_workload"] == "productpage-v1" and labels["destination_workload"] == "reviews-v1"
    assert labels["source_principal"] == "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
    assert labels["destination_service"] == "reviews.default.svc.cluster.local"
    assert labels["destination_version"] == "v1" and labels["response_flags"] == "-"
    buckets = {re.search(r'le="([^"]+)"', line).group(1): int(line.rsplit(" ", 1)[1]) for line in lines
               if line.startswith("istio_request_duration_milliseconds_bucket") and 'response_code="200"' in line}
    assert list(buckets) == [str(b) if isinstance(b, int) else "0.5" for b in DURATION_BUCKETS_MS] + ["+Inf"]
    assert (buckets["0.5"], buckets["1"], buckets["5"], buckets["25"], buckets["50"], buckets["+Inf"]) == (0, 0, 1, 1, 2, 2)
    assert buckets["3600000"] == 2
    assert any(line.startswith("istio_request_duration_milliseconds_sum{") and 'response_code="200"' in line
               and line.endswith(" 43") for line in lines)
    assert m.requests_total(response_code="503", response_flags="UO") == 1
    assert m.requests_total(destination_workload="reviews-v1") == 3 and m.requests_total(response_code="404") == 0


def test_metric_label_values_are_escaped() -> None:
    m = Metrics()
    m.record(record(source=Peer(workload='we"ird\\name')))
    assert 'source_workload="we\\"ird\\\\name"' in m.render()


def test_next_hop_keeps_the_trace_and_makes_a_new_span() -> None:
    incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    rng = random.Random(1)
    ctx = next_hop(incoming, rng)
    out = parse_traceparent(ctx.traceparent)
    assert out.trace_id == "0af7651916cd43dd8448eb211c80319c" == ctx.flow_id
    assert out.parent_id == ctx.span_id != "b7ad6b7169203331" and ctx.parent_id == "b7ad6b7169203331"
    assert out.flags == 1
    again = next_hop(ctx.traceparent, rng)
    assert again.trace_id == ctx.trace_id and again.parent_id == ctx.span_id and again.span_id != ctx.span_id


@pytest.mark.parametrize("incoming", [None, "", "garbage", "00-" + "0" * 32 + "-b7ad6b7169203331-01"])
def test_next_hop_starts_a_trace_when_needed(incoming) -> None:
    ctx = next_hop(incoming, random.Random(4))
    assert ctx.parent_id is None and len(ctx.trace_id) == 32 and ctx.trace_id != "0" * 32
    assert parse_traceparent(ctx.traceparent).parent_id == ctx.span_id
    assert next_hop(incoming, random.Random(4)) == ctx  # the rng decides
