"""The wire view of one flow: its layers, outermost first (lab/tui/wire.py reads them)."""

from __future__ import annotations

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Static

from .. import wire
from .base import LabScreen


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


class WireScreen(LabScreen):
    VIEW = "wire"
    AREAS = frozenset({"flows"})
    BINDINGS = [Binding("escape", "app.pop_screen", "back")]

    def __init__(self, flow_id: str) -> None:
        super().__init__()
        self.flow_id = flow_id

    def view_title(self) -> str:
        return f"wire {self.flow_id[:12]}"

    def compose(self) -> ComposeResult:
        yield from self.compose_status()
        with VerticalScroll(id="wire-box"):
            yield Static(id="wire")
        yield from self.compose_footer()

    def update_view(self, dirty, flow_changes, full) -> None:
        flow = self.model.flow(self.flow_id)
        box = self.query_one("#wire", Static)
        if flow is None:
            box.update(Text("this flow is no longer kept", style="yellow"))
            return
        self.query_one("#wire-box").border_title = ("HBONE: TCP / mTLS / HTTP/2 CONNECT / your bytes"
                                                   if wire.is_hbone(flow) else "plain TCP: no tunnel")
        box.update(render_layers(wire.layers(flow, self.model)))
