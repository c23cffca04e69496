"""Exercise 05: ztunnel's outbound decision (istio/ztunnel src/proxy/outbound.rs, build_request).

state.find_destination(ip) -> a Service (a ClusterIP), a Workload (a pod IP), or None.
service.waypoint / workload.waypoint: a waypoint to go through, or None.
is_from_waypoint(state, source, waypoint): the source is that very waypoint (do not loop back).
via_waypoint(state, source, original_dst, waypoint, rng, service, workload) -> the plan through it.
state.load_balance(service, port, rng) -> (workload, target_port), or None when no pod serves it.
to_workload(source, original_dst, workload, target_port, service) -> HBONE or TCP to that pod.
"""

from lab.ztunnel.proxy.decision import NoHealthyUpstream, Passthrough, is_from_waypoint, to_workload, via_waypoint  # noqa: F401
from lab.ztunnel.state import Service, Workload  # noqa: F401


def build_request(state, source, original_dst, rng):
    ip, port = original_dst
    # TODO: decide. Today every connection leaves as plain TCP to where the app wanted to go:
    # nothing is encrypted and no waypoint is ever used.
    return Passthrough(original_dst=original_dst, source=source,
                       reason="the learner's stub passes every connection through")
