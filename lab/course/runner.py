"""The course's operations, for both clients (the CLI's `ambient-lab ex ...` and the TUI): list,
start, check, hint, answer, reset, solution, watch. Everything a learner sees comes from here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import lab
from lab.common.errors import LabError
from lab.common.seams import seams_path
from lab.common.state import run_dir
from lab.course.answers import ANSWERS
from lab.course.checks import CHECKS, Context, Result
from lab.course.live import LiveLab
from lab.course.manifest import Exercise, load_course
from lab.course.progress import Progress

EXERCISES_ENV = "AMBIENT_LAB_EXERCISES"  # another exercises/ folder (the authors' check uses a copy)
SETTLE = 6.0  # seconds a failing check that depends on the lab settling is retried

Say = Callable[[str], None]


def exercises_dir() -> Path:
    return Path(os.environ.get(EXERCISES_ENV) or Path(lab.__file__).resolve().parents[1] / "exercises")


@dataclass
class Course:
    dir: Path
    exercises: list[Exercise]
    progress: Progress = field(repr=False)

    @classmethod
    def load(cls, directory: Path | None = None) -> "Course":
        d = directory or exercises_dir()
        manifest = d / "course.yaml"
        if not manifest.is_file():
            raise LabError(f"no course at {manifest}", f"the exercises live in the project's exercises/ folder "
                                                       f"(or set {EXERCISES_ENV})")
        return cls(d, load_course(manifest, set(CHECKS), set(ANSWERS)), Progress.load(d))

    @property
    def solutions(self) -> Path:
        return self.dir.parent / "solutions"

    def find(self, name: str | None) -> Exercise:
        """An exercise by name, number or topic (`01_enrol`, `01`, `1`, `enrol`); None: the current
        one, else the first not done."""
        if not name:
            current = next((e for e in self.exercises if e.name == self.progress.current), None)
            if current is not None and current.name not in self.progress.done:
                return current
            return next((e for e in self.exercises if e.name not in self.progress.done), self.exercises[-1])
        for e in self.exercises:
            if name in (e.name, e.name.split("_", 1)[1]) or (name.isdigit() and int(name) == e.number):
                return e
        raise LabError(f"no exercise {name!r}", "see: ambient-lab ex list")

    def status(self, e: Exercise) -> str:
        if e.name in self.progress.done:
            return "done"
        return "current" if e.name == self.progress.current else "not started"


def list_rows(course: Course) -> tuple[list[list[str]], str]:
    rows = [[e.name, e.kind, course.status(e), e.concept, e.title] for e in course.exercises]
    done = sum(1 for e in course.exercises if e.name in course.progress.done)
    return rows, f"{done}/{len(course.exercises)} done"


# -- start ------------------------------------------------------------------------------------
def lab_command(ex: Exercise, *words: str, check: bool = True) -> subprocess.CompletedProcess:
    """An `ambient-lab` command on the exercise's lab, exactly as a learner would type it."""
    args = [w.replace("{lab}", ex.lab) for w in words]
    args = [str(ex.folder / a) if (ex.folder / a).is_file() else a for a in args]
    p = subprocess.run([sys.executable, "-m", "lab", *args, "--name", ex.lab], capture_output=True, text=True,
                       timeout=180)
    if check and p.returncode != 0:
        raise LabError(f"setting up {ex.name}: `ambient-lab {' '.join(words)}` failed: {p.stderr.strip()}")
    return p


