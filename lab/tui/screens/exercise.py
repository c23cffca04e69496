"""The exercise view (`6`, `:ex`): the current exercise's task, its checks turning green live as
the learner works, `h` for the next hint, `n` for the next exercise.

A client of lab/course like the CLI's `ambient-lab ex`: the checks run in a worker thread against
the exercise's own lab (not the lab the TUI watches), every few seconds while it is up; in a
recording there is no lab, so the view shows the task and says how to check it.
"""

from __future__ import annotations

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Markdown, Static

from lab.common.errors import LabError
from lab.tui.screens.base import LabScreen

RECHECK_EVERY = 5.0  # seconds between live re-checks while the view is shown


class ExerciseScreen(LabScreen):
    VIEW = ":ex"
    AREAS = frozenset()
    BINDINGS = [
        Binding("c", "check", "check now"),
        Binding("h", "hint", "hint"),
        Binding("n", "next", "next exercise"),
    ]

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.course = None
        self.exercise = None
        self.lines: list[Text] = []
        self.hints: list[str] = []
        self._checking = False

    def view_title(self) -> str:
        return f":ex {self.exercise.name}" if self.exercise is not None else ":ex"

    def compose(self) -> ComposeResult:
        yield from self.compose_status()
        with VerticalScroll(id="exercise"):
            yield Static(id="ex-head")
            yield Static(id="ex-checks")
            yield Static(id="ex-hints")
            yield Markdown(id="ex-task")
        yield from self.compose_footer()

    def on_mount(self) -> None:
        self.load()
        self.set_interval(RECHECK_EVERY, self.action_check)

    def load(self) -> None:
        from lab.course.runner import Course

        try:
            self.course = Course.load()
            self.exercise = self.course.find(None)
        except LabError as e:
            self.query_one("#ex-head", Static).update(f"no course: {e.message}")
            return
        ex = self.exercise
        done = sum(1 for e in self.course.exercises if e.name in self.course.progress.done)
        head = Text()
        head.append(f" {ex.name} ", style="bold reverse")
        head.append(f"  {ex.title}\n", style="bold")
        head.append(f" {ex.kind} · {ex.concept} · {done}/{len(self.course.exercises)} done · lab {ex.lab}", style="dim")
        self.query_one("#ex-head", Static).update(head)
        self.query_one("#ex-task", Markdown).update(ex.task.read_text())
        self.lines = [Text(f"checks: press c (the lab of this exercise is started by `sudo ambient-lab ex start "
                           f"{ex.name}`)", style="dim")]
        self.hints = []
        self.show()
        self.action_check()

    def show(self) -> None:
        self.query_one("#ex-checks", Static).update(Text("\n").join(self.lines))
        self.query_one("#ex-hints", Static).update(Text("\n".join(self.hints), style="yellow"))

    def action_check(self) -> None:
        if self.exercise is not None and not self._checking and self.lab.backend.live:
            self._checking = True
            self.run_checks()

    @work(thread=True, group="exercise-checks")
    def run_checks(self) -> None:
        from lab.course import runner

        try:
            lines = []
            for r in runner.run_checks(self.course, self.exercise, settle=0):
                lines.append(Text(r.line(), style="green" if r.ok else "red"))
            if lines and all(str(t).startswith("✓") for t in lines):
                self.course.progress.mark_done(self.exercise.name)
                self.course.progress.save()
                lines.append(Text("done! press n for the next exercise", style="bold green"))
        except LabError as e:
            lines = [Text(f"{e.message}" + (f" ({e.fix})" if e.fix else ""), style="dim")]
        self.app.call_from_thread(self._checked, lines)

    def _checked(self, lines: list[Text]) -> None:
        self._checking = False
        self.lines = lines
        self.show()

    def action_hint(self) -> None:
        if self.exercise is None:
            return
        if not self.lab.backend.live and self.course.progress.hints_shown.get(self.exercise.name, 0) >= \
                len(self.exercise.hints):
            self.hints.append("(hints computed from your lab need the live lab: sudo ambient-lab ex hint)")
            self.show()
            return
        self.hint_worker()

    @work(thread=True, group="exercise-hint")
    def hint_worker(self) -> None:
        from lab.course import runner

        try:
            more = runner.hint(self.course, self.exercise)
        except LabError as e:
            more = [e.message]
        self.app.call_from_thread(self._hinted, more)

    def _hinted(self, more: list[str]) -> None:
        self.hints += more
        self.show()

    def action_next(self) -> None:
        if self.course is None or self.exercise is None:
            return
        names = [e.name for e in self.course.exercises]
        i = names.index(self.exercise.name)
        if i + 1 < len(names):
            self.course.progress.current = names[i + 1]
            self.course.progress.save()
            self.notify(f"next: {names[i + 1]}; start its lab with: sudo ambient-lab ex start {names[i + 1]}")
            self.load()
