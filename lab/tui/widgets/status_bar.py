"""The top line of every screen: which lab, how big, and what the connection is doing."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from lab.tui.model import HBONE, LabModel


class StatusBar(Static):
    """`ambient-lab | lab NAME (live) | 3 nodes, 8 pods (5 in mesh) | 16 flows (1 denied) | ...`"""

    def show(self, model: LabModel, source: str, view: str, extra: str = "") -> None:
        meshed = sum(p.mesh == HBONE for p in model.pods.values())
        denied = sum(f.status == "denied" for f in model.flows.values())
        t = Text()
        t.append(" ambient-lab ", style="bold reverse")
        t.append(f" {source} ", style="bold")
        t.append(f"| {view} ", style="bold cyan")
        t.append(f"| {len(model.nodes)} nodes, {len(model.pods)} pods ({meshed} in mesh) ")
        t.append(f"| {len(model.flows)} flows")
        if denied:
            t.append(f" ({denied} denied)", style="bold red")
        t.append(f" | {model.events_seen} events ")
        if model.step_mode or model.held:
            t.append(f"| STEP MODE ({len(model.held)} held) " if model.step_mode else f"| {len(model.held)} held ",
                     style="bold magenta")
        if extra:
            t.append(f"| {extra} ", style="yellow")
        if model.status:
            style = "bold red" if model.status.startswith(("error", "lost")) else "dim"
            t.append(f"| {model.status}", style=style)
        self.update(t)
