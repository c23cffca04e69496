"""k9s-style resource views (`:pods`, `:svc`, `:nodes`, `:ns`, `:policies`, `:routes`, `:workloads`).

One screen shows whichever resource the `:` prompt asked for; the tables themselves are built
by lab/tui/resources.py. `/` filters, `enter` drills in, `esc` clears the filter, `d` describes,
`y` shows YAML, `l` logs, `s` a shell in the pod's network namespace.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Input

from lab.tui import resources
from lab.tui.screens.base import LabScreen


class FilterableTable(LabScreen):
    """A table with k9s's `/` filter prompt. Subclasses build rows with `table_rows()`."""

    filter_text = ""

    def compose_table(self) -> ComposeResult:
        yield Input(placeholder="filter (substring; !text excludes)", id="filter", classes="hidden")
        yield DataTable(id="table", cursor_type="row", zebra_stripes=True)

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.remove_class("hidden")
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        if self.filter_text or not box.has_class("hidden"):
            box.value = ""
            self.filter_text = ""
            box.add_class("hidden")
            self.query_one(DataTable).focus()
            self.update_view(set(), None, True)
        elif len(self.app.screen_stack) > 1:
            self.app.pop_screen()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            self.filter_text = event.value
            self.update_view(set(), None, True)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "filter":
            if not event.value:
                event.input.add_class("hidden")
            self.query_one(DataTable).focus()

    def selected_key(self) -> str | None:
        table = self.query_one(DataTable)
        if table.row_count == 0:
            return None
        row_key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
        return row_key.value

    def fill(self, columns: list[str], rows: list[resources.Row]) -> None:
        """Replace the table's content, keeping the cursor on the same row key when it is still there."""
        table = self.query_one(DataTable)
        keep = self.selected_key()
        if [str(c.label) for c in table.columns.values()] != columns:
            table.clear(columns=True)
            table.add_columns(*columns)
        else:
            table.clear()
        for r in rows:
            table.add_row(*r.cells, key=r.key)
        if keep is not None:
            try:
                table.move_cursor(row=table.get_row_index(keep), animate=False)
            except Exception:  # noqa: BLE001 - the row is gone: the cursor stays where it is
                pass


class ResourceScreen(FilterableTable):
    AUTO_FOCUS = "#table"
    VIEW = "pods"
    AREAS = frozenset({"cluster", "components"})
    BINDINGS = [
        Binding("slash", "filter", "filter", key_display="/"),
        Binding("escape", "clear_filter", "clear/back"),
        Binding("enter", "enter", "open"),
        Binding("d", "describe", "describe"),
        Binding("y", "yaml", "YAML"),
        Binding("l", "logs", "logs"),
        Binding("s", "shell", "shell"),
    ]

    def __init__(self, view: str = "pods", filter_text: str = "", scope: tuple[str, str] | None = None, **kw) -> None:
        super().__init__(**kw)
        self.view = view
        self.filter_text = filter_text
        self.scope = scope  # ("node", name) or ("ns", name): a drill-down from a node or a namespace

    def view_title(self) -> str:
        where = f" on node {self.scope[1]}" if self.scope and self.scope[0] == "node" else \
            f" in namespace {self.scope[1]}" if self.scope else ""
        return f":{self.view}{where}" + (f" /{self.filter_text}" if self.filter_text else "")

    def in_scope(self, key: str) -> bool:
        if self.scope is None:
            return True
        pod = self.model.pods.get(key)
        if pod is None:
            return False
        return (pod.node if self.scope[0] == "node" else pod.namespace) == self.scope[1]

    def compose(self) -> ComposeResult:
        yield from self.compose_status()
        yield from self.compose_table()
        yield from self.compose_footer()

    def on_mount(self) -> None:
        if self.filter_text:
            box = self.query_one("#filter", Input)
            box.value = self.filter_text
            box.remove_class("hidden")
        self.query_one(DataTable).focus()

    def show(self, view: str, filter_text: str = "") -> None:
        """Switch to another resource (the `:` prompt)."""
        self.view = view
        self.filter_text = filter_text
        box = self.query_one("#filter", Input)
        box.value = filter_text
        box.set_class(not filter_text, "hidden")
        self.query_one(DataTable).focus()
        self.refresh_view(full=True)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_enter()

    def update_view(self, dirty, flow_changes, full) -> None:
        table = resources.build(self.view, self.model).filtered(self.filter_text)
        table.rows = [r for r in table.rows if self.in_scope(r.key)]
        self.query_one(DataTable).border_title = f"{self.view} ({len(table.rows)})"
        self.fill(table.columns, table.rows)

    def action_enter(self) -> None:
        """Drill in: a pod opens the pod view; a node or namespace lists its pods; others describe."""
        key = self.selected_key()
        if key is None:
            return
        if self.view in ("pods", "workloads"):
            self.lab.open_pod(key)
        elif self.view in ("nodes", "ns"):  # its pods, on a screen of their own: esc comes back here
            self.app.push_screen(ResourceScreen("pods", scope=("node" if self.view == "nodes" else "ns", key)))
        else:
            self.lab.describe(self.view, key)

    def action_describe(self) -> None:
        if (key := self.selected_key()) is not None:
            self.lab.describe(self.view, key)

    def action_yaml(self) -> None:
        if (key := self.selected_key()) is not None:
            self.lab.show_yaml(self.view, key)

    def action_logs(self) -> None:
        key = self.selected_key()
        if key is None:
            return
        if self.view in ("pods", "workloads"):
            self.lab.show_logs(pod_key=key)
        elif self.view == "nodes":
            self.lab.show_logs(component="ztunnel", node=key)
        else:
            self.notify(f"no logs for {self.view}: logs are for pods, and for a node's ztunnel", severity="warning")

    def action_shell(self) -> None:
        key = self.selected_key()
        if key is not None and self.view in ("pods", "workloads"):
            self.lab.shell(key)
        elif key is not None and self.view == "nodes":
            self.lab.shell_node(key)
        else:
            self.notify("a shell opens in a pod's (or a node's) network namespace", severity="warning")
