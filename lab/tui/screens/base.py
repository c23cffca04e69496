"""What every screen of the TUI shares: the status bar, the footer, redraws from the view model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Footer

from lab.tui.widgets.status_bar import StatusBar

if TYPE_CHECKING:
    from lab.tui.app import LabApp
    from lab.tui.model import LabModel


class LabScreen(Screen):
    """A view over the model. `AREAS` are the model areas it shows (see model.AREAS): the app's
    tick redraws the active screen only when one of them changed (coalescing)."""

    VIEW = ""
    AREAS: frozenset[str] = frozenset()

    @property
    def lab(self) -> "LabApp":
        return self.app  # type: ignore[return-value]

    @property
    def model(self) -> "LabModel":
        return self.lab.model

    def compose_status(self) -> ComposeResult:
        yield StatusBar(id="status")

    def compose_footer(self) -> ComposeResult:
        yield Footer()

    def view_title(self) -> str:
        return self.VIEW

    def on_screen_resume(self) -> None:
        self.refresh_view(full=True)

    def refresh_view(self, dirty: frozenset[str] | set[str] = frozenset(),
                     flow_changes: tuple[set[str], set[str]] | None = None, full: bool = False) -> None:
        bar = self.query("#status")
        if bar:
            bar.first(StatusBar).show(self.model, self.lab.backend.describe(), self.view_title(), self.lab.extra_status())
        if full or (set(dirty) & self.AREAS):
            self.update_view(set(dirty), flow_changes, full)

    def update_view(self, dirty: set[str], flow_changes: tuple[set[str], set[str]] | None, full: bool) -> None:
        """Redraw from the model; `full` after the screen (re)appears."""
