"""The wire view of one flow: its layers, outermost first (lab/tui/wire.py reads them), and beside
them what really crossed the pod's eth0 against what its application sent (lab/tui/capture.py)."""

from __future__ import annotations

import threading

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Static

from lab.common.errors import LabError
from lab.tui import capture, wire
from lab.tui.screens.base import LabScreen

CAPTURE_ROWS = 60  # rows of each leg shown (a long download has many DATA records)
ENDED = ("closed", "denied", "failed")


def render_layers(layers: list[wire.Layer]) -> Group:
    panels = []
    for depth, layer in enumerate(layers):
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        grid.add_row("", Text(layer.summary))
        for k, v in layer.details:
            grid.add_row(k, Text(v))
        panels.append(Panel(grid, title=layer.name, title_align="left", padding=(0, 1 + depth)))
    return Group(*panels)


def _leg(title: str, rows: list[tuple[str, str, str]], empty: str) -> Table:
    t = Table(title=title, title_justify="left", show_edge=False, box=None, padding=(0, 1))
    t.add_column("t (s)", justify="right", no_wrap=True)
    t.add_column("", no_wrap=True)
    t.add_column("what", overflow="fold")
    for row in rows[:CAPTURE_ROWS]:
        t.add_row(*row, style="dim" if not row[0] else None)
    if len(rows) > CAPTURE_ROWS:
        t.add_row("", "", f"... {len(rows) - CAPTURE_ROWS} more")
    if not rows:
        t.add_row("", "", empty)
    return t


def render_capture(cap: capture.Capture) -> Group:
    """The two legs side by side: TLS records on eth0 (and their decrypted HTTP/2 frames), plain text on lo."""
    side = Table.grid(padding=(0, 3), expand=True)
    side.add_column(ratio=1)
    side.add_column(ratio=1)
    wire_title = f"eth0, the wire: TLS to {capture.HBONE_PORT}" + (", decrypted" if cap.decrypted else "")
    side.add_row(_leg(wire_title, capture.wire_rows(cap), "no TLS record (a pooled tunnel opened before the capture "
                                                         "shows no handshake; plain TCP shows none at all)"),
                 _leg("lo: what the app sent and received", capture.plain_rows(cap),
                      "no application bytes on lo"))
    notes = [Text(c, style="yellow") for c in capture.caveats(cap)]
    return Group(Text(cap.note, style="italic"), Text(capture.totals(cap), style="bold"), *notes, side)


class WireScreen(LabScreen):
    VIEW = "wire"
    AREAS = frozenset({"flows"})
    BINDINGS = [Binding("escape", "app.pop_screen", "back"),
                Binding("c", "capture", "capture the next flow")]

    def __init__(self, flow_id: str) -> None:
        super().__init__()
        self.flow_id = flow_id
        self.capture_state = ""  # "", "armed", "reading", "done"
        self.capture_pod = ""  # the pod key it is armed on
        self.capture_note = ""
        self.captured: capture.Capture | None = None
        self._flows_before: set[str] = set()

    def view_title(self) -> str:
        return f"wire {self.flow_id[:12]}"

    def compose(self) -> ComposeResult:
        yield from self.compose_status()
        with VerticalScroll(id="wire-box"):
            yield Static(id="wire")
            yield Static(id="wire-capture")
        yield from self.compose_footer()

    def on_unmount(self) -> None:
        """Leaving the view with a capture armed: stop its tcpdumps (and delete the pcaps) quietly."""
        pod = self.model.pods.get(self.capture_pod)
        if self.capture_state == "armed" and pod is not None:
            threading.Thread(target=self.lab.backend.collect_capture, args=(pod,), daemon=True).start()

    def _pod(self):
        """The pod to capture on: the flow's source pod, else its destination pod."""
        flow = self.model.flow(self.flow_id)
        if flow is None:
            return None
        for name in (flow.src_pod, flow.dst_pod):
            pod = next((p for p in self.model.pods.values() if name and p.name == name), None)
            if pod is not None:
                return pod
        return None

    def update_view(self, dirty, flow_changes, full) -> None:
        flow = self.model.flow(self.flow_id)
        box = self.query_one("#wire", Static)
        if flow is None:
            box.update(Text("this flow is no longer kept", style="yellow"))
        else:
            self.query_one("#wire-box").border_title = ("HBONE: TCP / mTLS / HTTP/2 CONNECT / your bytes"
                                                       if wire.is_hbone(flow) else "plain TCP: no tunnel")
            box.update(render_layers(wire.layers(flow, self.model)))
        if self.capture_state == "armed" and self._next_flow_ended():
            self._read_capture()
        self._show_capture()

    def _next_flow_ended(self) -> bool:
        pod = self.model.pods.get(self.capture_pod)
        if pod is None:
            return False
        return any(f.id not in self._flows_before and pod.name in (f.src_pod, f.dst_pod) and f.status in ENDED
                   for f in self.model.flows.values())

    def _show_capture(self) -> None:
        box = self.query_one("#wire-capture", Static)
        pod = self.model.pods.get(self.capture_pod) or self._pod()
        name = pod.name if pod is not None else "?"
        if self.capture_state == "done" and self.captured is not None:
            box.update(Panel(render_capture(self.captured), title=f"capture on pod {name}", title_align="left"))
            return
        if self.capture_state == "armed":
            text = (f"{self.capture_note}\ncapturing on {name}'s eth0 (tcp port {capture.HBONE_PORT}) and lo: repeat "
                    f"the request (the same curl); the capture is read when the next flow of {name} ends (c: read it now)")
        elif self.capture_state == "reading":
            text = "reading the capture (tshark)..."
        else:
            ok, why = self.lab.backend.capture_support()
            text = ("What really crossed the wire: this flow is over, and a flow cannot be captured after the fact.\n"
                    + (f"c: capture the next flow from {name} (tcpdump on its eth0 and lo, TLS decrypted with the "
                       "lab's key log), then repeat the request." if ok and pod is not None else why))
        box.update(Panel(Text(text), title="on the wire", title_align="left"))

    def action_capture(self) -> None:
        pod = self._pod() if self.capture_state != "armed" else self.model.pods.get(self.capture_pod)
        if pod is None:
            self.app.notify("this flow has no pod to capture on", severity="warning")
            return
        if self.capture_state == "armed":
            self._read_capture()
            return
        self.capture_pod = pod.key
        self._flows_before = set(self.model.flows)
        self._arm(pod)

    @work(thread=True, group="wire-capture")
    def _arm(self, pod) -> None:
        backend = self.lab.backend
        try:
            note = backend.arm_capture(pod)
        except LabError as e:
            self.app.call_from_thread(self.app.notify, e.message, severity="error")
            return
        self.app.call_from_thread(self._armed, note)
        if backend.capture_at_once:
            self.app.call_from_thread(self._read_capture)

    def _armed(self, note: str) -> None:
        self.capture_state, self.capture_note = "armed", note
        self._show_capture()

    def _read_capture(self) -> None:
        self.capture_state = "reading"
        self._show_capture()
        self._collect(self.model.pods.get(self.capture_pod))

    @work(thread=True, group="wire-capture")
    def _collect(self, pod) -> None:
        try:
            cap = self.lab.backend.collect_capture(pod) if pod is not None else capture.Capture("?", note="pod gone")
        except LabError as e:
            cap = capture.Capture(pod.name if pod is not None else "?", note=f"error: {e.message}")
        self.app.call_from_thread(self._collected, cap)

    def _collected(self, cap: capture.Capture) -> None:
        self.captured, self.capture_state = cap, "done"
        self._show_capture()
