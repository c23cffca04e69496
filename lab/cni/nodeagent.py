"""The istio-cni node agent: puts pods into the ambient mesh on one node.

Real counterpart: is:cni/pkg/nodeagent (``server.go``, ``net_linux.go`` ``NetServer``,
``meshdataplane_linux.go``, ``ztunnelserver.go``, ``cni-watcher.go``). One process per node,
running in the node's network namespace (a DaemonSet pod with host networking in a real cluster).

AddPodToMesh (``POST /cmdadd``, from the chained CNI plugin or the pod informer):

1. open the pod's network namespace and keep the fd (Istio's pod netns cache);
2. on the ONE iptables thread, enter that netns and install the in-pod rules, the fwmark
   ``ip rule`` and the local route (:func:`lab.cni.iptables.install_inpod_rules`). This is
   idempotent: rules already there (an agent restart) are reconciled, never duplicated.
   A failure here is not retryable: the reply carries the error;
3. hand the pod (uid, name, namespace, service account) and the netns fd to ztunnel over ZDS
   and wait for its ack. If no ztunnel is connected, or it does not ack in time, or it NACKs,
   the pod is ``pending``: its rules stay, so it has no traffic until a ztunnel takes it
   ("Pods in this state will not egress/ingress traffic"), and the reply is still an error
   (HTTP 500, as ``cni-watcher.go`` answers): the plugin's CmdAdd fails, so a new pod's sandbox
   fails and the kubelet retries it; its app never runs outside the mesh. On an ack it is ``enabled``;
4. annotate the pod ``ambient.istio.io/redirection: enabled|pending`` (istiod gives a workload
   ``tunnel_protocol=HBONE`` only when it is ``enabled``).

At start, before it accepts ztunnel, the agent lists its node's pods that are already `enabled`
and takes them back into its cache (Istio's ``ConstructInitialSnapshot``): a restarted agent
therefore hands ztunnel a snapshot with every enrolled pod, and their listeners stay.

When a ztunnel (re)connects, the ZDS server sends it every cached pod (the snapshot); a pending
pod the ztunnel acknowledges becomes ``enabled`` and is annotated so. A ztunnel that goes away
changes no annotation (as in Istio).

RemovePodFromMesh (``POST /cmddel``): remove the rules if the pod's netns still exists, send
``DelWorkload`` to every connected ztunnel, close the cached fd, remove the annotation.

Lab differences: the Kubernetes API is the lab supervisor (its ``annotate`` operation), and the
informer lives in the supervisor too, which re-sends ``/cmdadd`` (``source: informer``) for every
ambient pod that is not ``enabled``, on every change and after the agent restarts (level-triggered,
as ``informers.go`` reconcilePod compares intent with status); the agent keeps no state on disk. The node-side probe
SNAT ipset (reference §1.3) is not maintained.

Run as ``python -m lab.cni --lab LAB --node NODE --plugin-socket PATH --zds-socket PATH``
inside the node's netns (``ip netns exec <node> ...``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional

from lab.cni import iptables
from lab.cni.constants import INPOD_RULE_PRIORITY, INPOD_TPROXY_MARK, INPOD_TPROXY_MASK, ROUTE_TABLE_INBOUND
from lab.cni.plugin_events import PluginEventServer
from lab.cni.ztunnel_server import ZtunnelServer, ZtunnelUnavailable
from lab.common.events import EventEmitter
from lab.common.procname import name_process
from lab.common.seams import Seams
from lab.common.state import run_dir
from lab.kube.model import REDIRECTION_ANNOTATION
from lab.proto.zds import WorkloadInfo

log = logging.getLogger("cni-agent")

NETNS_DIR = "/run/netns"
#: ioctl(2) on a namespace fd that returns its type (linux/nsfs.h ``NS_GET_NSTYPE``).
NS_GET_NSTYPE = 0xB703
SOURCES = ("cni-plugin", "informer")
ANNOTATE_TIMEOUT = 5.0
ANNOTATION_HISTORY = 200

Redirection = Literal["enabled", "pending"]

#: The policy routing the in-pod rules come with, as `ip rule` / `ip route` print it.
IP_RULE = (f"from all fwmark {INPOD_TPROXY_MARK:#x}/{INPOD_TPROXY_MASK:#x} lookup {ROUTE_TABLE_INBOUND}"
           f" pref {INPOD_RULE_PRIORITY}")
IP_ROUTE = f"local 0.0.0.0/0 dev lo table {ROUTE_TABLE_INBOUND}"


# ==================================================================================================
# Requests as data
# ==================================================================================================


class BadRequest(ValueError):
    """A /cmdadd or /cmddel body the agent cannot act on (HTTP 400)."""


@dataclass(frozen=True)
class PodRequest:
    """One plugin event: which pod, where its netns is, and who sent it."""

    uid: str
    name: str
    namespace: str
    netns: str
    service_account: str = "default"
    ip: str = ""
    source: str = "cni-plugin"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def netns_path(value: str) -> str:
    """Where a pod's netns is: a name under /run/netns, or an absolute path there or in /proc."""
    if not value:
        raise BadRequest("netns is required")
    if "/" not in value:
        return os.path.join(NETNS_DIR, value)
    path = os.path.normpath(value)
    if path.startswith(NETNS_DIR + "/") or (path.startswith("/proc/") and path.endswith("/ns/net")):
        return path
    raise BadRequest(f"netns {value!r} is neither under {NETNS_DIR} nor /proc/<pid>/ns/net")


