"""TUI tier: Textual Pilot and snapshot tests over a recording of a real lab (no root, no timing).

Nondeterminism removed: time zone fixed (UTC), no timer (the tests pump the app by hand), no
animations, the recording's own clock for ages, and a fixed terminal size.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "bookinfo"  # ambient, an allowed and a denied HBONE flow
RACE = Path(__file__).parent / "fixtures" / "race"  # istio-cni's start-up race: bypassed pods, plain text
STEPPING = Path(__file__).parent / "fixtures" / "stepping"  # step mode: a curl held, stepped, released
SIZE = (140, 40)


def recorded_events(fixture: Path = FIXTURE) -> list[dict]:
    return [json.loads(line) for line in (fixture / "events.jsonl").read_text().splitlines() if line.strip()]


def recorded_snapshot(fixture: Path = FIXTURE) -> dict:
    return json.loads((fixture / "snapshot.json").read_text())


def folded(fixture: Path):
    """A view model with a whole recording folded in."""
    from lab.tui.backend import RecordedBackend
    from lab.tui.model import LabModel

    b = RecordedBackend(fixture)
    m = LabModel(b.lab, clock=b.now)
    b.start()
    m.fold_all(b.drain())
    return m


@pytest.fixture(autouse=True)
def frozen_world(monkeypatch):
    """Clocks print in UTC and nothing animates, for these tests only (restored afterwards)."""
    monkeypatch.setenv("TZ", "UTC")
    monkeypatch.setenv("TEXTUAL_ANIMATIONS", "none")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def backend():
    from lab.tui.backend import RecordedBackend

    return RecordedBackend(FIXTURE)


@pytest.fixture
def app(backend):
    from lab.tui.app import LabApp

    return LabApp(backend, tick=None)


@pytest.fixture
def model():
    """The view model with the bookinfo recording folded in."""
    return folded(FIXTURE)
