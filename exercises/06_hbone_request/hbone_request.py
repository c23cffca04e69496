"""Exercise 06: the CONNECT request a source ztunnel sends (istio/ztunnel src/proxy/outbound.rs).

Return HboneRequest(authority, headers): headers is a list of (name, value) pairs, lower-case names.
The helpers below format each header's value as Istio does.
"""

from lab.hbone.headers import (  # noqa: F401
    Baggage,
    HboneRequest,
    format_authority,  # (ip, port) -> "10.244.1.10:9080", "[fd00::a]:9080"
    format_baggage,  # Baggage -> "k8s.cluster.name=...,k8s.namespace.name=...,..."
    format_traceparent,  # (trace_id) -> "00-<trace id>-<random span id>-00"
)


def create_hbone_request(dst_ip, dst_port, *, src_ip, src_port, service_host=None, baggage=None, trace_id=None):
    # TODO: the authority, and the headers baggage, forwarded and traceparent, in that order.
    return HboneRequest(authority=dst_ip, headers=[])