def parse_pod_request(body: dict[str, Any], *, add: bool) -> PodRequest:
    """Validate a plugin event body (pure). Unknown keys are ignored, as a JSON API does."""
    def text(key: str, default: Optional[str] = None) -> str:
        value = body.get(key, default)
        if value is None or not isinstance(value, str) or (default is None and not value):
            raise BadRequest(f"{key!r} must be a non-empty string")
        return value

    uid, name, namespace = text("uid"), text("name"), text("namespace")
    if add:
        netns = netns_path(text("netns"))
    else:
        netns = netns_path(body["netns"]) if body.get("netns") else ""
    source = text("source", "cni-plugin") if add else text("source", "informer")
    if source not in SOURCES:
        raise BadRequest(f"source must be one of {SOURCES}, not {source!r}")
    return PodRequest(uid=uid, name=name, namespace=namespace, netns=netns,
                      service_account=text("service_account", "default") or "default",
                      ip=text("ip", ""), source=source)


def reply(redirection: str, message: str, error: str = "") -> dict[str, str]:
    """The body of a plugin event reply."""
    return {"redirection": redirection, "error": error, "message": message}


# ==================================================================================================
# State
# ==================================================================================================


@dataclass
class MeshPod:
    """A pod this agent put in the mesh: the request, its netns (fd + inode) and its state."""

    req: PodRequest
    fd: int
    inode: int
    redirection: Redirection = "pending"
    since: float = field(default_factory=time.time)
    # A ztunnel acked this very netns in a snapshot while the Add was still in progress.
    snapshot_acked: bool = False

    def view(self) -> dict[str, Any]:
        return {**asdict(self.req), "netns_inode": self.inode, "redirection": self.redirection,
                "since": self.since}


