"""Snapshots of the main views over the recording (pytest-textual-snapshot).

First run, or after a deliberate change of looks: `pytest tests/tui/test_snapshots.py --snapshot-update`,
then look at the SVGs under __snapshots__/ before committing them. Time is frozen by the recording
(ages and clocks come from it, in UTC), there is no timer and no animation.
"""

from __future__ import annotations

from lab.tui.app import LabApp
from lab.tui.backend import RecordedBackend

from .conftest import FIXTURE, RACE, SIZE, STEPPING


def make_app(fixture=FIXTURE) -> LabApp:
    return LabApp(RecordedBackend(fixture), tick=None)


async def settle(pilot) -> None:
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


def test_cluster_view(snap_compare) -> None:
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=settle)


def test_cluster_view_after_the_start_up_race(snap_compare) -> None:
    """Bypassed, HBONE and out-of-mesh pods side by side (the race recording)."""
    assert snap_compare(make_app(RACE), terminal_size=SIZE, run_before=settle)


def test_pods_view(snap_compare) -> None:
    assert snap_compare(make_app(), press=["2"], terminal_size=SIZE, run_before=settle)


def test_flows_view(snap_compare) -> None:
    assert snap_compare(make_app(), press=["3"], terminal_size=SIZE, run_before=settle)


def test_timeline_of_a_flow(snap_compare) -> None:
    async def open_first_flow(pilot) -> None:
        await settle(pilot)
        app: LabApp = pilot.app
        denied = [f for f in app.model.flows.values() if f.status == "denied"]
        app.open_timeline((denied or list(app.model.flows.values()))[0].id)
        await settle(pilot)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=open_first_flow)


def test_timeline_of_a_held_flow(snap_compare) -> None:
    """Step mode: the recorded curl held before its CONNECT, with what will happen next."""
    backend = RecordedBackend(STEPPING)
    holds = [i for i, e in enumerate(backend.events) if e["kind"] == "step.held"]
    backend.events = backend.events[:holds[2] + 1]  # held before the CONNECT

    async def open_held_flow(pilot) -> None:
        await settle(pilot)
        app: LabApp = pilot.app
        app.open_timeline(backend.events[-1]["flow"])
        await settle(pilot)

    assert snap_compare(LabApp(backend, tick=None), terminal_size=SIZE, run_before=open_held_flow)


def test_control_plane_view(snap_compare) -> None:
    assert snap_compare(make_app(), press=["4"], terminal_size=SIZE, run_before=settle)


def test_pod_view_iptables_tab(snap_compare) -> None:
    async def open_pod(pilot) -> None:
        await settle(pilot)
        app: LabApp = pilot.app
        pod = next(p for p in app.model.pods.values() if p.name.startswith("productpage"))
        app.open_pod(pod.key, "iptables")
        await settle(pilot)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=open_pod)
