"""The view model (lab/tui/model.py) folded over a recording of a real lab, and its limits."""

from __future__ import annotations

import collections
import zlib

from lab.common.events import Event
from lab.tui import model as M
from lab.tui.backend import RecordedBackend
from lab.tui.model import LabModel, mesh_state
from lab.tui.steps import is_denial

from .conftest import FIXTURE, RACE, folded, recorded_events, recorded_snapshot

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def test_mesh_state_truth_table() -> None:
    redirect = "ambient.istio.io/redirection"
    assert mesh_state({}, {redirect: "enabled"}, AMBIENT) == M.HBONE
    assert mesh_state({}, {redirect: "pending"}, AMBIENT) == M.PENDING
    assert mesh_state({}, {}, AMBIENT) == M.BYPASSED  # selected, never captured (started before istio-cni)
    assert mesh_state(AMBIENT, {}, {}) == M.BYPASSED  # the pod label alone selects it too
    assert mesh_state({"istio.io/dataplane-mode": "none"}, {}, AMBIENT) == M.OUT_OF_MESH  # opted out
    assert mesh_state({}, {}, {}) == M.OUT_OF_MESH


def test_every_recorded_pod_has_its_node_address_and_mesh_state(model: LabModel) -> None:
    snap = recorded_snapshot()
    ns_labels = {n["name"]: n["labels"] for n in snap["namespaces"]}
    assert len(model.pods) == len(snap["pods"])
    for p in snap["pods"]:
        pod = model.pods[f"{p['namespace']}/{p['name']}"]
        assert (pod.node, pod.ip, pod.phase) == (p["node"], p["ip"], p["phase"])
        assert pod.mesh == mesh_state(p["labels"], p["annotations"], ns_labels[p["namespace"]])
    created = {e["pod"]: e["fields"]["netns"] for e in recorded_events() if e["kind"] == "pod.created"}
    assert created and all(model.pod_by_name(name).netns == netns for name, netns in created.items())


def test_components_come_from_the_supervisor_and_change_with_events(model: LabModel) -> None:
    nodes = [n["name"] for n in recorded_snapshot()["nodes"]]
    for node in nodes:
        comps = {c.component: c for c in model.components_on(node)}
        assert set(M.PER_NODE_COMPONENTS) <= set(comps), node
        assert all(comps[w].running for w in M.PER_NODE_COMPONENTS)
    victim = nodes[-1]
    model.fold_event(Event("component.killed", f"ztunnel on {victim} was killed", component="ztunnel", node=victim))
    assert not {c.component: c for c in model.components_on(victim)}["ztunnel"].running
    model.fold_event(Event("component.started", f"ztunnel on {victim} started", component="ztunnel", node=victim))
    assert {c.component: c for c in model.components_on(victim)}["ztunnel"].running


def _directions(events: list[dict]) -> dict[str, str]:
    return {e["flow"]: e["fields"]["direction"] for e in events if e["kind"] == "conn.captured"}


def test_each_connection_joins_its_two_halves(model: LabModel) -> None:
    """Every flow id of the recording lands in exactly one connection, with one half per direction."""
    events = recorded_events()
    directions = _directions(events)
    assert directions, "the recording has no connections"
    seen = [fid for f in model.flows.values() for fid in f.ids]
    assert sorted(seen) == sorted(directions)
    for f in model.flows.values():
        assert sorted(directions[i] for i in f.ids) in (["inbound", "outbound"], ["inbound"], ["outbound"])
        assert [s.ts for s in f.steps] == sorted(s.ts for s in f.steps)
        assert f.status in ("closed", "denied", "failed", "open")
    # halves were joined by the 4-tuple: the outbound half's upstream source is what the inbound half saw
    for f in model.flows.values():
        if len(f.ids) == 2:
            out_src = [s.fields["src"] for s in f.steps if s.kind in ("conn.upstream", "conn.forwarded")
                       and s.fields.get("direction") == "outbound"]
            in_src = [s.fields["src"] for s in f.steps if s.kind == "conn.captured" and s.fields["direction"] == "inbound"]
            assert out_src and out_src == in_src


