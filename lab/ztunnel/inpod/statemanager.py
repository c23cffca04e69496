"""What ztunnel does with each ZDS message: start, keep, replace or drain a pod's proxy.

Real counterpart: zt:src/inpod/statemanager.rs (``WorkloadProxyManagerState``). The ZDS
connection itself (hello, acks, reconnects) is :mod:`lab.ztunnel.inpod.workload_manager`; it
calls the ``add``/``delete``/``keep``/``snapshot_sent`` methods here, and a raised exception
becomes a NACK carrying its text.

The decisions are pure functions (:func:`decide_add`, :func:`pods_to_drain`); the class applies
them to the running proxies.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any, Literal

from lab.proto.zds import WorkloadInfo
from lab.ztunnel.config import Config
from lab.ztunnel.inpod.netns import InpodNetns, NetnsID
from lab.ztunnel.metrics import Metrics
from lab.ztunnel.proxy import (
    CONNECTION_DRAIN,
    Emit,
    InpodWorkload,
    MeshInputs,
    Proxy,
    ProxyInputs,
)
from lab.ztunnel.proxy.connection_manager import ConnectionManager
from lab.ztunnel.stepper import Stepper

log = logging.getLogger("ztunnel.inpod.statemanager")

AddAction = Literal["start", "keep", "replace"]


def decide_add(current: NetnsID | None, new: NetnsID) -> AddAction:
    """AddWorkload for a pod: what to do with its proxy (pure).

    - not proxied yet -> ``start`` a proxy in the new netns;
    - proxied in the same netns (same dev and inode: e.g. the agent's snapshot after a ztunnel
      reconnect) -> ``keep`` it and let go of the new fd;
    - proxied in a different netns (the pod got a new sandbox) -> ``replace``: drain the old
      proxy, start a new one.
    """
    if current is None:
        return "start"
    return "keep" if current == new else "replace"


def pods_to_drain(proxied: Iterable[str], snapshot: Iterable[str]) -> list[str]:
    """SnapshotSent: the pods ztunnel proxies that the agent's snapshot did not mention (pure)."""
    known = set(snapshot)
    return sorted(uid for uid in proxied if uid not in known)


class ProxyStartError(Exception):
    """A pod's proxy could not start; the text is the NACK the node agent receives."""


