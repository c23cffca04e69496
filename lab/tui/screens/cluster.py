"""The cluster view: the nodes side by side, each with its components and its pods.

What a learner checks first: is istio-cni up on every node, is ztunnel, and which pods are in
the mesh (HBONE), waiting for ztunnel (pending), escaped capture (bypassed) or outside it.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import OptionList, Static

from lab.tui.screens.base import LabScreen
from lab.tui.widgets.node_panel import NodePanel

LEGEND = ("◆ HBONE: in the mesh   ◇ pending: ztunnel has not taken it yet   ✗ bypassed: ambient by its labels "
          "but not captured   · out-of-mesh")


class ClusterScreen(LabScreen):
    VIEW = "cluster"
    AREAS = frozenset({"cluster", "components", "progress"})
    BINDINGS = [
        Binding("enter", "open_pod", "pod view"),
        Binding("d", "describe", "describe"),
        Binding("y", "yaml", "YAML"),
        Binding("l", "logs", "logs"),
        Binding("s", "shell", "shell"),
        Binding("left", "node(-1)", "prev node", show=False),
        Binding("right", "node(1)", "next node", show=False),
    ]

    def compose(self) -> ComposeResult:
        yield from self.compose_status()
        yield Horizontal(id="nodes")
        yield Static(LEGEND, id="legend")
        yield Static(id="progress")
        yield from self.compose_footer()

    def update_view(self, dirty, flow_changes, full) -> None:
        m = self.model
        box = self.query_one("#nodes", Horizontal)
        panels = list(box.query(NodePanel))
        if [p.node["name"] for p in panels] != [n["name"] for n in m.nodes] or \
                [p.node for p in panels] != m.nodes:
            box.remove_children()
            panels = [NodePanel(n) for n in m.nodes]
            box.mount_all(panels)
            self.call_after_refresh(self._fill, focus=True)
        else:
            self._fill()
        unscheduled = m.pending_pods()
        lines = []
        if unscheduled:
            lines.append("unscheduled: " + ", ".join(p.key for p in unscheduled))
        if m.uncaptured:
            lines.append("escaped capture (doctor): " + ", ".join(m.uncaptured))
        if not m.nodes and m.progress:
            lines += list(m.progress)[-8:]
        self.query_one("#progress", Static).update("\n".join(lines))

    def _fill(self, focus: bool = False) -> None:
        m = self.model
        for panel in self.query(NodePanel):
            if panel.is_mounted and panel.query(OptionList):
                panel.show(m.components_on(panel.node["name"]), m.pods_on(panel.node["name"]))
        if focus:
            for panel in self.query(NodePanel):
                if panel.pod_keys:
                    panel.query_one(OptionList).focus()
                    break

    def focused_panel(self) -> NodePanel | None:
        w = self.focused
        while w is not None and not isinstance(w, NodePanel):
            w = w.parent  # type: ignore[assignment]
        return w

    def selected_pod_key(self) -> str | None:
        panel = self.focused_panel()
        return panel.selected_pod if panel else None

    def action_node(self, step: int) -> None:
        panels = list(self.query(NodePanel))
        if not panels:
            return
        cur = self.focused_panel()
        i = panels.index(cur) if cur in panels else -1
        panels[(i + step) % len(panels)].query_one(OptionList).focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        if event.option.id:
            self.lab.open_pod(event.option.id)

    def action_open_pod(self) -> None:
        if key := self.selected_pod_key():
            self.lab.open_pod(key)

    def action_describe(self) -> None:
        if key := self.selected_pod_key():
            self.lab.describe("pods", key)
        elif panel := self.focused_panel():
            self.lab.describe("nodes", panel.node["name"])

    def action_yaml(self) -> None:
        if key := self.selected_pod_key():
            self.lab.show_yaml("pods", key)

    def action_logs(self) -> None:
        if key := self.selected_pod_key():
            self.lab.show_logs(pod_key=key)

    def action_shell(self) -> None:
        if key := self.selected_pod_key():
            self.lab.shell(key)