def test_joining_does_not_depend_on_which_half_arrives_first() -> None:
    """Events from two ztunnels arrive in any order: fold every inbound step before any outbound one."""
    events = recorded_events()
    directions = _directions(events)
    inbound_first = sorted((e for e in events if e["flow"]), key=lambda e: directions.get(e["flow"]) != "inbound")
    a, b = LabModel(), LabModel()
    a.fold_all({"event": e} for e in events if e["flow"])
    b.fold_all({"event": e} for e in inbound_first)
    pairs = lambda m: sorted(tuple(sorted(f.ids)) for f in m.flows.values())  # noqa: E731
    assert pairs(a) == pairs(b)


def test_bytes_and_duration_come_from_the_source_side_close(model: LabModel) -> None:
    closes = {e["flow"]: e["fields"] for e in recorded_events() if e["kind"] == "conn.closed"
              and e["fields"]["direction"] == "outbound"}
    for f in model.flows.values():
        out = [i for i in f.ids if i in closes]
        if out:
            assert (f.bytes_sent, f.bytes_recv) == (closes[out[0]]["bytes_sent"], closes[out[0]]["bytes_recv"])


def _flow_events(fid: str, denied: bool) -> list[Event]:
    evs = [Event("conn.captured", "captured", component="ztunnel", node="n1", pod="client", flow=fid,
                 fields={"direction": "outbound", "src": "10.244.1.2:40000"}),
           Event("conn.original_dst", "wanted", component="ztunnel", node="n1", pod="client", flow=fid,
                 fields={"direction": "outbound", "dst": "10.96.0.10:9080"}),
           Event("conn.upstream", "connected", component="ztunnel", node="n1", pod="client", flow=fid,
                 fields={"direction": "outbound", "src": f"10.244.1.2:{1024 + zlib.crc32(fid.encode()) % 60000}"})]
    if denied:
        evs.append(Event("rbac.decision", "denied by policy default/deny-all", component="ztunnel", node="n2",
                         pod="server", flow=fid, fields={"direction": "inbound", "allowed": False,
                                                         "policy": "default/deny-all"}))
        evs.append(Event("conn.failed", "failed", component="ztunnel", node="n1", pod="client", flow=fid,
                         fields={"direction": "outbound", "error": "http status: 401 Unauthorized"}))
    else:
        evs.append(Event("conn.closed", "closed", component="ztunnel", node="n1", pod="client", flow=fid,
                         fields={"direction": "outbound", "bytes_sent": 10, "bytes_recv": 20}))
    return evs


def test_a_denial_marks_the_connection_denied_with_its_policy() -> None:
    m = LabModel()
    for ev in _flow_events("f-denied", True) + _flow_events("f-ok", False):
        m.fold_event(ev)
    assert m.flow("f-denied").status == "denied"
    assert m.flow("f-denied").policy == "default/deny-all"
    assert m.flow("f-ok").status == "closed"
    assert (m.flow("f-ok").bytes_sent, m.flow("f-ok").bytes_recv) == (10, 20)


def test_is_denial_reads_each_way_a_proxy_says_no() -> None:
    assert is_denial("rbac.decision", {"allowed": False})
    assert not is_denial("rbac.decision", {"allowed": True})
    assert is_denial("rbac.decision", {"decision": "deny"})
    assert not is_denial("rbac.decision", {"decision": "allow"})
    assert is_denial("hbone.response", {"status": 401})
    assert not is_denial("hbone.response", {"status": 200})
    assert is_denial("conn.failed", {"error": "connection closed due to policy rejection: RBAC"})
    assert not is_denial("conn.failed", {"error": "connection refused"})


def test_memory_stays_bounded_under_a_flood() -> None:
    m = LabModel()
    n_flows = 5 * M.MAX_FLOWS
    n_events = 0
    for i in range(n_flows):
        for ev in _flow_events(f"flow-{i}", denied=i % 7 == 0):
            m.fold_event(ev)
            n_events += 1
    sizes = m.sizes()
    assert sizes["flows"] == M.MAX_FLOWS
    assert sizes["aliases"] == M.MAX_FLOWS
    assert n_events > M.MAX_EVENTS and sizes["events"] == M.MAX_EVENTS
    assert sizes["link_keys"] == M.MAX_LINK_KEYS  # none matched: the oldest were forgotten
    assert m.flows_evicted == n_flows - M.MAX_FLOWS
    changed, removed = m.take_flow_changes()
    assert len(removed) == n_flows - M.MAX_FLOWS
    assert not changed & removed
    assert set(m.flows) <= changed