class WorkloadProxyManagerState:
    """The pods this ztunnel proxies, by uid, and the handlers of the ZDS requests."""

    def __init__(self, cfg: Config, *, emit: Emit, cur_netns: int,
                 write_access_log: Callable[[str], None],
                 connections: ConnectionManager | None = None, metrics: Metrics | None = None,
                 mesh: MeshInputs | None = None, stepper: Stepper | None = None) -> None:
        self.cfg = cfg
        self.emit = emit
        self.cur_netns = cur_netns
        self.write_access_log = write_access_log
        self.connections = connections if connections is not None else ConnectionManager()
        self.metrics = metrics if metrics is not None else Metrics()
        self.mesh = mesh
        self.stepper = stepper if stepper is not None else Stepper()  # one for every pod's proxy
        self.proxies: dict[str, Proxy] = {}

    # ------------------------------------------------------------------ ZDS handlers
    async def add(self, uid: str, info: WorkloadInfo, netns_fd: int) -> None:
        """AddWorkload: start (or keep, or replace) the pod's proxy. On success the fd is ours."""
        new_id = NetnsID.of_fd(netns_fd)
        existing = self.proxies.get(uid)
        action = decide_add(existing.pi.netns.id if existing else None, new_id)
        if action == "keep":
            os.close(netns_fd)  # we keep using the fd we already hold for this netns
            self.emit("ztunnel.workload.kept",
                      f"ztunnel on {self.cfg.node} already proxies pod {info.name} in this network namespace "
                      f"(inode {new_id.inode}): it keeps its listeners", pod=info.name, uid=uid,
                      namespace=info.namespace, netns_inode=new_id.inode)
            return
        if action == "replace":
            assert existing is not None
            await self._drain(uid, f"the pod now has a new network namespace (inode {new_id.inode}, "
                                   f"was {existing.pi.netns.id.inode})")
        workload = InpodWorkload(uid, info)
        proxy = Proxy(ProxyInputs(cfg=self.cfg, workload=workload, netns=InpodNetns(self.cur_netns, netns_fd),
                                  connections=self.connections, emit=self.emit,
                                  write_access_log=self.write_access_log, metrics=self.metrics, mesh=self.mesh,
                                  stepper=self.stepper))
        try:
            await proxy.start()
        except OSError as e:
            error = f"failed to start the proxy for pod {info.namespace}/{info.name}: {e}"
            log.error("%s", error)
            self.emit("ztunnel.workload.failed",
                      f"ztunnel on {self.cfg.node} could not open its listeners in pod {info.name} ({e}); "
                      f"it NACKs the node agent", pod=info.name, uid=uid, namespace=info.namespace, error=str(e))
            raise ProxyStartError(error) from e  # the workload manager closes the fd and NACKs
        self.proxies[uid] = proxy
        log.info("pod %s/%s (uid %s) added, netns inode %d", info.namespace, info.name, uid, new_id.inode)
        self.emit("ztunnel.workload.added",
                  f"ztunnel on {self.cfg.node} now proxies pod {info.name}: istio-cni handed over its network "
                  f"namespace (inode {new_id.inode}) and ztunnel opened ports "
                  f"{', '.join(str(l.port) for l in proxy.listeners)} inside it",
                  pod=info.name, uid=uid, namespace=info.namespace, service_account=info.service_account,
                  netns_inode=new_id.inode, action=action)

    async def delete(self, uid: str) -> None:
        """DelWorkload: the pod left the mesh (or was deleted); drain its proxy."""
        if uid not in self.proxies:
            log.info("DelWorkload for unknown pod %s: nothing to drain", uid)
            return
        await self._drain(uid, "istio-cni removed the pod from the mesh (DelWorkload)")

    def keep(self, uid: str) -> None:
        """KeepWorkload (snapshot only): the agent has no netns for the pod; keep what we have."""
        proxy = self.proxies.get(uid)
        if proxy is None:
            log.warning("KeepWorkload for pod %s that this ztunnel does not proxy: nothing to keep", uid)
            return
        w = proxy.pi.workload
        self.emit("ztunnel.workload.kept",
                  f"istio-cni has no network namespace for pod {w.name} but it is still meshed: ztunnel keeps "
                  f"its listeners", pod=w.name, uid=uid, namespace=w.namespace,
                  netns_inode=proxy.pi.netns.id.inode)

    async def snapshot_sent(self, known: frozenset[str]) -> None:
        """SnapshotSent: drain every proxy the snapshot did not mention."""
        for uid in pods_to_drain(self.proxies, known):
            await self._drain(uid, "the pod was not in the node agent's snapshot")

    async def shutdown(self) -> None:
        """ztunnel stops: close every pod's listeners and connections."""
        for uid in list(self.proxies):
            await self._drain(uid, "ztunnel is shutting down")

    # ------------------------------------------------------------------ state
    def workloads(self) -> list[dict[str, Any]]:
        """The proxied pods as plain data (for the admin interface)."""
        return [p.to_dict() for _, p in sorted(self.proxies.items(), key=lambda kv: (
            kv[1].pi.workload.namespace, kv[1].pi.workload.name))]

    async def _drain(self, uid: str, reason: str) -> None:
        proxy = self.proxies.pop(uid)
        w = proxy.pi.workload
        inode = proxy.pi.netns.id.inode
        n = await proxy.drain(CONNECTION_DRAIN)
        log.info("pod %s/%s (uid %s) drained: %s", w.namespace, w.name, uid, reason)
        self.emit("ztunnel.workload.removed",
                  f"ztunnel on {self.cfg.node} stopped proxying pod {w.name}: {reason}; it closed the pod's "
                  f"listeners and {n} open connection{'s' if n != 1 else ''}",
                  pod=w.name, uid=uid, namespace=w.namespace, netns_inode=inode, reason=reason,
                  connections_closed=n)
