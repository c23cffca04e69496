"""The authors' check, as rustlings and Instruqt's `track test` do it, on real labs: for every
exercise, its starting state fails `check` (saying why), a plausible wrong answer fails with a live
hint that names the mistake, and the reference solution passes. Run on a copy of exercises/ and
solutions/, so the project's stubs are never touched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab.course import runner
from lab.course.checks import Result
from lab.course.manifest import LAB_PREFIX_ENV
from lab.supervisor.lifecycle import down_one
from tests.conftest import ROOT
from tests.lab.conftest import TEST_PREFIX, _made

pytestmark = pytest.mark.lab

COURSE = runner.Course.load(Path(ROOT) / "exercises")
NAMES = [e.name for e in COURSE.exercises]


@pytest.fixture
def course(root, tmp_path, monkeypatch) -> runner.Course:
    for d in ("exercises", "solutions"):
        shutil.copytree(Path(ROOT) / d, tmp_path / d)
    monkeypatch.setenv(runner.EXERCISES_ENV, str(tmp_path / "exercises"))
    monkeypatch.setenv(LAB_PREFIX_ENV, f"{TEST_PREFIX}x")  # never a learner's ex01...
    return runner.Course.load(tmp_path / "exercises")


def results(course: runner.Course, name: str, settle: float) -> list[Result]:
    fresh = runner.Course.load(course.dir)  # scripts may have written answers into the progress file
    return list(runner.run_checks(fresh, fresh.find(name), settle=settle))


def learner_script(ex, script: Path) -> None:
    """A solution's shell script, run as a learner would: `ambient-lab` of this checkout on PATH."""
    env = {**os.environ, "AMBIENT_LAB": ex.lab, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    p = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, f"{script} failed:\n{p.stdout}\n{p.stderr}"


def put(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    os.utime(dst)  # a new mtime: the component reloads the learner's file


@pytest.mark.parametrize("name", NAMES)
def test_start_fails_a_wrong_answer_fails_with_a_live_hint_the_solution_passes(course: runner.Course, name: str):
    ex = course.find(name)
    solutions = course.solutions / ex.name
    _made.add(ex.lab)  # the session's leftover check covers it
    try:
        runner.start(course, ex, say=lambda _: None)
        start = results(course, name, settle=0)
        assert not all(r.ok for r in start), f"{name}: the starting state already passes"
        assert any(r.hints for r in start if not r.ok), f"{name}: a failing check says nothing: {start}"

        if ex.seam is not None:
            put(solutions / f"wrong_{ex.seam.file}", ex.folder / ex.seam.file)
        else:
            learner_script(ex, solutions / "wrong.sh")
        wrong = results(course, name, settle=3)
        assert not all(r.ok for r in wrong), f"{name}: the plausible wrong answer passes"
        hints = [h for r in wrong if not r.ok for h in r.hints]
        assert any(ex.wrong["expect_hint"] in h for h in hints), (ex.wrong["expect_hint"], hints)

        if ex.seam is not None:
            put(solutions / ex.seam.file, ex.folder / ex.seam.file)
            runner.start(course, ex, say=lambda _: None)  # a fresh lab, with the solution plugged in
        else:
            runner.start(course, ex, say=lambda _: None)  # a fresh lab in the starting state
            learner_script(ex, solutions / "solve.sh")
        solved = results(course, name, settle=8)
        assert all(r.ok for r in solved), "\n".join(r.line() + " " + str(r.hints) for r in solved if not r.ok)
    finally:
        down_one(ex.lab)


def test_every_exercise_has_its_solution_and_a_wrong_answer():
    for ex in COURSE.exercises:
        folder = COURSE.solutions / ex.name
        if ex.seam is not None:
            assert (folder / ex.seam.file).is_file() and (folder / f"wrong_{ex.seam.file}").is_file(), ex.name
        else:
            assert (folder / "solve.sh").is_file() and (folder / "wrong.sh").is_file(), ex.name
        assert ex.wrong.get("expect_hint"), f"{ex.name}: say what the wrong answer's hint must name"
