"""istiod's Delta xDS server for ztunnels (is:pilot/pkg/xds/delta.go, discovery.go, ads.go).

One `XdsConnection` per connected ztunnel, one `Subscription` per type URL it asked for
(Address = workloads and services, Authorization = L4 policies). The protocol, message by
message (lab/proto/xds.py has the messages):

1. ztunnel -> istiod, first request of a type: a subscription. The first request on a
   connection must carry the node's token; the token names the node, and the node the ztunnel
   claims (`node.metadata.NODE_NAME`) must be that one. A bad token closes the connection.
   `initial_resource_versions` lists what a reconnecting ztunnel already holds.
2. istiod -> ztunnel: a DeltaDiscoveryResponse with every resource the ztunnel lacks (all of
   them on a fresh connection), `removed_resources` for names it holds that no longer exist,
   a `nonce` and the config version. Always sent, even empty: it tells ztunnel it is in sync.
3. ztunnel -> istiod: ACK (`response_nonce` = that nonce) or NACK (plus `error_detail`).
   On ACK the subscription's acknowledged versions advance. On NACK they do not, and what the
   response carried is marked "not delivered", so the next push sends it again.
4. On every config change: only the diff, per connection: resources whose version differs
   from what the ztunnel was last sent, and removed names. A push is not held back while an
   earlier one is unacknowledged (Istio's default; PILOT_ENABLE_FLOW_CONTROL=false).

A resource's version is a hash of its content, so an unchanged resource keeps its version
across recomputations and reconnections. Connections that get the same diff share one
response (one nonce), and one `istiod.push` event describes it, with the bytes sent and, for
comparison, what sidecar mode would have cost (`sidecar_equivalent_bytes`: every pod's sidecar
receiving the whole config of that type again).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from lab.proto.xds import (
    ADDRESS_TYPE,
    AUTHORIZATION_TYPE,
    TYPE_URLS,
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    Resource,
    encode,
)

#: Istio's short names for the types, as in its logs ("ADS:WDS: PUSH ...").
SHORT_TYPE = {ADDRESS_TYPE: "WDS", AUTHORIZATION_TYPE: "WADS"}
WILDCARD = "*"

#: Config state: type URL -> resource name -> resource dict.
State = dict[str, dict[str, dict]]


def resource_version(resource: dict) -> str:
    """A content hash: equal content, equal version, whenever and wherever it is computed."""
    canonical = json.dumps(resource, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def versioned(resources: dict[str, dict]) -> dict[str, Resource]:
    return {name: Resource(name=name, version=resource_version(r), resource=r)
            for name, r in sorted(resources.items())}


def delta(current: dict[str, Resource], held: dict[str, str],
          wants: Callable[[str], bool]) -> tuple[list[Resource], list[str]]:
    """The Delta xDS diff for one subscriber: resources whose version differs from what it holds
    (`held`: name -> version), and names it holds that are gone (or no longer wanted)."""
    changed = [r for name, r in current.items() if wants(name) and held.get(name) != r.version]
    removed = sorted(name for name in held if name not in current or not wants(name))
    return changed, removed


@dataclass
class SentResponse:
    """What one response carried, kept until the ztunnel ACKs or NACKs its nonce."""

    nonce: str
    version: str
    versions: dict[str, str]
    removed: list[str]


@dataclass
class Subscription:
    """One type URL on one connection."""

    type_url: str
    names: set[str] | None = None  # None: wildcard ("*"), every resource of the type
    sent: dict[str, str] = field(default_factory=dict)  # name -> version the ztunnel should hold now
    acked: dict[str, str] = field(default_factory=dict)  # name -> version it confirmed (ACK)
    pending: dict[str, SentResponse] = field(default_factory=dict)  # nonce -> unconfirmed response
    responses: int = 0
    last_nack: str = ""

    def wants(self, name: str) -> bool:
        return self.names is None or name in self.names


@dataclass
class XdsConnection:
    """One ztunnel's stream. `node` is empty until the first request authenticated it."""

    peer: str
    writer: Any  # asyncio.StreamWriter (anything with write())
    node: str = ""
    subscriptions: dict[str, Subscription] = field(default_factory=dict)


