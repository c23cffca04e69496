"""The lab's state record: everything a lab created, written down BEFORE it is created.

`down` removes exactly what is listed here, and nothing else: never by name pattern (the
lesson of Mininet's `mn -c`). Because each entry is recorded first, a supervisor killed with
SIGKILL mid-build still leaves a record that names everything it may have made. Processes are
recorded with their start time (from /proc/<pid>/stat) so a recycled pid is never signalled.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field

RUN_ROOT = "/run/ambient-lab"
LAB_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,18}[a-z0-9])?$")
DEFAULT_LAB = "ambient"


def run_dir(lab: str) -> str:
    return os.path.join(RUN_ROOT, lab)


def check_lab_name(lab: str) -> str:
    from lab.common.errors import LabError

    if not LAB_NAME.match(lab):
        raise LabError(f"invalid lab name {lab!r}",
                       "use 1-20 lowercase letters, digits and '-', starting and ending with a letter or digit")
    return lab


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat: the process's start time in clock ticks since boot (None: gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(data.rsplit(")", 1)[1].split()[19])


@dataclass
class ProcessEntry:
    pid: int
    start: int
    what: str


@dataclass
class LabRecord:
    """What one lab made: namespaces, processes, files. Saved atomically after every change."""

    lab: str
    supervisor: ProcessEntry | None = None
    netns: list[str] = field(default_factory=list)
    processes: list[ProcessEntry] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    closed: bool = False  # set by teardown: a removed lab's record is never written again

    @property
    def file(self) -> str:
        return os.path.join(run_dir(self.lab), "state.json")

    def save(self) -> None:
        if self.closed:
            return
        d = run_dir(self.lab)
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".state-")
        with os.fdopen(fd, "w") as f:
            json.dump({k: v for k, v in asdict(self).items() if k != "closed"}, f, indent=1)
        os.replace(tmp, self.file)

    @classmethod
    def load(cls, lab: str) -> "LabRecord | None":
        try:
            with open(os.path.join(run_dir(lab), "state.json")) as f:
                d = json.load(f)
        except FileNotFoundError:
            return None
        sup = d.get("supervisor")
        return cls(lab=d["lab"], supervisor=ProcessEntry(**sup) if sup else None, netns=d.get("netns", []),
                   processes=[ProcessEntry(**p) for p in d.get("processes", [])], paths=d.get("paths", []))

    def add_netns(self, name: str) -> None:
        if name not in self.netns:
            self.netns.append(name)
            self.save()

    def drop_netns(self, name: str) -> None:
        if name in self.netns:
            self.netns.remove(name)
            self.save()

    def add_process(self, pid: int, what: str) -> ProcessEntry:
        entry = ProcessEntry(pid, process_start_time(pid) or 0, what)
        self.processes.append(entry)
        self.save()
        return entry

    def drop_process(self, pid: int) -> None:
        self.processes = [p for p in self.processes if p.pid != pid]
        self.save()

    def add_path(self, p: str) -> None:
        if p not in self.paths:
            self.paths.append(p)
            self.save()

    def drop_path(self, p: str) -> None:
        if p in self.paths:
            self.paths.remove(p)
            self.save()


def process_state(pid: int) -> str:
    """Field 3 of /proc/<pid>/stat: R, S, D, Z (zombie: exited, not yet reaped)... or "" if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


def is_alive(entry: ProcessEntry) -> bool:
    """The recorded process still runs: same pid AND same start time, and not a zombie (an exited
    process whose parent has not collected it yet is gone for every purpose of ours)."""
    return process_start_time(entry.pid) == entry.start and process_state(entry.pid) not in ("Z", "X", "")


def running_labs() -> list[str]:
    try:
        return sorted(d for d in os.listdir(RUN_ROOT) if os.path.exists(os.path.join(RUN_ROOT, d, "state.json")))
    except FileNotFoundError:
        return []
