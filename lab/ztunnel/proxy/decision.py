"""The outbound decision: how ztunnel reaches the app's original destination
(zt:src/proxy/outbound.rs `build_request`).

When an app in a meshed pod connects somewhere, its pod's REDIRECT rule hands the connection to
ztunnel's 15001 listener, and ztunnel must decide, from its xDS state alone, what to do with
the original destination `ip:port`. In order:

1. The IP is a service VIP and the service has a waypoint -> HBONE to the waypoint
   (`waypointIP:15008`), with `:authority` = the original VIP:port, expecting the waypoint's
   identity. The waypoint picks the backend later.
2. The IP is a service VIP -> load balancing picks a backend pod and its target port.
   No backend left -> `NoHealthyUpstream` (unless the service's load-balancing mode is
   PASSTHROUGH, then step 4).
3. The IP is a pod IP whose workload has a waypoint -> HBONE to that waypoint.
4. The IP is unknown -> `Passthrough`: plain TCP to the original destination (not in the mesh).
5. The destination workload speaks HBONE (`tunnel_protocol: HBONE`) -> `Hbone` to
   `podIP:15008`, `:authority` = `podIP:targetPort`, expecting the pod's SPIFFE identity
   (plus the service's subject_alt_names). Otherwise -> `Tcp` to `podIP:targetPort`.

Traffic from a waypoint to the workloads it serves is not sent back to that waypoint
(zt `check_from_waypoint`). `build_request` is pure: state in, a plan out; the data path
(lab/ztunnel/proxy/outbound.py) carries the plan out and the events print its fields.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar

from lab.hbone.headers import format_authority
from lab.tls.identity import Identity
from lab.ztunnel.socket import format_addr
from lab.ztunnel.state import HBONE_PORT, GatewayAddress, ProxyState, Service, Workload

Addr = tuple[str, int]


def _addr(a: Addr | None) -> str:
    """`ip:port` for sentences and event fields (the addresses come from the kernel or xDS,
    already valid: no re-parsing on the data path)."""
    return format_addr(a)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Common to every outcome: where the app wanted to go, who is asking, what was found, why."""

    original_dst: Addr
    reason: str
    source: Workload | None = None
    destination_service: Service | None = None
    destination_workload: Workload | None = None

    #: "HBONE" or "TCP" (what goes on the wire), "" when nothing is sent.
    protocol: ClassVar[str] = ""

    @property
    def kind(self) -> str:
        return type(self).__name__

    @property
    def upstream(self) -> Addr | None:
        """The TCP next hop ztunnel connects to from inside the source pod (None: refuse)."""
        return None

    @property
    def source_identity(self) -> Identity | None:
        """Whose certificate ztunnel presents: the SOURCE workload's, not its own."""
        return self.source.identity if self.source else None

    @property
    def actual_destination_workload(self) -> Workload | None:
        """The workload this connection really reaches, which the access log (`dst.workload`) and
        the metrics (`destination_workload`, `destination_principal`) name (zt build_request's
        `actual_destination_workload`)."""
        return self.destination_workload

    def event_fields(self) -> dict[str, Any]:
        """The plan as plain JSON-friendly fields, for the `ztunnel.outbound.plan` event."""
        f: dict[str, Any] = {
            "plan": self.kind,
            "protocol": self.protocol,
            "original_dst": _addr(self.original_dst),
            "upstream": _addr(self.upstream),
            "reason": self.reason,
        }
        if self.source is not None:
            f["src_workload"] = self.source.name
            f["src_namespace"] = self.source.namespace
            f["src_identity"] = str(self.source_identity)
        if self.destination_service is not None:
            f["dst_service"] = self.destination_service.hostname
        if self.destination_workload is not None:
            f["dst_workload"] = self.destination_workload.name
            f["dst_namespace"] = self.destination_workload.namespace
            f["dst_identity"] = str(self.destination_workload.identity)
        return f


