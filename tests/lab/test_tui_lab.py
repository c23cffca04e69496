"""The real TUI in a real terminal (tmux) against a real lab: enrol, curl, and find the HBONE flow on screen."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import IN_CI
from tests.lab.conftest import down, new_lab_name, up
from tests.lab.test_capture import curl, redirection, wait_for

pytestmark = pytest.mark.lab


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def screen(session: str) -> str:
    return tmux("capture-pane", "-p", "-t", session)


def wait_screen(session: str, *needles: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = screen(session)
        if all(n in text for n in needles):
            return text
        time.sleep(0.3)
    raise AssertionError(f"{needles} not on screen after {timeout}s:\n{text}")


def test_tui_shows_an_hbone_flow_step_by_step(root):
    if not shutil.which("tmux"):
        if IN_CI:
            pytest.fail("tmux is missing (scripts/bootstrap.sh --test installs it)")
        pytest.skip("tmux is not installed")
    name = new_lab_name("t")
    session = f"ambient-lab-{name}"
    lab = up(name)
    try:
        tmux("new-session", "-d", "-s", session, "-x", "200", "-y", "50",
             f"{sys.executable} -m lab tui --name {name}")
        tmux("resize-window", "-t", session, "-x", "200", "-y", "50")
        wait_screen(session, f"{name}-worker", "curl-")  # the cluster view, nodes side by side
        lab("label", "namespace", "default", "istio.io/dataplane-mode=ambient")
        wait_for(lambda: all(redirection(p) == "enabled" for p in lab.pods()), what="pods enabled")
        assert "Simple Bookstore App" in curl(lab, "deploy/curl", "http://productpage:9080/productpage").stdout
        tmux("send-keys", "-t", session, "3")  # :flows
        text = wait_screen(session, "HBONE", "productpage")
        assert "curl-" in text
        # open the flow from curl: filter on it, then its timeline
        tmux("send-keys", "-t", session, "/")
        tmux("send-keys", "-t", session, "curl-", "Enter")
        time.sleep(0.5)
        tmux("send-keys", "-t", session, "Enter")
        text = wait_screen(session, "captured", "original destination", "mTLS handshake", timeout=15)
        assert "curl-" in text and "productpage" in text, text
        for _ in range(12):  # walk down the steps to the CONNECT sent inside the tunnel
            tmux("send-keys", "-t", session, "Down")
        wait_screen(session, "CONNECT", timeout=10)
        tmux("send-keys", "-t", session, "q")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        down(name)