def start(course: Course, ex: Exercise, say: Say = print) -> None:
    """Bring up the exercise's own lab, with its starting state in place, and show the task."""
    from lab.supervisor.lifecycle import default_scenario, down_one, start_lab, supervisor_alive

    for other in course.exercises:
        if other is not ex and supervisor_alive(other.lab):
            say(f"removing lab {other.lab} of exercise {other.name}, to leave the machine to this one")
            down_one(other.lab)
    if supervisor_alive(ex.lab):
        down_one(ex.lab)
    say(f"starting lab {ex.lab} for exercise {ex.name}...")
    files = [default_scenario() if f == "default" else str(ex.folder / f) for f in ex.files]
    took = start_lab(ex.lab, files, nodes=ex.nodes, quiet=True)
    if ex.seam is not None:
        write_seams(ex)
    for step in ex.setup:
        lab_command(ex, *step)
    live = LiveLab(ex.lab)
    baseline = {f"pods/{ns}": [p["metadata"]["name"] for p in live.pods(ns)] for ns in ("default",)}
    course.progress.started[ex.name] = {"ts": time.time(), "baseline": baseline}
    course.progress.current = ex.name
    course.progress.answers.pop(ex.name, None)
    course.progress.save()
    say(f"lab {ex.lab} is up ({took:.1f}s).\n")
    say(ex.task.read_text().rstrip())
    say("")
    say(next_steps(ex))


def write_seams(ex: Exercise) -> None:
    """Plug the learner's function into the lab's running component (lab/common/seams.py)."""
    assert ex.seam is not None
    path = seams_path(run_dir(ex.lab))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({ex.seam.name: f"{ex.folder / ex.seam.file}:{ex.seam.function}"}, f)
    os.replace(tmp, path)


def next_steps(ex: Exercise) -> str:
    lines = [f"Your lab is `{ex.lab}`: add `--name {ex.lab}` to ambient-lab commands, or `export AMBIENT_LAB={ex.lab}`."]
    if ex.seam is not None:
        lines.append(f"Edit {ex.folder / ex.seam.file}: the lab's {ex.seam.name.split('.')[0]} calls your "
                     f"{ex.seam.function}() from now on (saved changes apply at once).")
    lines += [f"Check your work:  sudo ambient-lab ex check {ex.name}",
              f"Stuck?            sudo ambient-lab ex hint {ex.name}"]
    if ex.answer is not None:
        lines.append(f"Answer with:      sudo ambient-lab ex answer {ex.name} VALUE")
    return "\n".join(lines)


# -- check ------------------------------------------------------------------------------------
def context(course: Course, ex: Exercise, live: LiveLab) -> Context:
    started = course.progress.started.get(ex.name) or {}
    computed = (lambda: ANSWERS[ex.answer["compute"]](live, ex.answer)) if ex.answer else None
    return Context(started=float(started.get("ts", 0.0)), answer=course.progress.answers.get(ex.name),
                   baseline=started.get("baseline") or {}, exercise=ex, computed_answer=computed)


def require_lab(ex: Exercise) -> LiveLab:
    live = LiveLab(ex.lab)
    if not live.alive():
        raise LabError(f"the lab of exercise {ex.name} ({ex.lab}) is not running",
                       f"start it: sudo ambient-lab ex start {ex.name}")
    return live


def run_checks(course: Course, ex: Exercise, settle: float = SETTLE) -> Iterator[Result]:
    """Every check of the exercise, one Result each as it finishes. A failing check that may only
    need the lab to settle is retried until `settle` seconds have passed since the first check."""
    live = require_lab(ex)
    ctx = context(course, ex, live)
    if ex.seam is not None:
        loaded = CHECKS["learner_code_loads"](live, {}, ctx)
        yield loaded
        if not loaded.ok:
            return
    deadline = time.monotonic() + settle
    for spec in ex.checks:
        fn = CHECKS[spec["check"]]
        while True:
            try:
                result = fn(live, spec, ctx)
            except LabError as e:
                result = Result(False, f"check {spec['check']}", e.message, hints=[e.fix] if e.fix else [])
            if result.ok or not result.retry or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        yield result


def check(course: Course, ex: Exercise, say: Say = print, settle: float = SETTLE) -> bool:
    ok = True
    for r in run_checks(course, ex, settle):
        say(r.line())
        if not r.ok:
            ok = False
            if r.command:
                say(f"    see it yourself: {r.command}")
    if ok:
        course.progress.mark_done(ex.name)
        course.progress.save()
        nxt = next((e for e in course.exercises if e.name not in course.progress.done), None)
        say(f"\nExercise {ex.name} is done." + (f" Next: sudo ambient-lab ex start {nxt.name}" if nxt else
                                                " That was the last one: the course is complete."))
    else:
        say(f"\nNot yet. A hint computed from your lab: sudo ambient-lab ex hint {ex.name}")
    return ok


