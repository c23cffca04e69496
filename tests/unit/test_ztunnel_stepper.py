"""Step mode's Stepper (lab/ztunnel/stepper.py): holding new connections before each step, the
release scopes, off releases everything, the timeout safety net. No root, real asyncio."""

from __future__ import annotations

import asyncio
import time

import pytest

from lab.ztunnel.stepper import Stepper, is_held, matches, parse_on, parse_release, to_release

A = "a" * 32
B = "b" * 32


class Events:
    """Collects what the stepper emits (the shape of EventEmitter.emit)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, str, dict]] = []

    def __call__(self, kind: str, msg: str, *, pod: str = "", flow: str = "", **fields) -> None:
        self.got.append((kind, msg, dict(fields, pod=pod, flow=flow)))

    def kinds(self) -> list[str]:
        return [k for k, _, _ in self.got]

    def of(self, kind: str) -> list[dict]:
        return [f for k, _, f in self.got if k == kind]


async def until(cond, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def stepper(**kw) -> tuple[Stepper, Events]:
    ev = Events()
    return Stepper(ev, component="ztunnel", node="lab-worker", **kw), ev


# -- pure parts ------------------------------------------------------------------------------------
def test_is_held_only_new_connections_while_on_and_not_freed() -> None:
    assert not is_held(False, 0.0, 5.0, A, ())
    assert is_held(True, 1.0, 5.0, A, ())
    assert not is_held(True, 10.0, 5.0, A, ())  # began before step mode: never held
    assert not is_held(True, 1.0, 5.0, A, {A})  # the learner let the whole flow run


def test_matches_star_whole_ids_and_prefixes() -> None:
    assert matches("*", A) and matches(A, A) and matches("aaaa", A)
    assert not matches("aaa", A)  # too short a prefix
    assert not matches("bbbb", A)


def test_parse_release_and_on() -> None:
    assert parse_release({}) == ("*", "step", None)
    assert parse_release({"flow": A, "scope": "flow", "seq": 3}) == (A, "flow", 3)
    with pytest.raises(ValueError):
        parse_release({"seq": "3"})
    with pytest.raises(ValueError):
        parse_release({"scope": "everything"})
    with pytest.raises(ValueError):
        parse_release({"flow": "ab"})
    assert parse_on(True) is True and parse_on("off") is False
    with pytest.raises(ValueError):
        parse_on(None)


# -- the gate ----------------------------------------------------------------------------------------
async def test_gate_off_returns_at_once_and_says_nothing() -> None:
    s, ev = stepper()
    t0 = time.perf_counter()
    for _ in range(1000):
        await s.gate(A, "plan", "ztunnel will decide", started=time.monotonic())
    assert time.perf_counter() - t0 < 0.5
    assert s.held() == [] and ev.got == []
    assert not s.holds(time.monotonic())


async def test_gate_on_holds_until_released_one_step_at_a_time() -> None:
    s, ev = stepper()
    s.set_mode(True)
    started = time.monotonic()
    progress: list[str] = []

    async def connection() -> None:
        for step in ("plan", "mtls", "connect"):
            await s.gate(A, step, f"next is {step}", started=started, pod="curl-1", direction="outbound")
            progress.append(step)

    task = asyncio.create_task(connection())
    await until(lambda: len(s.held()) == 1)
    await asyncio.sleep(0.05)
    assert progress == [] and not task.done()
    held = s.held()[0]
    assert (held["flow"], held["step"], held["next"], held["pod"], held["node"], held["direction"]) == \
        (A, "plan", "next is plan", "curl-1", "lab-worker", "outbound")
    first = ev.of("step.held")[0]
    assert first["flow"] == A and first["step"] == "plan" and first["next"] == "next is plan"
    assert first["where"] == "ztunnel@lab-worker"

    released = s.release(A, "step")
    assert [r["step"] for r in released] == ["plan"]
    await until(lambda: progress == ["plan"] and s.held() and s.held()[0]["step"] == "mtls")
    s.release("aaaa", "step")  # a prefix, as `trace` prints flow ids
    await until(lambda: progress == ["plan", "mtls"] and len(s.held()) == 1)
    s.release("*", "step")
    await asyncio.wait_for(task, 1)
    assert progress == ["plan", "mtls", "connect"]
    assert [f["reason"] for f in ev.of("step.released")] == ["step", "step", "step"]


async def test_connections_open_before_step_mode_are_not_held() -> None:
    s, _ = stepper()
    started = time.monotonic()
    s.set_mode(True)
    await asyncio.wait_for(s.gate(A, "plan", "x", started=started), 0.5)
    assert s.held() == []


async def test_release_scope_flow_lets_one_flow_run_and_others_stay_held() -> None:
    s, _ = stepper()
    s.set_mode(True)
    started = time.monotonic()
    done: dict[str, int] = {A: 0, B: 0}

    async def connection(fid: str) -> None:
        for step in ("plan", "mtls", "connect", "upstream"):
            await s.gate(fid, step, "…", started=started)
            done[fid] += 1

    ta, tb = asyncio.create_task(connection(A)), asyncio.create_task(connection(B))
    await until(lambda: len(s.held()) == 2)
    assert [r["flow"] for r in s.release(A, "flow")] == [A]
    await asyncio.wait_for(ta, 1)  # every later step of A passes
    assert done[A] == 4 and done[B] == 0 and [h["flow"] for h in s.held()] == [B]
    s.release("*", "step")
    await until(lambda: done[B] == 1 and len(s.held()) == 1)  # B is held again before its next step
    s.release("*", "flow")
    await asyncio.wait_for(tb, 1)
    assert done[B] == 4


async def test_a_flow_released_before_it_arrives_is_not_held() -> None:
    """The supervisor fans a flow-scope release out to every proxy: the destination ztunnel (or the
    waypoint) learns the flow id before the connection reaches it."""
    s, _ = stepper()
    s.set_mode(True)
    assert s.release(A, "flow") == []
    await asyncio.wait_for(s.gate(A, "authorization", "…", started=time.monotonic()), 0.5)
    assert s.held() == []


async def test_step_mode_off_releases_everything() -> None:
    s, ev = stepper()
    s.set_mode(True)
    started = time.monotonic()
    tasks = [asyncio.create_task(s.gate(f, "plan", "…", started=started)) for f in (A, B)]
    await until(lambda: len(s.held()) == 2)
    reply = s.set_mode(False)
    assert reply["on"] is False and reply["changed"] and {r["flow"] for r in reply["released"]} == {A, B}
    await asyncio.wait_for(asyncio.gather(*tasks), 1)
    assert s.held() == []
    assert [f["reason"] for f in ev.of("step.released")] == ["off", "off"]
    assert [f["on"] for f in ev.of("step.mode")] == [True, False]
    await asyncio.wait_for(s.gate(A, "mtls", "…", started=started), 0.5)  # off: nothing waits


async def test_the_timeout_safety_net_releases_a_forgotten_step() -> None:
    s, ev = stepper(timeout=0.1)
    s.set_mode(True)
    t0 = time.monotonic()
    await asyncio.wait_for(s.gate(A, "plan", "…", started=t0), 2)
    assert 0.09 <= time.monotonic() - t0 < 1.5
    (released,) = ev.of("step.released")
    assert released["reason"] == "timeout"
    assert "safety net" in next(m for k, m, _ in ev.got if k == "step.released")
    assert s.held() == []


async def test_a_connection_that_ends_while_held_is_forgotten() -> None:
    s, ev = stepper()
    s.set_mode(True)
    task = asyncio.create_task(s.gate(A, "plan", "…", started=time.monotonic()))
    await until(lambda: len(s.held()) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert s.held() == [] and ev.of("step.released")[0]["reason"] == "cancelled"


async def test_admin_commands() -> None:
    s, _ = stepper()
    ops = s.commands()
    assert ops["step_mode"]({"on": True, "timeout": 30})["on"] is True and s.timeout == 30
    task = asyncio.create_task(s.gate(A, "plan", "…", started=time.monotonic()))
    await until(lambda: len(ops["held"]({})) == 1)
    reply = ops["release"]({"flow": "*", "scope": "flow"})
    assert [r["flow"] for r in reply["released"]] == [A] and reply["held"] == []
    await asyncio.wait_for(task, 1)
    with pytest.raises(ValueError):
        ops["release"]({"scope": "nope"})
    with pytest.raises(ValueError):
        ops["step_mode"]({"on": True, "timeout": -1})
    assert ops["step_mode"]({"on": False})["on"] is False


def test_to_release_is_oldest_first() -> None:
    from lab.ztunnel.stepper import HeldStep

    held = [HeldStep(3, B, "x", "", "", 0.0), HeldStep(1, A, "y", "", "", 0.0), HeldStep(2, A, "z", "", "", 0.0)]
    assert [h.seq for h in to_release("*", held)] == [1, 2, 3]
    assert [h.seq for h in to_release(A, held)] == [1, 2]


async def test_pool_connect_ahead_opens_the_tunnel_that_the_connect_then_uses() -> None:
    """Step mode splits the mTLS handshake from the CONNECT: `connect_ahead` opens (or finds) the
    tunnel, the CONNECT's `send_request` then rides it without opening another."""
    import socket

    from lab.hbone import HboneConnection, serve_hbone
    from lab.hbone.headers import create_hbone_request
    from lab.tls.identity import Identity
    from lab.ztunnel.proxy.pool import WorkloadHbonePool, WorkloadKey

    servers: list[asyncio.Task] = []

    async def respond_ok(request, respond) -> None:  # type: ignore[no-untyped-def]
        stream = await respond(200)
        stream.write_eof()

    async def connect(key: WorkloadKey) -> HboneConnection:
        a, b = socket.socketpair()
        sr, sw = await asyncio.open_connection(sock=b)
        servers.append(asyncio.create_task(serve_hbone(sr, sw, respond_ok)))
        r, w = await asyncio.open_connection(sock=a)
        return HboneConnection(r, w, max_streams=10)

    src = Identity("cluster.local", "default", "curl")
    dst = Identity("cluster.local", "default", "details")
    pool = WorkloadHbonePool(connect)
    key = WorkloadKey(src, (dst,), "10.0.0.1", ("10.0.0.9", 15008))
    conn, opened = await pool.connect_ahead(key)
    again, opened_again = await pool.connect_ahead(key)
    assert opened and not opened_again and again is conn and pool.connections_opened == 1
    pooled = await pool.send_request(key, create_hbone_request("10.0.0.9", 9080, src_ip="10.0.0.1",
                                                               src_port=1).header_list())
    assert pooled.connection is conn and not pooled.new and pool.connections_opened == 1
    status, _, _ = await conn.await_response(pooled.stream)
    assert status == 200
    await pool.close()
    for t in servers:
        t.cancel()
    await asyncio.gather(*servers, return_exceptions=True)
