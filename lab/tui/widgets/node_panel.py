"""One node of the cluster view: its components up or down, and its pods with their mesh state.

Nodes sit side by side, the way `kind` nodes would in a diagram; each pod shows the state
istio-cni gave it (HBONE, pending, bypassed, out-of-mesh).
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from lab.tui.model import BYPASSED, HBONE, OUT_OF_MESH, PENDING, ComponentState, PodState

MESH_STYLE = {HBONE: "bold green", PENDING: "bold yellow", BYPASSED: "bold red", OUT_OF_MESH: "dim"}
MESH_MARK = {HBONE: "◆", PENDING: "◇", BYPASSED: "✗", OUT_OF_MESH: "·"}


def component_line(c: ComponentState) -> Text:
    t = Text()
    t.append("● " if c.running else "✗ ", style="green" if c.running else "bold red")
    t.append(f"{c.component:<10}")
    t.append("up" if c.running else "DOWN", style="green" if c.running else "bold red")
    return t


def pod_prompt(p: PodState) -> Text:
    t = Text(no_wrap=True, overflow="ellipsis")
    t.append(f"{MESH_MARK[p.mesh]} ", style=MESH_STYLE[p.mesh])
    t.append(p.name if p.namespace == "default" else f"{p.namespace}/{p.name}")
    t.append(f"\n  {p.ip or '-':<12} ", style="dim")
    t.append(p.mesh, style=MESH_STYLE[p.mesh])
    if p.phase and p.phase != "Running":
        t.append(f" {p.phase}", style="yellow")
    return t


class NodePanel(Vertical):
    """A node: title, components, pods (an OptionList, so arrows, enter and the mouse work)."""

    def __init__(self, node: dict, **kw) -> None:
        super().__init__(classes="node-panel", **kw)
        self.node = node
        self.pod_keys: list[str] = []

    def compose(self) -> ComposeResult:
        yield Static(classes="node-components")
        yield OptionList(classes="node-pods")

    def on_mount(self) -> None:
        self.border_title = f"{self.node['name']}  {self.node.get('ip', '')}"
        self.border_subtitle = self.node.get("role", "")

    def show(self, components: list[ComponentState], pods: list[PodState]) -> None:
        lines = Text("\n").join(component_line(c) for c in components) if components else Text("(no components)", style="dim")
        self.query_one(".node-components", Static).update(lines)
        keys = [p.key for p in pods]
        ol = self.query_one(OptionList)
        highlighted = ol.highlighted
        old_key = self.pod_keys[highlighted] if highlighted is not None and highlighted < len(self.pod_keys) else None
        if keys == self.pod_keys:
            for i, p in enumerate(pods):
                ol.replace_option_prompt_at_index(i, pod_prompt(p))
            return
        self.pod_keys = keys
        ol.clear_options()
        ol.add_options([Option(pod_prompt(p), id=p.key) for p in pods])
        if pods:
            ol.highlighted = keys.index(old_key) if old_key in keys else 0

    @property
    def selected_pod(self) -> str | None:
        ol = self.query_one(OptionList)
        if ol.highlighted is None or ol.highlighted >= len(self.pod_keys):
            return None
        return self.pod_keys[ol.highlighted]
