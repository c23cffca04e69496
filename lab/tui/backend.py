"""Where the TUI's data comes from: a live lab's supervisor, or a recording of one.

The TUI is a client of the supervisor only, as k9s is a client of the API server. A backend
turns the supervisor's streams into messages for the view model (lab/tui/model.py) and answers
the few requests the screens make:

- `LiveBackend`: the supervisor's unix socket (lab/supervisor/client.py). Worker threads follow
  `trace` (the event stream), `watch_cluster` (list-then-watch snapshots) and poll `components`
  and `step_held`; they only append to a queue, which the app drains on its own timer
  (coalescing). Kernel views of a pod run `ip netns exec <pod netns> ...` as a learner would.
  Step mode (the mesh debugger): `set_step_mode` and `release_step` ask the supervisor, which
  asks every ztunnel and waypoint. Step mode is turned off (every held flow released) when the
  TUI stops: on quit, from `stop()`; on a crash or an exception, from an atexit hook; on SIGTERM
  or SIGHUP (the terminal closed), from a signal handler. Only a SIGKILL escapes: then the
  proxies' own timeout (10 minutes) lets each held step go.
- `RecordedBackend`: a directory recorded from a real lab (events, one snapshot, the `get -o
  json` outputs, the pod commands' outputs). It answers reads from the recording and refuses
  changes; tests use it, so they need neither root nor timing luck.

No Textual here.
"""

from __future__ import annotations

import atexit
import collections
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import yaml

from lab.common.errors import LabError
from lab.tui import capture
from lab.tui.commands import POD_TABS, Request, pod_tab_commands
from lab.tui.model import PodState

QUEUE_LIMIT = 100_000  # messages waiting for the app; beyond this, events are counted as dropped
COMPONENTS_EVERY = 2.0  # seconds between `components` polls

STEP_HOLD_UNAVAILABLE = (
    "This lab's supervisor does not offer step mode (it has no `step_mode` request): restart the lab with "
    "this version of ambient-lab. What works: replaying the recorded steps of a flow one at a time (space)."
)
STEP_HOLD_RECORDED = (
    "This is a recording: nothing can be held. x, space and backspace replay the recorded steps of a flow "
    "one at a time; on a live lab (sudo ambient-lab tui) x makes the proxies hold every new connection."
)
STEP_HOLD_AVAILABLE = (
    "x: the proxies (every ztunnel and waypoint) hold every NEW connection before each step; then space lets a "
    "held flow take one step, f lets it run to its end, a lets every held flow run."
)
EXIT_RELEASE_TIMEOUT = 3.0  # seconds the TUI waits, on its way out, for step mode to be turned off


