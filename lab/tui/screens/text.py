"""A read-only page of text: describe (`d`), YAML (`y`), logs (`l`). `esc` goes back."""

from __future__ import annotations

from typing import Callable

from rich.syntax import Syntax
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Static

from lab.common.errors import LabError
from lab.tui.screens.base import LabScreen


class TextScreen(LabScreen):
    BINDINGS = [Binding("escape", "app.pop_screen", "back")]

    def __init__(self, title: str, text: str = "", loader: Callable[[], str] | None = None, language: str = "") -> None:
        super().__init__()
        self.title_text = title
        self.text = text
        self.loader = loader
        self.language = language

    def view_title(self) -> str:
        return self.title_text

    def compose(self) -> ComposeResult:
        yield from self.compose_status()
        with VerticalScroll(id="text-scroll"):
            yield Static(id="text-body", markup=False)
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.query_one("#text-scroll").border_title = self.title_text
        if self.loader is not None:
            self.show("loading...")
            self.load()
        else:
            self.show(self.text)

    def show(self, text: str) -> None:
        self.text = text
        body = self.query_one("#text-body", Static)
        if self.language:
            body.update(Syntax(text, self.language, theme="ansi_dark", word_wrap=False))
        else:
            body.update(Text(text))

    @work(thread=True, exclusive=True)
    def load(self) -> None:
        try:
            text = self.loader() if self.loader else ""
        except LabError as e:
            text = f"error: {e.message}" + (f"\n  fix: {e.fix}" if e.fix else "")
        self.app.call_from_thread(self.show, text)
