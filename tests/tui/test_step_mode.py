"""Step mode in the TUI over a recording of a real step session (tests/tui/fixtures/stepping: a
curl from the curl pod to details held before its plan, stepped twice, then released whole).

The recording is replayed up to a `step.held`, the keys are pressed, and the test checks the
request each key sends to the supervisor (a recording refuses it and says so); then the rest of
the recorded stream, what the lab did after those requests, is fed in and the screen follows."""

from __future__ import annotations

from textual.widgets import DataTable, OptionList

from lab.common.events import Event
from lab.tui.app import LabApp
from lab.tui.backend import RecordedBackend
from lab.tui.commands import Request
from lab.tui.model import LabModel
from lab.tui.screens.timeline import TimelineScreen

from .conftest import SIZE, STEPPING, recorded_events
from .test_app import plain, settle

HELD_STEPS = ["plan", "mTLS handshake", "CONNECT", "authorization"]


def split_at_hold(n: int) -> tuple[RecordedBackend, list[dict]]:
    """A recorded backend that replays up to (and with) the n-th `step.held`; and the rest."""
    b = RecordedBackend(STEPPING)
    holds = [i for i, e in enumerate(b.events) if e["kind"] == "step.held"]
    cut = holds[n] + 1
    rest = b.events[cut:]
    b.events = b.events[:cut]
    return b, rest


async def feed(pilot, events: list[dict], until: str = "") -> list[dict]:
    """Post recorded events until (and with) the first of kind `until`; return the others."""
    app: LabApp = pilot.app
    for i, e in enumerate(events):
        app.backend.post({"event": e})
        if e["kind"] == until:
            events = events[i + 1:]
            break
    else:
        events = []
    app.pump()
    await settle(pilot)
    return events


# -- the model ---------------------------------------------------------------------------------------
def test_the_model_follows_the_recorded_step_session() -> None:
    m = LabModel("tuirec")
    seen = []
    for e in recorded_events(STEPPING):
        m.fold({"event": e})
        if e["kind"] == "step.held":
            flow = m.flow(e["flow"])
            assert flow is not None and flow.status == "held" and m.step_mode is True
            (h,) = flow.held_steps()
            assert (h.step, h.next, h.node, h.component) == (e["fields"]["step"], e["fields"]["next"], e["node"],
                                                             "ztunnel")
            seen.append(h.step)
        elif e["kind"] == "step.released":
            assert not m.flow(e["flow"]).held
    assert seen == HELD_STEPS
    (flow,) = [f for f in m.flows.values() if any(s.kind == "hbone.connect.sent" for s in f.steps)]
    assert not any(s.kind.startswith("step.") for s in flow.steps)  # the proxy's steps only
    assert flow.status == "closed" and m.held == {} and m.step_mode is False


def test_a_poll_answer_never_brings_back_a_released_step() -> None:
    events = recorded_events(STEPPING)
    held_ev = next(e for e in events if e["kind"] == "step.held")
    row = dict(held_ev["fields"], flow=held_ev["flow"], component="ztunnel", node=held_ev["node"],
               pod=held_ev["pod"], since=held_ev["ts"])
    m = LabModel("tuirec")
    m.fold_step_state({"on": True, "held": [row]})  # the supervisor's step_held answer
    assert m.step_mode and m.flow(held_ev["flow"]).status == "held"
    released = next(e for e in events if e["kind"] == "step.released")
    m.fold_event(Event.from_dict(released))
    m.fold_step_state({"on": True, "held": [row]})  # answered before the release, arriving after it
    assert m.held == {} and not m.flow(held_ev["flow"]).held
    m.fold_step_state({"on": False, "held": []})
    assert m.step_mode is False


# -- the screens -------------------------------------------------------------------------------------
async def test_a_held_flow_shows_where_it_waits_and_the_keys_release_it() -> None:
    backend, rest = split_at_hold(0)
    held_ev = backend.events[-1]
    fid = held_ev["flow"]
    app = LabApp(backend, tick=None)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert "STEP MODE (1 held)" in plain(app.screen.query_one("#status"))
        await pilot.press("3")
        await settle(pilot)
        table = app.screen.query_one(DataTable)
        assert str(table.get_row(fid)[4]) == "held"

        app.open_timeline(fid)
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, TimelineScreen)
        steps = screen.query_one("#steps", OptionList)
        flow = app.model.flow(fid)
        assert steps.option_count == len(flow.steps) + 1 and steps.highlighted == len(flow.steps)
        details = plain(screen.query_one("#step-details"))
        assert "before the step 'plan'" in details and "look up pod curl-" in details
        banner = plain(screen.query_one("#step-banner"))
        assert f"HELD by ztunnel on {held_ev['node']} before 'plan'" in banner and "Next: ztunnel" in banner

        await pilot.press("space")  # one step
        await settle(pilot)
        assert backend.sent[-1] == Request("step_release", {"flow": fid, "scope": "step"})
        assert any("recording" in n.message for n in app._notifications)
        rest = await feed(pilot, rest, until="step.held")  # what the lab did: the plan, then the next hold
        kinds = [s.kind for s in flow.steps]
        assert "conn.plan" in kinds and "tls.certificate" in kinds
        assert steps.option_count == len(flow.steps) + 1 and steps.highlighted == len(flow.steps)
        assert "before the step 'mTLS handshake'" in plain(screen.query_one("#step-details"))

        await pilot.press("f")  # the whole flow
        await settle(pilot)
        assert backend.sent[-1] == Request("step_release", {"flow": fid, "scope": "flow"})
        await pilot.press("a")  # every held flow
        await settle(pilot)
        assert backend.sent[-1] == Request("step_release", {"flow": "*", "scope": "flow"})

        await feed(pilot, rest)  # the rest of the session: released, finished, step mode off
        assert not flow.held and flow.status == "closed"
        assert steps.option_count == len(flow.steps)
        assert "HELD" not in plain(screen.query_one("#step-banner"))
        assert "STEP MODE" not in plain(screen.query_one("#status"))


async def test_x_and_shift_x_ask_for_live_step_mode_only_where_it_exists() -> None:
    """On a recording `X` asks (and is refused, visibly); `x` in a timeline replays instead."""
    backend, _ = split_at_hold(0)
    app = LabApp(backend, tick=None)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("X")
        await settle(pilot)
        assert backend.sent[-1] == Request("step_mode", {"on": False})  # it is on: X turns it off
        assert any("recording" in n.message for n in app._notifications)
        fid = backend.events[-1]["flow"]
        app.open_timeline(fid)
        await settle(pilot)
        n_sent = len(backend.sent)
        await pilot.press("x")
        await settle(pilot)
        assert len(backend.sent) == n_sent and app.screen.stepping  # a recording: the replay
        assert app.screen.query_one("#steps", OptionList).option_count == 2  # first step + the held row
