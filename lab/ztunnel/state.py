"""What a ztunnel knows about the mesh: workloads, services, policies (zt:src/state.rs,
zt:src/state/{workload,service,policy}.rs).

istiod pushes two xDS types to every ztunnel (lab/proto/xds.py):

- `istio.workload.Address`, a oneof of
  - `Workload` (key: uid): one pod, with its IPs, its node, its identity (trust domain +
    namespace + service account), `tunnel_protocol` (HBONE once the pod is in the mesh, NONE
    otherwise), the services it backs (`services`: "ns/hostname" -> service port -> target
    port), its selector policies and its `capacity`;
  - `Service` (key: "namespace/hostname"): a ClusterIP service, with its VIPs, ports, optional
    waypoint and load-balancing settings;
- `istio.security.Authorization` (key: "namespace/name"): L4 policies (lab/ztunnel/rbac.py).

`ProxyState` is ztunnel's in-memory copy. It answers the questions the data path asks:
who is this IP (`find_destination`), which pod serves this service port (`load_balance`: a
random pick weighted by capacity, as zt `load_balance` does; the docs call it "round robin"),
which identity does a workload have (`identity`), which policies apply to it (`policies_for`).

Service endpoints are not sent as such: like ztunnel, the state derives them from each
Workload's `services` map, so a service knows its backends as soon as their workloads arrive.
Resources are dicts with workload.proto field names; they are parsed into the dataclasses below
(a resource that does not parse is rejected, and the xDS client NACKs it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lab.proto.xds import ADDRESS_TYPE, AUTHORIZATION_TYPE, Resource
from lab.tls.identity import DEFAULT_TRUST_DOMAIN, Identity
from lab.ztunnel.rbac import (
    NO_WORKLOAD,
    Authorization,
    Connection,
    Decision,
    InvalidAuthorization,
    assert_rbac,
)

#: The port every HBONE listener uses (GatewayAddress.hbone_mtls_port's default).
HBONE_PORT = 15008
TUNNEL_PROTOCOLS = ("NONE", "HBONE", "LEGACY_ISTIO_MTLS")
HEALTH = ("HEALTHY", "UNHEALTHY")
WORKLOAD_TYPES = ("DEPLOYMENT", "CRONJOB", "POD", "JOB")
LB_MODES = ("UNSPECIFIED_MODE", "STRICT", "FAILOVER", "PASSTHROUGH")
HEALTH_POLICIES = ("ONLY_HEALTHY", "ALLOW_ALL")
DEFAULT_SERVICE_ACCOUNT = "default"


class InvalidResource(ValueError):
    """A resource ztunnel cannot use; the xDS client NACKs the response carrying it."""


# ---------------------------------------------------------------------------------------------
# Parsing helpers (dicts with proto field names -> plain values)


def _str(d: Mapping[str, Any], key: str, default: str = "", required: bool = False) -> str:
    value = d.get(key)
    if value is None or value == "":
        if required:
            raise InvalidResource(f"{key} is required")
        return default
    if not isinstance(value, str):
        raise InvalidResource(f"{key} must be a string, got {value!r}")
    return value


def _ip(value: Any, what: str) -> str:
    """An IP as text. NetworkAddress objects {network, address} are accepted too."""
    if isinstance(value, Mapping):
        value = value.get("address")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise InvalidResource(f"{what}: not an IP address: {value!r}") from None


def _port(value: Any, what: str) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise InvalidResource(f"{what}: not a port number: {value!r}") from None
    if isinstance(value, bool) or not 0 <= port < 65536:
        raise InvalidResource(f"{what}: not a port number: {value!r}")
    return port


def _enum(value: Any, allowed: tuple[str, ...], what: str, default: str) -> str:
    if value is None or value == "":
        return default
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(allowed):
        return allowed[value]
    if isinstance(value, str) and value.upper() in allowed:
        return value.upper()
    raise InvalidResource(f"unknown {what} {value!r} (expected one of {', '.join(allowed)})")


def _strings(d: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = d.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidResource(f"{key} must be a list of strings, got {value!r}")
    return tuple(value)


def _port_map(value: Any, what: str) -> dict[int, int]:
    """A workload's ports for one service: service port -> target port.

    Accepts {"9080": 9080}, a PortList {"ports": [{service_port, target_port}]} or that list.
    """
    if isinstance(value, Mapping) and "ports" in value:
        value = value["ports"]
    if isinstance(value, list):
        out = {}
        for p in value:
            if not isinstance(p, Mapping):
                raise InvalidResource(f"{what}: expected {{service_port, target_port}}, got {p!r}")
            out[_port(p.get("service_port"), what)] = _port(p.get("target_port", 0), what)
        return out
    if isinstance(value, Mapping):
        return {_port(k, what): _port(v, what) for k, v in value.items()}
    raise InvalidResource(f"{what}: expected a port map, got {value!r}")


# ---------------------------------------------------------------------------------------------
# The resources


@dataclass(frozen=True)
class GatewayAddress:
    """Where a waypoint (or network gateway) is: an IP or a namespaced hostname, plus the HBONE
    port (zt:proto/workload.proto GatewayAddress)."""

    address: str | None = None
    hostname: str | None = None
    namespace: str | None = None
    hbone_mtls_port: int = HBONE_PORT

    @classmethod
    def parse(cls, value: Any, what: str = "waypoint") -> GatewayAddress | None:
        if value is None or value == {}:
            return None
        if not isinstance(value, Mapping):
            raise InvalidResource(f"{what}: expected a GatewayAddress object, got {value!r}")
        port = _port(value.get("hbone_mtls_port") or HBONE_PORT, what)
        if value.get("address"):
            return cls(address=_ip(value["address"], what), hbone_mtls_port=port)
        host = value.get("hostname")
        if isinstance(host, Mapping) and host.get("hostname"):
            return cls(hostname=str(host["hostname"]), namespace=str(host.get("namespace", "")),
                       hbone_mtls_port=port)
        raise InvalidResource(f"{what}: a GatewayAddress needs an address or a hostname: {value!r}")

    def __str__(self) -> str:
        where = self.address if self.address else f"{self.namespace}/{self.hostname}"
        return f"{where}:{self.hbone_mtls_port}"


@dataclass(frozen=True)
class Workload:
    """One pod as ztunnel sees it (zt `state::workload::Workload`)."""

    uid: str
    name: str
    namespace: str
    addresses: tuple[str, ...] = ()
    node: str = ""
    network: str = ""
    hostname: str = ""
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    tunnel_protocol: str = "NONE"
    native_tunnel: bool = False
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_type: str = ""
    workload_name: str = ""
    services: Mapping[str, Mapping[int, int]] = field(default_factory=dict, hash=False)
    authorization_policies: tuple[str, ...] = ()
    status: str = "HEALTHY"
    capacity: int = 1
    waypoint: GatewayAddress | None = None
    cluster_id: str = ""

    @classmethod
    def from_resource(cls, d: Any) -> Workload:
        """Parse a Workload dict (workload.proto field names); InvalidResource if it is unusable.

        Elided proto defaults come back: service_account "default", trust_domain
        "cluster.local", capacity 1, status HEALTHY, tunnel_protocol NONE.
        """
        if not isinstance(d, Mapping):
            raise InvalidResource(f"a Workload must be an object, got {type(d).__name__}")
        services = d.get("services") or {}
        if not isinstance(services, Mapping):
            raise InvalidResource(f"services must be an object, got {services!r}")
        addresses = d.get("addresses") or []
        if not isinstance(addresses, list):
            raise InvalidResource(f"addresses must be a list, got {addresses!r}")
        capacity = d.get("capacity")
        if capacity is None:
            capacity = 1
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise InvalidResource(f"capacity must be a non-negative integer, got {capacity!r}")
        return cls(
            uid=_str(d, "uid", required=True),
            name=_str(d, "name", required=True),
            namespace=_str(d, "namespace", required=True),
            addresses=tuple(_ip(a, "addresses") for a in addresses),
            node=_str(d, "node"),
            network=_str(d, "network"),
            hostname=_str(d, "hostname"),
            service_account=_str(d, "service_account", DEFAULT_SERVICE_ACCOUNT),
            trust_domain=_str(d, "trust_domain", DEFAULT_TRUST_DOMAIN),
            tunnel_protocol=_enum(d.get("tunnel_protocol"), TUNNEL_PROTOCOLS, "tunnel_protocol", "NONE"),
            native_tunnel=bool(d.get("native_tunnel", False)),
            canonical_name=_str(d, "canonical_name"),
            canonical_revision=_str(d, "canonical_revision"),
            workload_type=_enum(d.get("workload_type"), WORKLOAD_TYPES, "workload_type", "DEPLOYMENT"),
            workload_name=_str(d, "workload_name"),
            services={str(k): _port_map(v, f"services[{k}]") for k, v in services.items()},
            authorization_policies=_strings(d, "authorization_policies"),
            status=_enum(d.get("status"), HEALTH, "status", "HEALTHY"),
            capacity=capacity,
            waypoint=GatewayAddress.parse(d.get("waypoint")),
            cluster_id=_str(d, "cluster_id"),
        )

    @property
    def identity(self) -> Identity:
        """spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>."""
        return Identity(self.trust_domain, self.namespace, self.service_account)

    @property
    def hbone(self) -> bool:
        """In the mesh: peers reach it with HBONE on port 15008."""
        return self.tunnel_protocol == "HBONE"


@dataclass(frozen=True)
class ServicePort:
    service_port: int
    target_port: int  # 0: a named port, resolved per endpoint
    app_protocol: str = ""


@dataclass(frozen=True)
class Service:
    """A Kubernetes Service as ztunnel sees it (zt `state::service::Service`)."""

    name: str
    namespace: str
    hostname: str
    addresses: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    subject_alt_names: tuple[str, ...] = ()
    waypoint: GatewayAddress | None = None
    lb_mode: str = "UNSPECIFIED_MODE"
    health_policy: str = "ONLY_HEALTHY"

    @classmethod
    def from_resource(cls, d: Any) -> Service:
        if not isinstance(d, Mapping):
            raise InvalidResource(f"a Service must be an object, got {type(d).__name__}")
        addresses = d.get("addresses") or []
        ports = d.get("ports") or []
        if not isinstance(addresses, list) or not isinstance(ports, list):
            raise InvalidResource("addresses and ports must be lists")
        parsed_ports = []
        for p in ports:
            if not isinstance(p, Mapping):
                raise InvalidResource(f"ports: expected {{service_port, target_port}}, got {p!r}")
            parsed_ports.append(ServicePort(_port(p.get("service_port"), "ports"),
                                            _port(p.get("target_port") or 0, "ports"),
                                            str(p.get("app_protocol") or "")))
        lb = d.get("load_balancing") or {}
        if not isinstance(lb, Mapping):
            raise InvalidResource(f"load_balancing must be an object, got {lb!r}")
        return cls(
            name=_str(d, "name", required=True),
            namespace=_str(d, "namespace", required=True),
            hostname=_str(d, "hostname", required=True),
            addresses=tuple(_ip(a, "addresses") for a in addresses),
            ports=tuple(parsed_ports),
            subject_alt_names=_strings(d, "subject_alt_names"),
            waypoint=GatewayAddress.parse(d.get("waypoint")),
            lb_mode=_enum(lb.get("mode"), LB_MODES, "load_balancing.mode", "UNSPECIFIED_MODE"),
            health_policy=_enum(lb.get("health_policy"), HEALTH_POLICIES, "load_balancing.health_policy",
                                "ONLY_HEALTHY"),
        )

    @property
    def key(self) -> str:
        """The xDS name and the key of workloads' `services` maps: "namespace/hostname"."""
        return f"{self.namespace}/{self.hostname}"

    def target_port(self, service_port: int) -> int | None:
        """The service's target port for `service_port` (0 = named, per endpoint); None if the
        service has no such port."""
        for p in self.ports:
            if p.service_port == service_port:
                return p.target_port
        return None

    def san_identities(self) -> list[Identity]:
        """subject_alt_names that parse as SPIFFE identities (extra identities a backend may
        present, e.g. for a service spanning service accounts)."""
        out = []
        for san in self.subject_alt_names:
            try:
                out.append(Identity.parse(san))
            except ValueError:
                continue
        return out