class Backend(ABC):
    """The interface the app uses; the two implementations differ only in where data comes from."""

    live: bool = False
    can_exec: bool = False  # may the app run commands in the lab's namespaces (needs root, a live lab)

    def __init__(self, lab: str) -> None:
        self.lab = lab
        self._queue: collections.deque[dict] = collections.deque()
        self._latest: dict[str, dict] = {}  # "snapshot"/"components": only the newest one matters
        self._lock = threading.Lock()
        self.dropped = 0
        self.received = 0
        self.sent: collections.deque[Request] = collections.deque(maxlen=100)  # the last requests made, in order

    # -- the message queue (worker threads post, the app drains) ---------------------------------
    def post(self, message: dict) -> None:
        """Queue one message for the model. Snapshots and components replace older ones (coalescing)."""
        with self._lock:
            self.received += 1
            for slot in ("snapshot", "components"):
                if slot in message:
                    self._latest[slot] = message
                    return
            if len(self._queue) >= QUEUE_LIMIT:
                self.dropped += 1
                return
            self._queue.append(message)

    def drain(self, limit: int = 20_000) -> list[dict]:
        """Up to `limit` queued messages, oldest first; the newest snapshot/components come first."""
        with self._lock:
            out = [self._latest.pop(k) for k in ("snapshot", "components") if k in self._latest]
            n = min(limit, len(self._queue))
            out += [self._queue.popleft() for _ in range(n)]
        return out

    def pending(self) -> int:
        return len(self._queue) + len(self._latest)

    # -- what each backend provides ---------------------------------------------------------------
    @abstractmethod
    def start(self) -> None:
        """Begin delivering messages (non-blocking)."""

    def stop(self) -> None:
        """Stop delivering messages."""

    @abstractmethod
    def _call(self, op: str, fields: dict) -> dict:
        ...

    def request(self, op: str, **fields: Any) -> dict:
        """One supervisor request (`label`, `apply`, `kill`, `restart`, `get`, `resolve_pod`...).
        Blocking: the app calls it from a worker thread. Raises LabError."""
        self.sent.append(Request(op, dict(fields)))
        return self._call(op, fields)

    def send(self, req: Request) -> dict:
        return self.request(req.op, **req.fields)

    @abstractmethod
    def pod_output(self, pod: PodState, tab: str) -> str:
        """The pod view's kernel tabs (iptables, sockets, network) for one pod."""

    @abstractmethod
    def logs(self, pod: PodState | None = None, component: str = "", node: str = "") -> str:
        """A pod's app log, or a component's log on a node."""

    def yaml(self, kind: str, namespace: str, name: str) -> str:
        """`ambient-lab get KIND NAME -o yaml`."""
        return self.request("get", kind=kind, name=name, namespace=namespace, output="yaml").get("stdout", "")

    def step_support(self) -> tuple[bool, str]:
        """Can the proxies hold a new flow before each step (the mesh debugger)?"""
        return False, STEP_HOLD_RECORDED

    def set_step_mode(self, on: bool) -> dict:
        """Live step mode on or off in every proxy (off releases every held flow). Raises LabError."""
        return self.request("step_mode", on=on)

    def release_step(self, flow: str, scope: str) -> dict:
        """Let a held flow (or "*": every one) take one step (`scope` "step") or run to its end ("flow")."""
        return self.request("step_release", flow=flow, scope=scope)

    # -- the wire view's captures (lab/tui/capture.py) --------------------------------------------
    capture_at_once = False  # True: `collect_capture` right after `arm_capture` (nothing to wait for)

    def capture_support(self) -> tuple[bool, str]:
        """Can the wire view capture a pod's eth0 and lo (tcpdump), and why not?"""
        return False, "captures need a live lab and root (sudo ambient-lab tui)"

    def arm_capture(self, pod: PodState) -> str:
        """Start capturing `pod`'s eth0 (HBONE) and lo (the app's plain text); says what to do next."""
        raise LabError(self.capture_support()[1])

    def collect_capture(self, pod: PodState) -> capture.Capture:
        """Stop the capture armed on `pod` and decode it (blocking: call it from a worker thread)."""
        raise LabError(self.capture_support()[1])

    def now(self) -> float:
        return time.time()

    def describe(self) -> str:
        return f"lab {self.lab}"


