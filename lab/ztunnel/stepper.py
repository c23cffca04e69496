"""Step mode: the mesh debugger. A proxy holds each NEW connection before each of its steps until
the learner lets it go on (one step, the rest of the flow, or every held flow).

Real ztunnel and Envoy have nothing like it: this is the lab's teaching tool, a breakpoint in the
places where ztunnel's `src/proxy/outbound.rs` and `inbound.rs` (and the waypoint's Envoy filter
chain) move from one step to the next. The proxy code calls, at each step boundary::

    if stepper.on:                                    # step mode off: one boolean check, nothing else
        await flow.hold("mtls", "ztunnel will ...")   # -> stepper.gate(flow_id, step, next_sentence, ...)

While step mode is on, `gate` emits a ``step.held`` event (the flow, the step about to happen,
and a sentence saying what will happen next), then waits until `release` lets it go. Rules:

- Only connections that began after step mode was turned on are held (`started >= since`): a
  connection that was already open carries on untouched.
- ``release(flow, "step")`` lets a flow take one step (it is held again before the next one);
  ``release(flow, "flow")`` lets it run to its end in this proxy (also its later steps, and a
  flow id released this way before it arrives here is not held at all); ``flow="*"`` means every
  held flow.
- Turning step mode off releases everything. A held step waits at most `timeout` seconds
  (10 minutes by default): then the safety net lets it go, with a ``step.released`` event saying
  so. A connection that ends while held (the client gave up, the pod left the mesh, the proxy
  stops) is forgotten, also with an event.

Events (kind, fields): ``step.mode`` {on, released}, ``step.held`` {step, next, seq, where, ...},
``step.released`` {step, next, seq, where, reason, held_ms}; `reason` is one of RELEASE_REASONS.

The admin operations (lab/ztunnel/admin.py, lab/waypoint/admin.py) are `commands()`:
``step_mode {"on": bool, "timeout"?: seconds}``, ``release {"flow": id|"*", "scope": "step"|"flow",
"seq"?: n}`` and ``held``. The decisions (what a release matches, whether a flow is held) are
plain functions of plain data; only `gate` waits.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("stepper")

#: The safety net: a held step is let go after this many seconds, so nothing hangs forever.
HOLD_TIMEOUT = 600.0
#: Flow ids remembered as "run freely" (scope "flow"); the oldest are forgotten first.
FREE_LIMIT = 4096
#: The shortest flow id prefix a release accepts (the CLI and `trace` show 8-12 characters).
MIN_PREFIX = 4
SCOPES = ("step", "flow")

#: Why a held step went on, as the `reason` field of ``step.released`` says it.
RELEASE_REASONS: dict[str, str] = {
    "step": "the learner advanced it by one step",
    "flow": "the learner let the whole flow run",
    "off": "step mode was turned off",
    "timeout": "nobody released it in time: the safety net let it go",
    "cancelled": "the connection ended while it was held",
    "shutdown": "the proxy is shutting down",
}

Emit = Callable[..., Any]


@dataclass
class HeldStep:
    """One connection waiting before one step."""

    seq: int  # unique in this process: tells two holds of one flow apart
    flow: str
    step: str  # the step that will happen when it is released
    next: str  # what will happen then, as one sentence
    pod: str
    since: float  # wall-clock time it was held
    fields: dict[str, Any] = field(default_factory=dict)
    waiter: asyncio.Future[str] | None = field(default=None, repr=False)

    def to_dict(self, component: str, node: str, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        return {"flow": self.flow, "step": self.step, "next": self.next, "component": component, "node": node,
                "pod": self.pod, "where": f"{component}@{node}", "seq": self.seq, "since": self.since,
                "held_s": round(max(0.0, now - self.since), 3), **self.fields}


# ------------------------------------------------------------------------------------ pure parts
def is_held(on: bool, since: float, started: float, flow: str, free: Iterable[str]) -> bool:
    """Does a connection that began at `started` (monotonic) wait at its next step? Only while step
    mode is on, only if it began after step mode was turned on (`since`), and not if the learner
    let its whole flow run."""
    return on and started >= since and flow not in free


def matches(flow_ref: str, flow_id: str) -> bool:
    """Does a release naming `flow_ref` ("*", a whole flow id or a prefix of at least MIN_PREFIX
    characters, as `trace` prints them) apply to the flow `flow_id`?"""
    if flow_ref == "*":
        return True
    return flow_id == flow_ref or (len(flow_ref) >= MIN_PREFIX and flow_id.startswith(flow_ref))


def to_release(flow_ref: str, held: Iterable[HeldStep]) -> list[HeldStep]:
    """The held steps a release of `flow_ref` lets go, oldest first."""
    return sorted((h for h in held if matches(flow_ref, h.flow)), key=lambda h: h.seq)


def parse_release(request: dict[str, Any]) -> tuple[str, str, int | None]:
    """``{"flow": id|"*", "scope": "step"|"flow"[, "seq": n]}`` -> (flow_ref, scope, seq); ValueError
    when invalid. `seq` names one held step exactly (what `held` listed), so that a release cannot
    also let go a step the flow reached in the meantime."""
    flow = str(request.get("flow") or "*")
    scope = str(request.get("scope") or "step")
    seq = request.get("seq")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    if flow != "*" and len(flow) < MIN_PREFIX:
        raise ValueError(f"a flow id (or a prefix of at least {MIN_PREFIX} characters) or \"*\", not {flow!r}")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int)):
        raise ValueError(f"seq must be the number of a held step, not {seq!r}")
    return flow, scope, seq


def parse_on(value: Any) -> bool:
    """The `on` of a ``step_mode`` request: a JSON boolean (or "on"/"off")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("on", "true", "off", "false"):
        return value.lower() in ("on", "true")
    raise ValueError(f'"on" must be true or false, not {value!r}')


