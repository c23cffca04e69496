"""The exercise view (`6`, `:ex`) over a recording: the current exercise's task, `h` for its
hints, `n` for the next; the course and its progress file come from a copy of exercises/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from textual.widgets import Markdown, Static

from lab.course.runner import EXERCISES_ENV
from lab.tui.app import LabApp
from lab.tui.backend import RecordedBackend
from lab.tui.screens.exercise import ExerciseScreen
from tests.conftest import ROOT

from .conftest import FIXTURE, SIZE
from .test_app import plain, settle


@pytest.fixture(autouse=True)
def course_copy(tmp_path, monkeypatch):
    """The first three exercises of the course, so the view's looks do not change as the course grows."""
    shutil.copytree(Path(ROOT) / "exercises", tmp_path / "exercises")
    manifest = tmp_path / "exercises" / "course.yaml"
    course = yaml.safe_load(manifest.read_text())
    manifest.write_text(yaml.safe_dump({"exercises": course["exercises"][:3]}, sort_keys=False))
    monkeypatch.setenv(EXERCISES_ENV, str(tmp_path / "exercises"))
    return tmp_path / "exercises"


def make_app() -> LabApp:
    return LabApp(RecordedBackend(FIXTURE), tick=None)


async def test_6_opens_the_current_exercise_with_its_task_and_hints() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("6")
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, ExerciseScreen)
        assert "01_enrol" in plain(screen.query_one("#ex-head", Static))
        assert "Put every pod of `default` in the ambient mesh" in screen.query_one("#ex-task", Markdown).source
        assert ":ex 01_enrol" in plain(screen.query_one("#status", Static))
        await pilot.press("h")
        await settle(pilot)
        assert "hint 1/2" in plain(screen.query_one("#ex-hints", Static))
        await pilot.press("n")
        await settle(pilot)
        assert "02_ztunnel_sockets" in plain(screen.query_one("#ex-head", Static))


async def test_the_command_line_opens_it_too() -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("colon")
        await pilot.pause()
        from textual.widgets import Input

        app.screen.query_one(Input).value = "ex"
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, ExerciseScreen)


def test_exercise_view_snapshot(snap_compare) -> None:
    assert snap_compare(make_app(), press=["6"], terminal_size=SIZE, run_before=settle)
