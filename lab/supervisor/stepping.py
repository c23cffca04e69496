"""Step mode across the whole lab: the supervisor's side of the mesh debugger.

Each proxy process holds its own new connections (lab/ztunnel/stepper.py, served on its admin
socket: every node's ztunnel, every waypoint). The learner speaks to the supervisor only
(`ambient-lab step ...`, the TUI), and the supervisor fans each request out:

- ``step_mode {"on": bool}``: to every ztunnel and waypoint. The supervisor remembers the mode
  and, while it is on, says it again every KEEP_EVERY seconds, so a ztunnel or waypoint that
  (re)starts while step mode is on gets it within about a second (connections it accepts in
  that second are not held). Off releases everything everywhere.
- ``step_release {"flow": id|prefix|"*", "scope": "step"|"flow"}``: a prefix is resolved against
  what is held now (it must name one flow). Scope "flow" is sent to EVERY proxy, also to those not
  holding the flow yet: one flow id ties the source ztunnel, the waypoint and the destination
  ztunnel together, so the whole connection runs to its end without stopping further down.
- ``step_held``: every proxy's held steps, merged, oldest first.

A proxy that does not answer (a ztunnel that was killed) is reported, never waited for. When the
supervisor stops, the lab's processes stop with it: nothing is left waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lab.common.errors import LabError
from lab.supervisor.components import NodeSockets, waypoint_dir
from lab.ztunnel.stepper import matches, parse_on, parse_release

ADMIN_TIMEOUT = 3.0  # seconds one proxy may take to answer
KEEP_EVERY = 1.0  # seconds between re-assertions of step mode while it is on
FULL_FLOW_ID = 32  # hex digits of a flow id (a W3C trace id)

__all__ = ["ProxyAdmin", "StepControl", "admin_call", "parse_on", "proxy_admins", "render_held", "resolve_flow"]


@dataclass(frozen=True)
class ProxyAdmin:
    """One proxy's admin socket: a node's ztunnel or a waypoint."""

    name: str  # "ztunnel on lab-worker", "waypoint default/waypoint"
    path: str


def proxy_admins(lab: str, nodes: Iterable[Any], waypoints: Iterable[tuple[str, str]]) -> list[ProxyAdmin]:
    """Every proxy that can hold flows: each node's ztunnel, each waypoint Gateway's process (pure)."""
    out = [ProxyAdmin(f"ztunnel on {n.name}", NodeSockets.of(lab, n.name).ztunnel_admin) for n in nodes]
    out += [ProxyAdmin(f"waypoint {ns}/{name}", os.path.join(waypoint_dir(lab, ns, name), "admin.sock"))
            for ns, name in waypoints]
    return out


def resolve_flow(flow_ref: str, scope: str, held: Sequence[dict[str, Any]]) -> str:
    """The flow id a release names: "*", a whole id, or a prefix of ONE held flow (pure).
    Raises LabError when the prefix is ambiguous or names nothing held."""
    if flow_ref == "*":
        return "*"
    ids = sorted({h["flow"] for h in held if matches(flow_ref, h["flow"])})
    if len(ids) == 1:
        return ids[0]
    if len(ids) > 1:
        raise LabError(f"{flow_ref!r} names {len(ids)} held flows: {', '.join(i[:12] for i in ids)}",
                       "give more characters of the flow id")
    if scope == "flow" and len(flow_ref) == FULL_FLOW_ID:
        return flow_ref  # not held anywhere yet: every proxy lets it through when it comes
    raise LabError(f"no held flow matches {flow_ref!r}", "see what is held: ambient-lab step held")


async def admin_call(path: str, request: dict[str, Any], timeout: float = ADMIN_TIMEOUT) -> dict[str, Any]:
    """One request on a proxy's admin socket (one JSON line each way)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_unix_connection(path, limit=16 << 20)
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    if not line:
        raise ConnectionError("closed without an answer")
    return json.loads(line)


