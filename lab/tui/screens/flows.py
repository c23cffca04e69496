"""The flows view: every connection the proxies saw, newest at the bottom, updated in place.

A row is one connection across the proxies it crossed (the source pod's ztunnel and the
destination's); `enter` opens its timeline, `w` its wire view. The table is updated
incrementally (changed rows only), so a busy lab does not redraw 500 rows a tick.
"""

from __future__ import annotations

import time

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable

from lab.tui import resources
from lab.tui.model import Flow, LabModel
from lab.tui.screens.resources import FilterableTable

COLUMNS = ["TIME", "SOURCE", "DESTINATION", "PATH", "STATUS", "BYTES", "STEPS"]
STATUS_STYLE = {"denied": "bold red", "failed": "red", "held": "bold magenta", "open": "yellow", "closed": "green"}


def clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def flow_cells(m: LabModel, f: Flow) -> list:
    """One flow as table cells: who to whom, by which path, and how it ended."""
    src = f.src_pod or m.name_of(f.src) or "?"
    dst = m.name_of(f.dst) or "?"
    if f.dst_pod and not dst.startswith(f.dst_pod):
        dst += f" -> {f.dst_pod}"
    path = f.plan or ("HBONE" if any(s.kind.startswith("hbone.") for s in f.steps) else "TCP")
    status = Text(f.status, style=STATUS_STYLE.get(f.status, ""))
    return [clock(f.started), src, dst, path, status, f"{f.bytes_sent}/{f.bytes_recv}", str(len(f.steps))]


def flow_text(m: LabModel, f: Flow) -> list[str]:
    """The same cells as plain text, for filtering (also matches the policy and error)."""
    return [str(c) for c in flow_cells(m, f)] + [f.policy, f.error, f.id]


class FlowsScreen(FilterableTable):
    AUTO_FOCUS = "#table"
    VIEW = ":flows"
    AREAS = frozenset({"flows", "cluster"})
    BINDINGS = [
        Binding("slash", "filter", "filter", key_display="/"),
        Binding("escape", "clear_filter", "clear"),
        Binding("enter", "timeline", "timeline"),
        Binding("w", "wire", "wire view"),
    ]

    def compose(self) -> ComposeResult:
        yield from self.compose_status()
        yield from self.compose_table()
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).focus()

    def view_title(self) -> str:
        return ":flows" + (f" /{self.filter_text}" if self.filter_text else "")

    def rows(self) -> list[resources.Row]:
        m = self.model
        rows = [resources.Row(f.id, flow_text(m, f)) for f in m.flows.values()]
        return resources.filter_rows(rows, self.filter_text)

    def update_view(self, dirty, flow_changes, full) -> None:
        table = self.query_one(DataTable)
        m = self.model
        if full or self.filter_text or flow_changes is None:
            keys = [r.key for r in self.rows()]
            keep = self.selected_key()
            table.clear(columns=not table.columns)
            if not table.columns:
                table.add_columns(*COLUMNS)
            for k in keys:
                table.add_row(*flow_cells(m, m.flows[k]), key=k)
            if keep in keys:
                table.move_cursor(row=keys.index(keep), animate=False)
        else:
            changed, removed = flow_changes
            following = table.row_count == 0 or table.cursor_row >= table.row_count - 1
            for k in removed:
                if k in table.rows:
                    table.remove_row(k)
            for f in sorted((m.flows[k] for k in changed if k in m.flows), key=lambda f: f.started):
                k = f.id
                cells = flow_cells(m, f)
                if k in table.rows:
                    for col, value in zip(table.columns, cells):
                        table.update_cell(k, col, value)
                else:
                    table.add_row(*cells, key=k)
            if following and table.row_count:
                table.move_cursor(row=table.row_count - 1, animate=False)
        table.border_title = f"flows ({table.row_count})"

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_timeline()

    def action_timeline(self) -> None:
        if (key := self.selected_key()) is not None:
            self.lab.open_timeline(key)

    def action_wire(self) -> None:
        if (key := self.selected_key()) is not None:
            self.lab.open_wire(key)