def test_one_long_connection_keeps_its_first_steps_only() -> None:
    m = LabModel()
    for i in range(M.MAX_STEPS + 40):
        m.fold_event(Event("conn.progress", f"step {i}", component="ztunnel", flow="long", ts=1000.0 + i))
    f = m.flow("long")
    assert len(f.steps) == M.MAX_STEPS and f.dropped_steps == 40


def test_folding_marks_areas_dirty_once_per_batch() -> None:
    """Coalescing: a batch of hundreds of events leaves one set of dirty areas, taken once."""
    b = RecordedBackend(FIXTURE)
    m = LabModel()
    b.start()
    before = m.revision
    n = m.fold_all(b.drain())
    assert n == len(b.events) + 3  # status, snapshot, components
    assert m.revision - before >= n
    dirty = m.take_dirty()
    assert {"cluster", "events", "flows", "components"} <= dirty
    assert m.take_dirty() == set()


def test_istiod_pushes_add_up_per_type() -> None:
    m = LabModel()
    pushes = [("type.googleapis.com/istio.workload.Address", 3, 900, 9000),
              ("type.googleapis.com/istio.workload.Address", 1, 300, 9300),
              ("type.googleapis.com/istio.security.Authorization", 1, 200, 1600)]
    for i, (t, n, size, sidecar) in enumerate(pushes):
        m.fold_event(Event("istiod.push", "pushed", component="istiod", ts=float(i),
                           fields={"type_url": t, "resources": [f"r{j}" for j in range(n)], "bytes": size,
                                   "targets": ["w1"], "sidecar_equivalent_bytes": sidecar}))
    want = collections.defaultdict(lambda: [0, 0, 0, 0])
    for t, n, size, sidecar in pushes:
        w = want[t.rsplit(".", 1)[-1]]
        w[0] += 1
        w[1] += n
        w[2] += size
        w[3] += sidecar
    got = {k: [v.pushes, v.resources, v.bytes, v.sidecar_bytes] for k, v in m.push_totals.items()}
    assert got == dict(want)


def test_a_connection_knows_its_source_and_destination_pods(model: LabModel) -> None:
    """The source ztunnel's steps name the client pod; the destination ztunnel's name the server pod."""
    events = recorded_events()
    for f in model.flows.values():
        mine = [e for e in events if e["flow"] in f.ids]
        out = {e["pod"] for e in mine if e["fields"].get("direction") == "outbound"}
        inb = {e["pod"] for e in mine if e["fields"].get("direction") == "inbound"}
        assert out == ({f.src_pod} if out else set()) and inb == ({f.dst_pod} if inb else set())
        if out and inb:
            server = model.pod_by_name(f.dst_pod)
            assert f.dst.split(":")[0] in ({s["cluster_ip"] for s in model.services} | {server.ip})


def test_the_start_up_race_leaves_pods_bypassed_as_the_supervisor_reports() -> None:
    """Pods that started before istio-cni are ambient by their labels but carry no redirection
    annotation: the model calls them bypassed, exactly the pods the supervisor lists as uncaptured."""
    m = folded(RACE)
    snap = recorded_snapshot(RACE)
    bypassed = sorted(p.key for p in m.pods.values() if p.mesh == M.BYPASSED)
    assert bypassed and bypassed == sorted(m.uncaptured)
    for p in snap["pods"]:
        key = f"{p['namespace']}/{p['name']}"
        if p["labels"].get("istio.io/dataplane-mode") == "none":
            assert m.pods[key].mesh == M.OUT_OF_MESH
        elif p["annotations"].get("ambient.istio.io/redirection") == "enabled":
            assert m.pods[key].mesh == M.HBONE
    assert {p.mesh for p in m.pods.values()} == {M.BYPASSED, M.HBONE, M.OUT_OF_MESH}


def test_plain_text_into_a_meshed_pod_is_one_inbound_flow_without_identity() -> None:
    """The bypassed client has no ztunnel in its path: only the destination's inbound half exists,
    captured on 15006 and authorized with no identity (ztunnel's inbound passthrough)."""
    m = folded(RACE)
    decisions = [e for e in recorded_events(RACE) if e["kind"] == "rbac.decision"]
    assert decisions and all(not e["fields"]["src_identity"] for e in decisions)
    for e in decisions:
        f = m.flow(e["flow"])
        assert f.ids == [e["flow"]] and not f.src_pod and f.dst_pod == e["pod"]
        captured = [s for s in f.steps if s.kind == "conn.captured"]
        assert captured and captured[0].fields["port"] == 15006
