"""Tearing a lab down from its state record: processes, namespaces, files, in that order.

Used by the supervisor on `down` and by the CLI when the supervisor is gone (killed with
SIGKILL): both read the same record, so the result is the same. Idempotent: running it twice
removes nothing twice and fails on nothing already gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time

from lab.common import netns
from lab.common.state import RUN_ROOT, LabRecord, ProcessEntry, is_alive, run_dir


def stop_processes(entries: list[ProcessEntry], grace: float = 0.5) -> None:
    """SIGTERM every recorded process that is still the one we started, then SIGKILL the stragglers."""
    alive = [p for p in entries if is_alive(p)]
    for p in alive:
        try:
            os.kill(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if is_alive(p)]
    for p in alive:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def teardown(record: LabRecord, include_supervisor: bool = True) -> None:
    """Remove everything the record lists, then the lab's run directory."""
    record.closed = True
    procs = list(record.processes)
    if include_supervisor and record.supervisor:
        procs.append(record.supervisor)
    stop_processes(procs)
    # Pods before nodes before the fabric: the reverse of creation order.
    for name in reversed(record.netns):
        netns.remove(name)
    for p in record.paths:
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            os.unlink(p)
    shutil.rmtree(run_dir(record.lab), ignore_errors=True)
    with contextlib.suppress(OSError):
        os.rmdir(RUN_ROOT)  # the last lab out removes the lab's root directory (never while others run)
