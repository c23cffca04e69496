"""A lab's life: start its supervisor and wait until it is ready, or remove it.

The counterpart of `kind create cluster` and `kind delete cluster`. Both clients use it (the CLI's
`up` and `down`, and the TUI, which starts a lab when none runs), so it lives with the supervisor
and not in either client.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from importlib import resources

from lab.common import state
from lab.common.errors import LabError
from lab.kube import manifests
from lab.supervisor.client import call, supervisor_socket
from lab.supervisor.client import request as sup_request


def default_scenario() -> str:
    return str(resources.files("lab") / "scenarios" / "default.yaml")


def supervisor_alive(lab: str) -> bool:
    rec = state.LabRecord.load(lab)
    return bool(rec and rec.supervisor and state.is_alive(rec.supervisor))


def start_lab(lab: str, files: list[str], nodes: int = 0, quiet: bool = False, no_cni_taint: bool = False,
              cert_ttl: int = 0) -> float:
    """Build a lab and start its supervisor; returns when it is ready (seconds taken). Used by `up` and the TUI."""
    if supervisor_alive(lab):
        raise LabError(f"a lab named {lab!r} is already running",
                       f"use it, remove it with `sudo ambient-lab down --name {lab}`, or pick another --name")
    files = files or [default_scenario()]
    loaded = manifests.load_files(files)  # bad input fails here, before anything is built
    workers = nodes or (loaded.cluster.workers if loaded.cluster else 2)
    if not 1 <= workers <= 20:
        raise LabError(f"--nodes {workers}: the lab builds 1 to 20 worker nodes")
    missing = [t for t in ("ip", "iptables-legacy-restore", "iptables-legacy-save") if not _which(t)]
    if missing:
        raise LabError(f"missing tools: {', '.join(missing)}", "install them with: sudo make setup "
                       "(or apt-get install iptables iproute2); `ambient-lab doctor` checks everything")
    if state.LabRecord.load(lab):  # a previous supervisor died: clear what it left first
        if not quiet:
            print(f"removing what a previous run of lab {lab!r} left behind", file=sys.stderr)
        from lab.supervisor.cleanup import teardown  # pyroute2: only when there is something to remove

        teardown(state.LabRecord.load(lab))  # type: ignore[arg-type]
    t0 = time.monotonic()
    os.makedirs(state.run_dir(lab), exist_ok=True)
    log = open(os.path.join(state.run_dir(lab), "supervisor.log"), "ab")
    cmd = [sys.executable, "-m", "lab.supervisor", "--name", lab, "--nodes", str(workers)]
    if no_cni_taint:
        cmd.append("--no-cni-taint")
    if cert_ttl:
        cmd += ["--cert-ttl", str(cert_ttl)]
    for f in files:
        cmd += ["-f", f]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    while not os.path.exists(supervisor_socket(lab)):
        if proc.poll() is not None:
            raise LabError(f"the supervisor exited at start (code {proc.returncode})",
                           f"see {state.run_dir(lab)}/supervisor.log")
        time.sleep(0.01)
    try:
        for msg in sup_request(lab, "wait_ready", timeout=300):
            if "progress" in msg and not quiet:
                print("  " + msg["progress"], file=sys.stderr)
    except LabError:
        proc.wait(timeout=30)  # the supervisor removes what it built before it exits
        raise
    return time.monotonic() - t0


def _which(tool: str) -> bool:
    return shutil.which(tool) is not None or shutil.which(tool, path="/usr/sbin:/sbin") is not None


def down_one(lab: str) -> None:
    """Ask the supervisor to remove its lab; if it is gone, remove what its record lists ourselves."""
    rec = state.LabRecord.load(lab)
    if rec is None:
        print(f"lab {lab!r} is not running: nothing to remove", file=sys.stderr)
        return
    t0 = time.monotonic()
    if rec.supervisor and state.is_alive(rec.supervisor):
        try:
            call(lab, "down", timeout=30)
        except LabError:
            pass
        deadline = time.monotonic() + 10
        while state.is_alive(rec.supervisor) and time.monotonic() < deadline:
            time.sleep(0.01)
    rec = state.LabRecord.load(lab)  # the supervisor may have removed it all already
    if rec is not None:
        from lab.supervisor.cleanup import teardown  # pyroute2: only when there is something to remove

        teardown(rec)
    print(f"lab {lab!r} removed ({time.monotonic() - t0:.2f}s)", file=sys.stderr)
