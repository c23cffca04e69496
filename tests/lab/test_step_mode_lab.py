"""Step mode on a real lab (root): `ambient-lab step on`, a curl from the curl pod to details waits
in the proxies before each step, `step next` walks it from the source ztunnel to the destination
ztunnel, `step all` lets it finish with the right answer, `step off` releases what is held."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from tests.lab.conftest import Lab, down, leftovers, new_lab_name, up
from tests.lab.test_capture import redirection, wait_for

pytestmark = pytest.mark.lab

URL = "http://details:9080/details/0"


@pytest.fixture(scope="module")
def step_lab(root):
    """The default scenario, namespace default in ambient; always removed, step mode or not."""
    name = new_lab_name("s")
    try:
        lab = up(name)
        lab("label", "namespace", "default", "istio.io/dataplane-mode=ambient")
        wait_for(lambda: all(redirection(p) == "enabled" for p in lab.pods()), timeout=15, what="pods enabled")
        yield lab
    finally:
        try:
            Lab(name)("step", "off", check=False)
        finally:
            down(name)
    assert leftovers(name) == []


def held(lab: Lab) -> list[dict]:
    return json.loads(lab("step", "held", "-o", "json").stdout)


def background_curl(lab: Lab) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lab", "exec", "--name", lab.name, "deploy/curl", "--",
                             "curl", "-s", "--max-time", "20", URL],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def held_step(lab: Lab, step: str, pod_prefix: str) -> dict:
    return wait_for(lambda: next((h for h in held(lab) if h["step"] == step and h["pod"].startswith(pod_prefix)),
                                 None), timeout=5, what=f"a flow held before {step!r} in a {pod_prefix}* pod")


def test_step_mode_holds_a_new_connection_before_each_step(step_lab: Lab):
    lab = step_lab
    assert "step mode on" in lab("step", "on").stdout
    curl = background_curl(lab)
    try:
        first = held_step(lab, "plan", "curl-")
        flow = first["flow"]
        assert first["next"] and "10.96." in first["next"] and first["component"] == "ztunnel"
        assert first["direction"] == "outbound"
        time.sleep(0.5)
        assert curl.poll() is None, "curl finished while its connection was held"
        assert "plan" in lab("step", "held").stdout  # the readable form names the step and what comes next
        steps = ["plan"]
        for step, pod in (("mTLS handshake", "curl-"), ("CONNECT", "curl-"), ("authorization", "details-")):
            out = json.loads(lab("step", "next", flow[:10], "-o", "json").stdout)
            assert [r["flow"] for r in out["released"]] == [flow], out
            now = held_step(lab, step, pod)
            assert now["flow"] == flow and now["next"]
            steps.append(step)
            assert curl.poll() is None
        # the destination ztunnel holds the same flow id: the CONNECT carried it in traceparent
        assert now["node"] != first["node"] and now["direction"] == "inbound"
        assert "AuthorizationPolic" in now["next"]
        assert steps == ["plan", "mTLS handshake", "CONNECT", "authorization"]

        out = lab("step", "all").stdout
        assert flow[:12] in out
        stdout, _ = curl.communicate(timeout=15)
        assert curl.returncode == 0 and json.loads(stdout)["author"] == "William Shakespeare"
        assert held(lab) == []
    finally:
        if curl.poll() is None:
            curl.kill()
            curl.wait()

    # step off releases what is held, and then nothing waits
    curl = background_curl(lab)
    try:
        held_step(lab, "plan", "curl-")
        off = lab("step", "off").stdout
        # 1, or 2 when the flow, released at the source, got held at the destination before the "off"
        # reached it (the proxies are told in parallel): either way nothing waits any more
        assert re.match(r"step mode off: [12] held step\(s\) released", off), off
        stdout, _ = curl.communicate(timeout=15)
        assert curl.returncode == 0 and json.loads(stdout)["id"] == 0
    finally:
        if curl.poll() is None:
            curl.kill()
            curl.wait()
    assert held(lab) == [] and "step mode is off" in lab("step", "held").stdout
    t0 = time.monotonic()
    assert json.loads(lab.exec("deploy/curl", "curl", "-s", "--max-time", "5", URL).stdout)["id"] == 0
    assert time.monotonic() - t0 < 5


def step_mode_is_off(lab: Lab) -> bool:
    return "step mode is off" in lab("step", "held").stdout


def test_the_tui_ends_step_mode_when_it_quits_crashes_or_is_killed(step_lab: Lab):
    """The TUI's LiveBackend turns step mode off on its way out: quit (stop), an uncaught exception
    (atexit), SIGTERM (a signal handler); a held curl then finishes."""
    from lab.tui.backend import LiveBackend

    lab = step_lab
    backend = LiveBackend(lab.name, start_if_needed=False)
    assert backend.step_support()[0]
    assert backend.set_step_mode(True)["on"] is True
    curl = background_curl(lab)
    try:
        held_step(lab, "plan", "curl-")
        backend.stop()  # the learner quits the TUI
        stdout, _ = curl.communicate(timeout=15)
        assert curl.returncode == 0 and json.loads(stdout)["id"] == 0
    finally:
        if curl.poll() is None:
            curl.kill()
            curl.wait()
    assert step_mode_is_off(lab)

    crash = subprocess.run([sys.executable, "-c", (
        "from lab.tui.backend import LiveBackend\n"
        f"b = LiveBackend({lab.name!r}, start_if_needed=False)\n"
        "b.set_step_mode(True)\n"
        "raise RuntimeError('the TUI crashed')\n")], capture_output=True, text=True, timeout=30, check=False)
    assert crash.returncode == 1 and "the TUI crashed" in crash.stderr
    assert step_mode_is_off(lab)

    killed = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from lab.tui.backend import LiveBackend\n"
        f"b = LiveBackend({lab.name!r}, start_if_needed=False)\n"
        "b.start()\n"
        "b.set_step_mode(True)\n"
        "print('on', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert killed.stdout.readline().strip() == "on"
        assert not step_mode_is_off(lab)
        killed.terminate()
        assert killed.wait(timeout=15) != 0
    finally:
        if killed.poll() is None:
            killed.kill()
            killed.wait()
    assert step_mode_is_off(lab)
