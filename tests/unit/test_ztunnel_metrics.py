"""ztunnel's per-connection records: the Prometheus metrics (lab/ztunnel/metrics.py) and the
access-log lines with identities, as a Flow produces them (lab/ztunnel/proxy/__init__.py)."""

from __future__ import annotations

import os

import pytest

from lab.proto.zds import WorkloadInfo
from lab.tls.identity import Identity
from lab.ztunnel.access_log import ConnectionResult, message
from lab.ztunnel.config import Config
from lab.ztunnel.inpod.netns import InpodNetns
from lab.ztunnel.metrics import (
    CLOSED,
    FAILED,
    OPENED,
    RECEIVED,
    SENT,
    ConnectionLabels,
    Metrics,
    exposition,
    parse_exposition,
)
from lab.ztunnel.proxy import Flow, InpodWorkload, ProxyInputs
from lab.ztunnel.proxy.connection_manager import ConnectionManager
from lab.ztunnel.state import Workload

SLEEP = Identity.of("default", "sleep")
PRODUCTPAGE = Identity.of("default", "bookinfo-productpage")
LABELS = ConnectionLabels(reporter="source", source_workload="sleep", source_workload_namespace="default",
                          source_principal=SLEEP.uri, destination_workload="productpage-v1",
                          destination_workload_namespace="default", destination_principal=PRODUCTPAGE.uri,
                          destination_service="productpage.default.svc.cluster.local",
                          connection_security_policy="mutual_tls")


# ------------------------------------------------------------------ metrics
def test_counters_follow_a_connections_life():
    m = Metrics()
    m.opened(LABELS)
    m.closed(LABELS, request_bytes=80, response_bytes=175, failed=False)
    m.opened(LABELS)
    m.closed(LABELS, request_bytes=10, response_bytes=0, failed=True)
    assert (m.value(OPENED), m.value(CLOSED), m.value(FAILED)) == (2, 2, 1)
    assert (m.value(RECEIVED), m.value(SENT)) == (90, 175)
    assert m.value(OPENED, reporter="source", source_principal=SLEEP.uri) == 2
    assert m.value(OPENED, reporter="destination") == 0


def test_the_failure_counter_has_the_name_ztunnel_exports():
    assert FAILED == "istio_tcp_connections_failed_total"
    assert all(name.endswith("_total") for name in (OPENED, CLOSED, RECEIVED, SENT, FAILED))


def test_exposition_is_prometheus_text():
    m = Metrics()
    m.opened(LABELS)
    text = m.exposition()
    lines = text.splitlines()
    assert lines[0] == "# HELP istio_tcp_connections_opened_total The total number of TCP connections opened."
    assert lines[1] == "# TYPE istio_tcp_connections_opened_total counter"
    assert lines[2] == (
        'istio_tcp_connections_opened_total{reporter="source",source_workload="sleep",'
        'source_workload_namespace="default",source_principal="spiffe://cluster.local/ns/default/sa/sleep",'
        'destination_workload="productpage-v1",destination_workload_namespace="default",'
        'destination_principal="spiffe://cluster.local/ns/default/sa/bookinfo-productpage",'
        'destination_service="productpage.default.svc.cluster.local",connection_security_policy="mutual_tls",'
        'response_flags="-"} 1')
    assert [l for l in lines if l.startswith("# TYPE")] == [
        f"# TYPE {n} counter" for n in (OPENED, CLOSED, RECEIVED, SENT, FAILED)]
    assert text.endswith("\n")


def test_exposition_escapes_sorts_and_parses_back():
    odd = ConnectionLabels(reporter="destination", source_workload='we"ird\\name\nx')
    counters = {OPENED: {LABELS: 3, odd: 1}}
    text = exposition(counters)
    assert 'source_workload="we\\"ird\\\\name\\nx"' in text
    parsed = parse_exposition(text)
    assert [(labels["reporter"], labels["source_workload"], v) for labels, v in parsed[OPENED]] == [
        ("destination", 'we"ird\\name\nx', 1.0), ("source", "sleep", 3.0)]
    assert exposition(counters) == text  # stable output


def test_unknown_labels_default_to_unknown():
    labels = dict(ConnectionLabels(reporter="destination").items())
    assert labels["source_principal"] == "unknown" and labels["connection_security_policy"] == "unknown"
    assert labels["response_flags"] == "-"


# ------------------------------------------------------------------ access log with identities
def test_access_log_line_of_an_hbone_connection_matches_ztunnels():
    r = ConnectionResult(direction="outbound", src_addr=("10.244.1.12", 58508), src_workload="sleep-7d9c",
                         src_namespace="default", src_identity=SLEEP.uri, dst_addr=("10.244.1.10", 15008),
                         dst_hbone_addr=("10.244.1.10", 9080), dst_service="productpage.default.svc.cluster.local",
                         dst_workload="productpage-v1-abc", dst_namespace="default", dst_identity=PRODUCTPAGE.uri,
                         bytes_sent=80, bytes_recv=175, duration_ms=1.2)
    assert message(r) == (
        'connection complete src.addr=10.244.1.12:58508 src.workload="sleep-7d9c" src.namespace="default" '
        'src.identity="spiffe://cluster.local/ns/default/sa/sleep" dst.addr=10.244.1.10:15008 '
        'dst.hbone_addr="10.244.1.10:9080" dst.service="productpage.default.svc.cluster.local" '
        'dst.workload="productpage-v1-abc" dst.namespace="default" '
        'dst.identity="spiffe://cluster.local/ns/default/sa/bookinfo-productpage" direction="outbound" '
        'bytes_sent=80 bytes_recv=175 duration="1ms"')