@dataclass(frozen=True, kw_only=True)
class Hbone(Plan):
    """mTLS to `hbone_dst` (port 15008), then `CONNECT authority` over HTTP/2.

    The server must present one of `expected_identities`. `waypoint` is set when the next hop
    is a waypoint rather than the destination pod itself.
    """

    hbone_dst: Addr
    target: Addr  # what the :authority names: podIP:targetPort, or VIP:port via a waypoint
    expected_identities: tuple[Identity, ...]
    waypoint: Workload | None = None
    protocol: ClassVar[str] = "HBONE"

    @property
    def upstream(self) -> Addr:
        return self.hbone_dst

    @property
    def actual_destination_workload(self) -> Workload | None:
        """Via a waypoint, the waypoint pod: the source's telemetry names the waypoint, consistent
        with the identity it presented (`dst.identity`), not the service's pods behind it."""
        return self.waypoint or self.destination_workload

    @property
    def authority(self) -> str:
        """The CONNECT `:authority`, e.g. `10.244.1.10:9080`."""
        return format_authority(*self.target)

    def event_fields(self) -> dict[str, Any]:
        f = super().event_fields()
        f["authority"] = self.authority
        f["expected_identities"] = [str(i) for i in self.expected_identities]
        if self.waypoint is not None:
            f["waypoint"] = self.waypoint.name
        return f


@dataclass(frozen=True, kw_only=True)
class Tcp(Plan):
    """Plain TCP to a known workload that is not in the mesh (tunnel_protocol NONE)."""

    dst: Addr
    protocol: ClassVar[str] = "TCP"

    @property
    def upstream(self) -> Addr:
        return self.dst


@dataclass(frozen=True, kw_only=True)
class Passthrough(Plan):
    """Plain TCP to the original destination: it is not a known workload or service."""

    protocol: ClassVar[str] = "TCP"

    @property
    def upstream(self) -> Addr:
        return self.original_dst


@dataclass(frozen=True, kw_only=True)
class Failure(Plan):
    """No way to reach the destination; ztunnel closes the app's connection with `error`."""

    error: ClassVar[str] = ""

    def event_fields(self) -> dict[str, Any]:
        f = super().event_fields()
        f["error"] = self.error
        return f


@dataclass(frozen=True, kw_only=True)
class NoHealthyUpstream(Failure):
    """A known service with no endpoint to send to (zt `Error::NoHealthyUpstream`)."""

    error: ClassVar[str] = "no healthy upstream"


@dataclass(frozen=True, kw_only=True)
class UnknownWaypoint(Failure):
    """The destination has a waypoint that ztunnel cannot resolve to a pod (zt `UnknownWaypoint`)."""

    waypoint_address: GatewayAddress
    error: ClassVar[str] = "unknown waypoint"


# ---------------------------------------------------------------------------------------------


def is_from_waypoint(state: ProxyState, source: Workload | None, gw: GatewayAddress) -> bool:
    """Is the source itself this waypoint? Then do not send its traffic back to it."""
    if source is None:
        return False
    found = state.find_gateway(gw)
    if isinstance(found, Workload):
        return found.uid == source.uid
    if isinstance(found, Service):
        return found.key in source.services
    return False


def via_waypoint(state: ProxyState, source: Workload | None, original_dst: Addr, gw: GatewayAddress,
                  rng: random.Random, service: Service | None, workload: Workload | None) -> Plan:
    """HBONE to the waypoint in front of `service` (or `workload`), authority = original dst."""
    what = f"service {service.hostname}" if service else f"pod {workload.name if workload else '?'}"
    found = state.find_gateway(gw)
    waypoint: Workload | None = None
    port = gw.hbone_mtls_port
    sans: list[Identity] = []
    if isinstance(found, Service):
        picked = state.load_balance(found, gw.hbone_mtls_port, rng)
        if picked is not None:
            waypoint, port = picked
            sans = found.san_identities()
    elif isinstance(found, Workload) and found.addresses:
        waypoint = found
    if waypoint is None:
        return UnknownWaypoint(
            original_dst=original_dst, source=source, destination_service=service,
            destination_workload=workload, waypoint_address=gw,
            reason=f"{what} uses waypoint {gw}, but ztunnel knows no pod for it: the connection is refused")
    expected = tuple(dict.fromkeys([waypoint.identity, *sans]))
    hbone_dst = (waypoint.addresses[0], port)
    return Hbone(
        original_dst=original_dst, source=source, destination_service=service,
        destination_workload=workload, waypoint=waypoint, hbone_dst=hbone_dst, target=original_dst,
        expected_identities=expected,
        reason=(f"{what} has a waypoint, so ztunnel sends the connection over HBONE to waypoint pod "
                f"{waypoint.name} ({_addr(hbone_dst)}) with CONNECT {_addr(original_dst)} (the original "
                f"destination); the waypoint applies L7 routing and policy and picks the backend"))


