"""The control plane view: what istiod sends, and what a sidecar mesh would have sent instead.

In ambient, istiod pushes each node's ztunnel only the workloads, services and authorizations
(WDS, delta xDS) that changed, once per node. With sidecars, every pod's Envoy receives its full
configuration on each change: `sidecar_equivalent_bytes` on each `istiod.push` event is that
figure (every pod times the full set of the type). Below: each push, the ACK/NACKs, and the
certificates istiod's CA signed for the ztunnels (one per workload identity).
"""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Static

from lab.tui.screens.base import LabScreen
from lab.tui.screens.flows import clock

PUSH_COLUMNS = ["TIME", "TYPE", "RESOURCES", "REMOVED", "BYTES", "SIDECAR-EQUIV", "TARGETS", "REASON"]


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def totals_table(screen: "ControlPlaneScreen") -> Table:
    m = screen.model
    t = Table(title="istiod -> ztunnels (ambient) vs every pod's sidecar", title_justify="left", expand=False)
    for col in ("type", "pushes", "resources", "ambient bytes", "sidecar-equivalent", "saved"):
        t.add_column(col, justify="right" if col != "type" else "left")
    total = [0, 0, 0, 0]
    for short, tot in sorted(m.push_totals.items()):
        ratio = f"{tot.sidecar_bytes / tot.bytes:.1f}x" if tot.bytes else "-"
        t.add_row(short, str(tot.pushes), str(tot.resources), human_bytes(tot.bytes), human_bytes(tot.sidecar_bytes),
                  ratio)
        for i, v in enumerate((tot.pushes, tot.resources, tot.bytes, tot.sidecar_bytes)):
            total[i] += v
    if m.push_totals:
        t.add_row(Text("all", style="bold"), str(total[0]), str(total[1]), human_bytes(total[2]), human_bytes(total[3]),
                  f"{total[3] / total[2]:.1f}x" if total[2] else "-", style="bold")
    return t


class ControlPlaneScreen(LabScreen):
    AUTO_FOCUS = "#pushes"
    VIEW = ":istiod"
    AREAS = frozenset({"istiod", "components"})
    BINDINGS = [Binding("escape", "app.pop_screen", "back", show=False)]

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.last_push = None  # the newest push already in the table (pushes are appended, not redrawn)

    def compose(self) -> ComposeResult:
        yield from self.compose_status()
        with Horizontal(id="cp-top"):
            yield Static(id="cp-totals")
            with VerticalScroll(id="cp-side"):
                yield Static(id="cp-certs")
        yield DataTable(id="pushes", cursor_type="row", zebra_stripes=True)
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.query_one("#pushes", DataTable).add_columns(*PUSH_COLUMNS)
        self.query_one("#pushes").border_title = "pushes"
        self.query_one("#cp-side").border_title = "certificates and ACKs"

    def short(self, node: str) -> str:
        """Node names without the lab's prefix (`tuirec-worker2` -> `worker2`)."""
        return node.removeprefix(self.model.lab + "-")

    def update_view(self, dirty, flow_changes, full) -> None:
        m = self.model
        istiod = [c for c in m.components.values() if c.component == "istiod"]
        head = Text()
        for c in istiod:
            head.append(f"istiod on {c.node}: ", style="bold")
            head.append("up" if c.running else "DOWN", style="green" if c.running else "bold red")
            head.append("\n")
        if not m.pushes:
            head.append("no xDS push seen yet: istiod pushes when a ztunnel subscribes and when the cluster changes\n",
                        style="dim")
        from rich.console import Group

        self.query_one("#cp-totals", Static).update(Group(head, totals_table(self)) if m.pushes else head)
        side = Text()
        side.append(f"ACKs: {m.acks}   NACKs: {len(m.nacks)}\n", style="bold")
        for ev in list(m.nacks)[-5:]:
            side.append(f"NACK {ev.msg}\n", style="red")
        if m.certificates:
            side.append("workload certificates istiod's CA issued:\n")
        for ev in list(m.certificates)[-20:]:
            ok = ev.kind.endswith("signed")
            side.append(("✓ " if ok else "✗ REFUSED "), style="green" if ok else "bold red")
            identity = str(ev.fields.get("identity") or ev.msg).removeprefix("spiffe://")
            node = self.short(str(ev.fields.get("node", "")))
            side.append(identity.split("/", 1)[-1] if "/ns/" in identity else identity)
            side.append(f" ({node})\n" if node else "\n", style="dim")
        self.query_one("#cp-certs", Static).update(side)
        table = self.query_one("#pushes", DataTable)
        pushes = list(m.pushes)
        start = 0
        if not full and self.last_push is not None:
            try:  # only the pushes after the last one shown (the deque may have dropped old ones)
                start = next(i for i in range(len(pushes) - 1, -1, -1) if pushes[i] is self.last_push) + 1
            except StopIteration:
                start = 0
        if start == 0:
            table.clear()
        for p in pushes[start:]:
            table.add_row(clock(p.ts), p.short_type, str(p.resources), str(p.removed), human_bytes(p.bytes),
                          human_bytes(p.sidecar_bytes), ",".join(self.short(t) for t in p.targets), p.reason)
        self.last_push = pushes[-1] if pushes else None
        if table.row_count and start < len(pushes):
            table.move_cursor(row=table.row_count - 1, animate=False)
