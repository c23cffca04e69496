"""The lab supervisor: owns one lab, makes the kernel match the API server, answers clients.

It plays the parts of a real cluster that keep things running: kind (nodes), the kubelets and
the primary CNI (pods), kube-proxy (service rules), and the API endpoint the CLI and TUI talk
to. It is one asyncio process; every call that enters a network namespace runs on one
dedicated "kernel" thread, because setns moves only the calling thread (lab/common/netns.py).

Clients speak newline-delimited JSON over `/run/ambient-lab/<lab>/supervisor.sock`: one
request line, then one or more reply lines, the last with `"done": true`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import os
import signal
import socket
import time
import traceback
from typing import Any, Awaitable, Callable

from lab.cni import enrolment, plugin_events
from lab.common.errors import LabError
from lab.common.events import Event, events_socket
from lab.common.procname import name_process
from lab.common.state import LabRecord, process_start_time, run_dir
from lab.istiod.deployment_controller import DeploymentController
from lab.kube import addressing, cluster, kubelet, kubeproxy, manifests, networkpolicy, printers
from lab.kube.apiserver import ApiServer, resolve_kind
from lab.kube.model import CNI_NOT_READY_TAINT, REDIRECTION_ANNOTATION, Node, Pod, Service
from lab.supervisor.cleanup import stop_processes, teardown
from lab.supervisor.client import supervisor_socket
from lab.supervisor.components import COMPONENTS, XDS_PORT, Components, NodeSockets, istiod_dir, write_node_tokens
from lab.supervisor.stepping import ProxyAdmin, StepControl, parse_on, proxy_admins

EVENT_HISTORY = 20_000
READINESS_TIMEOUT = 10.0

Reply = Callable[[dict], Awaitable[None]]


class SandboxRetry:
    """The kubelet's back-off for one pod whose sandbox failed: 0.2 s, doubling, at most 5 s (the
    real kubelet starts at 10 s and caps at 5 minutes; the lab is faster so a learner sees it)."""

    FIRST, MOST = 0.2, 5.0

    def __init__(self) -> None:
        self.attempts = 0
        self.delay = 0.0
        self.next = 0.0

    def failed(self) -> None:
        self.attempts += 1
        self.delay = min(self.FIRST * 2 ** (self.attempts - 1), self.MOST)
        self.next = time.monotonic() + self.delay

    def due(self) -> bool:
        return time.monotonic() >= self.next


class Supervisor:
    def __init__(self, lab: str, workers: int, files: list[str], cni_taint: bool = True, cert_ttl: int = 0) -> None:
        self.lab = lab
        self.files = files
        # Istio's fix for the start-up race (reference §7.1): nodes carry a taint until istio-cni is
        # ready. Without it, pods start before the agent and run un-captured.
        self.cni_taint = cni_taint
        self.nodes: list[Node] = addressing.plan_nodes(lab, workers)
        # istiod's deployment controller writes waypoint Deployments and Services through the API server
        self.api = ApiServer(lab=lab, nodes=self.nodes, controllers=[DeploymentController()])
        self.record = LabRecord(lab=lab)
        self.kernel = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernel")
        self.running: dict[tuple, Pod] = {}  # pods whose sandbox and app exist
        self.kube_proxy_rules: dict[str, str] = {}
        self.network_policy_rules: dict[str, str] = {}  # node -> the NetworkPolicy rules installed
        self.events: collections.deque[Event] = collections.deque(maxlen=EVENT_HISTORY)
        self.subscribers: set[asyncio.Queue] = set()
        self.progress: list[str] = []
        self.ready = asyncio.Event()
        self.failed: str = ""
        self.fix: str = ""
        self.stopping = asyncio.Event()
        self.started = time.time()
        self.lock = asyncio.Lock()  # one change to the cluster at a time
        self._children: dict[int, Any] = {}  # Popen objects, so exits are reaped and seen
        self.components = Components(lab, self.record, self.logs_dir, self.dns_records_path, cert_ttl=cert_ttl)
        self.control_plane = self.nodes[0]
        self.components.istiod_address = f"{self.control_plane.ip}:{XDS_PORT}"
        self.agent_ready: set[str] = set()  # nodes whose istio-cni agent answers
        # Nodes where istio-cni installed its chained CNI plugin. It stays installed when the agent
        # stops (istio-cni `cmd/root.go`: "to 'stall' new ambient-enabled pods"), so from then on a
        # new ambient pod's sandbox fails while the agent is away: fail closed.
        self.cni_installed: set[str] = set()
        self.enrolled: dict[tuple, str] = {}  # pod key -> the agent's last answer (enabled|pending)
        self.sandbox_retry: dict[tuple, SandboxRetry] = {}  # pods whose sandbox failed: kubelet retries them
        self.gateway_addresses: dict[tuple, str] = {}  # waypoint Gateway -> the address in its status
        self.generation = 0  # bumped on every change watchers (istiod) must see
        self.changed_cond = asyncio.Condition()
        self.stepping = StepControl(self.step_targets, self.emit)  # step mode, the mesh debugger

    # -- events -------------------------------------------------------------------------------
    def publish(self, ev: Event) -> None:
        self.events.append(ev)
        for q in list(self.subscribers):
            if q.qsize() < 10_000:
                q.put_nowait(ev)

    def emit(self, kind: str, msg: str, *, component: str = "supervisor", node: str = "", pod: str = "",
             flow: str = "", **fields: Any) -> None:
        self.publish(Event(kind=kind, msg=msg, component=component, node=node, pod=pod, flow=flow, fields=fields))

    def say(self, msg: str) -> None:
        """A progress line for whoever waits on `up`."""
        self.progress.append(msg)
        self.emit("lab.progress", msg)

    async def on_kernel(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.kernel, fn, *args)

    # -- building ------------------------------------------------------------------------------
    async def build(self) -> None:
        t0 = time.monotonic()
        loaded = manifests.load_files(self.files) if self.files else manifests.Manifests()
        self.say(f"creating {len(self.nodes)} nodes ({', '.join(n.name for n in self.nodes)}) and the fabric network")
        await self.on_kernel(cluster.build_fabric, self.lab, self.record)
        for node in self.nodes:
            if self.cni_taint:
                node.taints.append(f"{CNI_NOT_READY_TAINT}:NoSchedule")
            await self.on_kernel(cluster.build_node, self.lab, node, self.nodes, self.record)
            self.emit("node.created", f"node {node.name} is up at {node.ip} with pod CIDR {node.pod_cidr}",
                      node=node.name)
        self.write_dns_records()
        for node in self.nodes:
            self.components.start("kube-dns", node)
        await self.start_istiod()
        async with self.lock:
            if loaded.resources:
                self.api.apply(loaded.resources)
                for w in self.api.selector_warnings():
                    self.say("warning: " + w)
            if self.cni_taint:
                await self.start_mesh_agents()
                await self.sync(progress=True)
            else:
                # The race of reference §7.1: no taint, so pods start before istio-cni is there.
                await self.sync(progress=True)
                self.say("starting istio-cni and ztunnel AFTER the pods (no readiness taint): "
                         "ambient pods started so far ran un-captured until now")
                await self.start_mesh_agents()
                # The agent's informer lists every pod when it starts and enrols the ambient ones
                # the plugin never saw; connections they opened before stay outside the mesh.
                await self.sync_enrolment()
            await self.wait_enrolment_settled()
        asyncio.get_running_loop().create_task(self.watch_components())
        asyncio.get_running_loop().create_task(self.retry_sandboxes())
        self.say(f"lab {self.lab} ready in {time.monotonic() - t0:.2f}s")

    async def start_istiod(self) -> None:
        """istiod on the control-plane node: it watches this API server, pushes config, signs certificates."""
        write_node_tokens(self.lab, self.nodes)
        self.record.add_path(istiod_dir(self.lab))
        self.components.start("istiod", self.control_plane)
        root = os.path.join(istiod_dir(self.lab), "root-cert.pem")
        deadline = time.monotonic() + 15
        while not os.path.exists(root):
            if not self.components.running("istiod", self.control_plane) or time.monotonic() > deadline:
                raise LabError("istiod did not start", f"see {self.components.log_path('istiod', self.control_plane)}")
            await asyncio.sleep(0.02)
        self.say(f"istiod is up on {self.control_plane.name} ({self.control_plane.ip}:{XDS_PORT}): "
                 "registry, config push, certificate authority")

    async def start_mesh_agents(self) -> None:
        """istio-cni and ztunnel on every node; the untaint controller lifts the taint once the agent is ready."""
        self.say("starting istio-cni and ztunnel on every node")
        for node in self.nodes:
            self.components.start("istio-cni", node)
            self.components.start("ztunnel", node)  # a DaemonSet: the control-plane node gets one too
        await asyncio.gather(*(self.wait_agent_ready(n) for n in self.nodes))
        # The lab also waits for each ztunnel to connect to its agent, as istio/istio#61490 proposes
        # for the untaint controller: otherwise the first pods' sandboxes fail once and are retried.
        await asyncio.gather(*(self.wait_ztunnel_connected(n) for n in self.nodes))
        self.api.reconcile()  # the scheduler places the pods that waited for the taint to go

    async def wait_ztunnel_connected(self, node: Node, timeout: float = 10.0) -> None:
        sock = NodeSockets.of(self.lab, node.name).plugin
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if (await asyncio.to_thread(plugin_events.get, sock, "/pods")).get("ztunnels_connected"):
                    return
            except (OSError, plugin_events.PluginError):
                pass
            await asyncio.sleep(0.02)
    async def wait_agent_ready(self, node: Node, timeout: float = 15.0) -> None:
        sock = NodeSockets.of(self.lab, node.name).plugin
        deadline = time.monotonic() + timeout
        while True:
            try:
                await asyncio.to_thread(plugin_events.get, sock, "/healthz")
                break
            except (OSError, plugin_events.PluginError):
                if not self.components.running("istio-cni", node):
                    raise LabError(f"istio-cni on {node.name} exited at start",
                                   f"see {self.components.log_path('istio-cni', node)}")
                if time.monotonic() > deadline:
                    raise LabError(f"istio-cni on {node.name} did not become ready in {timeout:.0f}s",
                                   f"see {self.components.log_path('istio-cni', node)}")
                await asyncio.sleep(0.02)
        self.agent_ready.add(node.name)
        self.cni_installed.add(node.name)  # install-cni wrote the chained plugin into the node's CNI config
        taint = f"{CNI_NOT_READY_TAINT}:NoSchedule"
        if taint in node.taints:
            node.taints.remove(taint)
            self.emit("node.untainted", f"istio-cni is ready on {node.name}: the untaint controller removed "
                      f"{CNI_NOT_READY_TAINT}, so pods may now be scheduled there", node=node.name)

    async def wait_enrolment_settled(self, timeout: float = 5.0) -> None:
        """Give pods handed over while ztunnel was still connecting time to turn `enabled`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(
                p.meta.annotations.get(REDIRECTION_ANNOTATION) == "pending" for p in self.running.values()):
            await asyncio.sleep(0.05)

    async def watch_components(self) -> None:
        """Notice per-node processes that died on their own (crash), and say so in the stream."""
        while True:
            await asyncio.sleep(0.5)
            for what, node, code in self.components.reap():
                self.emit("component.exited", f"{what} on {node} exited with code {code}", component=what, node=node)

    @property
    def logs_dir(self) -> str:
        return os.path.join(run_dir(self.lab), "logs")

    @property
    def dns_records_path(self) -> str:
        return os.path.join(run_dir(self.lab), "dns.json")

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    async def sync(self, progress: bool = False) -> None:
        """Make pods, enrolment, DNS and kube-proxy rules match the API server.

        This is the kubelets' loop (sandboxes and apps), the chained istio-cni plugin (CmdAdd as a
        pod starts; a failed CmdAdd fails the sandbox), the node agent's informer (level-triggered
        enrolment) and kube-proxy's.
        """
        wanted = {p.key: p for p in self.api.pods() if p.node}
        gone = [k for k in self.running if k not in wanted]
        new = [p for k, p in wanted.items() if k not in self.running]
        for key in gone:
            pod = self.running.pop(key)
            self.sandbox_retry.pop(key, None)
            if key in self.enrolled:
                await self.remove_from_mesh(pod)
            stop_processes([e for e in self.record.processes if e.pid == pod.pid], grace=0.3)
            self.record.drop_process(pod.pid)
            if (child := self._children.pop(pod.pid, None)) is not None:
                child.wait()
            await self.on_kernel(kubelet.delete_sandbox, pod, self.record)
            self.emit("pod.deleted", f"pod {pod.namespace}/{pod.name} deleted from {pod.node}", node=pod.node,
                      pod=pod.name)
        if new and progress:
            self.say(f"starting {len(new)} pods")
        started = []
        for pod in new:
            await self.on_kernel(kubelet.create_sandbox, pod, self.node(pod.node), self.record)
            pod.phase = "ContainerCreating"
            self.running[pod.key] = pod
            if await self.run_cni_plugin(pod):  # the chained plugin runs before the app starts
                self.start_app(pod)
                started.append(pod)
        if new:
            self.changed()  # scheduled pods are visible to watchers (istiod) before they are ready
            await asyncio.gather(*(self.wait_pod_ready(p) for p in started))
        await self.sync_enrolment()
        self.write_dns_records()
        await self.sync_kube_proxy()
        await self.sync_network_policies()
        self.changed()

    def is_ambient(self, pod: Pod) -> bool:
        ns = self.api.objects.get(("Namespace", "", pod.namespace))
        return enrolment.pod_is_ambient(pod.meta.labels, ns.meta.labels if ns else {})

    def start_app(self, pod: Pod) -> None:
        """The kubelet starts the pod's container once its sandbox (and every CNI plugin) succeeded."""
        command = self.components.waypoint_command(pod, self.node(pod.node)) if pod.app == "waypoint" else None
        proc = kubelet.start_app(pod, os.path.join(self.logs_dir, f"{pod.namespace}_{pod.name}.log"), self.record,
                                 command)
        self._children[proc.pid] = proc
        self.emit("pod.created", f"pod {pod.namespace}/{pod.name} got {pod.ip} on {pod.node}, "
                  f"running the {pod.app} app", node=pod.node, pod=pod.name, ip=pod.ip, netns=pod.netns)

    async def run_cni_plugin(self, pod: Pod) -> bool:
        """The chained istio-cni plugin's CmdAdd, as the container runtime runs it for a new sandbox.

        Before istio-cni installed the plugin on the node there is nothing to run: the pod starts
        un-captured (the start-up race the readiness taint closes). Once installed, the plugin asks
        the node agent to add an ambient pod to the mesh, and any failure (the agent is away, no
        ztunnel took the pod) fails the sandbox: the pod waits in ContainerCreating and the kubelet
        retries it (istio-cni `pkg/plugin/plugin.go` CmdAdd). Returns whether the app may start.
        """
        if pod.node not in self.cni_installed or not self.is_ambient(pod):
            return True
        error = await self.add_to_mesh(pod, "cni-plugin")
        if not error:
            self.sandbox_retry.pop(pod.key, None)
            return True
        retry = self.sandbox_retry.setdefault(pod.key, SandboxRetry())
        retry.failed()
        self.emit("pod.sandbox.failed", f"pod {pod.namespace}/{pod.name} on {pod.node}: FailedCreatePodSandBox: "
                  f'plugin type="istio-cni" failed (add): {error}; the kubelet retries in {retry.delay:.1f}s '
                  f"(attempt {retry.attempts}); the app does not start outside the mesh",
                  node=pod.node, pod=pod.name, reason="FailedCreatePodSandBox", error=error, attempts=retry.attempts)
        return False

    async def retry_sandboxes(self) -> None:
        """The kubelet's sandbox retries, with back-off, for pods whose CNI ADD failed."""
        while True:
            await asyncio.sleep(SandboxRetry.FIRST)
            if not self.sandbox_retry:
                continue
            async with self.lock:
                due = [self.running[k] for k, r in list(self.sandbox_retry.items())
                       if k in self.running and r.due()]
                started = [pod for pod in due if await self.run_cni_plugin(pod)]
                for pod in started:
                    self.start_app(pod)
                    self.emit("pod.sandbox.created", f"pod {pod.namespace}/{pod.name}: the sandbox was created on "
                              "retry; istio-cni added it to the mesh before its app started", node=pod.node,
                              pod=pod.name)
                if started:
                    self.changed()
                    await asyncio.gather(*(self.wait_pod_ready(p) for p in started))
                    self.changed()

    async def sync_enrolment(self, node: str = "", agent_started: bool = False) -> None:
        """The node agent's informer (istio-cni `nodeagent/informers.go` reconcilePod), level-triggered.

        For every running pod it compares intent (its labels and its namespace's) with status (the
        `ambient.istio.io/redirection` annotation), never old labels with new ones: an ambient pod
        that is not `enabled` (it started before the plugin was installed, or it is `pending`
        because no ztunnel took it) is added again, and a pod that is no longer ambient is removed.
        It runs on every change and, for a node, when its agent (re)starts: a new agent knows no
        pod, so it takes back every ambient pod of its node, `enabled` ones included (the snapshot
        it gives ztunnel is built from them, istio-cni's `ConstructInitialSnapshot`); without
        that, ztunnel would drop their listeners when it reconnects to the new agent.
        """
        for key, pod in list(self.running.items()):
            if key in self.sandbox_retry or pod.node not in self.agent_ready or (node and pod.node != node):
                continue
            want = self.is_ambient(pod)
            status = pod.meta.annotations.get(REDIRECTION_ANNOTATION, "")
            if want and (status != "enabled" or agent_started):
                await self.add_to_mesh(pod, "informer")
            elif not want and (key in self.enrolled or status):
                await self.remove_from_mesh(pod)

    async def add_to_mesh(self, pod: Pod, source: str) -> str:
        """Ask the node agent to add the pod (CmdAdd, or its informer); returns the error, or ""."""
        sock = NodeSockets.of(self.lab, pod.node).plugin
        body = {"uid": pod_uid(pod), "name": pod.name, "namespace": pod.namespace, "ip": pod.ip,
                "service_account": pod.template.service_account if pod.template else "default",
                "netns": kubelet.netns.path(pod.netns), "source": source}
        try:
            reply = await asyncio.to_thread(plugin_events.post, sock, "/cmdadd", body)
        except (OSError, plugin_events.PluginError) as e:
            error = f"istio-cni cmdAdd failed to contact node Istio CNI agent: {e}"
            self.emit("pod.enrolment.failed", f"istio-cni on {pod.node} could not enrol {pod.namespace}/{pod.name}: "
                      f"{error}", node=pod.node, pod=pod.name)
            return error
        # The agent itself annotated the pod (enabled or pending) before it replied, as istio-cni does.
        if reply.get("redirection"):
            self.enrolled[pod.key] = reply["redirection"]
        if reply.get("error"):
            self.emit("pod.enrolment.failed", f"istio-cni refused {pod.namespace}/{pod.name}: {reply['error']}",
                      node=pod.node, pod=pod.name)
            return reply["error"]
        return ""

    async def remove_from_mesh(self, pod: Pod) -> None:
        self.enrolled.pop(pod.key, None)
        sock = NodeSockets.of(self.lab, pod.node).plugin
        try:
            await asyncio.to_thread(plugin_events.post, sock, "/cmddel",
                                    {"uid": pod_uid(pod), "name": pod.name, "namespace": pod.namespace,
                                     "netns": kubelet.netns.path(pod.netns)})
        except (OSError, plugin_events.PluginError) as e:
            self.emit("pod.enrolment.failed", f"istio-cni on {pod.node} could not remove {pod.name}: {e}",
                      node=pod.node, pod=pod.name)
        self.set_annotation(pod, REDIRECTION_ANNOTATION, None)

    def set_annotation(self, pod: Pod, key: str, value: str | None) -> None:
        if value is None:
            pod.meta.annotations.pop(key, None)
        else:
            pod.meta.annotations[key] = value
        pod.raw.setdefault("metadata", {})["annotations"] = dict(pod.meta.annotations)
        self.changed()

    def changed(self) -> None:
        """Wake watchers (istiod's informers) up: the cluster's objects changed."""
        self.generation += 1

        async def notify() -> None:
            async with self.changed_cond:
                self.changed_cond.notify_all()

        asyncio.get_running_loop().create_task(notify())

    def cluster_snapshot(self) -> dict:
        """Everything a control plane watches, as plain data (what istiod's informers would list)."""
        pods = []
        for p in self.api.pods():
            pods.append({"name": p.name, "namespace": p.namespace, "uid": pod_uid(p) if p.ip else "",
                         "ip": p.ip, "node": p.node, "phase": p.phase, "labels": p.meta.labels,
                         "annotations": p.meta.annotations, "owner": p.owner,
                         "service_account": p.template.service_account if p.template else "default",
                         "ports": {cp.name: cp.container_port for c in (p.template.containers if p.template else [])
                                   for cp in c.ports if cp.name}})
        services = [{"name": s.name, "namespace": s.namespace, "cluster_ip": s.cluster_ip, "labels": s.meta.labels,
                     "selector": s.selector, "ports": [{"name": sp.name, "port": sp.port, "target_port": sp.target_port,
                                                        "protocol": sp.protocol, "app_protocol": sp.app_protocol}
                                                       for sp in s.ports]}
                    for s in self.api.services()]
        gateway_status = self.gateway_status()
        others = [{"kind": o.kind, "api_version": o.api_version, "namespace": o.namespace, "name": o.name,
                   "labels": o.meta.labels, "raw": o.raw, "status": gateway_status.get(key, {}).get("status", {})}
                  for key, o in sorted(self.api.objects.items())
                  if key[0] not in ("Pod", "Service", "Deployment", "Namespace", "ServiceAccount")]
        return {"generation": self.generation,
                "nodes": [{"name": n.name, "ip": n.ip, "role": n.role} for n in self.nodes],
                "namespaces": [{"name": n.name, "labels": n.meta.labels} for n in self.api.list("Namespace")],
                "pods": pods, "services": services, "objects": others}

    async def wait_pod_ready(self, pod: Pod) -> None:
        """kubelet's readiness probe: a TCP connect to each declared port from inside the pod, or for a
        waypoint (Envoy) an HTTP GET of /healthz/ready on 15021, as istio-proxy's probe does."""
        ports = sorted({p.container_port for c in pod.template.containers for p in c.ports}) if pod.template else []
        probes = [(15021, b"/healthz/ready")] if pod.app == "waypoint" else [(port, b"") for port in ports]
        deadline = time.monotonic() + READINESS_TIMEOUT
        loop = asyncio.get_running_loop()
        for port, path in probes:
            while True:
                if process_start_time(pod.pid) is None or self._exited(pod.pid):
                    pod.phase = "Failed"
                    self.emit("pod.failed", f"pod {pod.namespace}/{pod.name}: its app exited", pod=pod.name,
                              node=pod.node)
                    return
                sock = await self.on_kernel(_socket_in, pod.netns)
                try:
                    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 1)
                    if not path:
                        break
                    await loop.sock_sendall(sock, b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n"
                                            b"Connection: close\r\n\r\n")
                    head = await asyncio.wait_for(loop.sock_recv(sock, 64), 1)
                    if head.split(b" ")[1:2] == [b"200"]:
                        break
                    raise OSError("not ready")
                except (OSError, asyncio.TimeoutError):
                    if time.monotonic() > deadline:
                        pod.phase = "Failed"
                        return
                    await asyncio.sleep(0.05)
                finally:
                    sock.close()
        pod.phase = "Running"

    def _exited(self, pid: int) -> bool:
        p = self._children.get(pid)
        return p is not None and p.poll() is not None

    def write_dns_records(self) -> None:
        services = {}
        for svc in self.api.services():
            if svc.cluster_ip and svc.cluster_ip != "None":
                services[addressing.service_fqdn(svc.name, svc.namespace)] = svc.cluster_ip
        services[addressing.service_fqdn("kubernetes", "default")] = addressing.KUBERNETES_SERVICE_IP
        services[addressing.service_fqdn("kube-dns", "kube-system")] = addressing.CLUSTER_DNS_IP
        pods = {f"{p.ip.replace('.', '-')}.{p.namespace}.pod.{addressing.CLUSTER_DOMAIN}": p.ip
                for p in self.api.pods() if p.ip}
        tmp = self.dns_records_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"services": services, "pods": pods}, f)
        os.replace(tmp, self.dns_records_path)

    def kube_proxy_input(self) -> list[kubeproxy.ServicePortRule]:
        out = []
        for svc in self.api.services():
            if not svc.cluster_ip or svc.cluster_ip == "None":
                continue
            eps = self.api.endpoints(svc)
            for sp in svc.ports:
                out.append(kubeproxy.ServicePortRule(
                    namespace=svc.namespace, name=svc.name, port_name=sp.name, cluster_ip=svc.cluster_ip,
                    port=sp.port, protocol=sp.protocol,
                    endpoints=[kubeproxy.ServiceEndpoint(e.ip, e.port) for e in eps.get(sp.name, [])]))
        return out

    async def sync_kube_proxy(self) -> None:
        text = kubeproxy.render_rules(self.kube_proxy_input())
        for node in self.nodes:
            if self.kube_proxy_rules.get(node.name) != text:
                await self.on_kernel(kubeproxy.install_rules, node.netns, text)
                self.kube_proxy_rules[node.name] = text
                self.emit("kube-proxy.synced", f"kube-proxy rewrote the service rules on {node.name}",
                          component="kube-proxy", node=node.name, services=len(self.api.services()))

    async def sync_network_policies(self) -> None:
        """The primary CNI's NetworkPolicy enforcement (lab/kube/networkpolicy.py), on every node."""
        policies = [o.raw for o in self.api.list("NetworkPolicy", None)]
        if not policies and not self.network_policy_rules:
            return  # no policy has ever existed: the nodes' filter tables stay as kube-proxy left them
        pods = [networkpolicy.PodInfo(p.name, p.namespace, p.ip, dict(p.meta.labels)) for p in self.running.values()]
        namespaces = {n.name: dict(n.meta.labels) for n in self.api.list("Namespace")}
        text, warnings = networkpolicy.render_rules(policies, pods, namespaces)
        changed = False
        for node in self.nodes:
            if self.network_policy_rules.get(node.name) != text:
                await self.on_kernel(kubeproxy.install_rules, node.netns, text)
                self.network_policy_rules[node.name] = text
                changed = True
        if changed:
            self.emit("networkpolicy.synced", f"NetworkPolicy rules rewritten on every node: "
                      f"{text.count(' -j DROP')} isolated pods", component="kube-proxy")
            for w in warnings:
                self.emit("networkpolicy.warning", w, component="kube-proxy")

    # -- teardown -----------------------------------------------------------------------------
    async def shutdown(self) -> None:
        self.emit("lab.down", f"lab {self.lab} is being removed")
        await self.on_kernel(teardown, self.record, False)
        self.kernel.shutdown(wait=False)

    # -- client protocol ----------------------------------------------------------------------
    async def serve(self) -> None:
        os.makedirs(self.logs_dir, exist_ok=True)
        path = supervisor_socket(self.lab)
        server = await asyncio.start_unix_server(self.handle_client, path=path)
        os.chmod(path, 0o600)
        await self.listen_events()
        try:
            await self.build()
            self.ready.set()
        except Exception as e:  # noqa: BLE001 - any failure: report it and leave nothing behind
            self.failed = str(e) if isinstance(e, LabError) else f"{type(e).__name__}: {e}"
            self.fix = getattr(e, "fix", "")
            traceback.print_exc()
            self.emit("lab.failed", self.failed)
            self.ready.set()
            await self.shutdown()
            await asyncio.sleep(0.2)  # let the waiting client read the error
            server.close()
            return
        await self.stopping.wait()
        server.close()
        await self.shutdown()

    async def listen_events(self) -> None:
        """The lab's other processes stream their events here (see lab/common/events.py), one JSON line each."""

        async def reader_task(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while line := await reader.readline():
                    try:
                        self.publish(Event.from_dict(json.loads(line)))
                    except (ValueError, TypeError):
                        pass
            except (ConnectionError, asyncio.LimitOverrunError, ValueError):
                pass
            finally:
                writer.close()

        self._event_server = await asyncio.start_unix_server(reader_task, path=events_socket(self.lab),
                                                             limit=1 << 20)

    async def handle_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def reply(msg: dict) -> None:
            writer.write((json.dumps(msg, default=str) + "\n").encode())
            await writer.drain()

        try:
            line = await reader.readline()
            if not line:
                return
            req = json.loads(line)
            op = req.get("op", "")
            handler = getattr(self, "op_" + op.replace("-", "_"), None)
            if handler is None:
                await reply({"done": True, "error": f"unknown operation {op!r}"})
                return
            try:
                await handler(req, reply)
            except (ConnectionError, BrokenPipeError):
                return  # the client went away (a watcher disconnecting, a CLI interrupted)
            except LabError as e:
                await reply({"done": True, "error": e.message, "fix": e.fix})
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                await reply({"done": True, "error": f"{type(e).__name__}: {e}"})
        except (ConnectionError, json.JSONDecodeError):
            pass
        finally:
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass

    async def op_ping(self, req: dict, reply: Reply) -> None:
        await reply({"done": True, "lab": self.lab, "ready": self.ready.is_set() and not self.failed,
                     "pid": os.getpid()})

    async def op_wait_ready(self, req: dict, reply: Reply) -> None:
        sent = 0
        while True:
            while sent < len(self.progress):
                await reply({"progress": self.progress[sent]})
                sent += 1
            if self.ready.is_set():
                break
            await asyncio.sleep(0.05)
        while sent < len(self.progress):
            await reply({"progress": self.progress[sent]})
            sent += 1
        await reply({"done": True, "ok": not self.failed, "error": self.failed, "fix": self.fix})

    async def op_status(self, req: dict, reply: Reply) -> None:
        pods = self.api.pods()
        await reply({"done": True, "lab": self.lab, "uptime": time.time() - self.started,
                     "nodes": [{"name": n.name, "ip": n.ip, "pod_cidr": n.pod_cidr, "netns": n.netns}
                               for n in self.nodes],
                     "pods": {"total": len(pods), "running": sum(p.phase == "Running" for p in pods)},
                     "services": len(self.api.services()), "processes": len(self.record.processes),
                     "netns": len(self.record.netns)})

    async def op_get(self, req: dict, reply: Reply) -> None:
        kind = resolve_kind(req["kind"])
        ns = None if req.get("all_namespaces") else (req.get("namespace") or "default")
        if kind == "Node":
            objects: list = list(self.nodes)
        else:
            objects = self.api.list(kind, None if kind == "Namespace" else ns)
        if req.get("name"):
            objects = [o for o in objects if o.name == req["name"]]
            if not objects:
                raise LabError(f'{kind.lower()}s "{req["name"]}" not found'
                               + (f" in namespace {ns!r}" if kind not in ("Node", "Namespace") else ""))
        printed = printers.render(kind, objects, output=req.get("output", ""),
                                  all_namespaces=bool(req.get("all_namespaces")), by_name=bool(req.get("name")),
                                  show_labels=bool(req.get("show_labels")), now=time.time(),
                                  created=self.created_times(), extra=self.printer_extra(), namespace=ns or "default")
        await reply({"done": True, "stdout": printed.stdout.rstrip("\n"), "stderr": printed.stderr.rstrip("\n")})

    def created_times(self) -> dict:
        times = dict(self.api.created)
        for n in self.nodes:
            times[("Node", "", n.name)] = self.started
        return times

    def printer_extra(self) -> dict:
        extra = printers.derive_extra(self.api, os_image=_os_image(), kernel_version=os.uname().release)
        for gw, status in self.gateway_status().items():
            extra.setdefault(gw, {}).update(status)
        for key, doc in self.route_status().items():
            extra.setdefault(key, {})["route_status"] = doc
        return extra

    def route_status(self) -> dict:
        """Each HTTPRoute's status as its waypoints see it (Accepted, ResolvedRefs), per parent."""
        from lab.istiod.deployment_controller import is_waypoint_gateway
        from lab.waypoint.config import build_waypoint_config, route_status_document

        out: dict = {}
        snapshot = None
        for gw in self.api.list("Gateway"):
            if not is_waypoint_gateway(gw):
                continue
            snapshot = snapshot or self.cluster_snapshot()
            try:
                cfg = build_waypoint_config(snapshot, gw.namespace, gw.name)
            except Exception:  # noqa: BLE001 - status is best effort; the waypoint logs the real error
                continue
            for ref, status in cfg.route_status.items():
                ns, name = ref.split("/", 1)
                doc = route_status_document(status)
                out.setdefault(("HTTPRoute", ns, name), {"parents": []})["parents"] += doc["parents"]
        return out

    def gateway_status(self) -> dict:
        """A waypoint Gateway's status, as istiod's gateway controller writes it: Programmed while a
        pod is ready; `status.addresses` (its Service's ClusterIP) from the first time one was, and
        kept. istiod attaches the waypoint only once the address is there (lab/istiod/waypoints.py)."""
        from lab.istiod.deployment_controller import GATEWAY_NAME_LABEL, is_waypoint_gateway

        out = {}
        gateways = [gw for gw in self.api.list("Gateway") if is_waypoint_gateway(gw)]
        self.gateway_addresses = {k: v for k, v in self.gateway_addresses.items() if k in {g.key for g in gateways}}
        for gw in gateways:
            svc = self.api.objects.get(("Service", gw.namespace, gw.name))
            pods = [p for p in self.api.pods(gw.namespace) if p.meta.labels.get(GATEWAY_NAME_LABEL) == gw.name]
            running = any(p.phase == "Running" for p in pods)
            if running and isinstance(svc, Service) and svc.cluster_ip:
                self.gateway_addresses[gw.key] = svc.cluster_ip
            address = self.gateway_addresses.get(gw.key, "")
            out[gw.key] = {"address": address, "programmed": "True" if running else "False",
                           "status": {"addresses": [{"type": "IPAddress", "value": address}] if address else []}}
        return out

    async def op_waypoints(self, req: dict, reply: Reply) -> None:
        """`istioctl waypoint list`: waypoint Gateways with their state, pod and flow file."""
        from lab.istiod.deployment_controller import GATEWAY_NAME_LABEL, is_waypoint_gateway
        from lab.supervisor.components import waypoint_dir

        ns = None if req.get("all_namespaces") else (req.get("namespace") or "default")
        status = self.gateway_status()
        rows = []
        for gw in self.api.list("Gateway", ns):
            if is_waypoint_gateway(gw):
                pods = [p.name for p in self.api.pods(gw.namespace) if p.meta.labels.get(GATEWAY_NAME_LABEL) == gw.name]
                rows.append({"namespace": gw.namespace, "name": gw.name, "pods": pods,
                             "programmed": status[gw.key]["programmed"], "address": status[gw.key]["address"],
                             "waypoint_for": gw.meta.labels.get("istio.io/waypoint-for", "service"),
                             "dir": waypoint_dir(self.lab, gw.namespace, gw.name)})
        await reply({"done": True, "waypoints": rows})

    async def op_apply(self, req: dict, reply: Reply) -> None:
        loaded = self.load_request(req)
        async with self.lock:
            results = self.api.apply(loaded.resources)
            await self.sync()
        lines = [f"{printers.resource_name(r.resource)} {r.action}" for r in results]
        await reply({"done": True, "stdout": "\n".join(lines),
                     "stderr": "\n".join("Warning: " + w for w in self.api.selector_warnings())})

    async def op_delete(self, req: dict, reply: Reply) -> None:
        loaded = self.load_request(req)
        async with self.lock:
            gone = self.api.delete(loaded.resources)
            await self.sync()
        missing = [r for r in loaded.resources if r.key not in {g.key for g in gone}]
        await reply({"done": True, "stdout": "\n".join(f"{printers.resource_name(g)} deleted" for g in gone),
                     "stderr": "\n".join(f'Error from server (NotFound): {r.kind.lower()}s "{r.name}" not found'
                                         for r in missing), "exit": 1 if missing else 0})

    def load_request(self, req: dict) -> manifests.Manifests:
        out = manifests.Manifests()
        for doc in req.get("docs", []):
            part = manifests.load_text(doc["text"], doc.get("file", "<stdin>"), req.get("namespace") or "")
            out.resources += part.resources
        manifests.check_duplicates(out.resources)
        return out

    async def op_label(self, req: dict, reply: Reply) -> None:
        kind = resolve_kind(req["kind"])
        ns = req.get("namespace") or "default"
        changes: dict[str, str | None] = req["changes"]
        obj = self.api.get(kind, ns, req["name"])
        for k, v in changes.items():
            cur = obj.meta.labels.get(k)
            if v is not None and cur is not None and cur != v and not req.get("overwrite"):
                raise LabError(f"'{k}' already has a value ({cur}), and --overwrite is false",
                               "add --overwrite to replace it")
        async with self.lock:
            self.api.set_labels(kind, ns, req["name"], changes)
            self.changed()
            self.emit("object.labeled", f"{printers.resource_name(obj)} labels are now "
                      + ",".join(f"{k}={v}" for k, v in sorted(obj.meta.labels.items())), labels=obj.meta.labels)
            await self.sync()
        verb = "unlabeled" if all(v is None for v in changes.values()) else "labeled"
        await reply({"done": True, "stdout": f"{printers.resource_name(obj)} {verb}"})

    async def op_resolve_pod(self, req: dict, reply: Reply) -> None:
        """`POD` or `deploy/NAME` -> the pod, its netns and its log file (for exec and logs)."""
        ns = req.get("namespace") or "default"
        ref: str = req["ref"]
        if "/" in ref:
            word, name = ref.split("/", 1)
            kind = resolve_kind(word)
            if kind == "Pod":
                pods = [self.api.get("Pod", ns, name)]
            elif kind == "Deployment":
                self.api.get("Deployment", ns, name)
                pods = [p for p in self.api.pods(ns) if p.owner == f"Deployment/{name}"]
            else:
                raise LabError(f"cannot exec into a {kind}", "name a pod or deploy/NAME")
        else:
            pods = [self.api.get("Pod", ns, ref)]
        pods = [p for p in pods if isinstance(p, Pod)]
        running = [p for p in pods if p.phase == "Running"] or pods
        if not running:
            raise LabError(f'no pods found for "{ref}" in namespace {ns!r}')
        p = running[0]
        await reply({"done": True, "pod": p.name, "namespace": p.namespace, "netns": p.netns, "node": p.node,
                     "phase": p.phase, "ip": p.ip,
                     "log": os.path.join(self.logs_dir, f"{p.namespace}_{p.name}.log")})

    async def op_trace(self, req: dict, reply: Reply) -> None:
        pod = req.get("pod") or ""
        for ev in list(self.events):
            if not pod or ev.pod.startswith(pod):
                await reply({"event": ev.__dict__})
        if not req.get("follow"):
            await reply({"done": True})
            return
        q: asyncio.Queue = asyncio.Queue()
        self.subscribers.add(q)
        try:
            while True:
                ev = await q.get()
                if not pod or ev.pod.startswith(pod):
                    await reply({"event": ev.__dict__})
        finally:
            self.subscribers.discard(q)

    async def op_node_pods(self, req: dict, reply: Reply) -> None:
        """istio-cni's informer, listing at agent start: the node's running pods already `enabled`."""
        pods = [{"uid": pod_uid(p), "name": p.name, "namespace": p.namespace, "ip": p.ip,
                 "service_account": p.template.service_account if p.template else "default",
                 "netns": kubelet.netns.path(p.netns)}
                for p in self.running.values()
                if p.node == req.get("node") and p.meta.annotations.get(REDIRECTION_ANNOTATION) == "enabled"]
        await reply({"done": True, "pods": pods})

    async def op_annotate(self, req: dict, reply: Reply) -> None:
        """The istio-cni agent patches a pod's annotation (`ambient.istio.io/redirection`)."""
        pod = self.api.get("Pod", req["namespace"], req["pod"])
        assert isinstance(pod, Pod)
        self.set_annotation(pod, req["key"], req.get("value"))
        if req["key"] == REDIRECTION_ANNOTATION and pod.key in self.enrolled and req.get("value"):
            self.enrolled[pod.key] = req["value"]
        await reply({"done": True})

    def component_node(self, req: dict) -> tuple[str, Node]:
        what = req["component"]
        if what not in COMPONENTS:
            raise LabError(f"unknown component {what!r}", f"one of: {', '.join(COMPONENTS)}")
        name = req["node"]
        for n in self.nodes:
            if name in (n.name, n.name.removeprefix(self.lab + "-")):
                return what, n
        raise LabError(f'nodes "{name}" not found', "see: ambient-lab get nodes")

    def waypoint_pod(self, req: dict) -> Pod:
        from lab.istiod.deployment_controller import GATEWAY_NAME_LABEL

        ns, name = req.get("namespace") or "default", req["node"]
        for p in self.api.pods(ns):
            if p.meta.labels.get(GATEWAY_NAME_LABEL) == name and p.key in self.running:
                return p
        raise LabError(f'waypoint "{name}" has no running pod in namespace {ns!r}', "see: ambient-lab waypoint list")

    async def op_kill(self, req: dict, reply: Reply) -> None:
        if req["component"] == "waypoint":
            pod = self.waypoint_pod(req)
            stop_processes([e for e in self.record.processes if e.pid == pod.pid], grace=0)
            self.record.drop_process(pod.pid)
            if (child := self._children.pop(pod.pid, None)) is not None:
                child.wait()
            pod.phase = "Error"
            self.changed()
            self.emit("component.killed", f"waypoint {pod.namespace}/{req['node']} (pod {pod.name}) was killed",
                      component="waypoint", node=pod.node, pod=pod.name)
            await reply({"done": True, "stdout": f"waypoint {pod.namespace}/{req['node']} killed (pod {pod.name})"})
            return
        what, node = self.component_node(req)
        pid = self.components.kill(what, node)
        if what == "istio-cni":
            self.agent_ready.discard(node.name)
        self.emit("component.killed", f"{what} on {node.name} (pid {pid}) was killed", component=what, node=node.name)
        await reply({"done": True, "stdout": f"{what} on {node.name} killed (pid {pid})"})

    async def op_restart(self, req: dict, reply: Reply) -> None:
        if req["component"] == "waypoint":
            pod = self.waypoint_pod(req)
            if pod.phase == "Running":
                raise LabError(f"waypoint {pod.namespace}/{req['node']} is running", "kill it first to see it fail")
            node = self.node(pod.node)
            proc = kubelet.start_app(pod, os.path.join(self.logs_dir, f"{pod.namespace}_{pod.name}.log"), self.record,
                                     self.components.waypoint_command(pod, node))
            self._children[proc.pid] = proc
            pod.restarts += 1
            await self.wait_pod_ready(pod)
            self.changed()
            self.emit("component.started", f"waypoint {pod.namespace}/{req['node']} started again", component="waypoint",
                      node=pod.node, pod=pod.name)
            await reply({"done": True, "stdout": f"waypoint {pod.namespace}/{req['node']} started ({pod.phase})"})
            return
        what, node = self.component_node(req)
        if what == "istiod" and node is not self.control_plane:
            raise LabError(f"istiod runs on {self.control_plane.name}, not {node.name}")
        if self.components.running(what, node):
            self.components.kill(what, node)
        pid = self.components.start(what, node)
        self.emit("component.started", f"{what} on {node.name} started again (pid {pid})", component=what,
                  node=node.name)
        if what == "istio-cni":
            # A restarted agent lists the node's pods from its informer and reconciles every one of
            # them (reconcileNamespace on start); pods whose sandbox waits are retried by the kubelet.
            self.agent_ready.discard(node.name)
            await self.wait_agent_ready(node)
            async with self.lock:
                await self.sync_enrolment(node.name, agent_started=True)
        await reply({"done": True, "stdout": f"{what} on {node.name} started (pid {pid})"})

    async def op_components(self, req: dict, reply: Reply) -> None:
        rows = [{"component": what, "node": n.name, "pid": self.components.pid(what, n),
                 "running": self.components.running(what, n)} for n in self.nodes for what in COMPONENTS
                if what != "istiod" or n is self.control_plane]
        uncaptured = [f"{p.namespace}/{p.name}" for k, p in self.running.items()
                      if k not in self.sandbox_retry and self.is_ambient(p)
                      and not p.meta.annotations.get(REDIRECTION_ANNOTATION)]
        await reply({"done": True, "components": rows, "uncaptured": uncaptured})

    async def op_watch_cluster(self, req: dict, reply: Reply) -> None:
        """A list-then-watch stream: the whole cluster now, then again after every change."""
        seen = -1
        while True:
            if self.generation != seen:
                seen = self.generation
                await reply({"snapshot": self.cluster_snapshot()})
            async with self.changed_cond:
                try:
                    await asyncio.wait_for(self.changed_cond.wait(), 30)
                except asyncio.TimeoutError:
                    pass

    # -- step mode: the mesh debugger (lab/supervisor/stepping.py) -------------------------------
    def step_targets(self) -> list[ProxyAdmin]:
        from lab.istiod.deployment_controller import is_waypoint_gateway

        gateways = [(g.namespace, g.name) for g in self.api.list("Gateway", None) if is_waypoint_gateway(g)]
        return proxy_admins(self.lab, self.nodes, gateways)

    async def op_step_mode(self, req: dict, reply: Reply) -> None:
        try:
            on = parse_on(req.get("on"))
            timeout = float(req["timeout"]) if req.get("timeout") is not None else None
            if timeout is not None and not timeout > 0:
                raise ValueError(f"timeout must be a positive number of seconds, not {timeout:g}")
        except (ValueError, TypeError) as e:
            raise LabError(f"step_mode: {e}", 'send {"op": "step_mode", "on": true|false}') from None
        await reply({"done": True, **await self.stepping.set_mode(on, timeout)})

    async def op_step_release(self, req: dict, reply: Reply) -> None:
        try:
            result = await self.stepping.release(str(req.get("flow") or "*"), str(req.get("scope") or "step"))
        except ValueError as e:
            raise LabError(f"step_release: {e}", 'scope is "step" or "flow"; flow is an id, a prefix or "*"') from None
        await reply({"done": True, **result})

    async def op_step_held(self, req: dict, reply: Reply) -> None:
        await reply({"done": True, "on": self.stepping.on, "held": await self.stepping.held()})

    async def op_down(self, req: dict, reply: Reply) -> None:
        await reply({"progress": f"removing lab {self.lab}"})
        self.stopping.set()
        await reply({"done": True})


def pod_uid(pod: Pod) -> str:
    """A stable uid for a pod (Kubernetes' is a random UUID; ztunnel keys workloads by it)."""
    import uuid

    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"ambient-lab/{pod.namespace}/{pod.name}/{pod.ip}"))


def _os_image() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return "Linux"


def _socket_in(netns_name: str) -> socket.socket:
    """A TCP socket that belongs to a pod's namespace (created there, usable from anywhere)."""
    from lab.common import netns

    with netns.entered(netns_name):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.setblocking(False)
    return s


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lab.supervisor")
    ap.add_argument("--name", required=True)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("-f", "--filename", action="append", default=[])
    ap.add_argument("--no-cni-taint", action="store_true")
    ap.add_argument("--cert-ttl", type=int, default=0)
    args = ap.parse_args(argv)
    name_process("lab-supervisor")
    sup = Supervisor(args.name, args.nodes, args.filename, cni_taint=not args.no_cni_taint, cert_ttl=args.cert_ttl)
    sup.record.supervisor = None
    me = os.getpid()
    from lab.common.state import ProcessEntry

    sup.record.supervisor = ProcessEntry(me, process_start_time(me) or 0, "supervisor")
    sup.record.save()

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, sup.stopping.set)
        await sup.serve()

    asyncio.run(run())
    return 0