class StepControl:
    """The lab-wide step mode: the supervisor's state and its fan-out to the proxies."""

    def __init__(self, targets: Callable[[], list[ProxyAdmin]], emit: Callable[..., Any]) -> None:
        self.targets = targets
        self.emit = emit
        self.on = False
        self.timeout: float | None = None
        self._keeper: asyncio.Task[None] | None = None

    @staticmethod
    async def ask(target: ProxyAdmin, request: dict[str, Any]) -> dict[str, Any]:
        """One proxy's answer, or {"error": ...} when it is not there or does not answer."""
        if not os.path.exists(target.path):
            return {"error": f"{target.name} is not running (no {os.path.basename(target.path)})"}
        try:
            return await admin_call(target.path, request)
        except (OSError, TimeoutError, ValueError) as e:
            return {"error": f"{target.name} does not answer ({getattr(e, 'strerror', None) or e or 'timeout'})"}

    async def fan_out(self, request: dict[str, Any]) -> list[tuple[ProxyAdmin, dict[str, Any]]]:
        """Send `request` to every proxy at once: [(proxy, its answer or {"error": ...})]."""
        targets = self.targets()
        answers = await asyncio.gather(*(self.ask(t, request) for t in targets))
        return list(zip(targets, answers))

    async def set_mode(self, on: bool, timeout: float | None = None) -> dict[str, Any]:
        """Turn step mode on or off in every proxy (off: everything held goes on)."""
        self.on = on
        if timeout is not None:
            self.timeout = float(timeout)
        request: dict[str, Any] = {"op": "step_mode", "on": on}
        if self.timeout is not None:
            request["timeout"] = self.timeout
        proxies, released = [], []
        for target, answer in await self.fan_out(request):
            mode = answer.get("step_mode") or {}
            released += mode.get("released", [])
            proxies.append({"name": target.name, "ok": "error" not in answer, "error": answer.get("error", ""),
                            "released": len(mode.get("released", []))})
        if on and (self._keeper is None or self._keeper.done()):
            self._keeper = asyncio.get_running_loop().create_task(self._keep(), name="step mode keeper")
        elif not on and self._keeper is not None:
            self._keeper.cancel()
            self._keeper = None
        ok = sum(p["ok"] for p in proxies)
        self.emit("step.mode", f"step mode {'on' if on else 'off'} in the lab: {ok} of {len(proxies)} proxies "
                  + ("hold every new connection before each step" if on else
                     f"run freely again ({len(released)} held step(s) released)"),
                  on=on, proxies=len(proxies), answered=ok, released=len(released), where="lab")
        return {"on": on, "proxies": proxies, "released": released}

    async def held_at(self) -> list[tuple[ProxyAdmin, dict[str, Any]]]:
        """Every held step with the proxy holding it, oldest first."""
        out = [(t, h) for t, answer in await self.fan_out({"op": "held"}) for h in answer.get("held") or []]
        return sorted(out, key=lambda th: (th[1].get("since", 0), th[1].get("seq", 0)))

    async def held(self) -> list[dict[str, Any]]:
        """Every held step of every proxy, oldest first."""
        return [h for _, h in await self.held_at()]

    async def release(self, flow_ref: str, scope: str) -> dict[str, Any]:
        """Let one flow (or every held one) go on by one step, or to its end."""
        flow_ref, scope, _ = parse_release({"flow": flow_ref, "scope": scope})
        placed = await self.held_at()
        flow = resolve_flow(flow_ref, scope, [h for _, h in placed])
        released: list[dict[str, Any]] = []
        if scope == "step":
            # Exactly the steps held NOW, each at its proxy: released at the source, a flow may reach
            # the destination's next gate before a broadcast release would get there, and go on too.
            asks = [self.ask(t, {"op": "release", "flow": h["flow"], "scope": "step", "seq": h["seq"]})
                    for t, h in placed if matches(flow, h["flow"])]
            for answer in await asyncio.gather(*asks):
                released += (answer.get("release") or {}).get("released", [])
            return {"flow": flow, "scope": scope, "released": released, "at": time.time()}
        for _, answer in await self.fan_out({"op": "release", "flow": flow, "scope": scope}):
            released += (answer.get("release") or {}).get("released", [])
        if flow == "*":
            # the flows just let go may still meet proxies further down (the waypoint, the destination)
            for fid in sorted({r["flow"] for r in released}):
                for _, answer in await self.fan_out({"op": "release", "flow": fid, "scope": "flow"}):
                    released += (answer.get("release") or {}).get("released", [])
        return {"flow": flow, "scope": scope, "released": released, "at": time.time()}

    async def _keep(self) -> None:
        """While step mode is on, say so again to every proxy: one that (re)started gets it."""
        while self.on:
            await asyncio.sleep(KEEP_EVERY)
            if not self.on:
                return
            request: dict[str, Any] = {"op": "step_mode", "on": True}
            if self.timeout is not None:
                request["timeout"] = self.timeout
            for target, answer in await self.fan_out(request):
                if (answer.get("step_mode") or {}).get("changed"):
                    self.emit("step.mode", f"{target.name} (re)started while step mode was on: it holds new "
                                           f"connections again", on=True, proxy=target.name, where="lab")


def render_held(held: Sequence[dict[str, Any]], lab: str = "") -> str:
    """`ambient-lab step held`: one block per held step, with what happens next (pure)."""
    if not held:
        return "nothing is held"
    lines = [f"{'FLOW':<14}{'WHERE':<30}{'POD':<30}{'HELD':>7}  BEFORE"]
    for h in held:
        where = str(h.get("where", "")).replace(f"@{lab}-", "@") if lab else str(h.get("where", ""))
        lines.append(f"{h['flow'][:12]:<14}{where:<30.29}{h.get('pod', ''):<30.29}"
                     f"{h.get('held_s', 0):>6.1f}s  {h.get('step', '')}")
        lines.append(f"{'':<14}next: {h.get('next', '')}")
    return "\n".join(lines)
