"""The backends: a recording answers like a lab and refuses changes; a live one reports a missing lab."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from lab.common.errors import LabError
from lab.tui.backend import QUEUE_LIMIT, LiveBackend, RecordedBackend
from lab.tui.model import PodState

from .conftest import FIXTURE, recorded_events


def test_start_queues_status_snapshot_components_and_every_event(backend: RecordedBackend) -> None:
    backend.start()
    msgs = backend.drain()
    assert "snapshot" in msgs[0] and "components" in msgs[1]  # the newest cluster state first
    assert [m["event"] for m in msgs if "event" in m] == recorded_events()
    assert backend.drain() == [] and backend.pending() == 0


def test_snapshots_coalesce_and_events_are_bounded(backend: RecordedBackend) -> None:
    for gen in range(5):
        backend.post({"snapshot": {"generation": gen}})
    assert [m["snapshot"]["generation"] for m in backend.drain() if "snapshot" in m] == [4]
    for i in range(QUEUE_LIMIT + 10):
        backend.post({"event": {"kind": "x", "msg": str(i)}})
    assert backend.dropped == 10
    assert len(backend.drain(limit=100)) == 100 and backend.pending() == QUEUE_LIMIT - 100


def test_reads_come_from_the_recording(backend: RecordedBackend) -> None:
    pods = json.loads((FIXTURE / "get" / "pods.json").read_text())["items"]
    name = pods[0]["metadata"]["name"]
    doc = yaml.safe_load(backend.yaml("pods", "default", name))
    assert doc == pods[0]
    with pytest.raises(LabError):
        backend.yaml("pods", "default", "no-such-pod")
    recorded = sorted(p.name for p in (FIXTURE / "pods").iterdir())
    pod = PodState(name=recorded[0], namespace="default")
    assert backend.pod_output(pod, "iptables") == (FIXTURE / "pods" / recorded[0] / "iptables.txt").read_text()
    assert "has no sockets output" in backend.pod_output(PodState(name="other", namespace="default"), "sockets")


def test_changes_are_refused_but_recorded(backend: RecordedBackend) -> None:
    with pytest.raises(LabError, match="recording"):
        backend.request("label", kind="namespace", name="default", changes={"a": "b"})
    assert [(r.op, r.fields["name"]) for r in backend.sent] == [("label", "default")]


def test_replay_at_a_rate_rekeys_flows_each_pass() -> None:
    b = RecordedBackend(FIXTURE, rate=20_000, loops=2)
    b.start()
    b.wait_replayed(10)
    events = [m["event"] for m in b.drain() if "event" in m]
    n = len(b.events)
    assert len(events) == 2 * n
    first = {e["flow"] for e in events[:n] if e["flow"]}
    second = {e["flow"] for e in events[n:] if e["flow"]}
    assert first and second and not first & second
    assert len(first) == len({e["flow"] for e in b.events if e["flow"]})


def test_live_backend_says_when_the_lab_is_not_running() -> None:
    b = LiveBackend("tui-test-absent", start_if_needed=False)
    b.start()
    deadline = time.monotonic() + 5
    msgs: list[dict] = []
    while time.monotonic() < deadline and not msgs:
        msgs = b.drain()
        time.sleep(0.02)
    b.stop()
    assert msgs and "not running" in msgs[0]["status"]
    with pytest.raises(LabError):
        b.request("ping")


def test_live_backend_without_step_support_says_why() -> None:
    ok, why = LiveBackend("tui-test-absent", start_if_needed=False).step_support()
    assert not ok and why
