"""`?`: every key of every screen, from help.md beside this file."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP_FILE = Path(__file__).with_name("help.md")


def help_text() -> str:
    return HELP_FILE.read_text()


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape", "app.pop_screen", "close"), Binding("question_mark", "app.pop_screen", "close"),
                Binding("q", "app.pop_screen", "close", show=False)]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box"):
            yield Markdown(help_text(), id="help")

    def on_mount(self) -> None:
        self.query_one("#help-box").border_title = "keys (esc to close)"
        self.query_one("#help-box").focus()
