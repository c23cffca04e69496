"""The TUI's view model: the lab as a learner watches it, folded from the supervisor's streams.

Two streams come from the supervisor (lab/supervisor/server.py): the event stream (`trace`, one
`Event` per step of everything: pods created, istio-cni enrolling a pod, ztunnel capturing a
connection, istiod pushing xDS) and the cluster snapshots (`watch_cluster`, what istiod's
informers list after every change). `LabModel` folds both into what the screens show:

- per-pod state, with the pod's place in the mesh (`mesh_state`: HBONE, pending, bypassed,
  out-of-mesh), as istio-cni's `ambient.istio.io/redirection` annotation and the enablement
  selectors decide it;
- per-node components (istio-cni, ztunnel, kube-dns, istiod), up or down;
- flows: every connection with its steps in order (one flow id ties the source ztunnel's and
  the destination ztunnel's steps together; plain-TCP halves are joined by their 4-tuple);
- istiod's xDS pushes, with what a sidecar mesh would have pushed instead;
- step mode (the mesh debugger, lab/ztunnel/stepper.py): whether the proxies hold new flows, and
  which flow waits where, before which step, with what will happen next (`step.*` events, and
  the supervisor's `step_held` answer a live backend polls).

Memory is bounded (every history is a bounded deque or an evicting dict) and updates are
coalesced: folding only marks areas dirty; the app redraws each dirty area at most once per
tick. No Textual here: a test imports this module and checks that.
"""

from __future__ import annotations

import bisect
import collections
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from lab.cni.enrolment import pod_is_ambient
from lab.common.events import Event
from lab.kube.model import DATAPLANE_MODE_LABEL, REDIRECTION_ANNOTATION, USE_WAYPOINT_LABEL
from lab.tui.steps import decisive_policy, is_denial, step_title

MAX_EVENTS = 5_000  # the event log view
MAX_FLOWS = 500  # connections kept for the flows view
MAX_STEPS = 64  # steps kept per connection (a long-lived one keeps its first ones)
MAX_POD_EVENTS = 200  # per pod, for the pod view
MAX_PUSHES = 1_000  # istiod pushes
MAX_LINK_KEYS = 4 * MAX_FLOWS  # 4-tuples remembered to join plain-TCP halves
MAX_RELEASED_KEYS = 1_000  # held steps known released (a late poll answer must not bring them back)

PER_NODE_COMPONENTS = ("istio-cni", "ztunnel", "kube-dns")

# Mesh states a pod can be in, as the cluster view shows them.
HBONE = "HBONE"  # captured: istio-cni installed the in-pod rules and ztunnel took the pod
PENDING = "pending"  # captured, but ztunnel has not acknowledged the pod yet
BYPASSED = "bypassed"  # ambient by its labels, yet not captured (started before istio-cni was installed)
OUT_OF_MESH = "out-of-mesh"  # not selected for ambient: plain TCP, kube-proxy only

# Areas of the screen that folding can make stale.
AREAS = ("cluster", "components", "flows", "events", "istiod", "progress")


def mesh_state(pod_labels: dict, pod_annotations: dict, namespace_labels: dict) -> str:
    """A pod's place in the ambient mesh.

    istio-cni annotates a pod it captured with `ambient.istio.io/redirection: enabled` once
    ztunnel acknowledged it (`pending` before that). A pod the enablement selectors pick
    (namespace or pod label `istio.io/dataplane-mode=ambient`) without that annotation escaped
    capture: its traffic bypasses ztunnel (Istio's start-up race, reference §7.1).
    """
    redirection = (pod_annotations or {}).get(REDIRECTION_ANNOTATION, "")
    if redirection == "enabled":
        return HBONE
    if redirection == "pending":
        return PENDING
    if pod_is_ambient(pod_labels or {}, namespace_labels or {}):
        return BYPASSED
    return OUT_OF_MESH