# ------------------------------------------------------------------------------------ the stepper
class Stepper:
    """Step mode for one proxy process (a ztunnel, a waypoint). Create one per process, give it to
    every handler, and serve `commands()` on the admin socket."""

    def __init__(self, emit: Emit | None = None, *, component: str = "ztunnel", node: str = "",
                 timeout: float = HOLD_TIMEOUT) -> None:
        self._emit = emit
        self.component = component
        self.node = node
        self.timeout = timeout
        self.on = False
        self.since = math.inf  # monotonic time step mode was turned on
        self._held: dict[int, HeldStep] = {}
        self._free: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._seq = itertools.count(1)

    @property
    def who(self) -> str:
        return f"{self.component} on {self.node}" if self.node else self.component

    # -- the data path ---------------------------------------------------------------------------
    def holds(self, started: float, flow: str = "") -> bool:
        """Would a connection that began at `started` (time.monotonic) wait at its next step?"""
        return is_held(self.on, self.since, started, flow, self._free)

    async def gate(self, flow: str, step: str, next_sentence: str, *, started: float, pod: str = "",
                   **fields: Any) -> None:
        """A step boundary of connection `flow`: return at once unless step mode holds it; else
        announce the step (``step.held``) and wait for a release (or the timeout)."""
        if not self.on or not is_held(self.on, self.since, started, flow, self._free):
            return
        held = HeldStep(next(self._seq), flow, step, next_sentence, pod, time.time(), dict(fields),
                        asyncio.get_running_loop().create_future())
        self._held[held.seq] = held
        self._event("step.held", held,
                    f"step mode: {self.who} holds flow {flow[:12]} before the step '{step}'. "
                    f"Next: {next_sentence}")
        try:
            async with asyncio.timeout(self.timeout):
                assert held.waiter is not None
                await held.waiter
        except TimeoutError:
            if held.seq in self._held:
                self._release(held, "timeout")
        except asyncio.CancelledError:
            if held.seq in self._held:
                self._release(held, "cancelled")
            raise

    # -- the learner's side (admin operations) -------------------------------------------------
    def set_mode(self, on: bool, *, timeout: float | None = None, reason: str = "off") -> dict[str, Any]:
        """Turn step mode on or off. Off releases every held step (`reason`: off or shutdown)."""
        if timeout is not None:
            if not timeout > 0:
                raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
            self.timeout = float(timeout)
        changed = on != self.on
        released: list[dict[str, Any]] = []
        if on and changed:
            self.on, self.since = True, time.monotonic()
            self._free.clear()
            self._mode_event(f"step mode on: {self.who} holds every NEW connection before each step until "
                             f"the learner releases it (connections already open carry on)", 0)
        elif not on and changed:
            self.on, self.since = False, math.inf
            released = [self._release(h, reason) for h in to_release("*", list(self._held.values()))]
            self._free.clear()
            self._mode_event(f"step mode off: {self.who} released {len(released)} held step(s); connections "
                             f"run freely again", len(released))
        return {"on": self.on, "changed": changed, "released": released, "held": len(self._held),
                "timeout": self.timeout}

    def release(self, flow_ref: str = "*", scope: str = "step", seq: int | None = None) -> list[dict[str, Any]]:
        """Let held flows go on: one step (`scope` "step") or to their end here ("flow"); `seq`:
        only that held step."""
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
        targets = [h for h in to_release(flow_ref, list(self._held.values())) if seq is None or h.seq == seq]
        if scope == "flow":
            ids = {h.flow for h in targets}
            if flow_ref != "*" and not targets:
                ids.add(flow_ref)  # a flow that has not reached this proxy yet: it will not be held here
            for fid in ids:
                self._free[fid] = None
                self._free.move_to_end(fid)
            while len(self._free) > FREE_LIMIT:
                self._free.popitem(last=False)
        return [self._release(h, scope) for h in targets]

    def held(self) -> list[dict[str, Any]]:
        """Every held step, oldest first, as plain data."""
        now = time.time()
        return [h.to_dict(self.component, self.node, now) for h in sorted(self._held.values(), key=lambda h: h.seq)]

    def commands(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        """The admin operations of step mode: op -> handler(request)."""

        def step_mode(req: dict[str, Any]) -> dict[str, Any]:
            timeout = req.get("timeout")
            return self.set_mode(parse_on(req.get("on")), timeout=float(timeout) if timeout is not None else None)

        def release(req: dict[str, Any]) -> dict[str, Any]:
            flow, scope, seq = parse_release(req)
            return {"released": self.release(flow, scope, seq), "held": self.held()}

        return {"step_mode": step_mode, "release": release, "held": lambda req: self.held()}

    # -- internals -------------------------------------------------------------------------------
    def _release(self, held: HeldStep, reason: str) -> dict[str, Any]:
        self._held.pop(held.seq, None)
        if held.waiter is not None and not held.waiter.done():
            held.waiter.set_result(reason)
        waited_ms = round((time.time() - held.since) * 1000, 1)
        why = RELEASE_REASONS.get(reason, reason)
        if reason == "timeout":
            why = f"nobody released it within {self.timeout:g} s: the safety net let it go"
        verb = "forgot" if reason == "cancelled" else "let"
        tail = "" if reason == "cancelled" else f" go on with the step '{held.step}'"
        self._event("step.released", held, f"step mode: {self.who} {verb} flow {held.flow[:12]}{tail} "
                                           f"after {waited_ms / 1000:.1f} s ({why})",
                    reason=reason, held_ms=waited_ms)
        out = held.to_dict(self.component, self.node)
        out["reason"] = reason
        return out

    def _event(self, kind: str, held: HeldStep, msg: str, **extra: Any) -> None:
        if self._emit is None:
            return
        try:
            self._emit(kind, msg, pod=held.pod, flow=held.flow, step=held.step, next=held.next, seq=held.seq,
                       where=f"{self.component}@{self.node}", **held.fields, **extra)
        except Exception:  # observing must never break the data path
            log.exception("emitting %s failed", kind)

    def _mode_event(self, msg: str, released: int) -> None:
        if self._emit is None:
            return
        try:
            self._emit("step.mode", msg, on=self.on, released=released, where=f"{self.component}@{self.node}",
                       timeout=self.timeout)
        except Exception:
            log.exception("emitting step.mode failed")
