"""Solution of exercise 05: ztunnel's outbound decision."""

from lab.ztunnel.proxy.decision import NoHealthyUpstream, Passthrough, is_from_waypoint, to_workload, via_waypoint
from lab.ztunnel.state import Service, Workload


def build_request(state, source, original_dst, rng):
    ip, port = original_dst
    dest = state.find_destination(ip)
    if isinstance(dest, Service):
        if dest.waypoint is not None and not is_from_waypoint(state, source, dest.waypoint):
            return via_waypoint(state, source, original_dst, dest.waypoint, rng, dest, None)
        picked = state.load_balance(dest, port, rng)
        if picked is None:
            return NoHealthyUpstream(original_dst=original_dst, source=source, destination_service=dest,
                                     reason=f"service {dest.hostname} has no healthy endpoint for port {port}")
        workload, target_port = picked
        return to_workload(source, original_dst, workload, target_port, dest)
    if isinstance(dest, Workload):
        if dest.waypoint is not None and not is_from_waypoint(state, source, dest.waypoint):
            return via_waypoint(state, source, original_dst, dest.waypoint, rng, None, dest)
        return to_workload(source, original_dst, dest, port, None)
    return Passthrough(original_dst=original_dst, source=source, reason=f"{ip} is outside the mesh")