def parse_address(resource: Any) -> Workload | Service:
    """`istio.workload.Address` = oneof {workload, service}."""
    if isinstance(resource, Mapping):
        if "workload" in resource and "service" not in resource:
            return Workload.from_resource(resource["workload"])
        if "service" in resource and "workload" not in resource:
            return Service.from_resource(resource["service"])
    raise InvalidResource("an Address must hold exactly one of 'workload' or 'service'")


# ---------------------------------------------------------------------------------------------
# Weighted random choice


T = TypeVar("T")


def weighted_choice(items: Sequence[T], weights: Sequence[int], rng: random.Random) -> T | None:
    """Pick one item at random with probability weight/sum(weights); None if nothing has weight
    (ztunnel's `choose_weighted` over endpoints, weights = workload capacity)."""
    total = sum(weights)
    if total <= 0:
        return None
    point = rng.random() * total
    for item, weight in zip(items, weights):
        if point < weight:
            return item
        point -= weight
    return next(i for i, w in zip(reversed(items), reversed(weights)) if w > 0)  # float edge


# ---------------------------------------------------------------------------------------------
# The state


@dataclass
class ApplyResult:
    """What one xDS response changed (names as in the response)."""

    type_url: str
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # name -> why it did not parse

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.removed)


class ProxyState:
    """ztunnel's view of the mesh (zt `ProxyState`: WorkloadStore, ServiceStore, PolicyStore).

    Indexes: workloads by uid and by IP, services by "ns/hostname" and by VIP, policies by
    "ns/name" and by namespace (GLOBAL ones under ""), endpoints by service key.
    """

    def __init__(self) -> None:
        self.workloads: dict[str, Workload] = {}
        self._workload_by_ip: dict[str, str] = {}
        self.services: dict[str, Service] = {}
        self._service_by_vip: dict[str, str] = {}
        self.policies: dict[str, Authorization] = {}
        self._policies_by_ns: dict[str, set[str]] = {}
        # service key -> workload uid -> {service port: target port}
        self._endpoints: dict[str, dict[str, dict[int, int]]] = {}

    # ------------------------------------------------------------------ updates

    def apply(self, type_url: str, resources: Iterable[Resource | tuple[str, Any]],
              removed: Iterable[str] = ()) -> ApplyResult:
        """Apply one delta: insert or replace `resources`, delete `removed` names.

        A resource that does not parse is skipped and listed in `rejected` (the rest still
        applies, as ztunnel's handlers do); the xDS client then NACKs the response.
        """
        if type_url not in (ADDRESS_TYPE, AUTHORIZATION_TYPE):
            raise ValueError(f"unknown type_url {type_url!r}")
        result = ApplyResult(type_url)
        for item in resources:
            name, body = (item.name, item.resource) if isinstance(item, Resource) else item
            try:
                if type_url == ADDRESS_TYPE:
                    existed = self._insert_address(name, parse_address(body))
                else:
                    existed = self._insert_policy(name, Authorization.from_resource(body))
            except (InvalidResource, InvalidAuthorization) as e:
                result.rejected[name] = str(e)
                continue
            (result.updated if existed else result.added).append(name)
        for name in removed:
            if type_url == ADDRESS_TYPE:
                gone = self.remove_workload(name) or self.remove_service(name)
            else:
                gone = self.remove_policy(name)
            if gone:
                result.removed.append(name)
        return result

    def _insert_address(self, name: str, addr: Workload | Service) -> bool:
        if isinstance(addr, Workload):
            if name and name != addr.uid:
                raise InvalidResource(f"resource name {name!r} is not the workload uid {addr.uid!r}")
            return self.insert_workload(addr)
        if name and name != addr.key:
            raise InvalidResource(f"resource name {name!r} is not the service key {addr.key!r}")
        return self.insert_service(addr)

    def _insert_policy(self, name: str, policy: Authorization) -> bool:
        if name and name != policy.key:
            raise InvalidResource(f"resource name {name!r} is not the policy key {policy.key!r}")
        return self.insert_policy(policy)

    def insert_workload(self, w: Workload) -> bool:
        """Insert or replace a workload; returns whether it replaced one."""
        existed = self.remove_workload(w.uid)
        self.workloads[w.uid] = w
        for ip in w.addresses:
            self._workload_by_ip[ip] = w.uid
        for svc_key, ports in w.services.items():
            self._endpoints.setdefault(svc_key, {})[w.uid] = dict(ports)
        return existed

    def remove_workload(self, uid: str) -> bool:
        w = self.workloads.pop(uid, None)
        if w is None:
            return False
        for ip in w.addresses:
            if self._workload_by_ip.get(ip) == uid:
                del self._workload_by_ip[ip]
        for svc_key in w.services:
            eps = self._endpoints.get(svc_key, {})
            eps.pop(uid, None)
            if not eps:
                self._endpoints.pop(svc_key, None)
        return True

    def insert_service(self, s: Service) -> bool:
        existed = self.remove_service(s.key)
        self.services[s.key] = s
        for vip in s.addresses:
            self._service_by_vip[vip] = s.key
        return existed

    def remove_service(self, key: str) -> bool:
        s = self.services.pop(key, None)
        if s is None:
            return False
        for vip in s.addresses:
            if self._service_by_vip.get(vip) == key:
                del self._service_by_vip[vip]
        return True

    def insert_policy(self, p: Authorization) -> bool:
        existed = self.remove_policy(p.key)
        self.policies[p.key] = p
        bucket = self._policy_bucket(p)
        if bucket is not None:
            self._policies_by_ns.setdefault(bucket, set()).add(p.key)
        return existed

    def remove_policy(self, key: str) -> bool:
        p = self.policies.pop(key, None)
        if p is None:
            return False
        bucket = self._policy_bucket(p)
        if bucket is not None:
            self._policies_by_ns.get(bucket, set()).discard(key)
        return True

    @staticmethod
    def _policy_bucket(p: Authorization) -> str | None:
        """GLOBAL policies apply everywhere (ztunnel files them under namespace ""), NAMESPACE ones
        to their namespace; WORKLOAD_SELECTOR ones only through Workload.authorization_policies."""
        if p.scope == "GLOBAL":
            return ""
        if p.scope == "NAMESPACE":
            return p.namespace
        return None

    # ------------------------------------------------------------------ lookups

    def workload_by_ip(self, ip: str) -> Workload | None:
        uid = self._workload_by_ip.get(ip)
        return self.workloads.get(uid) if uid else None

    def service_by_vip(self, ip: str) -> Service | None:
        key = self._service_by_vip.get(ip)
        return self.services.get(key) if key else None

    def find_destination(self, ip: str) -> Workload | Service | None:
        """Who is `ip`? A workload (pod IP) first, then a service VIP (zt `find_address`)."""
        return self.workload_by_ip(ip) or self.service_by_vip(ip)

    def find_gateway(self, gw: GatewayAddress) -> Workload | Service | None:
        """Resolve a waypoint's GatewayAddress to the workload or service it names."""
        if gw.address is not None:
            return self.find_destination(gw.address)
        return self.services.get(f"{gw.namespace}/{gw.hostname}")

    def endpoints(self, service: Service) -> dict[str, dict[int, int]]:
        """The service's backends: workload uid -> {service port: target port}."""
        return {uid: dict(ports) for uid, ports in self._endpoints.get(service.key, {}).items()}

    def services_of(self, workload: Workload) -> list[Service]:
        """The known services `workload` backs."""
        return [self.services[k] for k in sorted(workload.services) if k in self.services]

    def workloads_on_node(self, node: str) -> list[Workload]:
        return sorted((w for w in self.workloads.values() if w.node == node), key=lambda w: w.uid)

    def identity(self, workload: Workload) -> Identity:
        """The SPIFFE identity of a workload: its certificate's URI SAN."""
        return workload.identity

    def load_balance(self, service: Service, port: int,
                     rng: random.Random | None = None) -> tuple[Workload, int] | None:
        """Pick a backend for `service`:`port` (zt:src/state.rs `load_balance`).

        1. keep endpoints whose workload exists, has an address, is healthy (unless the service's
           health_policy is ALLOW_ALL) and serves the port (its own target port for this service
           port, else the service's target port if that is not a named port);
        2. choose one at random, weighted by the workload's `capacity`.

        Returns (workload, target port), or None: the port is not a service port, or no
        endpoint is left. (Locality routing preferences are not modelled.)
        """
        rng = rng or random.Random()
        svc_target = service.target_port(port)
        if svc_target is None:
            return None
        candidates: list[tuple[Workload, int]] = []
        for uid, ports in sorted(self._endpoints.get(service.key, {}).items()):
            w = self.workloads.get(uid)
            if w is None or not w.addresses:
                continue
            if service.health_policy != "ALLOW_ALL" and w.status != "HEALTHY":
                continue
            target = ports.get(port) or svc_target
            if not target:
                continue
            candidates.append((w, target))
        return weighted_choice(candidates, [w.capacity for w, _ in candidates], rng)

    # ------------------------------------------------------------------ authorization

    def policies_for(self, workload: Workload) -> list[Authorization]:
        """The policies ztunnel evaluates for a connection to `workload`: the NAMESPACE policies
        of its namespace, the GLOBAL ones (root namespace), and its own selector policies."""
        keys: list[str] = []
        keys += sorted(self._policies_by_ns.get(workload.namespace, ()))
        keys += sorted(self._policies_by_ns.get("", ()))
        keys += list(workload.authorization_policies)
        seen, out = set(), []
        for k in keys:
            if k in self.policies and k not in seen:
                seen.add(k)
                out.append(self.policies[k])
        return out

    def assert_rbac(self, conn: Connection) -> Decision:
        """Authorize an inbound connection to a local pod: find the destination workload by IP,
        then rbac.assert_rbac over its policies. No workload -> deny."""
        w = self.workload_by_ip(conn.dst_ip)
        if w is None:
            return Decision(False, NO_WORKLOAD)
        return assert_rbac(self.policies_for(w), conn)


