"""A flow's timeline: every step of one connection, one plain sentence each, with its details.

The steps follow ztunnel's own order (outbound.rs then inbound.rs): captured by the in-pod
REDIRECT, original destination, the plan, certificate and mTLS handshake, CONNECT sent and
received, the authorization decision, upstream connected, closed (or failed, or denied).

Step mode, the mesh debugger. On a live lab `x` turns it on in every proxy (ztunnel, waypoint:
lab/ztunnel/stepper.py): each NEW connection then waits before each step until the learner lets
it go on. A held flow shows, after its steps so far, a last row "held before <step>" whose
details say where it waits and what will happen next; `space` lets it take one step, `f` run to
its end, `a` lets every held flow run. `x` again ends step mode, releasing everything (so does
quitting the TUI). On a recording nothing can be held: `x`, `space` and `backspace` replay the
recorded steps one at a time.
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from lab.tui.model import Flow, HeldStep, Step
from lab.tui.screens.base import LabScreen
from lab.tui.screens.flows import STATUS_STYLE, clock
from lab.tui.steps import format_details, is_denial, step_reference


def offset_ms(flow: Flow, step: Step) -> str:
    return f"+{(step.ts - flow.started) * 1000:.1f} ms"


def side(step: Step) -> str:
    """Which end of the connection the step happened at (ztunnel's outbound or inbound side)."""
    direction = step.fields.get("direction", "")
    return {"outbound": "src", "inbound": "dst"}.get(direction, direction[:3])


def step_prompt(flow: Flow, step: Step) -> Text:
    t = Text(no_wrap=True, overflow="ellipsis")
    t.append(f"{offset_ms(flow, step):>10} ", style="dim")
    t.append(f"{step.node.removeprefix(flow_lab_prefix(step.node)):<13.13} {side(step):<4}", style="cyan")
    bad = step.kind == "conn.failed" or is_denial(step.kind, step.fields)
    t.append(step.title, style="bold red" if bad else "")
    return t


def flow_lab_prefix(node: str) -> str:
    """`tuirec-worker2` -> `tuirec-`: node names carry the lab's name; the timeline drops it."""
    for role in ("-control-plane", "-worker"):
        if role in node:
            return node[: node.index(role) + 1]
    return ""


def flow_summary(screen: "TimelineScreen", flow: Flow) -> Text:
    m = screen.model
    t = Text()
    t.append(f"{flow.src_pod or m.name_of(flow.src) or '?'}", style="bold")
    t.append(f" ({flow.src}) -> ")
    t.append(f"{m.name_of(flow.dst) or '?'}", style="bold")
    if flow.dst_pod:
        t.append(f" -> pod {flow.dst_pod}")
    t.append("   ")
    t.append(flow.status, style=STATUS_STYLE.get(flow.status, ""))
    if flow.policy:
        t.append(f"  policy: {flow.policy}", style="red")
    if flow.error:
        t.append(f"\n{flow.error}", style="red")
    t.append(f"\nstarted {clock(flow.started)}, {len(flow.steps)} steps, flow id(s) {', '.join(i[:12] for i in flow.ids)}",
             style="dim")
    if flow.dropped_steps:
        t.append(f" ({flow.dropped_steps} later steps not kept)", style="dim")
    return t


def held_prompt(h: HeldStep) -> Text:
    """The last row of a held flow: where it waits, before which step."""
    t = Text(no_wrap=True, overflow="ellipsis")
    where = {"outbound": "src", "inbound": "dst"}.get(h.direction, "wp" if h.component == "waypoint" else "")
    t.append(f"{'HELD':>10} ", style="bold magenta")
    t.append(f"{h.node.removeprefix(flow_lab_prefix(h.node)):<13.13} {where:<4}", style="cyan")
    t.append(f"waits before: {h.step}", style="bold magenta")
    return t


def held_details(h: HeldStep, now: float) -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    grid.add_row("held", Text(f"before the step '{h.step}'", style="bold magenta"))
    grid.add_row("where", f"{h.component} on {h.node or '?'}" + (f", pod {h.pod}" if h.pod else ""))
    grid.add_row("since", f"{clock(h.since)} ({max(0.0, now - h.since):.1f} s)")
    grid.add_row("", "")
    grid.add_row("next", Text(h.next))
    grid.add_row("", "")
    grid.add_row("keys", "space: this step, f: the whole flow, a: every held flow, x: step mode off")
    return grid


def step_details(flow: Flow, step: Step) -> Table:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    grid.add_row("step", f"{step.title}  ({step.kind})")
    grid.add_row("when", f"{clock(step.ts)}, {offset_ms(flow, step)} after the first step")
    grid.add_row("where", f"{step.component} on {step.node or '?'}" + (f", pod {step.pod}" if step.pod else "")
                 + (f" ({side(step)} side)" if side(step) else ""))
    grid.add_row("", "")
    grid.add_row("what", Text(step.sentence))
    grid.add_row("", "")
    for k, v in format_details(step.fields):
        grid.add_row(k, Text(v))
    if ref := step_reference(step.kind):
        grid.add_row("", "")
        grid.add_row("read", Text(ref))
    return grid


class TimelineScreen(LabScreen):
    AUTO_FOCUS = "#steps"
    VIEW = "timeline"
    AREAS = frozenset({"flows"})
    BINDINGS = [
        Binding("escape", "app.pop_screen", "back"),
        Binding("x", "step_mode", "step mode"),
        Binding("space", "next_step", "next step"),
        Binding("f", "release_flow", "whole flow"),
        Binding("a", "release_all", "all held"),
        Binding("backspace", "previous_step", "previous step"),
        Binding("w", "wire", "wire view"),
    ]

    def __init__(self, flow_id: str) -> None:
        super().__init__()
        self.flow_id = flow_id
        self.stepping = False  # replaying the recorded steps one at a time
        self.revealed = 0
        self.hold_available = False
        self.hold_message = ""
        self.shown: tuple = ()

    def view_title(self) -> str:
        return f"flow {self.flow_id[:12]}"

    def compose(self) -> ComposeResult:
        yield from self.compose_status()
        yield Static(id="flow-summary")
        with Horizontal(id="timeline"):
            yield OptionList(id="steps")
            with VerticalScroll(id="step-details-box"):
                yield Static(id="step-details")
        yield Static(id="step-banner")
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.query_one("#steps").border_title = "steps"
        self.query_one("#step-details-box").border_title = "details"
        self.query_one("#steps", OptionList).focus()
        self.probe_step_support()

    @work(thread=True, exclusive=True, group="step-support")
    def probe_step_support(self) -> None:
        ok, msg = self.lab.backend.step_support()
        self.app.call_from_thread(self._set_support, ok, msg)

    def _set_support(self, ok: bool, msg: str) -> None:
        self.hold_available, self.hold_message = ok, msg
        self._banner()

    @property
    def flow(self) -> Flow | None:
        return self.model.flow(self.flow_id)

    def visible_steps(self, flow: Flow) -> list[Step]:
        return flow.steps[: self.revealed] if self.stepping else flow.steps

    @property
    def live(self) -> bool:
        """Can x hold flows in the proxies (a live lab whose supervisor offers step mode)?"""
        return self.lab.backend.live and self.hold_available

    def update_view(self, dirty, flow_changes, full) -> None:
        flow = self.flow
        if flow is None:
            self.query_one("#flow-summary", Static).update(Text("this flow is no longer kept (the model keeps the "
                                                                "newest flows only)", style="yellow"))
            return
        self.query_one("#flow-summary", Static).update(flow_summary(self, flow))
        steps = self.visible_steps(flow)
        held = flow.held_steps()
        ol = self.query_one("#steps", OptionList)
        shown = (len(steps), tuple(h.key for h in held))
        if shown != self.shown or full:
            first_time = not self.shown
            newly_held = bool(held) and shown[1] != (self.shown[1] if self.shown else ())
            keep = ol.highlighted
            ol.clear_options()
            ol.add_options([Option(step_prompt(flow, s)) for s in steps] + [Option(held_prompt(h)) for h in held])
            self.shown = shown
            rows = len(steps) + len(held)
            if newly_held:  # the question now is what it waits for
                ol.highlighted = len(steps)
            elif steps and first_time:  # open on the step that went wrong, if one did: that is the question
                ol.highlighted = next((i for i, s in enumerate(steps) if s.kind == "conn.failed"
                                       or is_denial(s.kind, s.fields)), 0)
            elif rows:
                ol.highlighted = len(steps) - 1 if self.stepping else min(keep or 0, rows - 1)
        self._show_details()
        self._banner()

    def _show_details(self) -> None:
        flow = self.flow
        ol = self.query_one("#steps", OptionList)
        box = self.query_one("#step-details", Static)
        if flow is None or ol.highlighted is None:
            box.update("")
            return
        steps, held = self.visible_steps(flow), flow.held_steps()
        i = ol.highlighted
        if i < len(steps):
            box.update(step_details(flow, steps[i]))
        elif i - len(steps) < len(held):
            box.update(held_details(held[i - len(steps)], self.lab.backend.now()))
        else:
            box.update("")

    def _banner(self) -> None:
        flow = self.flow
        t = Text()
        if self.stepping and flow is not None:
            t.append(f"replay: step {self.revealed} of {len(flow.steps)}", style="bold")
            t.append("  (space: next, backspace: back, x: leave)\n")
        held = flow.held_steps() if flow is not None else []
        for h in held:
            t.append(f"HELD by {h.component} on {h.node} before '{h.step}'. ", style="bold magenta")
            t.append(f"Next: {h.next}\n")
        if held:
            t.append("space: one step  f: the whole flow  a: every held flow  x: step mode off\n", style="dim")
        if self.model.step_mode and self.live:
            t.append("step mode ON: ", style="bold magenta")
            t.append("the proxies hold every new connection before each step. x: off (releases every held flow)",
                     style="dim")
        elif self.hold_message:
            t.append("live step mode: ", style="bold")
            if self.live:
                t.append("off. ", style="green")
            elif self.lab.backend.live:
                t.append("unavailable. ", style="yellow")
            t.append(self.hold_message, style="dim")
        self.query_one("#step-banner", Static).update(t)

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        self._show_details()

    def action_step_mode(self) -> None:
        """Live: step mode on/off in the proxies. A recording: replay this flow's steps."""
        if self.live:
            self.lab.toggle_step_mode(not self.model.step_mode)
            return
        flow = self.flow
        self.stepping = not self.stepping
        self.revealed = 1 if flow and flow.steps else 0
        self.update_view(set(), None, True)

    def action_next_step(self) -> None:
        """A held flow takes one step; any other flow's recorded steps are replayed one more."""
        flow = self.flow
        if flow is None:
            return
        if flow.held:
            self.lab.release_steps(flow.held_steps()[0].flow, "step")
            return
        if not self.stepping:
            self.stepping, self.revealed = True, 0
        self.revealed = min(self.revealed + 1, len(flow.steps))
        self.update_view(set(), None, True)

    def action_release_flow(self) -> None:
        """This held flow runs to its end (in every proxy it still meets)."""
        flow = self.flow
        if flow is None or not flow.held:
            self.notify("this flow is not held" + ("" if self.model.step_mode else
                                                    " (x turns step mode on; new flows are then held)"))
            return
        self.lab.release_steps(flow.held_steps()[0].flow, "flow")

    def action_release_all(self) -> None:
        """Every held flow runs to its end."""
        if not self.model.held:
            self.notify("no flow is held")
            return
        self.lab.release_steps("*", "flow")

    def action_previous_step(self) -> None:
        if self.stepping and self.revealed > 1:
            self.revealed -= 1
            self.update_view(set(), None, True)

    def action_wire(self) -> None:
        self.lab.open_wire(self.flow_id)
