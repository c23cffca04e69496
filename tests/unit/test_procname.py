"""Processes are named after what they play: `ss -p`, `ps -o comm` and `top` read /proc/PID/comm,
`ps -ef` reads /proc/PID/cmdline. Checked in fresh interpreters, never in the test process."""

from __future__ import annotations

import subprocess
import sys

from lab.apps import process_name
from tests.conftest import ROOT

PROBE = """
import sys
from lab.common.procname import name_process
name_process(sys.argv[1])
print(open("/proc/self/comm").read().strip())
print(open("/proc/self/cmdline").read().replace("\\0", " ").strip())
"""


def run(*args: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_short_name_and_command_line():
    comm, cmdline = run("ztunnel", "--node", "ambient-worker")
    assert comm == "ztunnel"
    assert cmdline == "ztunnel ztunnel --node ambient-worker"  # argv[1:] of the probe starts with the name


def test_a_long_name_is_cut_to_the_kernels_15_bytes():
    comm, _ = run("a-very-long-component-name")
    assert comm == "a-very-long-com"


def test_apps_are_named_after_their_image_without_site_packages():
    """The apps start with `python -S` (stdlib only): they set the short name from /proc alone."""
    code = ("import sys; sys.argv[1:] = ['idle', '--pod', 'p']; from lab.apps.__main__ import parse_args, set_comm; "
            "from lab.apps import process_name; set_comm(process_name(parse_args(sys.argv[1:]).app)); "
            "print(open('/proc/self/comm').read().strip()); print('setproctitle' in sys.modules)")
    r = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["sleep", "False"]
    assert process_name("productpage") == "productpage" and process_name("tcp-echo") == "tcp-echo"
