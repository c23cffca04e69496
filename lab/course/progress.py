"""The learner's progress: one small readable JSON file per checkout, beside `exercises/`.

It survives `down`, a crashed lab and a reboot (it is not under /run), and `ex reset --all`
clears it. What it holds: which exercises are done (and when), which one is current, when each
was started and what it looked like then (the baseline some checks compare with), the answers
given, and how many of each exercise's hints were shown.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FILE_NAME = ".ambient-lab-progress.json"


@dataclass
class Progress:
    path: Path
    done: dict[str, float] = field(default_factory=dict)
    current: str = ""
    started: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"ts", "baseline"}
    answers: dict[str, str] = field(default_factory=dict)
    hints_shown: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, exercises_dir: Path) -> "Progress":
        path = exercises_dir.parent / FILE_NAME
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        known = {k: data[k] for k in ("done", "current", "started", "answers", "hints_shown") if k in data}
        return cls(path=path, **known)

    def save(self) -> None:
        data = {k: v for k, v in asdict(self).items() if k != "path"}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.path)

    def mark_done(self, name: str) -> None:
        self.done.setdefault(name, time.time())

    def forget(self, name: str) -> None:
        for d in (self.done, self.started, self.answers, self.hints_shown):
            d.pop(name, None)
