"""The pod view: one pod seen from every side, one tab each.

- overview: `kubectl describe`, the pod's mesh state explained, its events from the stream;
- events / flows: what the stream says about it, and the connections it took part in;
- iptables: the in-pod rules istio-cni installed (`iptables-legacy-save -c`, with counters);
- sockets: `ss -tanp` in the pod: ztunnel's 15001/15006/15008 listeners sit in the pod's netns;
- network: its veth, routes and the fwmark rule that keeps the client's source IP.

The kernel tabs run `ip netns exec <pod netns> ...` (root, a live lab); a recording answers
them from its saved outputs.
"""

from __future__ import annotations

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Static, TabbedContent, TabPane

from ...errors import LabError
from .. import resources
from ..commands import POD_TABS
from .base import LabScreen
from .flows import flow_cells

TABS = ("overview", "events", "flows", *POD_TABS)


class PodScreen(LabScreen):
    VIEW = "pod"
    AREAS = frozenset({"cluster", "events", "flows"})
    BINDINGS = [
        Binding("escape", "app.pop_screen", "back"),
        Binding("left_square_bracket", "tab(-1)", "prev tab", key_display="["),
        Binding("right_square_bracket", "tab(1)", "next tab", key_display="]"),
        Binding("r", "reload", "reload tab"),
        Binding("s", "shell", "shell"),
        Binding("l", "logs", "logs"),
        Binding("y", "yaml", "YAML"),
    ]

    def __init__(self, pod_key: str, tab: str = "overview") -> None:
        super().__init__()
        self.pod_key = pod_key
        self.initial_tab = tab
        self.outputs: dict[str, str] = {}

    def view_title(self) -> str:
        return f"pod {self.pod_key}"

    def compose(self) -> ComposeResult:
        yield from self.compose_status()
        with TabbedContent(initial=self.initial_tab, id="pod-tabs"):
            for tab in TABS:
                with TabPane(tab, id=tab):
                    with VerticalScroll():
                        yield Static(id=f"tab-{tab}", markup=False)
        yield from self.compose_footer()

    @property
    def pod(self):
        return self.model.pods.get(self.pod_key)

    def on_mount(self) -> None:
        if self.initial_tab in POD_TABS:
            self.load_tab(self.initial_tab)

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        tab = event.pane.id or ""
        if tab in POD_TABS and tab not in self.outputs:
            self.load_tab(tab)

    @property
    def active_tab(self) -> str:
        return self.query_one(TabbedContent).active

    def action_tab(self, step: int) -> None:
        tc = self.query_one(TabbedContent)
        tc.active = TABS[(TABS.index(tc.active) + step) % len(TABS)]

    def action_reload(self) -> None:
        tab = self.active_tab
        if tab in POD_TABS:
            self.load_tab(tab)
        else:
            self.update_view(set(), None, True)

    def action_shell(self) -> None:
        self.lab.shell(self.pod_key)

    def action_logs(self) -> None:
        self.lab.show_logs(pod_key=self.pod_key)

    def action_yaml(self) -> None:
        self.lab.show_yaml("pods", self.pod_key)

    @work(thread=True, group="pod-tab")
    def load_tab(self, tab: str) -> None:
        pod = self.pod
        self.app.call_from_thread(self._show_tab, tab, "loading...")
        if pod is None:
            text = f"pod {self.pod_key} is gone"
        else:
            try:
                text = self.lab.backend.pod_output(pod, tab)
            except LabError as e:
                text = f"error: {e.message}"
        self.outputs[tab] = text
        self.app.call_from_thread(self._show_tab, tab, text)

    def _show_tab(self, tab: str, text: str) -> None:
        self.query_one(f"#tab-{tab}", Static).update(Text(text))

    def update_view(self, dirty, flow_changes, full) -> None:
        pod = self.pod
        m = self.model
        if pod is None:
            self._show_tab("overview", f"pod {self.pod_key} is gone")
            return
        self._show_tab("overview", resources.describe("pods", m, self.pod_key))
        evs = list(m.pod_events.get(pod.name, []))
        self._show_tab("events", "\n".join(ev.line() for ev in evs) or "(no events about this pod yet)")
        flows = [f for f in m.flows.values() if pod.name in (f.src_pod, f.dst_pod)]
        lines = ["  ".join(str(c) for c in flow_cells(m, f)) for f in flows]
        self._show_tab("flows", "\n".join(lines) or "(no connections from or to this pod yet)")
        for tab, text in self.outputs.items():
            self._show_tab(tab, text)