@dataclass
class PodState:
    """One pod as the TUI shows it: the snapshot's facts plus what the event stream added."""

    name: str
    namespace: str
    node: str = ""
    ip: str = ""
    phase: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    owner: str = ""
    service_account: str = ""
    ports: dict[str, int] = field(default_factory=dict)
    netns: str = ""  # from the pod.created event
    mesh: str = OUT_OF_MESH

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def app(self) -> str:
        return self.labels.get("app", "") or self.owner.split("/")[-1]


@dataclass
class ComponentState:
    """One per-node process of the lab (istio-cni, ztunnel, kube-dns, istiod)."""

    component: str
    node: str
    running: bool = False
    pid: int = 0
    note: str = ""  # the last thing that happened to it, as a sentence
    since: float = 0.0


@dataclass
class Step:
    """One step of a connection: the event, with its timeline title."""

    ts: float
    kind: str
    title: str
    sentence: str
    component: str
    node: str
    pod: str
    flow: str
    fields: dict[str, Any]

    @classmethod
    def of(cls, ev: Event) -> "Step":
        return cls(ev.ts, ev.kind, step_title(ev.kind), ev.msg, ev.component, ev.node, ev.pod, ev.flow,
                   dict(ev.fields))

    @property
    def where(self) -> str:
        return self.component + (f"@{self.node}" if self.node else "")


@dataclass
class HeldStep:
    """Step mode: one flow waiting in one proxy before one step, and what will happen next."""

    flow: str
    step: str
    next: str
    where: str  # component@node
    component: str = ""
    node: str = ""
    pod: str = ""
    seq: int = 0
    since: float = 0.0
    direction: str = ""  # ztunnel's outbound (source) or inbound (destination) side; "" in a waypoint

    @property
    def key(self) -> str:
        """Unique per held step: the proxy and its sequence number."""
        return f"{self.where}#{self.seq}"

    @classmethod
    def of(cls, d: dict[str, Any], ev: Event | None = None) -> "HeldStep":
        """From a `step.held` event's fields, or one row of the supervisor's `step_held` answer."""
        component = (ev.component if ev else "") or str(d.get("component", ""))
        node = (ev.node if ev else "") or str(d.get("node", ""))
        return cls(flow=(ev.flow if ev else "") or str(d.get("flow", "")), step=str(d.get("step", "")),
                   next=str(d.get("next", "")), where=str(d.get("where") or f"{component}@{node}"),
                   component=component, node=node, pod=(ev.pod if ev else "") or str(d.get("pod", "")),
                   seq=int(d.get("seq", 0) or 0), since=float(ev.ts if ev else d.get("since", 0) or 0),
                   direction=str(d.get("direction", "")))


@dataclass
class Flow:
    """One connection as a learner follows it, across the proxies it went through.

    `ids` are the flow ids that make it up: one when both ztunnels share the flow id (HBONE
    carries it in the CONNECT request), two when a plain-TCP outbound half and the inbound half
    it reached were joined by their 4-tuple.
    """

    id: str
    started: float
    updated: float = 0.0
    ids: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    dropped_steps: int = 0
    src: str = ""  # ip:port of the client
    dst: str = ""  # the original destination (service VIP or pod IP, and port)
    src_pod: str = ""
    dst_pod: str = ""
    open_ids: set[str] = field(default_factory=set)  # "flow id/direction" of halves not closed yet
    denied: bool = False
    failed: bool = False
    error: str = ""
    policy: str = ""
    bytes_sent: int = 0
    bytes_recv: int = 0
    duration_ms: float = 0.0
    plan: str = ""
    held: dict[str, HeldStep] = field(default_factory=dict)  # step mode: where it waits now

    @property
    def status(self) -> str:
        """denied > failed > held > open > closed: the worst thing that happened to any half."""
        if self.denied:
            return "denied"
        if self.failed:
            return "failed"
        if self.held:
            return "held"
        if self.open_ids:
            return "open"
        return "closed"

    def held_steps(self) -> list[HeldStep]:
        """Where the flow waits now (step mode), oldest first."""
        return sorted(self.held.values(), key=lambda h: (h.since, h.seq))


