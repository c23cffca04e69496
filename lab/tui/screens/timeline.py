"""A flow's timeline: every step of one connection, one plain sentence each, with its details.

The steps follow ztunnel's own order (outbound.rs then inbound.rs): captured by the in-pod
REDIRECT, original destination, the plan, certificate and mTLS handshake, CONNECT sent and
received, the authorization decision, upstream connected, closed (or failed, or denied).

Step mode (`x`) replays the steps one at a time (`space` next, `backspace` back). Holding a
live flow inside the proxies before each step needs support in ztunnel and the supervisor; the
banner says whether the lab offers it (see Backend.step_support).
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

from ..model import Flow, Step
from ..steps import format_details, is_denial
from .base import LabScreen
from .flows import STATUS_STYLE, clock


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
    return grid


class TimelineScreen(LabScreen):
    AUTO_FOCUS = "#steps"
    VIEW = "timeline"
    AREAS = frozenset({"flows"})
    BINDINGS = [
        Binding("escape", "app.pop_screen", "back"),
        Binding("x", "step_mode", "step mode"),
        Binding("space", "next_step", "next step"),
        Binding("backspace", "previous_step", "previous step"),
        Binding("w", "wire", "wire view"),
    ]

    def __init__(self, flow_id: str) -> None:
        super().__init__()
        self.flow_id = flow_id
        self.stepping = False
        self.revealed = 0
        self.hold_available = False
        self.hold_message = ""
        self.shown_steps = -1

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

    def update_view(self, dirty, flow_changes, full) -> None:
        flow = self.flow
        if flow is None:
            self.query_one("#flow-summary", Static).update(Text("this flow is no longer kept (the model keeps the "
                                                                "newest flows only)", style="yellow"))
            return
        self.query_one("#flow-summary", Static).update(flow_summary(self, flow))
        steps = self.visible_steps(flow)
        ol = self.query_one("#steps", OptionList)
        if len(steps) != self.shown_steps or full:
            first_time = self.shown_steps == -1
            keep = ol.highlighted
            ol.clear_options()
            ol.add_options([Option(step_prompt(flow, s)) for s in steps])
            self.shown_steps = len(steps)
            if steps and first_time:  # open on the step that went wrong, if one did: that is the question
                ol.highlighted = next((i for i, s in enumerate(steps) if s.kind == "conn.failed"
                                       or is_denial(s.kind, s.fields)), 0)
            elif steps:
                ol.highlighted = len(steps) - 1 if self.stepping else min(keep or 0, len(steps) - 1)
        self._show_details()
        self._banner()

    def _show_details(self) -> None:
        flow = self.flow
        ol = self.query_one("#steps", OptionList)
        box = self.query_one("#step-details", Static)
        if flow is None or ol.highlighted is None or ol.highlighted >= len(self.visible_steps(flow)):
            box.update("")
            return
        box.update(step_details(flow, self.visible_steps(flow)[ol.highlighted]))

    def _banner(self) -> None:
        flow = self.flow
        t = Text()
        if self.stepping and flow is not None:
            t.append(f"step mode: step {self.revealed} of {len(flow.steps)}", style="bold")
            t.append("  (space: next, backspace: back, x: leave)\n")
        if self.hold_message:
            t.append("live hold: ", style="bold")
            t.append("available. " if self.hold_available else "unavailable. ",
                     style="green" if self.hold_available else "yellow")
            t.append(self.hold_message, style="dim")
        self.query_one("#step-banner", Static).update(t)

    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        self._show_details()

    def action_step_mode(self) -> None:
        flow = self.flow
        self.stepping = not self.stepping
        self.revealed = 1 if flow and flow.steps else 0
        self.update_view(set(), None, True)

    def action_next_step(self) -> None:
        flow = self.flow
        if flow is None:
            return
        if not self.stepping:
            self.stepping, self.revealed = True, 0
        self.revealed = min(self.revealed + 1, len(flow.steps))
        self.update_view(set(), None, True)

    def action_previous_step(self) -> None:
        if self.stepping and self.revealed > 1:
            self.revealed -= 1
            self.update_view(set(), None, True)

    def action_wire(self) -> None:
        self.lab.open_wire(self.flow_id)
