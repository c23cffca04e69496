"""The event log: every step of everything, as `ambient-lab trace` prints it, with `/` to filter."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import Input, RichLog

from lab.common.events import Event
from lab.tui.model import MAX_EVENTS
from lab.tui.screens.base import LabScreen

COMPONENT_STYLE = {"ztunnel": "cyan", "istio-cni": "magenta", "istiod": "blue", "supervisor": "white",
                   "kube-proxy": "green", "waypoint": "yellow"}


def event_text(ev: Event) -> Text:
    t = Text(ev.line(), no_wrap=True)
    t.stylize(COMPONENT_STYLE.get(ev.component, ""), 13, 41)
    if ev.kind.endswith(("failed", "refused", "nack", "killed", "exited")) or "denied" in ev.msg:
        t.stylize("bold red", 41, 67)
    return t


class EventsScreen(LabScreen):
    AUTO_FOCUS = "#log"
    VIEW = ":events"
    AREAS = frozenset({"events"})
    BINDINGS = [
        Binding("slash", "filter", "filter", key_display="/"),
        Binding("escape", "clear_filter", "clear"),
    ]

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.filter_text = ""
        self.written = 0  # model.events_seen when we last wrote

    def view_title(self) -> str:
        return ":events" + (f" /{self.filter_text}" if self.filter_text else "")

    def compose(self) -> ComposeResult:
        yield from self.compose_status()
        yield Input(placeholder="filter (substring; !text excludes)", id="filter", classes="hidden")
        yield RichLog(id="log", max_lines=MAX_EVENTS, wrap=False, markup=False)
        yield from self.compose_footer()

    def matches(self, ev: Event) -> bool:
        f = self.filter_text.strip()
        if not f:
            return True
        invert = f.startswith("!")
        return (f.lstrip("!").lower() in ev.line().lower()) != invert

    def update_view(self, dirty, flow_changes, full) -> None:
        log = self.query_one(RichLog)
        m = self.model
        new = m.events_seen - self.written
        if full or new > len(m.events):
            log.clear()
            evs = list(m.events)
        else:
            evs = list(m.events)[-new:] if new else []
        for ev in evs:
            if self.matches(ev):
                log.write(event_text(ev))
        self.written = m.events_seen

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.remove_class("hidden")
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        self.filter_text = ""
        box.add_class("hidden")
        self.query_one(RichLog).focus()
        self.update_view(set(), None, True)

    def on_input_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value
        self.update_view(set(), None, True)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one(RichLog).focus()
