"""What the four bookinfo services share: where their upstreams are, and which headers travel.

Bookinfo's services find each other by Service name (``http://details:9080``), so the request
goes through the cluster's DNS and Service VIP, and therefore through kube-proxy or ztunnel.
The real images let the environment override the names (``DETAILS_HOSTNAME``,
``SERVICES_DOMAIN``, ...) and ports (``DETAILS_SERVICE_PORT``, which Kubernetes also injects
into every pod for each Service); so do these, which is how the tests run them on loopback.

Tracing: Istio's proxies can only stitch a trace together if each app copies the trace headers
of the request it is serving onto the requests it makes. Bookinfo's apps do that with the list
below (the lab adds W3C ``baggage`` and single-header ``b3``).
"""

from __future__ import annotations

import os

FORWARD_HEADERS: tuple[str, ...] = (
    "x-request-id",  # every app should propagate it: Istio's access logs carry it
    "x-ot-span-context",  # Lightstep
    "x-datadog-trace-id", "x-datadog-parent-id", "x-datadog-sampling-priority",
    "traceparent", "tracestate", "baggage",  # W3C Trace Context and Baggage
    "x-cloud-trace-context", "grpc-trace-bin",  # OpenCensus / Stackdriver
    "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "b3",
    "sw8",  # SkyWalking
    "end-user", "user-agent",  # application headers: end-user drives the "jason" routing task
    "cookie", "authorization", "jwt",  # session and credentials
)


def upstream(service: str, environ: dict[str, str] | None = None) -> tuple[str, int]:
    """(host, port) of a bookinfo Service as the real apps compute it from the environment.

    ``upstream("details")`` is ``("details", 9080)`` unless ``DETAILS_HOSTNAME``,
    ``SERVICES_DOMAIN`` or ``DETAILS_SERVICE_PORT`` say otherwise.
    """
    env = os.environ if environ is None else environ
    prefix = service.upper()
    host = env.get(f"{prefix}_HOSTNAME") or service
    domain = env.get("SERVICES_DOMAIN")
    if domain:
        host = f"{host}.{domain}"
    port = int(env.get(f"{prefix}_SERVICE_PORT") or 9080)
    return host, port


def pod_name(option: str) -> str:
    """The pod's name: the supervisor passes it; the real apps read ``$HOSTNAME``."""
    return option or os.environ.get("HOSTNAME", "") or "unknown"


def product_id_of(segment: str) -> int | None:
    """A path segment as a non-negative integer id, or None when it is not one."""
    return int(segment) if segment.isascii() and segment.isdigit() else None