def open_netns(path: str) -> int:
    """Open a pod netns read-only and check it IS a network namespace; the caller owns the fd."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        os.close(fd)
        raise BadRequest(f"{path} is not a namespace") from None
    if kind != os.CLONE_NEWNET:
        os.close(fd)
        raise BadRequest(f"{path} is not a network namespace")
    return fd


def netns_still_there(path: str, inode: int) -> bool:
    """Is the pod's netns still at `path` (same inode)? False once the pod's sandbox is gone."""
    try:
        return os.stat(path).st_ino == inode
    except OSError:
        return False


class IptablesThread:
    """All kernel rule work on ONE thread: libiptc is not thread-safe, and setns is per thread."""

    def __init__(self, dns_capture: bool, seams: Seams | None = None) -> None:
        self.dns_capture = dns_capture
        self.seams = seams
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="iptables")

    def wanted(self) -> list[iptables.Rule]:
        """The rule set to write: Istio's, or a learner's while the in-pod rules exercise runs
        (lab/common/seams.py; a failing learner function raises SeamError: the pod is not added)."""
        rules = iptables.inpod_rules
        if self.seams is not None:
            rules = self.seams.get("cni.inpod_rules", rules, check=iptables.rule_set_problem)
        return list(rules(self.dns_capture))

    async def install(self, netns: iptables.NetnsRef) -> None:
        wanted = self.wanted()
        await asyncio.get_running_loop().run_in_executor(
            self._pool, iptables.install_inpod_rules, netns, self.dns_capture, wanted)

    async def remove(self, netns: iptables.NetnsRef) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, iptables.remove_inpod_rules, netns)

    def rule_count(self) -> int:
        return len(iptables.inpod_rules(self.dns_capture))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class Annotator:
    """Patches a pod's annotation through the Kubernetes API, here the lab supervisor's ``annotate``.

    ``socket_path`` None -> ``lab.supervisor.client.call(lab, "annotate", ...)``; otherwise the
    same newline-JSON request is sent to that socket (tests, or a supervisor elsewhere).
    """

    def __init__(self, lab: str, socket_path: Optional[str] = None, timeout: float = ANNOTATE_TIMEOUT) -> None:
        self.lab = lab
        self.socket_path = socket_path
        self.timeout = timeout

    def patch(self, namespace: str, pod: str, key: str, value: Optional[str]) -> None:
        """Blocking; raises OSError / LabError when the API cannot be reached or refuses."""
        fields = {"namespace": namespace, "pod": pod, "key": key, "value": value}
        if self.socket_path is None:
            from lab.supervisor.client import call

            call(self.lab, "annotate", timeout=self.timeout, **fields)
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(self.timeout)
            s.connect(self.socket_path)
            with s.makefile("rwb") as f:
                f.write((json.dumps({"op": "annotate", **fields}) + "\n").encode())
                f.flush()
                for line in f:
                    msg = json.loads(line)
                    if msg.get("done"):
                        if msg.get("error"):
                            raise RuntimeError(msg["error"])
                        return
        raise ConnectionError("the supervisor closed the connection without an answer")


def zds_event_message(ev: dict[str, Any], pod: str) -> str:
    """One sentence for a ZtunnelServer event (pure), for the event stream and the log."""
    kind, ack, who = ev.get("kind", ""), ev.get("ack"), pod or ev.get("uid", "")
    snap = " (snapshot)" if ev.get("snapshot") else ""
    outcome = {"ok": "acknowledged", "nack": f"refused: {ev.get('error')}", "timeout": "not acknowledged in time",
               "lost": f"lost: {ev.get('error')}", "unavailable": "not sent: no ztunnel connected"}.get(ack, "")
    if kind == "zds.connected":
        return f"a ztunnel connected to the ZDS socket (conn {ev.get('conn')}, {ev.get('connections')} connected)"
    if kind == "zds.hello":
        return f"ztunnel said hello (ZDS {ev.get('version')}, conn {ev.get('conn')})"
    if kind == "zds.disconnected":
        return f"ztunnel disconnected (conn {ev.get('conn')}, {ev.get('connections')} still connected)"
    if kind == "zds.add":
        return f"AddWorkload {who} + netns fd{snap}: {outcome}"
    if kind == "zds.keep":
        return f"KeepWorkload {who}{snap}: {outcome}"
    if kind == "zds.del":
        return f"DelWorkload {who}: {outcome}"
    if kind == "zds.snapshot_sent":
        return f"SnapshotSent after {ev.get('pods')} pod(s): {outcome}"
    if kind == "zds.refused":
        return f"refused a ZDS packet from ztunnel: {ev.get('error')}"
    return kind


# ==================================================================================================
# The agent
# ==================================================================================================


class NodeAgent:
    """One node's istio-cni agent: plugin event server + ZDS server + iptables thread + annotations."""

    def __init__(self, *, lab: str, node: str, plugin_socket: str, zds_socket: str, dns_capture: bool = False,
                 annotator: Optional[Annotator] = None, emitter: Optional[EventEmitter] = None,
                 ack_timeout: Optional[float] = None) -> None:
        self.lab, self.node = lab, node
        self.iptables = IptablesThread(dns_capture, Seams(run_dir(lab)))
        self.annotator = annotator or Annotator(lab)
        self.emitter = emitter or EventEmitter(lab, "istio-cni", node)
        kw = {} if ack_timeout is None else {"ack_timeout": ack_timeout}
        self.zds = ZtunnelServer(zds_socket, on_event=self._on_zds_event, **kw)
        self.plugin = PluginEventServer(plugin_socket, self)
        self.pods: dict[str, MeshPod] = {}
        self.annotations: collections.deque[dict[str, Any]] = collections.deque(maxlen=ANNOTATION_HISTORY)
        self._locks: dict[str, asyncio.Lock] = {}
        self._names: dict[str, PodRequest] = {}  # uid -> request, while the agent deals with the pod
        self._annotate_q: asyncio.Queue[tuple[str, str, Optional[str], asyncio.Future[None]]] = asyncio.Queue()
        self._annotate_task: Optional[asyncio.Task[None]] = None
        self._ready = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Plugin socket first (healthz answers 503), then the initial snapshot, then ZDS; ready
        once ztunnel can connect."""
        await self.plugin.start()
        await self.construct_initial_snapshot()
        await self.zds.start()
        self._annotate_task = asyncio.create_task(self._annotate_loop(), name="annotate")
        self._ready = True
        self._log(logging.INFO, "CNI node agent ready", node=self.node, plugin_socket=self.plugin.path,
                  zds_socket=self.zds.path, dns_capture=self.iptables.dns_capture)
        self.emitter.emit("cni.ready", f"istio-cni on {self.node} is ready: ztunnel may connect to "
                          f"{self.zds.path}", zds_socket=self.zds.path, plugin_socket=self.plugin.path)

    async def construct_initial_snapshot(self) -> None:
        """Before serving ZDS, take back the node's pods that are already in the mesh (annotation
        `enabled`), as istio-cni's `ConstructInitialSnapshot` does from its informer: a ztunnel
        that connects to a restarted agent then finds them in the snapshot and keeps their
        listeners, instead of draining every pod of the node. Their rules are already in place."""
        try:
            listed = await asyncio.to_thread(self.list_enrolled_pods)
        except Exception as e:  # noqa: BLE001 - no API server (a test rig): start with an empty snapshot
            self._log(logging.INFO, "no initial snapshot: the pod list is not available", error=str(e))
            return
        for body in listed:
            try:
                req = parse_pod_request({**body, "source": "informer"}, add=True)
                fd = open_netns(req.netns)
            except (BadRequest, OSError) as e:
                self._log(logging.WARNING, "cannot take back an enrolled pod", pod=body.get("name"), error=str(e))
                continue
            pod = self.pods[req.uid] = MeshPod(req, fd, os.fstat(fd).st_ino, redirection="enabled")
            self._names[req.uid] = req
            self.zds.upsert_pod(req.uid, WorkloadInfo(req.name, req.namespace, req.service_account), fd)
            self._log(logging.INFO, "pod taken back into the initial snapshot", pod=req.key, netns_inode=pod.inode)
        if listed:
            self.emitter.emit("cni.snapshot.built", f"istio-cni on {self.node} took back {len(self.pods)} enrolled "
                              f"pod(s) before accepting ztunnel: its snapshot keeps their listeners", pods=len(self.pods))

    def list_enrolled_pods(self) -> list[dict[str, Any]]:
        """The informer's list: this node's pods annotated `enabled` (from the lab's API server)."""
        from lab.supervisor.client import call

        return call(self.lab, "node_pods", node=self.node, timeout=5)["pods"]

    async def close(self) -> None:
        """Stop serving. Rules stay in the pods (Istio leaves them); fds and sockets are closed."""
        self._ready = False
        await self.plugin.close()
        with contextlib.suppress(Exception):  # let queued annotations out, briefly
            await asyncio.wait_for(self._annotate_q.join(), 1.0)
        if self._annotate_task:
            self._annotate_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._annotate_task
        await self.zds.close()
        for pod in self.pods.values():
            os.close(pod.fd)
        self.pods.clear()
        self.iptables.close()
        self.emitter.close()

    def ready(self) -> bool:
        return self._ready

    # ------------------------------------------------------------------ plugin events
    async def cmd_add(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if not self._ready:
            return 503, reply("", "node agent not ready", "node agent not ready")
        try:
            req = parse_pod_request(body, add=True)
        except BadRequest as e:
            return 400, reply("", f"bad cmdadd: {e}", str(e))
        async with self._lock(req.uid):
            return await self.add_pod_to_mesh(req)

    async def cmd_del(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if not self._ready:
            return 503, reply("", "node agent not ready", "node agent not ready")
        try:
            req = parse_pod_request(body, add=False)
        except BadRequest as e:
            return 400, reply("", f"bad cmddel: {e}", str(e))
        async with self._lock(req.uid):
            return await self.remove_pod_from_mesh(req)

    def pods_view(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "ready": self._ready,
            "dns_capture": self.iptables.dns_capture,
            "ztunnels_connected": self.zds.connections,
            "pods": [p.view() for p in self.pods.values()],
            "pending": sorted(p.req.key for p in self.pods.values() if p.redirection == "pending"),
            "zds_cache": {uid: {"pod": f"{info.namespace}/{info.name}", "netns_inode": ident[1] if ident else None}
                          for uid, (info, ident) in self.zds.pods().items()},
            "annotations": list(self.annotations),
        }

    def _lock(self, uid: str) -> asyncio.Lock:
        return self._locks.setdefault(uid, asyncio.Lock())

    # ------------------------------------------------------------------ AddPodToMesh
    async def add_pod_to_mesh(self, req: PodRequest) -> tuple[int, dict[str, Any]]:
        """Open the netns, install the rules, hand the pod to ztunnel, annotate. Holds the pod's lock."""
        self._names[req.uid] = req
        self._log(logging.INFO, "adding pod to the mesh", pod=req.key, source=req.source, netns=req.netns,
                  ip=req.ip)
        self._emit("cni.pod.add", f"{req.source} asked to add {req.key} to the mesh (netns {req.netns})", req,
                   source=req.source, netns=req.netns, ip=req.ip, uid=req.uid)
        # 1. open (and later cache) the netns fd
        try:
            fd = open_netns(req.netns)
        except FileNotFoundError:
            return self._add_failed(req, 500, f"pod netns {req.netns} does not exist: the pod is gone "
                                    "(deleted while being enrolled?)")
        except BadRequest as e:
            return self._add_failed(req, 400, str(e))
        except OSError as e:
            return self._add_failed(req, 500, f"cannot open pod netns {req.netns}: {e}")
        inode = os.fstat(fd).st_ino
        # 2. the in-pod rules, on the iptables thread (idempotent: reconciles what is there)
        try:
            await self.iptables.install(fd)
        except Exception as e:
            os.close(fd)
            return self._add_failed(req, 500, f"failed to install in-pod rules in {req.netns}: "
                                    f"{type(e).__name__}: {e}")
        if not netns_still_there(req.netns, inode):
            # The sandbox went away meanwhile. Our fd was the last thing keeping that netns (and
            # the rules just written into it) alive: closing it leaves nothing behind.
            os.close(fd)
            return self._add_failed(req, 500, f"pod netns {req.netns} vanished during enrolment")
        self._log(logging.INFO, "in-pod rules installed", pod=req.key, rules=self.iptables.rule_count(),
                  ip_rule=IP_RULE, ip_route=IP_ROUTE)
        self._emit("cni.rules.installed", f"in-pod rules in place in {req.key}: {self.iptables.rule_count()} "
                   f"iptables rules (mangle+nat{'+raw' if self.iptables.dns_capture else ''}), "
                   f"ip rule '{IP_RULE}', route '{IP_ROUTE}'", req, rules=self.iptables.rule_count(),
                   ip_rule=IP_RULE, ip_route=IP_ROUTE, netns_inode=inode, dns_capture=self.iptables.dns_capture)
        old = self.pods.get(req.uid)
        if old is not None:
            if old.inode != inode:
                self._log(logging.INFO, "pod netns changed, replacing cached netns", pod=req.key,
                          old_inode=old.inode, new_inode=inode)
            os.close(old.fd)
        pod = self.pods[req.uid] = MeshPod(req, fd, inode)
        # 3. hand the pod to ztunnel over ZDS
        info = WorkloadInfo(req.name, req.namespace, req.service_account)
        try:
            resp = await self.zds.add_pod(req.uid, info, fd)
        except ZtunnelUnavailable as e:
            return await self._not_handed(pod, f"no ztunnel took it ({e})")
        self._emit("cni.pod.handed", f"{req.key} handed to ztunnel with its netns fd (inode {inode}): "
                   f"{'ack' if resp.ok else 'NACK ' + resp.ack_error}", req, netns_inode=inode,
                   ack="ok" if resp.ok else "nack", error=resp.ack_error)
        if not resp.ok:
            return await self._not_handed(pod, f"ztunnel refused it: {resp.ack_error}")
        # 4. enabled
        self._set_enabled(pod, "ztunnel acknowledged the pod")
        await self._annotate(req, "enabled")
        return 200, reply("enabled", f"{req.key} is in the mesh: rules installed and ztunnel has its netns")

    async def _not_handed(self, pod: MeshPod, reason: str) -> tuple[int, dict[str, Any]]:
        """The ZDS hand-over failed: the pod is pending, unless a newly connected ztunnel already
        acknowledged this very netns in its snapshot meanwhile (then it is enabled after all)."""
        if pod.snapshot_acked:
            self._set_enabled(pod, "a ztunnel acknowledged it in its snapshot")
            await self._annotate(pod.req, "enabled")
            return 200, reply("enabled", f"{pod.req.key} is in the mesh: a new ztunnel took it in its snapshot")
        self._pending(pod, reason)
        await self._annotate(pod.req, "pending")
        # Still an error for the plugin (cni-watcher.go answers 500): the sandbox fails and the
        # kubelet retries it, so the app never runs without ztunnel's listeners in its pod.
        return 500, reply("pending", f"{pod.req.key} is pending: {reason}", f"failed to add pod to the mesh: {reason}")

    def _add_failed(self, req: PodRequest, status: int, error: str) -> tuple[int, dict[str, Any]]:
        if req.uid not in self.pods:
            self._names.pop(req.uid, None)
        self._log(logging.ERROR, "failed to add pod to the mesh", pod=req.key, error=error)
        self._emit("cni.pod.failed", f"could not add {req.key} to the mesh: {error}", req, error=error)
        return status, reply("", error, error)

    def _pending(self, pod: MeshPod, reason: str) -> None:
        pod.redirection, pod.since = "pending", time.time()
        self._log(logging.WARNING, "pod partially added: rules installed but no ztunnel has it; it will not "
                  "send or receive traffic until one does", pod=pod.req.key, reason=reason)
        self._emit("cni.pod.pending", f"{pod.req.key} is pending: its traffic is captured, but {reason}; "
                   "it has no traffic until a ztunnel takes it", pod.req, reason=reason, netns_inode=pod.inode)

    def _set_enabled(self, pod: MeshPod, why: str) -> None:
        pod.redirection, pod.since = "enabled", time.time()
        self._log(logging.INFO, "pod added to the mesh", pod=pod.req.key, why=why)
        self._emit("cni.pod.enabled", f"{pod.req.key} is in the mesh ({why}): "
                   f"{REDIRECTION_ANNOTATION}=enabled", pod.req, netns_inode=pod.inode)

    # ------------------------------------------------------------------ RemovePodFromMesh
    async def remove_pod_from_mesh(self, req: PodRequest) -> tuple[int, dict[str, Any]]:
        """Rules out (if the netns is still there), DelWorkload to every ztunnel, fd closed, un-annotate."""
        pod = self.pods.pop(req.uid, None)
        self._names.setdefault(req.uid, req)
        path = req.netns or (pod.req.netns if pod else "")
        self._log(logging.INFO, "removing pod from the mesh", pod=req.key, netns=path or "-")
        error = ""
        # 1. the rules, only while the pod still exists (same netns as enrolled)
        target: Optional[iptables.NetnsRef] = None
        if pod is not None and netns_still_there(pod.req.netns, pod.inode):
            target = pod.fd
        elif pod is None and path and os.path.exists(path):
            target = path
        if target is not None:
            try:
                await self.iptables.remove(target)
                self._emit("cni.rules.removed", f"in-pod rules, ip rule and route removed from {req.key}", req,
                           netns=path)
            except Exception as e:
                error = f"failed to remove in-pod rules from {path}: {type(e).__name__}: {e}"
                self._log(logging.ERROR, "failed to remove in-pod rules", pod=req.key, error=error)
        else:
            self._log(logging.INFO, "pod netns is gone, no rules to remove", pod=req.key)
        # 2. every connected ztunnel lets go of the pod
        acks = await self.zds.del_pod(req.uid)
        # 3. drop the cached netns
        if pod is not None:
            os.close(pod.fd)
        self._emit("cni.pod.removed", f"{req.key} left the mesh ({len(acks)} ztunnel(s) acknowledged the delete)",
                   req, ztunnel_acks=len(acks), was_enrolled=pod is not None)
        self._log(logging.INFO, "pod removed from the mesh", pod=req.key, ztunnel_acks=len(acks))
        # 4. the annotation goes
        await self._annotate(req, None)
        if req.uid not in self.pods:
            self._names.pop(req.uid, None)
        if error:
            return 500, reply("", error, error)
        return 200, reply("", f"{req.key} removed from the mesh" if pod else f"{req.key} was not in the mesh")

    # ------------------------------------------------------------------ ZDS events
    def _on_zds_event(self, ev: dict[str, Any]) -> None:
        """Forward every ZtunnelServer event; a snapshot ack flips a pending pod to enabled."""
        kind, uid = ev.get("kind", "zds.event"), ev.get("uid")
        req = self._names.get(uid) if uid else None
        fields = {k: v for k, v in ev.items() if k not in ("kind", "pod")}
        if ev.get("pod"):
            fields["workload"] = ev["pod"]  # "namespace/name" as ZDS names it
        msg = zds_event_message(ev, req.key if req else (ev.get("pod") or ""))
        if kind not in ("zds.connected", "zds.hello", "zds.disconnected"):  # ZtunnelServer logs those
            level = logging.WARNING if ev.get("ack") in ("nack", "timeout", "lost") else logging.INFO
            self._log(level, msg, scope="ztunnelserver")
        self.emitter.emit(kind, msg, pod=req.name if req else "", **({"namespace": req.namespace} if req else {}),
                          **fields)
        pod = self.pods.get(uid) if uid else None
        if (pod is None or kind != "zds.add" or not ev.get("snapshot") or ev.get("ack") != "ok"
                or ev.get("netns_inode") != pod.inode or pod.redirection != "pending"):
            return
        if self._lock(uid).locked():  # an Add of this pod is under way: it decides
            pod.snapshot_acked = True
            return
        self._set_enabled(pod, "a ztunnel acknowledged it in its snapshot")
        self._queue_annotation(pod.req, "enabled")

    # ------------------------------------------------------------------ annotations
    def _queue_annotation(self, req: PodRequest, value: Optional[str]) -> asyncio.Future[None]:
        """Queue an annotation patch; patches reach the API in the order they were queued."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._annotate_q.put_nowait((req.namespace, req.name, value, done))
        return done

    async def _annotate(self, req: PodRequest, value: Optional[str]) -> None:
        """Patch the annotation and wait for it (Istio annotates before AddPodToMesh returns).

        The caller of /cmdadd (the supervisor) is also the API that gets patched: it must not
        block its own event loop while waiting for the reply. A patch that fails or hangs is
        logged and given up after ANNOTATE_TIMEOUT; the reply still carries the state.
        """
        await asyncio.shield(self._queue_annotation(req, value))

    async def _annotate_loop(self) -> None:
        while True:
            namespace, name, value, done = await self._annotate_q.get()
            record = {"namespace": namespace, "pod": name, "key": REDIRECTION_ANNOTATION, "value": value,
                      "ts": time.time()}
            try:
                await asyncio.to_thread(self.annotator.patch, namespace, name, REDIRECTION_ANNOTATION, value)
                record["result"] = "ok"
                self._log(logging.INFO, "annotated pod" if value else "removed pod annotation",
                          pod=f"{namespace}/{name}", annotation=_annotation_text(value))
            except Exception as e:  # unreachable or refusing API: log and carry on
                record["result"] = f"failed: {type(e).__name__}: {e}"
                self._log(logging.WARNING, "could not annotate pod", pod=f"{namespace}/{name}",
                          annotation=_annotation_text(value), error=f"{type(e).__name__}: {e}")
            finally:
                self.annotations.append(record)
                self._annotate_q.task_done()
                if not done.done():
                    done.set_result(None)

    # ------------------------------------------------------------------ output
    def _emit(self, kind: str, msg: str, req: PodRequest, **fields: Any) -> None:
        self.emitter.emit(kind, msg, pod=req.name, namespace=req.namespace, **fields)

    def _log(self, level: int, msg: str, scope: str = "cni-agent", **fields: Any) -> None:
        log.log(level, msg, extra={"scope": scope, "fields": fields})


def _annotation_text(value: Optional[str]) -> str:
    return f"{REDIRECTION_ANNOTATION}={value}" if value is not None else f"{REDIRECTION_ANNOTATION}-"


# ==================================================================================================
# Logging in istio-cni's style: time, level, scope, message, key=value
# ==================================================================================================

_SCOPES = {"cni-agent": "cni-agent", "lab.cni.ztunnel_server": "ztunnelserver", "lab.cni.iptables": "iptables",
           "lab.cni.plugin_events": "cni-plugin-server"}


class IstioLogFormatter(logging.Formatter):
    """``2026-08-22T10:00:00.123456Z\tinfo\tcni-agent\tmessage\tkey=value ...`` (Istio's log layout)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.created % 1 * 1e6):06d}Z"
        level = {"WARNING": "warn", "CRITICAL": "error"}.get(record.levelname, record.levelname.lower())
        scope = getattr(record, "scope", None) or _SCOPES.get(record.name, record.name)
        line = f"{ts}\t{level}\t{scope}\t{record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            line += "\t" + " ".join(f"{k}={v}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(IstioLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


# ==================================================================================================
# Entry point
# ==================================================================================================


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lab.cni", description="istio-cni node agent for one lab node")
    p.add_argument("--lab", required=True, help="lab name (events and annotations go to its supervisor)")
    p.add_argument("--node", required=True, help="node name")
    p.add_argument("--plugin-socket", required=True, help="unix socket of the CNI plugin events (HTTP)")
    p.add_argument("--zds-socket", required=True, help="unix SOCK_SEQPACKET socket ztunnel connects to (ZDS)")
    p.add_argument("--dns-capture", action="store_true", help="also redirect the pods' DNS to ztunnel (15053)")
    p.add_argument("--annotate-socket", default=os.environ.get("LAB_CNI_ANNOTATE_SOCKET") or None,
                   help="send 'annotate' requests to this newline-JSON socket instead of the lab supervisor")
    p.add_argument("--events-socket", default=os.environ.get("LAB_CNI_EVENTS_SOCKET") or None,
                   help="send events to this datagram socket instead of the lab supervisor's")
    p.add_argument("--ack-timeout", type=float, default=None, help="ZDS ack deadline in seconds (default 5)")
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    emitter = EventEmitter(args.lab, "istio-cni", args.node)
    if args.events_socket:
        emitter.path = args.events_socket
    agent = NodeAgent(lab=args.lab, node=args.node, plugin_socket=args.plugin_socket, zds_socket=args.zds_socket,
                      dns_capture=args.dns_capture, annotator=Annotator(args.lab, args.annotate_socket),
                      emitter=emitter, ack_timeout=args.ack_timeout)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.start()
    except OSError as e:
        log.error("cannot start the node agent: %s", e, extra={"scope": "cni-agent"})
        await agent.close()
        return 1 if e.errno != errno.EADDRINUSE else 2
    await stop.wait()
    log.info("shutting down: in-pod rules stay in place", extra={"scope": "cni-agent"})
    await agent.close()
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    name_process("istio-cni")
    setup_logging(logging.DEBUG if args.debug else logging.INFO)
    return asyncio.run(run(args))