def build_request(state: ProxyState, source: Workload | None, original_dst: Addr,
                  rng: random.Random | None = None) -> Plan:
    """Decide how to reach `original_dst` for an app in `source` (zt `build_request`; order in
    the module docstring). Pure: reads `state`, uses `rng` only for load balancing."""
    rng = rng or random.Random()
    ip, port = original_dst
    dest = state.find_destination(ip)
    service: Service | None = None

    if isinstance(dest, Service):
        service = dest
        if service.waypoint is not None and not is_from_waypoint(state, source, service.waypoint):
            return via_waypoint(state, source, original_dst, service.waypoint, rng, service, None)
        if service.lb_mode == "PASSTHROUGH":
            # zt find_upstream: OriginalDestination whatever the endpoints, and no intended service
            return Passthrough(
                original_dst=original_dst, source=source,
                reason=(f"{_addr(original_dst)} is service {service.hostname}, whose load-balancing mode is "
                        f"PASSTHROUGH: ztunnel picks no endpoint and sends plain TCP to the original destination"))
        picked = state.load_balance(service, port, rng)
        if picked is None:
            why = ("it has no port " + str(port) if service.target_port(port) is None
                   else f"none of its endpoints is a known, healthy pod serving port {port}")
            return NoHealthyUpstream(
                original_dst=original_dst, source=source, destination_service=service,
                reason=(f"{_addr(original_dst)} is the VIP of service {service.hostname}, but {why}: "
                        f"ztunnel closes the connection (no healthy upstream)"))
        workload, target_port = picked
        dst_ip = workload.addresses[0]
        found = (f"{_addr(original_dst)} is the VIP of service {service.hostname}; load balancing "
                 f"picked pod {workload.name} ({dst_ip}, port {port} -> {target_port})")
    elif isinstance(dest, Workload):
        workload, target_port, dst_ip = dest, port, ip
        if workload.waypoint is not None and not is_from_waypoint(state, source, workload.waypoint):
            return via_waypoint(state, source, original_dst, workload.waypoint, rng, None, workload)
        found = f"{ip} is the IP of pod {workload.namespace}/{workload.name}"
    else:
        return Passthrough(
            original_dst=original_dst, source=source,
            reason=(f"{ip} is neither a known pod nor a service VIP, so the destination is outside the "
                    f"mesh: ztunnel passes the connection through as plain TCP to {_addr(original_dst)}"))

    return to_workload(source, original_dst, workload, target_port, service, found)


def to_workload(source: Workload | None, original_dst: Addr, workload: Workload, target_port: int,
                service: Service | None, found: str = "") -> Plan:
    """The last step of the decision: to the chosen pod itself, HBONE to its 15008 if it is in
    the mesh (tunnel_protocol HBONE), else plain TCP to its port (zt build_request's tail)."""
    dst_ip = workload.addresses[0]
    found = found or f"the destination is pod {workload.namespace}/{workload.name}"
    if workload.hbone:
        sans = service.san_identities() if service else []
        expected = tuple(dict.fromkeys([workload.identity, *sans]))
        hbone_dst = (dst_ip, HBONE_PORT)
        target = (dst_ip, target_port)
        return Hbone(
            original_dst=original_dst, source=source, destination_service=service,
            destination_workload=workload, hbone_dst=hbone_dst, target=target,
            expected_identities=expected,
            reason=(f"{found}; the pod is in the mesh (tunnel_protocol HBONE), so ztunnel opens mTLS to "
                    f"{_addr(hbone_dst)} expecting identity {workload.identity} and sends "
                    f"CONNECT {_addr(target)}"))
    dst = (dst_ip, target_port)
    return Tcp(
        original_dst=original_dst, source=source, destination_service=service,
        destination_workload=workload, dst=dst,
        reason=(f"{found}; the pod is not in the mesh (tunnel_protocol NONE), so ztunnel connects to "
                f"{_addr(dst)} with plain TCP"))
