"""Step mode in the waypoint (lab/waypoint/proxy.py + lab/ztunnel/stepper.py), no root: a request
of a tunnel opened after step mode was turned on waits before its route, its L7 policy decision,
the router's action and the tunnel out; a tunnel opened before is never held. The pipeline is the
real one of tests/unit/test_waypoint_proxy.py (HBONE over socketpairs, loopback backends)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from lab.common.admin_socket import admin_response
from lab.ztunnel.stepper import Stepper
from tests.unit.test_waypoint_proxy import PODS, RULES, Rig, get, waypoint_snapshot

STEPS = ["route", "authorization", "router", "tunnel out"]


@pytest.fixture
async def rig(tmp_path: Path):
    r = await Rig(tmp_path, waypoint_snapshot(PODS, rules=RULES)).start()
    r.proxy.stepper = Stepper(r._emit, component="waypoint", node="n2")
    yield r
    r.proxy.stepper.set_mode(False)
    await r.close()


async def until(cond, timeout: float = 3.0):
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)
    return value


async def test_a_request_waits_before_each_step_until_released(rig: Rig):
    stepper = rig.proxy.stepper
    ops = stepper.commands()
    assert admin_response({"op": "step_mode", "on": True}, {}, ops)["step_mode"]["on"] is True
    stream = await rig.tunnel()
    request = asyncio.create_task(get(stream, "/v1/hello"))
    seen: list[str] = []
    for step in STEPS:
        held = await until(lambda: admin_response({"op": "held"}, {}, ops)["held"])
        assert [h["step"] for h in held] == [step] and not request.done()
        h = held[0]
        assert h["flow"] and h["next"] and h["method"] == "GET" and h["path"] == "/v1/hello"
        assert h["pod"] == "waypoint-0" and h["where"] == "waypoint@n2"
        seen.append(h["step"])
        reply = admin_response({"op": "release", "flow": h["flow"][:8], "scope": "step"}, {}, ops)
        assert [r["step"] for r in reply["release"]["released"]] == [step]
    response = await asyncio.wait_for(request, 3)
    assert response.status == 200 and response.body == b"v1\n"
    assert seen == STEPS
    assert [e["fields"]["step"] for e in rig.of_kind("step.held")] == STEPS
    assert "L7 AuthorizationPolicy" in rig.of_kind("step.held")[1]["fields"]["next"]


async def test_a_tunnel_opened_before_step_mode_is_not_held_and_off_releases_all(rig: Rig):
    stepper = rig.proxy.stepper
    old = await rig.tunnel()
    stepper.set_mode(True)
    assert (await asyncio.wait_for(get(old, "/v1/a"), 3)).status == 200  # already open: never held
    new = await rig.tunnel()
    request = asyncio.create_task(get(new, "/v1/b"))
    await until(lambda: stepper.held())
    stepper.release("*", "flow")  # the whole flow runs to its end in this proxy
    assert (await asyncio.wait_for(request, 3)).status == 200
    third = await rig.tunnel(flow="5" * 32)
    request = asyncio.create_task(get(third, "/v1/c"))
    await until(lambda: stepper.held())
    assert stepper.set_mode(False)["released"]
    assert (await asyncio.wait_for(request, 3)).status == 200
    assert [e["fields"]["reason"] for e in rig.of_kind("step.released")] == ["flow", "off"]
