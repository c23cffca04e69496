"""Solution of exercise 06: the CONNECT request a source ztunnel sends."""

from lab.hbone.headers import Baggage, HboneRequest, format_authority, format_baggage, format_traceparent  # noqa: F401


def create_hbone_request(dst_ip, dst_port, *, src_ip, src_port, service_host=None, baggage=None, trace_id=None):
    headers = []
    if baggage is not None and format_baggage(baggage):
        headers.append(("baggage", format_baggage(baggage)))
    forwarded = f'for="{format_authority(src_ip, src_port)}"' + (f";host={service_host}" if service_host else "")
    headers.append(("forwarded", forwarded))
    headers.append(("traceparent", format_traceparent(trace_id)))
    return HboneRequest(authority=format_authority(dst_ip, dst_port), headers=headers)