class XdsRejected(Exception):
    """The connection must be closed (bad token, node mismatch)."""


class DiscoveryServer:
    """Holds the current config and every ztunnel's view of it; pushes diffs.

    `authenticate(token)` -> node name or None; `emit(kind, msg, **fields)` records an event;
    `log(level, scope, msg)` writes istiod's log. Call `update(state, pods)` with the whole new
    config whenever the cluster changed, `on_request` for every request, `disconnect` at EOF.
    """

    def __init__(self, authenticate: Callable[[str], str | None], emit: Callable[..., Any],
                 log: Callable[[str, str, str], None]) -> None:
        self.authenticate = authenticate
        self.emit = emit
        self.log = log
        self.state: dict[str, dict[str, Resource]] | None = None  # None until the first sync
        self.version = "0"
        self.pods = 0
        self.connections: list[XdsConnection] = []
        self._full_size: dict[str, int] = {}

    # -- config changes -------------------------------------------------------------------------
    def update(self, state: State, pods: int) -> bool:
        """Install a new config (type URL -> name -> resource) and push the diffs. `pods` is the
        number of pods in the mesh's registry, for the sidecar-mode comparison. Returns whether
        anything changed."""
        new = {t: versioned(state.get(t, {})) for t in TYPE_URLS}
        first = self.state is None
        if not first and all(_same(new[t], self.state[t]) for t in TYPE_URLS):  # type: ignore[index]
            self.pods = pods
            return False
        self.state = new
        self.pods = pods
        self.version = str(int(self.version) + 1)
        self._full_size = {}
        for type_url in TYPE_URLS:
            subs = [(c, c.subscriptions[type_url]) for c in self.connections if type_url in c.subscriptions]
            self.push(type_url, subs, reason="initial" if first else "change")
        return True

    def full_size(self, type_url: str) -> int:
        """Bytes of one response carrying the whole config of a type (a sidecar's full push)."""
        if type_url not in self._full_size:
            everything = list((self.state or {}).get(type_url, {}).values())
            msg = DeltaDiscoveryResponse(type_url=type_url, system_version_info=self.version,
                                         nonce=_nonce(), resources=everything)
            self._full_size[type_url] = len(encode(msg))
        return self._full_size[type_url]

    def push(self, type_url: str, subscribers: Iterable[tuple[XdsConnection, Subscription]],
             reason: str) -> None:
        """Send each subscriber its diff. Subscribers with the same diff share one response."""
        if self.state is None:
            return
        current = self.state[type_url]
        groups: dict[tuple, list[tuple[XdsConnection, Subscription]]] = {}
        diffs: dict[tuple, tuple[list[Resource], list[str]]] = {}
        for conn, sub in subscribers:
            changed, removed = delta(current, sub.sent, sub.wants)
            if not changed and not removed and sub.responses > 0:
                continue  # nothing new for this one
            key = (tuple((r.name, r.version) for r in changed), tuple(removed))
            groups.setdefault(key, []).append((conn, sub))
            diffs[key] = (changed, removed)
        for key, members in groups.items():
            changed, removed = diffs[key]
            nonce = _nonce()
            msg = DeltaDiscoveryResponse(type_url=type_url, system_version_info=self.version, nonce=nonce,
                                         resources=changed, removed_resources=removed)
            data = encode(msg)
            for conn, sub in members:
                conn.writer.write(data)
                for r in changed:
                    sub.sent[r.name] = r.version
                for name in removed:
                    sub.sent.pop(name, None)
                sub.pending[nonce] = SentResponse(nonce, self.version, {r.name: r.version for r in changed},
                                                  list(removed))
                sub.responses += 1
            targets = sorted(conn.node for conn, _ in members)
            short = SHORT_TYPE.get(type_url, type_url)
            for node in targets:
                self.log("info", "delta", f"ADS:{short}: PUSH for node:{node} resources:{len(changed)} "
                                          f"removed:{len(removed)} size:{_size(len(data))} version:{self.version}")
            self.emit("istiod.push",
                      f"istiod pushed {len(changed)} {short} resource(s) and {len(removed)} removal(s) "
                      f"to the ztunnel(s) of {', '.join(targets)} ({reason})",
                      type_url=type_url, resources=[r.name for r in changed], removed=list(removed),
                      bytes=len(data) * len(members), bytes_per_target=len(data), targets=targets,
                      version=self.version, nonce=nonce, reason=reason,
                      sidecar_equivalent_bytes=self.pods * self.full_size(type_url))

    # -- requests ------------------------------------------------------------------------------
    def on_request(self, conn: XdsConnection, req: DeltaDiscoveryRequest) -> None:
        """Handle one request: subscription, ACK or NACK. Raises XdsRejected to close."""
        self._authenticate(conn, req)
        if req.type_url not in TYPE_URLS:
            self.log("warn", "ads", f"ADS: node:{conn.node} asked for unknown type {req.type_url!r}; ignored")
            return
        sub = conn.subscriptions.get(req.type_url)
        if req.response_nonce:
            if sub is None:
                self.log("warn", "ads", f"ADS: node:{conn.node} answered nonce {req.response_nonce} of "
                                        f"{req.type_url}, to which it never subscribed; ignored")
                return
            self._on_answer(conn, sub, req)
            return
        self._on_subscribe(conn, sub, req)

    def _authenticate(self, conn: XdsConnection, req: DeltaDiscoveryRequest) -> None:
        if conn.node and not req.token:
            return
        node = self.authenticate(req.token) if req.token else None
        claimed = str((req.node.get("metadata") or {}).get("NODE_NAME", "")) if isinstance(req.node, dict) else ""
        if node is None:
            why = "no token" if not req.token else "the token is not a node's token"
            self._reject(conn, f"authentication failure: {why}", claimed)
        if claimed and claimed != node:
            self._reject(conn, f"authentication failure: the token is node {node}'s but the ztunnel "
                               f"claims NODE_NAME={claimed}", claimed)
        if conn.node and conn.node != node:
            self._reject(conn, f"authentication failure: the connection belongs to node {conn.node}, "
                               f"not {node}", claimed)
        if not conn.node:
            conn.node = node  # type: ignore[assignment]
            self.connections.append(conn)
            self.log("info", "ads", f"ADS: new delta connection for node:{node} from {conn.peer}")
            self.emit("istiod.connected", f"the ztunnel of {node} connected to istiod from {conn.peer}",
                      node=node, peer=conn.peer)

    def _reject(self, conn: XdsConnection, reason: str, claimed: str) -> None:
        self.log("error", "ads", f"ADS: connection from {conn.peer} (NODE_NAME={claimed or '?'}) refused: {reason}")
        self.emit("istiod.xds.rejected", f"istiod refused an xDS connection from {conn.peer}: {reason}",
                  peer=conn.peer, claimed_node=claimed, reason=reason)
        raise XdsRejected(reason)

    def _on_subscribe(self, conn: XdsConnection, sub: Subscription | None, req: DeltaDiscoveryRequest) -> None:
        names = set(req.resource_names_subscribe or [WILDCARD])
        wanted = None if WILDCARD in names else names
        if sub is None:
            sub = Subscription(req.type_url, names=wanted, sent=dict(req.initial_resource_versions or {}))
            sub.acked = dict(sub.sent)
            conn.subscriptions[req.type_url] = sub
            short = SHORT_TYPE[req.type_url]
            self.log("info", "delta", f"ADS:{short}: REQ node:{conn.node} subscribe {sorted(names)} "
                                      f"initial versions:{len(sub.sent)}")
            self.emit("istiod.subscribe", f"the ztunnel of {conn.node} subscribed to {short}",
                      node=conn.node, type_url=req.type_url, names=sorted(names),
                      initial_resource_versions=len(sub.sent))
        else:
            sub.names = wanted  # a change of subscription on a live stream
        self.push(req.type_url, [(conn, sub)], reason="subscribe")

    def _on_answer(self, conn: XdsConnection, sub: Subscription, req: DeltaDiscoveryRequest) -> None:
        sent = sub.pending.pop(req.response_nonce, None)
        short = SHORT_TYPE[sub.type_url]
        if sent is None:
            self.log("debug", "delta", f"ADS:{short}: node:{conn.node} answered an unknown or stale nonce "
                                       f"{req.response_nonce}; ignored")
            return
        if req.error_detail:
            # NACK: the versions do not advance, and what this response carried counts as not
            # delivered, so that the next push sends it again.
            for name in [*sent.versions, *sent.removed]:
                if name in sub.acked:
                    sub.sent[name] = sub.acked[name]
                else:
                    sub.sent.pop(name, None)
            sub.last_nack = req.error_detail
            self.log("warn", "delta", f"ADS:{short}: NACK node:{conn.node} nonce:{sent.nonce} "
                                      f"version:{sent.version}: {req.error_detail}")
            self.emit("istiod.nack", f"the ztunnel of {conn.node} rejected {short} version {sent.version}: "
                                     f"{req.error_detail}",
                      node=conn.node, type_url=sub.type_url, nonce=sent.nonce, version=sent.version,
                      error=req.error_detail, resources=sorted(sent.versions))
            return
        sub.acked.update(sent.versions)
        sub.last_nack = ""
        for name in sent.removed:
            sub.acked.pop(name, None)
        self.log("debug", "delta", f"ADS:{short}: ACK node:{conn.node} nonce:{sent.nonce} version:{sent.version}")
        self.emit("istiod.ack", f"the ztunnel of {conn.node} acknowledged {short} version {sent.version}",
                  node=conn.node, type_url=sub.type_url, nonce=sent.nonce, version=sent.version)

    def disconnect(self, conn: XdsConnection, reason: str = "") -> None:
        if conn in self.connections:
            self.connections.remove(conn)
            self.log("info", "ads", f"ADS: \"{conn.peer}\" node:{conn.node} terminated{': ' + reason if reason else ''}")
            self.emit("istiod.disconnected", f"the ztunnel of {conn.node} disconnected from istiod",
                      node=conn.node, peer=conn.peer, reason=reason)

    # -- introspection -------------------------------------------------------------------------
    def status(self) -> list[dict]:
        """`istioctl proxy-status` for ztunnels: per node and type, what it holds and confirmed."""
        rows = []
        for conn in self.connections:
            for type_url, sub in sorted(conn.subscriptions.items()):
                current = (self.state or {}).get(type_url, {})
                synced = not sub.pending and sub.acked == {n: r.version for n, r in current.items() if sub.wants(n)}
                rows.append({"node": conn.node, "peer": conn.peer, "type_url": type_url,
                             "acked": len(sub.acked), "pending": len(sub.pending),
                             "status": "SYNCED" if synced else ("NACKED" if sub.last_nack else "STALE"),
                             "last_nack": sub.last_nack, "version": self.version})
        return rows


def _same(a: dict[str, Resource], b: dict[str, Resource]) -> bool:
    return a.keys() == b.keys() and all(a[k].version == b[k].version for k in a)


def _nonce() -> str:
    return secrets.token_hex(8)


def _size(n: int) -> str:
    return f"{n / 1024:.1f}kB" if n >= 1024 else f"{n}B"


__all__ = ["DiscoveryServer", "XdsConnection", "Subscription", "XdsRejected", "delta", "resource_version",
           "versioned"]