# -- hints, answers, reset, solutions ---------------------------------------------------------
def hint(course: Course, ex: Exercise) -> list[str]:
    """The exercise's next own hint; after the last one, live hints for each failing check."""
    shown = course.progress.hints_shown.get(ex.name, 0)
    if shown < len(ex.hints):
        course.progress.hints_shown[ex.name] = shown + 1
        course.progress.save()
        return [f"hint {shown + 1}/{len(ex.hints)}: {ex.hints[shown]}"]
    out = []
    for r in run_checks(course, ex, settle=0):
        if not r.ok:
            out.append(f"{r.line()}")
            out += [f"    -> {h}" for h in dict.fromkeys(r.hints)] or [
                "    -> (no more to say about this one: read the task again)"]
    return out or ["every check passes now: sudo ambient-lab ex check " + ex.name]


def answer(course: Course, ex: Exercise, value: str) -> None:
    if ex.answer is None:
        raise LabError(f"exercise {ex.name} asks no question", "its checks read the lab; run ambient-lab ex check")
    course.progress.answers[ex.name] = value
    course.progress.save()


def stub_paths(ex: Exercise) -> list[Path]:
    return [ex.folder / ex.seam.file] if ex.seam is not None else []


def reset(course: Course, ex: Exercise, say: Say = print) -> None:
    """Restore the exercise's stub (from git) and start its lab again, with its starting fault."""
    for path in stub_paths(ex):
        top = subprocess.run(["git", "-C", str(path.parent), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True)
        if top.returncode != 0:
            raise LabError(f"cannot restore {path}: not in a git checkout", "restore the file from the project")
        rel = path.resolve().relative_to(Path(top.stdout.strip()).resolve())
        original = subprocess.run(["git", "-C", top.stdout.strip(), "show", f"HEAD:{rel}"], capture_output=True)
        if original.returncode == 0:
            path.write_bytes(original.stdout)
            say(f"restored {path}")
    course.progress.forget(ex.name)
    course.progress.save()
    start(course, ex, say)


def solution(course: Course, ex: Exercise, force: bool = False) -> str:
    if ex.name not in course.progress.done and not force:
        raise LabError(f"exercise {ex.name} is not done yet", f"finish it, or: ambient-lab ex solution {ex.name} --force")
    folder = course.solutions / ex.name
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("wrong"))
    return "\n\n".join(f"# {p.relative_to(course.dir.parent)}\n{p.read_text().rstrip()}" for p in files)


def watch(course: Course, say: Say = print, stop: Callable[[], bool] = lambda: False) -> None:
    """rustlings' loop: check the current exercise whenever one of its files is saved or the lab
    changes, and move on to the next exercise when it passes."""
    import watchfiles

    ex = course.find(None)
    if not LiveLab(ex.lab).alive():
        start(course, ex, say)
    seen = -1  # events in the lab's stream after the last check (the check's own traffic included)
    while not stop():
        live = LiveLab(ex.lab)
        if not live.alive():
            raise LabError(f"the lab of exercise {ex.name} stopped", f"start it again: sudo ambient-lab ex start {ex.name}")
        if len(live.events()) != seen:
            say(f"\n== {ex.name}: {ex.title}")
            if check(course, ex, say, settle=0):
                ex = next((e for e in course.exercises if e.name not in course.progress.done), None)
                if ex is None:
                    return
                start(course, ex, say)
                seen = -1
                continue
            seen = len(live.events())
        # wait for a saved file (then check at once) or 2 s (then look for new events in the lab)
        for changes in watchfiles.watch(ex.folder, rust_timeout=2000, yield_on_timeout=True, raise_interrupt=False):
            if changes:
                seen = -1
            break