# ---------------------------------------------------------------------------------------------
# Finding the Workload of a pod handed over by ZDS (zt:src/state.rs `wait_for_workload`)


def find_workload_for_pod(state: ProxyState, uid: str, name: str, namespace: str) -> Workload | None:
    """The xDS Workload of a pod ztunnel proxies: by uid (the key istiod uses), else by
    (name, namespace), the WorkloadInfo the node agent sent over ZDS (pure)."""
    w = state.workloads.get(uid)
    if w is not None:
        return w
    for w in state.workloads.values():
        if w.name == name and w.namespace == namespace:
            return w
    return None


class StateChanges:
    """Wakes up whoever waits for the state to change: every xDS response that changed something
    calls `notify`."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.generation = 0

    def notify(self) -> None:
        self.generation += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait(self, timeout: float) -> bool:
        """Wait for the next change; False on timeout."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
            return True
        except TimeoutError:
            return False


async def wait_for_workload(state: ProxyState, changes: StateChanges, uid: str, name: str, namespace: str,
                            timeout: float = 5.0) -> Workload | None:
    """The pod's Workload, waiting up to `timeout` seconds for istiod to send it: a pod can start
    (and connect out) before its Workload reached this ztunnel. None if it never came."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        w = find_workload_for_pod(state, uid, name, namespace)
        if w is not None:
            return w
        left = deadline - loop.time()
        if left <= 0 or not await changes.wait(left):
            return find_workload_for_pod(state, uid, name, namespace)