@dataclass
class Push:
    """One xDS push from istiod (ambient: only what changed, to the ztunnels that need it)."""

    ts: float
    type_url: str
    resources: int
    removed: int
    bytes: int
    targets: list[str]
    sidecar_bytes: int
    reason: str
    version: str

    @property
    def short_type(self) -> str:
        return self.type_url.rsplit("/", 1)[-1].rsplit(".", 1)[-1]


@dataclass
class PushTotals:
    pushes: int = 0
    resources: int = 0
    bytes: int = 0
    sidecar_bytes: int = 0


def _addr_ip(addr: str) -> str:
    return addr.rsplit(":", 1)[0] if addr else ""


class LabModel:
    """Everything the screens show, folded from events and snapshots; bounded and coalesced."""

    def __init__(self, lab: str = "", clock: Callable[[], float] = time.time) -> None:
        self.lab = lab
        self.clock = clock
        self.nodes: list[dict] = []
        self.namespaces: list[dict] = []
        self.services: list[dict] = []
        self.objects: list[dict] = []
        self.pods: dict[str, PodState] = {}  # "ns/name" -> pod
        self.netns: dict[str, str] = {}  # pod name -> netns, from pod.created
        self.generation = -1
        self.components: dict[tuple[str, str], ComponentState] = {}
        self.uncaptured: list[str] = []
        self.events: collections.deque[Event] = collections.deque(maxlen=MAX_EVENTS)
        self.events_seen = 0
        self.pod_events: dict[str, collections.deque[Event]] = {}
        self.flows: collections.OrderedDict[str, Flow] = collections.OrderedDict()
        self.flow_alias: dict[str, str] = {}  # every flow id -> the Flow that holds it
        self._by_forward_src: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._by_inbound_src: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.flows_evicted = 0
        self.pushes: collections.deque[Push] = collections.deque(maxlen=MAX_PUSHES)
        self.push_totals: dict[str, PushTotals] = {}
        self.acks = 0
        self.nacks: collections.deque[Event] = collections.deque(maxlen=50)
        self.certificates: collections.deque[Event] = collections.deque(maxlen=200)
        self.progress: collections.deque[str] = collections.deque(maxlen=50)
        self.status = ""  # the connection's state, one line (connecting, live, recorded, gone)
        self.step_mode: bool | None = None  # live step mode, as last heard (None: never heard of)
        self.held: dict[str, HeldStep] = {}  # step mode: every held step, by HeldStep.key
        self._released: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.revision = 0
        self._dirty: set[str] = set()
        self.changed_flows: set[str] = set()
        self.removed_flows: set[str] = set()

    # -- coalescing ------------------------------------------------------------------------------
    def touch(self, *areas: str) -> None:
        self._dirty.update(areas)
        self.revision += 1

    def take_dirty(self) -> set[str]:
        """The areas changed since the last call (the app redraws each at most once a tick)."""
        out, self._dirty = self._dirty, set()
        return out

    def take_flow_changes(self) -> tuple[set[str], set[str]]:
        """Flows changed and flows evicted since the last call, for incremental table updates."""
        changed, removed = self.changed_flows - self.removed_flows, set(self.removed_flows)
        self.changed_flows, self.removed_flows = set(), set()
        return changed, removed

    # -- input -----------------------------------------------------------------------------------
    def fold(self, message: dict) -> None:
        """One reply line of the supervisor: {"event": ...}, {"snapshot": ...}, {"components": ...},
        {"status": "..."} or {"progress": "..."}."""
        if "event" in message:
            self.fold_event(Event.from_dict(message["event"]))
        elif "snapshot" in message:
            self.fold_snapshot(message["snapshot"])
        elif "components" in message:
            self.fold_components(message)
        elif "progress" in message:
            self.progress.append(str(message["progress"]))
            self.touch("progress")
        elif "status" in message:
            self.status = str(message["status"])
            self.touch("progress")
        elif "step" in message:
            self.fold_step_state(message["step"])

    def fold_all(self, messages: Iterable[dict]) -> int:
        n = 0
        for m in messages:
            self.fold(m)
            n += 1
        return n

    def fold_snapshot(self, snap: dict) -> None:
        """A `watch_cluster` snapshot replaces the cluster's objects (list-then-watch)."""
        self.generation = int(snap.get("generation", self.generation))
        self.nodes = list(snap.get("nodes", []))
        self.namespaces = list(snap.get("namespaces", []))
        self.services = list(snap.get("services", []))
        self.objects = list(snap.get("objects", []))
        ns_labels = {n["name"]: n.get("labels", {}) for n in self.namespaces}
        pods = {}
        for p in snap.get("pods", []):
            pod = PodState(name=p["name"], namespace=p.get("namespace", "default"), node=p.get("node", ""),
                           ip=p.get("ip", ""), phase=p.get("phase", ""), labels=dict(p.get("labels") or {}),
                           annotations=dict(p.get("annotations") or {}), owner=p.get("owner", ""),
                           service_account=p.get("service_account", ""), ports=dict(p.get("ports") or {}),
                           netns=self.netns.get(p["name"], ""))
            pod.mesh = mesh_state(pod.labels, pod.annotations, ns_labels.get(pod.namespace, {}))
            pods[pod.key] = pod
        self.pods = pods
        for n in self.nodes:  # per-node components exist from the start, up or not
            for what in PER_NODE_COMPONENTS:
                self.components.setdefault((what, n["name"]), ComponentState(what, n["name"]))
        self.touch("cluster", "components")

    def fold_components(self, reply: dict) -> None:
        """The supervisor's `components` answer: pids and liveness, and pods that escaped capture."""
        for row in reply.get("components", []):
            key = (row["component"], row["node"])
            c = self.components.get(key) or ComponentState(row["component"], row["node"])
            if row["component"] not in PER_NODE_COMPONENTS and not row.get("running") and key not in self.components:
                continue  # istiod runs on one node only: do not list it everywhere
            c.running, c.pid = bool(row.get("running")), int(row.get("pid") or 0)
            self.components[key] = c
        self.uncaptured = list(reply.get("uncaptured", []))
        self.touch("components", "cluster")

    def fold_event(self, ev: Event) -> None:
        self.events.append(ev)
        self.events_seen += 1
        self.touch("events")
        if ev.pod:
            q = self.pod_events.get(ev.pod)
            if q is None:
                q = self.pod_events[ev.pod] = collections.deque(maxlen=MAX_POD_EVENTS)
                self._bound_pod_events()
            q.append(ev)
        k = ev.kind
        if k.startswith("step."):
            self._fold_step_event(ev)
        elif ev.flow:
            self._fold_flow_step(ev)
        if k == "pod.created" and ev.pod and ev.fields.get("netns"):
            self.netns[ev.pod] = str(ev.fields["netns"])
            for p in self.pods.values():
                if p.name == ev.pod:
                    p.netns = self.netns[ev.pod]
        elif k == "pod.deleted":
            self.netns.pop(ev.pod, None)
        elif k in ("lab.progress", "lab.failed", "lab.down"):
            self.progress.append(ev.msg)
            self.touch("progress")
        elif k.startswith("component.") or k in ("cni.ready", "ztunnel.xds.connected", "istiod.started"):
            self._fold_component_event(ev)
        elif k == "istiod.push":
            self._fold_push(ev)
        elif k == "istiod.ack":
            self.acks += 1
            self.touch("istiod")
        elif k in ("istiod.nack", "ztunnel.xds.nack"):
            self.nacks.append(ev)
            self.touch("istiod")
        elif k in ("istiod.csr.signed", "istiod.csr.refused"):
            self.certificates.append(ev)
            self.touch("istiod")

    # -- step mode -------------------------------------------------------------------------------
    def _fold_step_event(self, ev: Event) -> None:
        """`step.held` / `step.released` / `step.mode`: not steps of the flow, but its state."""
        f = ev.fields
        if ev.kind == "step.mode":
            if ev.component == "supervisor" or f.get("where") == "lab":
                self.step_mode = bool(f.get("on"))
            elif f.get("on"):
                self.step_mode = True
            self.touch("flows", "cluster")
            return
        h = HeldStep.of(f, ev)
        if ev.kind == "step.held" and h.key not in self._released:
            self._hold(h)
        elif ev.kind == "step.released":
            self._remember_released(h.key)
            self._unhold(h.key)

    def fold_step_state(self, state: dict) -> None:
        """The supervisor's `step_held` answer (polled): the mode, and every held step now. Steps
        already known released (their event came first) stay released."""
        self.step_mode = bool(state.get("on"))
        now = {h.key: h for h in (HeldStep.of(d) for d in state.get("held", [])) if h.key not in self._released}
        for key in [k for k in self.held if k not in now]:
            self._unhold(key)
        for key, h in now.items():
            if key not in self.held:
                self._hold(h)
        self.touch("flows", "cluster")

    def _hold(self, h: HeldStep) -> None:
        self.held[h.key] = h
        flow = self.flow(h.flow)
        if flow is None and h.flow:  # held before any step reached us: the flow starts here
            flow = Flow(id=h.flow, started=h.since, updated=h.since, ids=[h.flow])
            self.flows[h.flow] = flow
            self.flow_alias[h.flow] = h.flow
            self._evict_flows()
        if flow is not None:
            flow.held[h.key] = h
            self.changed_flows.add(flow.id)
        self.touch("flows")

    def _unhold(self, key: str) -> None:
        h = self.held.pop(key, None)
        if h is None:
            return
        flow = self.flow(h.flow)
        if flow is not None:
            flow.held.pop(key, None)
            self.changed_flows.add(flow.id)
        self.touch("flows")

    def _remember_released(self, key: str) -> None:
        self._released[key] = None
        while len(self._released) > MAX_RELEASED_KEYS:
            self._released.popitem(last=False)

    def held_steps(self) -> list[HeldStep]:
        """Every held step of the lab, oldest first."""
        return sorted(self.held.values(), key=lambda h: (h.since, h.seq))

    def _bound_pod_events(self) -> None:
        """Pods come and go: keep the per-pod histories of at most 4x the pods we know."""
        limit = max(64, 4 * len(self.pods))
        while len(self.pod_events) > limit:
            self.pod_events.pop(next(iter(self.pod_events)))

    def _fold_component_event(self, ev: Event) -> None:
        k = ev.kind
        what = {"cni.ready": "istio-cni", "ztunnel.xds.connected": "ztunnel", "istiod.started": "istiod"}.get(
            k, ev.component)
        node = ev.node
        if k == "istiod.started" and not node:
            node = self._node_by_ip(_addr_ip(str(ev.fields.get("listen", ""))))
        if not node:
            return
        c = self.components.get((what, node)) or ComponentState(what, node)
        if k in ("component.killed", "component.exited"):
            c.running, c.pid = False, 0
        else:
            c.running = True
        c.note, c.since = ev.msg, ev.ts
        self.components[(what, node)] = c
        self.touch("components", "cluster")

    def _node_by_ip(self, ip: str) -> str:
        for n in self.nodes:
            if n.get("ip") == ip:
                return n["name"]
        return ""

    def _fold_push(self, ev: Event) -> None:
        f = ev.fields
        res = f.get("resources", [])
        push = Push(ts=ev.ts, type_url=str(f.get("type_url", "")), resources=len(res) if isinstance(res, list) else int(res),
                    removed=len(f.get("removed") or []), bytes=int(f.get("bytes", 0)),
                    targets=list(f.get("targets") or []), sidecar_bytes=int(f.get("sidecar_equivalent_bytes", 0)),
                    reason=str(f.get("reason", "")), version=str(f.get("version", "")))
        self.pushes.append(push)
        t = self.push_totals.setdefault(push.short_type, PushTotals())
        t.pushes += 1
        t.resources += push.resources
        t.bytes += push.bytes
        t.sidecar_bytes += push.sidecar_bytes
        self.touch("istiod")

    # -- flows -----------------------------------------------------------------------------------
    def _fold_flow_step(self, ev: Event) -> None:
        fid = self.flow_alias.get(ev.flow)
        flow = self.flows.get(fid) if fid else None
        if flow is None:
            flow = Flow(id=ev.flow, started=ev.ts, ids=[ev.flow])
            self.flows[ev.flow] = flow
            self.flow_alias[ev.flow] = ev.flow
            self._evict_flows()
        if ev.flow not in flow.ids:
            flow.ids.append(ev.flow)
        f = ev.fields
        direction = f.get("direction", "")
        if len(flow.steps) < MAX_STEPS:  # in time order: two ztunnels' events may arrive out of order
            bisect.insort(flow.steps, Step.of(ev), key=lambda s: s.ts)
        else:
            flow.dropped_steps += 1
        flow.updated = max(flow.updated, ev.ts)
        flow.started = min(flow.started, ev.ts)
        k = ev.kind
        if ev.pod and direction == "outbound":  # the source pod's ztunnel speaks for the source pod
            flow.src_pod = flow.src_pod or ev.pod
        elif ev.pod and direction == "inbound":  # and the destination's for the destination pod
            flow.dst_pod = flow.dst_pod or ev.pod
        half = f"{ev.flow}/{direction}"  # one flow id, two halves when both ztunnels share it (HBONE)
        if k == "conn.captured":
            flow.open_ids.add(half)
            if direction == "outbound" or not flow.src:
                flow.src = flow.src or str(f.get("src", ""))
            if direction == "inbound":
                if str(f.get("port", "")) != "15008":  # plaintext into a pod: join it to its source's half
                    self._link_inbound(flow, str(f.get("src", "")), ev.flow)
        elif k == "conn.original_dst" and (direction == "outbound" or not flow.dst):
            flow.dst = str(f.get("dst", ""))
        elif k in ("conn.forwarded", "conn.upstream") and direction == "outbound":
            # ztunnel's own connection leaves the pod from `src`: a plain-TCP inbound half sees that.
            flow.plan = flow.plan or str(f.get("plan", ""))
            if f.get("protocol", "TCP") == "TCP":  # HBONE's outer source is shared by pooled streams
                self._link_outbound(flow, str(f.get("src", "")))
        elif k == "conn.plan":
            flow.plan = str(f.get("plan") or f.get("kind") or flow.plan)
        if is_denial(k, f):
            flow.denied = True
            flow.policy = flow.policy or decisive_policy(f)
            flow.error = flow.error or str(f.get("error") or (f"denied: {f['reason']}" if f.get("reason") else ev.msg))
        if k == "conn.failed":
            flow.failed = True
            flow.error = flow.error or str(f.get("error", ""))
        if k in ("conn.closed", "conn.failed"):
            flow.open_ids.discard(half)
            if direction != "inbound" or not flow.bytes_sent:
                flow.bytes_sent = int(f.get("bytes_sent", flow.bytes_sent) or 0)
                flow.bytes_recv = int(f.get("bytes_recv", flow.bytes_recv) or 0)
            flow.duration_ms = max(flow.duration_ms, float(f.get("duration_ms", 0) or 0))
        self.changed_flows.add(flow.id)
        self.touch("flows")

    def _link_outbound(self, flow: Flow, src: str) -> None:
        """Plain TCP: the outbound half connected from `src`; the inbound half it reached saw `src`."""
        if not src:
            return
        other = self._by_inbound_src.pop(src, None)
        if other is not None:
            self._merge(flow, other)
        else:
            self._remember(self._by_forward_src, src, flow.id)

    def _link_inbound(self, flow: Flow, src: str, fid: str) -> None:
        if not src or len(flow.ids) > 1:
            return
        other = self._by_forward_src.pop(src, None)
        if other is not None and other != flow.id:
            target = self.flows.get(self.flow_alias.get(other, ""))
            if target is not None:
                self._merge(target, flow.id)
                return
        self._remember(self._by_inbound_src, src, flow.id)

    @staticmethod
    def _remember(d: collections.OrderedDict, key: str, fid: str) -> None:
        d[key] = fid
        while len(d) > MAX_LINK_KEYS:
            d.popitem(last=False)

    def _merge(self, into: Flow, other_id: str) -> None:
        """Join two halves of one connection: `other_id`'s steps move into `into`."""
        other = self.flows.pop(self.flow_alias.get(other_id, other_id), None)
        if other is None or other is into:
            return
        self.removed_flows.add(other.id)
        for fid in other.ids:
            self.flow_alias[fid] = into.id
            if fid not in into.ids:
                into.ids.append(fid)
        into.steps = sorted(into.steps + other.steps, key=lambda s: s.ts)[:MAX_STEPS]
        into.dropped_steps += other.dropped_steps
        into.started = min(into.started, other.started)
        into.updated = max(into.updated, other.updated)
        into.open_ids |= other.open_ids
        into.denied |= other.denied
        into.failed |= other.failed
        into.error = into.error or other.error
        into.policy = into.policy or other.policy
        into.dst_pod = into.dst_pod or other.dst_pod
        into.src_pod = into.src_pod or other.src_pod
        into.src = into.src or other.src
        into.dst = into.dst or other.dst
        into.duration_ms = max(into.duration_ms, other.duration_ms)
        into.held.update(other.held)

    def _evict_flows(self) -> None:
        while len(self.flows) > MAX_FLOWS:
            _, old = self.flows.popitem(last=False)
            for fid in old.ids:
                self.flow_alias.pop(fid, None)
            for key in old.held:
                self.held.pop(key, None)
            self.removed_flows.add(old.id)
            self.flows_evicted += 1

    # -- queries ---------------------------------------------------------------------------------
    def flow(self, fid: str) -> Flow | None:
        return self.flows.get(self.flow_alias.get(fid, fid))

    def pod_by_name(self, name: str) -> PodState | None:
        for p in self.pods.values():
            if p.name == name:
                return p
        return None

    def name_of(self, addr: str) -> str:
        """`10.96.3.13:9080` -> `svc details:9080`; `10.244.1.3:9080` -> `productpage-v1-...:9080`."""
        if not addr:
            return ""
        ip, _, port = addr.rpartition(":")
        for s in self.services:
            if s.get("cluster_ip") == ip:
                return f"{s['name']}:{port}"
        for p in self.pods.values():
            if p.ip == ip:
                return f"{p.name}:{port}"
        return addr

    def pods_on(self, node: str) -> list[PodState]:
        return sorted((p for p in self.pods.values() if p.node == node), key=lambda p: (p.namespace, p.name))

    def pending_pods(self) -> list[PodState]:
        """Pods not scheduled on any node yet (tainted nodes, or none fits)."""
        return [p for p in self.pods.values() if not p.node]

    def namespace_labels(self, ns: str) -> dict[str, str]:
        for n in self.namespaces:
            if n["name"] == ns:
                return dict(n.get("labels") or {})
        return {}

    def is_ambient_namespace(self, ns: str) -> bool:
        return self.namespace_labels(ns).get(DATAPLANE_MODE_LABEL) == "ambient"

    def waypoint_of(self, pod: PodState) -> str:
        return pod.labels.get(USE_WAYPOINT_LABEL) or self.namespace_labels(pod.namespace).get(USE_WAYPOINT_LABEL, "")

    def components_on(self, node: str) -> list[ComponentState]:
        order = {"istiod": 0, "istio-cni": 1, "ztunnel": 2, "kube-dns": 3}
        return sorted((c for (_, n), c in self.components.items() if n == node),
                      key=lambda c: order.get(c.component, 9))

    def sizes(self) -> dict[str, int]:
        """How much the model holds (the responsiveness bench prints it: it must stay bounded)."""
        return {"events": len(self.events), "flows": len(self.flows), "aliases": len(self.flow_alias),
                "steps": sum(len(f.steps) for f in self.flows.values()), "pod_histories": len(self.pod_events),
                "pushes": len(self.pushes), "link_keys": len(self._by_forward_src) + len(self._by_inbound_src)}