# -- live ----------------------------------------------------------------------------------------
class LiveBackend(Backend):
    """A running lab, through its supervisor's socket; starts the lab first when asked to."""

    live = True
    can_exec = True

    def __init__(self, lab: str, files: list[str] | None = None, start_if_needed: bool = True) -> None:
        super().__init__(lab)
        self.files = list(files or [])
        self.start_if_needed = start_if_needed
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_ts = 0.0
        self.started_lab = False  # this TUI brought the lab up (so `--down-on-exit` may remove it)
        self.step_on = False  # live step mode, as this TUI last set or saw it
        self._exit_hooks = False
        self._old_handlers: dict[int, Any] = {}
        self._captures: dict[str, capture.LiveCapture] = {}  # pod key -> the capture armed on it

    def start(self) -> None:
        self._install_signal_handlers()
        t = threading.Thread(target=self._attach, name="tui-attach", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        try:
            self.end_step_mode()
        finally:
            self._stop.set()
            self._restore_signals()
            for key in list(self._captures):  # no tcpdump outlives the TUI, no pcap stays behind
                self._captures.pop(key).discard()

    # -- step mode: never leave a flow held behind ----------------------------------------------
    def set_step_mode(self, on: bool) -> dict:
        if on:
            self._arm_exit_hooks()
        reply = super().set_step_mode(on)
        self.step_on = bool(reply.get("on", on))
        return reply

    def end_step_mode(self) -> None:
        """On the way out: if step mode is on, turn it off, so nothing stays held (quick, quiet)."""
        if not self.step_on:
            return
        self.step_on = False
        from lab.supervisor.client import call

        try:
            call(self.lab, "step_mode", timeout=EXIT_RELEASE_TIMEOUT, on=False)
        except (LabError, OSError, ValueError):
            pass  # the lab is gone: so are its proxies and what they held

    def _arm_exit_hooks(self) -> None:
        """Step mode is on: end it at exit too, after a crash or an uncaught exception."""
        if not self._exit_hooks:
            self._exit_hooks = True
            atexit.register(self.end_step_mode)

    def _install_signal_handlers(self) -> None:
        """SIGTERM and SIGHUP (the terminal went away) end step mode first, then do what they did."""
        if threading.current_thread() is not threading.main_thread() or self._old_handlers:
            return
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous = signal.getsignal(sig)

            def handler(signum: int, frame: Any, previous: Any = previous) -> None:
                self.end_step_mode()
                if callable(previous):
                    previous(signum, frame)
                else:  # the default action (terminate), as if we had not been here
                    signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
                    os.kill(os.getpid(), signum)

            self._old_handlers[sig] = previous
            signal.signal(sig, handler)

    def _restore_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, previous in self._old_handlers.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._old_handlers.clear()

    def _attach(self) -> None:
        from lab.supervisor import lifecycle

        try:
            if not lifecycle.supervisor_alive(self.lab):
                if not self.start_if_needed:
                    raise LabError(f"lab {self.lab!r} is not running", f"start it with: sudo ambient-lab up --name {self.lab}")
                self._start_lab()
        except LabError as e:
            self.post({"status": f"error: {e.message}" + (f" (fix: {e.fix})" if e.fix else "")})
            return
        self.post({"status": f"live: attached to lab {self.lab}"})
        for target, args in ((self._follow, ("trace", "event", {"follow": True})),
                             (self._follow, ("watch_cluster", "snapshot", {})),
                             (self._poll_components, ())):
            t = threading.Thread(target=target, args=args, name=f"tui-{args[0] if args else 'components'}", daemon=True)
            t.start()
            self._threads.append(t)

    def _start_lab(self) -> None:
        """`ambient-lab up` (quietly), while streaming the supervisor's progress into the TUI."""
        from lab.supervisor import lifecycle
        from lab.supervisor.client import request, supervisor_socket

        self.post({"status": f"starting lab {self.lab}..."})
        done = threading.Event()

        def progress() -> None:
            while not done.is_set() and not os.path.exists(supervisor_socket(self.lab)):
                time.sleep(0.05)
            try:
                for msg in request(self.lab, "wait_ready", timeout=300):
                    if "progress" in msg:
                        self.post({"progress": msg["progress"]})
            except (LabError, OSError):
                pass

        t = threading.Thread(target=progress, name="tui-progress", daemon=True)
        t.start()
        try:
            lifecycle.start_lab(self.lab, list(self.files or []), quiet=True)
            self.started_lab = True
        finally:
            done.set()
            t.join(timeout=5)

    def _follow(self, op: str, key: str, fields: dict) -> None:
        """Follow one streaming request; reconnect (quietly skipping replayed history) if it drops."""
        from lab.supervisor.client import request

        replay_until = 0.0
        while not self._stop.is_set():
            try:
                for msg in request(self.lab, op, timeout=None, **fields):
                    if self._stop.is_set():
                        return
                    if key == "event" and "event" in msg:
                        ts = float(msg["event"].get("ts", 0))
                        if ts <= replay_until:
                            continue
                        self._last_ts = max(self._last_ts, ts)
                    if key in msg:
                        self.post(msg)
            except (LabError, OSError, ValueError) as e:
                if self._stop.is_set():
                    return
                self.post({"status": f"lost the supervisor ({getattr(e, 'message', e)}); retrying"})
            replay_until = self._last_ts
            self._stop.wait(1.0)

    def _poll_components(self) -> None:
        from lab.supervisor.client import call

        while not self._stop.is_set():
            try:
                self.post(call(self.lab, "components", timeout=10))
            except (LabError, OSError, ValueError):
                pass
            try:
                state = call(self.lab, "step_held", timeout=10)
                self.step_on = bool(state.get("on"))
                if self.step_on:
                    self._arm_exit_hooks()
                self.post({"step": {"on": self.step_on, "held": state.get("held", [])}})
            except (LabError, OSError, ValueError):
                pass  # a supervisor without step mode, or a lab going away
            self._stop.wait(COMPONENTS_EVERY)

    def _call(self, op: str, fields: dict) -> dict:
        from lab.supervisor.client import call

        try:
            return call(self.lab, op, timeout=120, **fields)
        except OSError as e:
            raise LabError(f"cannot reach the supervisor of lab {self.lab}: {e}") from None

    def _netns(self, pod: PodState) -> str:
        if pod.netns:
            return pod.netns
        return self.request("resolve_pod", ref=pod.name, namespace=pod.namespace)["netns"]

    def pod_output(self, pod: PodState, tab: str) -> str:
        out = []
        for argv in pod_tab_commands(self._netns(pod), tab):
            try:
                r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
                out.append(f"$ {' '.join(argv)}\n{r.stdout}{r.stderr}")
            except (OSError, subprocess.TimeoutExpired) as e:
                out.append(f"$ {' '.join(argv)}\n{e}")
        return "\n".join(out)

    def logs(self, pod: PodState | None = None, component: str = "", node: str = "", limit: int = 65536) -> str:
        if pod is not None:
            path = self.request("resolve_pod", ref=pod.name, namespace=pod.namespace)["log"]
        else:
            from lab.common.state import run_dir

            path = os.path.join(run_dir(self.lab), "logs", f"{component}_{node}.log")
        try:
            with open(path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
                return f.read().decode(errors="replace")
        except OSError as e:
            return f"cannot read {path}: {e}"

    def capture_support(self) -> tuple[bool, str]:
        if os.geteuid() != 0:
            return False, "captures run tcpdump inside the pod's namespace: run the TUI as root (sudo ambient-lab tui)"
        return True, "c: capture the next flow from this pod (tcpdump on its eth0 and lo, decrypted with the lab's key log)"

    def arm_capture(self, pod: PodState) -> str:
        ok, why = self.capture_support()
        if not ok:
            raise LabError(why)
        from lab.common.state import run_dir
        from lab.supervisor.components import tls_keylog

        old = self._captures.pop(pod.key, None)
        if old is not None:
            old.discard()
        cap = capture.LiveCapture(pod.name, self._netns(pod), pod.ip, run_dir(self.lab), tls_keylog(self.lab))
        cap.start()
        if not cap.running():
            cap.discard()
            raise LabError(f"tcpdump did not start in pod {pod.name}'s namespace")
        self._captures[pod.key] = cap
        return f"capturing on {pod.name}'s eth0 and lo: repeat the request now"

    def collect_capture(self, pod: PodState) -> capture.Capture:
        cap = self._captures.pop(pod.key, None)
        if cap is None:
            return capture.Capture(pod.name, note="no capture was armed on this pod")
        return cap.collect()

    def step_support(self) -> tuple[bool, str]:
        try:
            reply = self.request("step_held")
        except LabError as e:
            if "unknown operation" in e.message:
                return False, STEP_HOLD_UNAVAILABLE
            return False, e.message
        self.step_on = bool(reply.get("on"))
        if self.step_on:
            self._arm_exit_hooks()
        return True, STEP_HOLD_AVAILABLE

    def describe(self) -> str:
        return f"lab {self.lab} (live)"


# -- recorded ------------------------------------------------------------------------------------
class RecordedBackend(Backend):
    """A recording of a real lab (see tests/tui/record_fixtures.py for how one is made).

    Layout: `lab.json` ({"lab": name}), `events.jsonl` (`ambient-lab trace -o json`),
    `snapshot.json` (one `watch_cluster` snapshot), `components.json`, `get/<kind>.json`
    (`ambient-lab get KIND -A -o json`), `pods/<pod>/<tab>.txt` (iptables, sockets, network; a
    later read of the same tab, if recorded, in `<tab>.2.txt`, `<tab>.3.txt`...: each read of the
    tab serves the next one, then the last again), `logs/<pod or component_node>.log`, and
    `captures/<pod>/eth0.tsv`, `lo.tsv`: tshark's field output (capture.WIRE_FIELDS,
    capture.PLAIN_FIELDS) of one capture of that pod around a curl.

    `rate` replays the events at that many per second in a loop, each pass with fresh flow ids
    and timestamps (the responsiveness bench); otherwise everything is queued by `start()`.
    """

    def __init__(self, directory: str | Path, rate: float = 0.0, loops: int = 1) -> None:
        self.dir = Path(directory)
        meta = json.loads((self.dir / "lab.json").read_text()) if (self.dir / "lab.json").exists() else {}
        super().__init__(meta.get("lab", self.dir.name))
        self.events = [json.loads(line) for line in (self.dir / "events.jsonl").read_text().splitlines() if line.strip()]
        self.snapshot = json.loads((self.dir / "snapshot.json").read_text())
        comp = self.dir / "components.json"
        self.components = json.loads(comp.read_text()) if comp.exists() else None
        self.rate = rate
        self.loops = loops
        self._stop = threading.Event()
        self._feeder: threading.Thread | None = None
        self.replayed = 0
        self.feed_started = self.feed_ended = 0.0
        self._clock = max((e.get("ts", 0) for e in self.events), default=0.0) + 1.0
        self._reads: dict[tuple[str, str], int] = {}  # (pod, tab) -> how many times it was read

    def start(self) -> None:
        self.post({"status": f"recorded: {self.lab} ({len(self.events)} events)"})
        self.post({"snapshot": self.snapshot})
        if self.components:
            self.post({"components": self.components.get("components", []),
                       "uncaptured": self.components.get("uncaptured", [])})
        if not self.rate:
            for ev in self.events:
                self.post({"event": ev})
            return
        self._feeder = threading.Thread(target=self._feed, name="tui-replay", daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        """Post events at `rate` per second, in small batches, re-keying flows on every pass."""
        interval = 1.0 / self.rate
        t0 = self.feed_started = time.monotonic()
        n = 0
        for _ in range(self.loops):
            remap: dict[str, str] = {}
            for ev in self.events:
                if self._stop.is_set():
                    return
                ev = dict(ev, ts=time.time())
                if ev.get("flow"):
                    ev["flow"] = remap.setdefault(ev["flow"], uuid.uuid4().hex)
                self.post({"event": ev, "posted": time.monotonic()})
                n += 1
                self.replayed = n
                self.feed_ended = time.monotonic()
                delay = t0 + n * interval - self.feed_ended
                if delay > 0:
                    time.sleep(delay)

    def stop(self) -> None:
        self._stop.set()

    def wait_replayed(self, timeout: float) -> None:
        if self._feeder is not None:
            self._feeder.join(timeout)

    def now(self) -> float:
        return self._clock if not self.rate else time.time()

    def _get_items(self, kind: str) -> list[dict]:
        path = self.dir / "get" / f"{kind}.json"
        return json.loads(path.read_text()).get("items", []) if path.exists() else []

    def _call(self, op: str, fields: dict) -> dict:
        if op == "get":
            items = self._get_items(fields["kind"])
            if fields.get("name"):
                ns = fields.get("namespace")
                items = [i for i in items if i["metadata"]["name"] == fields["name"]
                         and (not ns or i["metadata"].get("namespace", ns) == ns)]
                if not items:
                    raise LabError(f'{fields["kind"]} "{fields["name"]}" is not in the recording')
            doc = items[0] if fields.get("name") else {"apiVersion": "v1", "kind": "List", "items": items}
            if fields.get("output") == "yaml":
                return {"done": True, "stdout": yaml.safe_dump(doc, sort_keys=False)}
            return {"done": True, "stdout": json.dumps(doc, indent=4)}
        if op == "resolve_pod":
            for p in self.snapshot.get("pods", []):
                if p["name"] == fields["ref"] and p["namespace"] == (fields.get("namespace") or "default"):
                    netns = next((e["fields"].get("netns", "") for e in self.events
                                  if e["kind"] == "pod.created" and e["pod"] == p["name"]), "")
                    return {"done": True, "pod": p["name"], "namespace": p["namespace"], "node": p["node"],
                            "ip": p["ip"], "phase": p["phase"], "netns": netns,
                            "log": str(self.dir / "logs" / f"{p['name']}.log")}
            raise LabError(f'pod "{fields["ref"]}" is not in the recording')
        raise LabError(f"this is a recording of lab {self.lab}: `{op}` cannot change it",
                       "to act on a lab, run the TUI on a live one: sudo ambient-lab tui")

    def pod_output(self, pod: PodState, tab: str) -> str:
        if tab not in POD_TABS:
            raise ValueError(tab)
        n = self._reads[(pod.name, tab)] = self._reads.get((pod.name, tab), 0) + 1
        later = [self.dir / "pods" / pod.name / f"{tab}.{i}.txt" for i in range(n, 1, -1)]
        path = next((p for p in later if p.exists()), self.dir / "pods" / pod.name / f"{tab}.txt")
        if path.exists():
            return path.read_text()
        have = sorted(p.name for p in (self.dir / "pods").iterdir()) if (self.dir / "pods").is_dir() else []
        return (f"(this recording has no {tab} output for {pod.name}; it has it for: {', '.join(have) or 'no pod'})")

    capture_at_once = True

    def capture_support(self) -> tuple[bool, str]:
        have = (self.dir / "captures").is_dir()
        return have, ("c: show the capture recorded with this lab (a curl from the pod, on its eth0 and lo)" if have
                      else "this recording has no capture")

    def arm_capture(self, pod: PodState) -> str:
        return f"this is a recording: showing the capture recorded on {pod.name}"

    def collect_capture(self, pod: PodState) -> capture.Capture:
        d = self.dir / "captures" / pod.name
        if not (d / "eth0.tsv").exists():
            have = sorted(p.name for p in (self.dir / "captures").iterdir()) if (self.dir / "captures").is_dir() else []
            return capture.Capture(pod.name, note=f"this recording has no capture of {pod.name}; it has one of: "
                                                  f"{', '.join(have) or 'no pod'}")
        lo = (d / "lo.tsv").read_text() if (d / "lo.tsv").exists() else ""
        return capture.Capture(pod.name, capture.parse_wire_fields((d / "eth0.tsv").read_text(), pod.ip),
                               capture.parse_plain_fields(lo, pod.ip), note=f"recorded on {pod.name}'s eth0 and lo")

    def logs(self, pod: PodState | None = None, component: str = "", node: str = "") -> str:
        name = pod.name if pod is not None else f"{component}_{node}"
        path = self.dir / "logs" / f"{name}.log"
        return path.read_text() if path.exists() else f"(this recording has no log for {name})"

    def describe(self) -> str:
        return f"lab {self.lab} (recorded)"