@pytest.fixture
def inputs():
    fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    lines: list[str] = []
    events: list[tuple[str, dict]] = []
    pi = ProxyInputs(cfg=Config("lab", "worker", "/z"), workload=InpodWorkload("uid-sleep", WorkloadInfo(
        "sleep-7d9c", "default", "sleep")), netns=InpodNetns(-1, fd), connections=ConnectionManager(),
        emit=lambda kind, msg, **f: events.append((kind, f)), write_access_log=lines.append)
    yield pi, lines, events
    pi.netns.close()


SLEEP_W = Workload("uid-sleep", "sleep-7d9c", "default", ("10.244.1.12",), node="worker", service_account="sleep",
                   tunnel_protocol="HBONE", workload_name="sleep")
PP_W = Workload("uid-pp", "productpage-v1-abc", "default", ("10.244.1.10",), service_account="bookinfo-productpage",
                tunnel_protocol="HBONE", workload_name="productpage-v1")


def test_flow_reports_identities_only_with_mtls(inputs):
    pi, lines, events = inputs
    flow = Flow(pi, "outbound", 15001, ("10.244.1.12", 58508), ("127.0.0.1", 15001))
    flow.src_workload, flow.dst_workload = SLEEP_W, PP_W
    flow.src_identity, flow.dst_identity = SLEEP, PRODUCTPAGE
    flow.upstream, flow.hbone_addr = ("10.244.1.10", 15008), ("10.244.1.10", 9080)
    flow.mtls = True
    flow.open()
    flow.counts.downstream_to_upstream, flow.counts.upstream_to_downstream = 80, 175
    flow.finish()
    assert 'src.identity="spiffe://cluster.local/ns/default/sa/sleep"' in lines[0]
    assert 'dst.identity="spiffe://cluster.local/ns/default/sa/bookinfo-productpage"' in lines[0]
    assert "\tinfo\taccess\tconnection complete " in lines[0]
    assert pi.metrics.value(OPENED, connection_security_policy="mutual_tls", source_principal=SLEEP.uri) == 1
    assert pi.metrics.value(RECEIVED) == 80 and pi.metrics.value(SENT) == 175
    assert events[-1][0] == "conn.closed" and events[-1][1]["flow"] == flow.id

    plain = Flow(pi, "outbound", 15001, ("10.244.1.12", 40000), ("127.0.0.1", 15001))
    plain.src_workload, plain.dst_workload = SLEEP_W, PP_W
    plain.src_identity = SLEEP  # known, but not proven on this connection: not logged
    plain.upstream = ("10.244.1.10", 9080)
    plain.open()
    plain.finish()
    assert "identity" not in lines[1] and "dst.addr=10.244.1.10:9080 " in lines[1]
    assert pi.metrics.value(OPENED, connection_security_policy="unknown", source_principal="unknown") == 1


def test_flow_failures_log_like_ztunnel_and_count(inputs):
    pi, lines, events = inputs
    early = Flow(pi, "outbound", 15001, ("10.244.1.12", 1), ("127.0.0.1", 15001))
    early.target = ("10.244.1.10", 15001)
    early.finish("attempted recursive call to ourselves")
    assert "\twarn\taccess\tconnection failed src.addr=10.244.1.12:1 dst.addr=10.244.1.10:15001 " in lines[0]
    # refused before it was proxied: logged, but not counted (ztunnel's log_early_deny)
    assert pi.metrics.value(FAILED) == 0 and pi.metrics.value(CLOSED) == 0 and pi.metrics.value(OPENED) == 0

    denied = Flow(pi, "inbound", 15008, ("10.244.1.12", 2), ("10.244.1.10", 15008))
    denied.dst_workload, denied.src_identity, denied.dst_identity, denied.mtls = PP_W, SLEEP, PRODUCTPAGE, True
    denied.hbone_addr = denied.target = ("10.244.1.10", 9080)
    denied.open()
    denied.response_flags = "DENY"
    denied.finish("connection closed due to policy rejection: explicitly denied by: default/deny")
    assert "\terror\taccess\tconnection complete " in lines[1]
    assert 'dst.addr=10.244.1.10:15008 dst.hbone_addr="10.244.1.10:9080"' in lines[1]
    assert 'src.identity="spiffe://cluster.local/ns/default/sa/sleep"' in lines[1]
    assert lines[1].endswith('error="connection closed due to policy rejection: explicitly denied by: default/deny"')
    assert pi.metrics.value(FAILED, reporter="destination", response_flags="DENY") == 1
    assert pi.metrics.value(OPENED, reporter="destination", response_flags="-") == 1
    assert events[-1][0] == "conn.failed" and events[-1][1]["response_flags"] == "DENY"
    denied.finish("again")  # recorded once
    assert len(lines) == 2


def test_destination_principal_is_known_for_a_known_workload_even_in_plaintext(inputs):
    """ztunnel's metrics name a known destination's identity whatever the transport (metrics.rs
    with_destination); only the access log leaves identities out without mTLS."""
    pi, lines, events = inputs
    plain = Flow(pi, "inbound", 15006, ("10.244.1.12", 3), ("10.244.1.10", 9080))
    plain.dst_workload = PP_W
    labels = plain.metric_labels()
    assert labels.destination_principal == PP_W.identity.uri and labels.source_principal == "unknown"
    assert labels.connection_security_policy == "unknown"
    plain.target = ("10.244.1.10", 9080)
    plain.open()
    plain.finish()
    assert "dst.identity" not in lines[-1]
