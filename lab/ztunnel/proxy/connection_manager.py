"""Every open connection of this ztunnel, and the policy watcher that re-checks them
(zt:src/proxy/connection_manager.rs ``ConnectionManager``, ``PolicyWatcher``).

ztunnel authorizes an inbound connection once, when it arrives. Policies change later: istiod
pushes a new AuthorizationPolicy, a PeerAuthentication turns STRICT, a workload gets a selector
policy. So ztunnel keeps, for every live inbound connection, the facts its authorization was
decided on (the RBAC ``Connection``: source IP and identity, destination IP and application
port). After every change of the authorization config it decides again for each of them and
closes those that are now denied, with "connection closed due to policy change".

The same registry serves the admin interface (``istioctl ztunnel-config connections``) and the
drain of a pod that leaves the mesh: its tunnels and connections are closed.

`connections_to_close` is the pure part: contexts + a decision function in, what to close out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from lab.ztunnel.rbac import Connection, Decision

if TYPE_CHECKING:
    from lab.ztunnel.proxy import ConnectionInfo, Flow

#: zt:src/proxy.rs: the error of a connection closed by the policy watcher.
POLICY_CHANGE = "connection closed due to policy change"

K = TypeVar("K", bound=Hashable)


def connections_to_close(tracked: Iterable[tuple[K, Connection]],
                         decide: Callable[[Connection], Decision]) -> list[tuple[K, Decision]]:
    """The connections a re-check denies, with the decision that denies each (pure).

    `tracked` pairs a key with the RBAC context the connection was authorized with; `decide`
    is the authorization of the current config (``ProxyState.assert_rbac``).
    """
    out = []
    for key, ctx in tracked:
        decision = decide(ctx)
        if not decision.allowed:
            out.append((key, decision))
    return out


@dataclass
class _Entry:
    flow: Flow
    task: asyncio.Task[Any]
    rbac: Connection | None = None


class ConnectionManager:
    """Every open connection by its key (flow id, direction, sequence), plus the HBONE tunnels (accepted 15008 connections)
    of each pod, which carry inbound connections but are not connections themselves."""

    def __init__(self) -> None:
        self._open: dict[str, _Entry] = {}
        self._tunnels: dict[asyncio.Task[Any], str] = {}  # task -> pod uid

    # ------------------------------------------------------------------ registration
    def register(self, flow: Flow, task: asyncio.Task[Any]) -> None:
        self._open[flow.key] = _Entry(flow, task)

    def track_rbac(self, flow: Flow, ctx: Connection) -> None:
        """Remember what an inbound connection was authorized with, for later re-checks."""
        entry = self._open.get(flow.key)
        if entry is not None:
            entry.rbac = ctx

    def release(self, flow: Flow) -> None:
        self._open.pop(flow.key, None)

    def register_tunnel(self, uid: str, task: asyncio.Task[Any]) -> None:
        self._tunnels[task] = uid

    def release_tunnel(self, task: asyncio.Task[Any]) -> None:
        self._tunnels.pop(task, None)

    # ------------------------------------------------------------------ views
    def connections(self, uid: str | None = None) -> list[ConnectionInfo]:
        return [e.flow.info for e in self._open.values() if uid is None or e.flow.info.uid == uid]

    def flows(self) -> list[Flow]:
        return [e.flow for e in self._open.values()]

    def tracked_rbac(self) -> list[tuple[str, Connection]]:
        """(key, RBAC context) of every inbound connection authorized so far."""
        return [(k, e.rbac) for k, e in self._open.items() if e.rbac is not None and not e.flow.closing]

    def __len__(self) -> int:
        return len(self._open)

    # ------------------------------------------------------------------ closing
    def _close(self, entry: _Entry, reason: str) -> None:
        entry.flow.closing = reason
        entry.task.cancel()

    def recheck(self, decide: Callable[[Connection], Decision]) -> list[tuple[Flow, Connection, Decision]]:
        """PolicyWatcher: decide again for every tracked inbound connection, close the denied ones
        (their handlers log "connection closed due to policy change"). Returns what was closed."""
        closed = []
        for key, decision in connections_to_close(self.tracked_rbac(), decide):
            entry = self._open.get(key)
            if entry is None or entry.rbac is None:
                continue
            self._close(entry, POLICY_CHANGE)
            closed.append((entry.flow, entry.rbac, decision))
        return closed

    async def drain(self, uid: str, reason: str, timeout: float = 1.0) -> int:
        """Close every open connection and tunnel of pod `uid`; return how many connections."""
        tasks = []
        for entry in list(self._open.values()):
            if entry.flow.info.uid == uid and not entry.flow.closing:
                self._close(entry, reason)
                tasks.append(entry.task)
        n = len(tasks)
        for task, owner in list(self._tunnels.items()):
            if owner == uid:
                task.cancel()
                tasks.append(task)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        return n
