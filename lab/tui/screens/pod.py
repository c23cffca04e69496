"""The pod view: one pod seen from every side, one tab each.

- overview: `kubectl describe`, the pod's mesh state explained, its events from the stream;
- events / flows: what the stream says about it, and the connections it took part in;
- iptables: the in-pod rules istio-cni installed (`iptables-legacy-save -c`, with counters);
- sockets: `ss -tanp` in the pod: ztunnel's 15001/15006/15008 listeners sit in the pod's netns,
  owned by the process named `ztunnel` (a summary above the output says who owns what);
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

from lab.common.errors import LabError
from lab.tui import iptables_view, resources, sockets_view
from lab.tui.commands import POD_TABS
from lab.tui.screens.base import LabScreen
from lab.tui.screens.flows import flow_cells

TABS = ("overview", "events", "flows", *POD_TABS)
LIVE_REREAD_EVERY = 2.0  # seconds between re-reads of the iptables tab while it is shown (live labs)


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
        self.previous: dict[str, str] = {}  # the read before the one shown (iptables: what moved since)
        self._reading: set[str] = set()  # tabs being read now (one read at a time per tab)

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
        if self.lab.backend.live:
            self.set_interval(LIVE_REREAD_EVERY, self._reread_counters)

    def _reread_counters(self) -> None:
        """While the iptables tab is shown, read the counters again (the rule a flow hits lights up)."""
        if self.is_current and self.active_tab == "iptables":
            self.load_tab("iptables")

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

    def load_tab(self, tab: str) -> None:
        """Run the tab's command again (not while it is still running)."""
        if tab in self._reading:
            return
        self._reading.add(tab)
        self._read_tab(tab)

    @work(thread=True, group="pod-tab")
    def _read_tab(self, tab: str) -> None:
        pod = self.pod
        if tab not in self.outputs:
            self.app.call_from_thread(self._show_tab, tab, "loading...")
        if pod is None:
            text = f"pod {self.pod_key} is gone"
        else:
            try:
                text = self.lab.backend.pod_output(pod, tab)
            except LabError as e:
                text = f"error: {e.message}"
        self.app.call_from_thread(self._loaded, tab, text)

    def _loaded(self, tab: str, text: str) -> None:
        self._reading.discard(tab)
        if tab in self.outputs:
            self.previous[tab] = self.outputs[tab]
        self.outputs[tab] = text
        self._show_tab(tab, text)

    def _show_tab(self, tab: str, text: str) -> None:
        if tab == "iptables" and text == self.outputs.get(tab):
            previous = self.previous.get(tab)
            head = iptables_view.summary(text, previous)
            body = iptables_view.render(text, previous)
            self.query_one(f"#tab-{tab}", Static).update(Text.assemble(head + "\n\n", body) if head else body)
            return
        if tab == "sockets" and (head := sockets_view.summary(text)):
            text = f"{head}\n\n{text}"
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
