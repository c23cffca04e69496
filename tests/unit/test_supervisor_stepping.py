"""The supervisor's side of step mode (lab/supervisor/stepping.py), no root: the fan-out to real
proxy admin sockets (unix sockets in a temporary directory, each served by lab/ztunnel/admin.py
around a real Stepper), the exact release of one step, the whole-flow release reaching proxies
the flow has not met yet, the keeper that re-applies step mode to a restarted proxy."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from lab.common.admin_socket import admin_response, start_admin, stop_admin
from lab.common.errors import LabError
from lab.kube.model import Node
from lab.supervisor import stepping
from lab.supervisor.stepping import ProxyAdmin, StepControl, proxy_admins, render_held, resolve_flow
from lab.ztunnel.stepper import Stepper

A = "ab" * 16
B = "ac" * 16


def test_resolve_flow_by_prefix_star_or_whole_id() -> None:
    held = [{"flow": A}, {"flow": A}, {"flow": B}]
    assert resolve_flow("*", "step", held) == "*"
    assert resolve_flow("abab", "step", held) == A
    with pytest.raises(LabError, match="names 2 held flows"):
        resolve_flow("abab", "step", held + [{"flow": "abab" + "0" * 28}])
    with pytest.raises(LabError, match="no held flow"):
        resolve_flow("ffff", "step", held)
    assert resolve_flow("f" * 32, "flow", held) == "f" * 32  # not held yet: let it through when it comes


def test_proxy_admins_and_render_held() -> None:
    nodes = [Node(name="lab-worker", index=1, role="worker", ip="172.18.0.3", pod_cidr="10.244.1.0/24",
                  netns="lab-worker")]
    admins = proxy_admins("lab", nodes, [("default", "waypoint")])
    assert [a.name for a in admins] == ["ztunnel on lab-worker", "waypoint default/waypoint"]
    assert admins[0].path.endswith("nodes/worker/ztunnel-admin.sock")
    assert admins[1].path.endswith("waypoints/default-waypoint/admin.sock")
    text = render_held([{"flow": A, "where": "ztunnel@lab-worker", "pod": "curl-1", "held_s": 2.5,
                         "step": "CONNECT", "next": "ztunnel will send CONNECT"}], "lab")
    assert A[:12] in text and "ztunnel@worker" in text and "CONNECT" in text and "next: ztunnel will" in text
    assert render_held([]) == "nothing is held"


class Proxies:
    """Two proxies (a source and a destination ztunnel) with real admin sockets."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.steppers: dict[str, Stepper] = {}
        self.servers: dict[str, asyncio.AbstractServer] = {}

    async def start(self, name: str) -> Stepper:
        s = Stepper(component="ztunnel", node=name)
        path = str(self.tmp / f"{name}.sock")
        self.servers[name] = await start_admin(path, lambda req: admin_response(req, {}, s.commands()))
        self.steppers[name] = s
        return s

    def stop(self, name: str) -> None:
        stop_admin(self.servers.pop(name), str(self.tmp / f"{name}.sock"))

    def targets(self) -> list[ProxyAdmin]:
        return [ProxyAdmin(f"ztunnel on {n}", str(self.tmp / f"{n}.sock")) for n in ("src", "dst", "gone")]


async def until(cond, timeout: float = 3.0):
    deadline = time.monotonic() + timeout
    while not (v := cond()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)
    return v


async def test_fan_out_releases_exactly_the_step_held_now(tmp_path: Path) -> None:
    proxies = Proxies(tmp_path)
    src, dst = await proxies.start("src"), await proxies.start("dst")
    events: list[tuple[str, dict]] = []
    control = StepControl(proxies.targets, lambda kind, msg, **f: events.append((kind, f)))
    reply = await control.set_mode(True)
    assert src.on and dst.on and [p["ok"] for p in reply["proxies"]] == [True, True, False]
    assert "not running" in reply["proxies"][2]["error"]  # a proxy that is not there: said, not waited for
    started = time.monotonic()
    passed: list[str] = []

    async def connection() -> None:
        """One flow crossing two proxies, with no delay between them (the worst case)."""
        await src.gate(A, "CONNECT", "send CONNECT", started=started)
        passed.append("CONNECT")
        await dst.gate(A, "authorization", "check policies", started=started)
        passed.append("authorization")
        await dst.gate(A, "upstream", "connect to the app", started=started)
        passed.append("upstream")

    task = asyncio.create_task(connection())
    await until(lambda: src.held())
    assert [h["step"] for h in await control.held()] == ["CONNECT"]
    out = await control.release(A[:6], "step")
    assert [r["step"] for r in out["released"]] == ["CONNECT"] and out["flow"] == A
    await until(lambda: dst.held())
    await asyncio.sleep(0.05)
    assert passed == ["CONNECT"]  # the destination's step was not released along with the source's
    out = await control.release("*", "flow")
    await asyncio.wait_for(task, 2)
    assert passed == ["CONNECT", "authorization", "upstream"]
    assert await control.held() == []
    off = await control.set_mode(False)
    assert not src.on and not dst.on and off["on"] is False
    assert [k for k, _ in events] == ["step.mode", "step.mode"]
    for n in list(proxies.servers):
        proxies.stop(n)


async def test_a_whole_flow_release_reaches_proxies_it_has_not_met_yet(tmp_path: Path) -> None:
    proxies = Proxies(tmp_path)
    src, dst = await proxies.start("src"), await proxies.start("dst")
    control = StepControl(proxies.targets, lambda *a, **k: None)
    await control.set_mode(True)
    started = time.monotonic()
    task = asyncio.create_task(src.gate(A, "plan", "…", started=started))
    await until(lambda: src.held())
    await control.release(A[:8], "flow")
    await asyncio.wait_for(task, 2)
    await asyncio.wait_for(dst.gate(A, "authorization", "…", started=started), 1)  # not held downstream
    await control.set_mode(False)
    for n in list(proxies.servers):
        proxies.stop(n)


async def test_a_restarted_proxy_gets_step_mode_again(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(stepping, "KEEP_EVERY", 0.05)
    proxies = Proxies(tmp_path)
    await proxies.start("src")
    events: list[tuple[str, str]] = []
    control = StepControl(proxies.targets, lambda kind, msg, **f: events.append((kind, msg)))
    await control.set_mode(True)
    proxies.stop("src")
    restarted = await proxies.start("src")  # a new process: it starts with step mode off
    # The keeper says "(re)started" only when its step_mode request CHANGED the proxy's mode,
    # which shows the new process had come up with step mode off. (No direct check of "off":
    # with a 50 ms keeper it may be on again by the time start() returns; and the event comes
    # after every proxy answered, a moment after the proxy itself switched on.)
    await until(lambda: any("(re)started while step mode was on" in m for _, m in events))
    assert restarted.on
    await control.set_mode(False)
    await asyncio.sleep(0.15)
    assert not restarted.on  # off stays off: the keeper has stopped
    proxies.stop("src")
