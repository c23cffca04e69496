"""The lab's TUI, k9s-shaped: a thin Textual layer over the view model (lab/tui/model.py).

Data flow: a backend (live supervisor or recording, lab/tui/backend.py) queues messages from
its worker threads; every `tick` the app drains the queue, folds it into the model, and redraws
the active screen once if an area it shows changed. So a burst of 500 events costs one redraw,
and memory stays bounded by the model's limits, not by the traffic.

Keys (all listed by `?`, from screens/help.md): `:` switches view (`:pods`, `:svc`, `:nodes`,
`:ns`, `:policies`, `:routes`, `:workloads`, `:flows`, `:istiod`, `:events`), `/` filters,
`enter` drills in, `esc` backs out, `d` `y` `l` `s` describe, YAML, logs, shell; `ctrl+p` opens
the actions (label a namespace, apply a file, curl, kill/restart ztunnel); `X` (anywhere) and `x`
(in a flow's timeline) turn live step mode on and off: the proxies hold every new connection
before each step until the learner releases it (see screens/timeline.py).
"""

from __future__ import annotations

import collections
import subprocess
import time
from typing import Iterable

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from lab.common.errors import LabError
from lab.tui import commands, resources
from lab.tui.backend import Backend
from lab.tui.commands import Request
from lab.tui.model import LabModel
from lab.tui.screens.base import LabScreen
from lab.tui.screens.cluster import ClusterScreen
from lab.tui.screens.controlplane import ControlPlaneScreen
from lab.tui.screens.events import EventsScreen
from lab.tui.screens.exercise import ExerciseScreen
from lab.tui.screens.flows import FlowsScreen
from lab.tui.screens.help import HelpScreen
from lab.tui.screens.pod import PodScreen
from lab.tui.screens.prompt import PromptScreen
from lab.tui.screens.resources import ResourceScreen
from lab.tui.screens.text import TextScreen
from lab.tui.screens.timeline import TimelineScreen
from lab.tui.screens.wire import WireScreen

TICK = 0.1  # seconds between drains of the backend's queue (at most 10 redraws a second)
BATCH = 20_000  # messages folded per tick at most (the rest wait for the next tick)


class PumpStats:
    """How the app keeps up with the stream (the responsiveness bench reads this)."""

    def __init__(self) -> None:
        self.ticks = 0
        self.folded = 0
        self.busy: collections.deque[float] = collections.deque(maxlen=2000)  # seconds per tick
        self.lags: collections.deque[float] = collections.deque(maxlen=2000)  # posted -> folded, seconds
        self.max_backlog = 0
        self.window: collections.deque[tuple[float, int]] = collections.deque(maxlen=50)

    def rate(self) -> float:
        if len(self.window) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.window[0], self.window[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


class LabApp(App):
    """The TUI over one backend. `tick=None` disables the timer (tests pump by hand)."""

    CSS_PATH = "lab.tcss"
    TITLE = "ambient-lab"
    MODES = {"cluster": ClusterScreen, "resources": ResourceScreen, "flows": FlowsScreen,
             "istiod": ControlPlaneScreen, "events": EventsScreen, "ex": ExerciseScreen}
    DEFAULT_MODE = "cluster"
    BINDINGS = [
        Binding("colon", "command_line", "view", key_display=":"),
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("1", "go('cluster')", "cluster", show=False),
        Binding("2", "go('pods')", "pods", show=False),
        Binding("3", "go('flows')", "flows", show=False),
        Binding("4", "go('istiod')", "istiod", show=False),
        Binding("5", "go('events')", "events", show=False),
        Binding("6", "go('ex')", "exercise", show=False),
        Binding("X", "live_step_mode", "step mode", show=False),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, backend: Backend, tick: float | None = TICK) -> None:
        super().__init__()
        self.backend = backend
        self.model = LabModel(backend.lab, clock=backend.now)
        self.tick = tick
        self.stats = PumpStats()
        self.commands_run: collections.deque[list[str]] = collections.deque(maxlen=100)  # what keys/actions ran
        self._exercise_seen: tuple[float, str] = (-1.0, "")  # progress file mtime, current exercise

    # -- the data pump -----------------------------------------------------------------------------
    def on_mount(self) -> None:
        self.backend.start()
        self.pump()
        if self.tick:
            self.set_interval(self.tick, self.pump)

    def on_unmount(self) -> None:
        self.backend.stop()

    def pump(self) -> int:
        """Drain the backend, fold into the model, redraw the active screen once. Returns messages folded."""
        t0 = time.perf_counter()
        msgs = self.backend.drain(BATCH)
        n = self.model.fold_all(msgs)
        now = time.monotonic()
        oldest = next((m["posted"] for m in msgs if "posted" in m), None)  # set by a paced replay (the bench)
        if oldest is not None:
            self.stats.lags.append(now - oldest)
        flow_changes = self.model.take_flow_changes()
        dirty = self.model.take_dirty()
        screen = self.screen
        if isinstance(screen, LabScreen) and screen.is_mounted:
            screen.refresh_view(dirty, flow_changes)
        self.stats.ticks += 1
        self.stats.folded += n
        self.stats.busy.append(time.perf_counter() - t0)
        self.stats.max_backlog = max(self.stats.max_backlog, self.backend.pending() + 0)
        self.stats.window.append((now, self.stats.folded))
        return n

    def extra_status(self) -> str:
        parts = []
        if self.backend.live:
            parts.append(f"{self.stats.rate():.0f} msg/s")
            if exercise := self.current_exercise():
                parts.append(f"exercise {exercise} (6)")
        if self.backend.dropped:
            parts.append(f"{self.backend.dropped} dropped")
        return ", ".join(parts)

    def current_exercise(self) -> str:
        """The learner's current exercise, from the course's progress file (re-read when it changes)."""
        from lab.course.progress import FILE_NAME, Progress
        from lab.course.runner import exercises_dir

        path = exercises_dir().parent / FILE_NAME
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return ""
        if self._exercise_seen[0] != mtime:
            progress = Progress.load(exercises_dir())
            current = progress.current if progress.current not in progress.done else ""
            self._exercise_seen = (mtime, current)
        return self._exercise_seen[1]

    # -- navigation --------------------------------------------------------------------------------
    async def action_go(self, where: str) -> None:
        if where in ("cluster", "flows", "istiod", "events", "ex"):
            await self.go_mode(where)
        else:
            await self.open_view(where)

    async def go_mode(self, mode: str) -> None:
        if self.current_mode != mode:
            await self.switch_mode(mode)
        while len(self.screen_stack) > 1:
            await self.pop_screen()

    async def open_view(self, view: str, filter_text: str = "") -> None:
        """`:pods`, `:svc`...: the resource screen, showing `view`, filtered by `filter_text`."""
        await self.go_mode("resources")
        screen = self.screen
        if isinstance(screen, ResourceScreen):
            screen.show(view, filter_text)

    def action_command_line(self) -> None:
        self.push_screen(PromptScreen(":", "pods, svc, nodes, ns, policies, routes, workloads, flows, istiod, events, q",
                                      id="command-line"), self.run_command_line)

    async def run_command_line(self, text: str | None) -> None:
        if not text:
            return
        cmd = commands.parse_command_line(text)
        if cmd.action == "quit":
            self.exit()
        elif cmd.action == "view":
            await self.open_view(cmd.target, cmd.argument)
        elif cmd.action == "screen" and cmd.target == "wire":
            await self.go_mode("flows")
            self.notify("pick a flow and press w for its wire view")
        elif cmd.action == "screen":
            await self.go_mode(cmd.target)
        else:
            self.notify(f"unknown view {cmd.target!r}: try :pods :svc :nodes :ns :policies :routes :workloads "
                        ":flows :istiod :events", severity="error")

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def open_pod(self, key: str, tab: str = "overview") -> None:
        if key in self.model.pods:
            self.push_screen(PodScreen(key, tab))

    def open_timeline(self, flow_id: str) -> None:
        self.push_screen(TimelineScreen(flow_id))

    def open_wire(self, flow_id: str) -> None:
        self.push_screen(WireScreen(flow_id))

    def describe(self, view: str, key: str) -> None:
        self.push_screen(TextScreen(f"describe {view} {key}", resources.describe(view, self.model, key)))

    def show_yaml(self, view: str, key: str) -> None:
        text = resources.object_yaml(self.model, view, key)
        if text is not None:
            self.push_screen(TextScreen(f"yaml {view} {key}", text, language="yaml"))
            return
        ns, _, name = key.rpartition("/")
        kind = resources.GET_KIND.get(view, view)
        self.push_screen(TextScreen(f"yaml {view} {key}", loader=lambda: self.backend.yaml(kind, ns, name),
                                    language="yaml"))

    def show_logs(self, pod_key: str | None = None, component: str = "", node: str = "") -> None:
        if pod_key is not None:
            pod = self.model.pods.get(pod_key)
            if pod is None:
                return
            self.push_screen(TextScreen(f"logs {pod_key}", loader=lambda: self.backend.logs(pod)))
        else:
            self.push_screen(TextScreen(f"logs {component} on {node}",
                                        loader=lambda: self.backend.logs(component=component, node=node)))

    # -- step mode: the mesh debugger ------------------------------------------------------------------
    def action_live_step_mode(self) -> None:
        """`X`: live step mode on/off in every proxy (a recording says it cannot)."""
        self.toggle_step_mode(not self.model.step_mode)

    @work(thread=True, group="step", exclusive=True)
    def toggle_step_mode(self, on: bool) -> None:
        try:
            reply = self.backend.set_step_mode(on)
        except LabError as e:
            self.call_from_thread(self.notify, e.message + (f"\n{e.fix}" if e.fix else ""), severity="error",
                                  timeout=8)
            return
        self.call_from_thread(self._step_mode_set, reply)

    def _step_mode_set(self, reply: dict) -> None:
        on = bool(reply.get("on"))
        proxies = reply.get("proxies", [])
        ok = sum(1 for p in proxies if p.get("ok"))
        if on:
            self.model.step_mode = True
            text = (f"step mode ON: {ok} of {len(proxies)} proxies hold every NEW connection before each step. "
                    f"Send traffic (ctrl+p: curl), then open the held flow (3, enter).")
        else:
            self.model.fold_step_state({"on": False, "held": []})
            text = f"step mode off: {len(reply.get('released', []))} held step(s) released"
        self.model.touch("flows", "cluster")
        for p in proxies:
            if not p.get("ok"):
                text += f"\n{p.get('error')}"
        self.notify(text, timeout=8)
        self.pump()

    @work(thread=True, group="step")
    def release_steps(self, flow: str, scope: str) -> None:
        """Let a held flow (or "*": every held flow) take one step, or run to its end."""
        try:
            reply = self.backend.release_step(flow, scope)
        except LabError as e:
            self.call_from_thread(self.notify, e.message + (f"\n{e.fix}" if e.fix else ""), severity="error",
                                  timeout=8)
            return
        released = reply.get("released", [])
        what = "one step" if scope == "step" else "to its end" if flow != "*" else "every held flow to its end"
        text = (f"released {what}: " + ", ".join(f"{r['flow'][:8]} {r['step']}" for r in released[:4])
                if released else "nothing was held any more")
        self.call_from_thread(self.notify, text, timeout=4)

    # -- commands in the lab's namespaces -----------------------------------------------------------
    def pod_netns(self, pod_key: str) -> str:
        pod = self.model.pods[pod_key]
        if pod.netns:
            return pod.netns
        return self.backend.request("resolve_pod", ref=pod.name, namespace=pod.namespace)["netns"]

    def shell(self, pod_key: str) -> None:
        """`s`: suspend the TUI and run a shell in the pod's network namespace (as k9s's shell)."""
        try:
            argv = commands.shell_command(self.pod_netns(pod_key))
        except (LabError, KeyError) as e:
            self.notify(f"no network namespace for {pod_key}: {getattr(e, 'message', e)}", severity="error")
            return
        self.run_interactive(argv)

    def shell_node(self, node: str) -> None:
        """A shell in a node's network namespace (node netns are named after the node)."""
        self.run_interactive(commands.shell_command(node))

    def run_interactive(self, argv: list[str]) -> None:
        self.commands_run.append(argv)
        if not self.backend.can_exec:
            self.notify("recorded lab, nothing to enter; on a live lab this runs: " + " ".join(argv), timeout=8)
            return
        with self.suspend():
            print(f"$ {' '.join(argv)}   (exit to return to the TUI)")
            subprocess.call(argv)

    # -- actions (the command palette) ----------------------------------------------------------------
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield from self.lab_commands()

    def lab_commands(self) -> Iterable[SystemCommand]:
        """The actions a learner takes on the lab, as palette entries (each one supervisor request
        or one `ip netns exec` command)."""
        m = self.model
        for ns in sorted(m.namespaces, key=lambda n: n["name"]):
            name = ns["name"]
            if m.is_ambient_namespace(name):
                yield SystemCommand(f"Remove namespace {name} from ambient",
                                    f"label namespace {name} istio.io/dataplane-mode- (istio-cni releases its pods)",
                                    lambda name=name: self.send(commands.label_namespace(name, False)))
            else:
                yield SystemCommand(f"Add namespace {name} to ambient",
                                    f"label namespace {name} istio.io/dataplane-mode=ambient (istio-cni captures its pods)",
                                    lambda name=name: self.send(commands.label_namespace(name, True)))
        yield SystemCommand("Apply a YAML file", "ambient-lab apply -f FILE (a path on this machine)", self.ask_apply)
        for node in m.nodes:
            for what in ("ztunnel", "istio-cni"):
                yield SystemCommand(f"Kill {what} on {node['name']}", f"SIGKILL {what}: see what fails, and what does not",
                                    lambda n=node["name"], w=what: self.send(commands.component_action("kill", w, n)))
                yield SystemCommand(f"Restart {what} on {node['name']}", f"start {what} again on {node['name']}",
                                    lambda n=node["name"], w=what: self.send(commands.component_action("restart", w, n)))
        services = sorted(m.services, key=lambda s: (s["namespace"], s["name"]))
        for pod in sorted(m.pods.values(), key=lambda p: p.key):
            if pod.phase != "Running":
                continue
            for svc in services:
                if not svc.get("ports"):
                    continue
                port = svc["ports"][0]["port"]
                yield SystemCommand(f"curl from {pod.name} to {svc['name']}:{port}",
                                    f"exec {pod.key} -- curl http://{svc['name']}.{svc['namespace']}:{port}/",
                                    lambda p=pod.key, s=svc, port=port: self.curl(p, s["name"], s["namespace"], port))

    def ask_apply(self) -> None:
        def apply(path: str | None) -> None:
            if not path:
                return
            try:
                req = commands.apply_file(path)
            except OSError as e:
                self.notify(f"cannot read {path}: {e}", severity="error")
                return
            self.send(req)

        self.push_screen(PromptScreen("apply -f", "a YAML file or a directory of them", id="apply-prompt"), apply)

    @work(thread=True, group="actions")
    def send(self, req: Request) -> dict:
        """Send one request to the supervisor (from a worker thread) and say how it went."""
        try:
            reply = self.backend.send(req)
        except LabError as e:
            self.call_from_thread(self.notify, e.message + (f"\n{e.fix}" if e.fix else ""), severity="error",
                                  timeout=8)
            return {}
        text = "\n".join(x for x in (reply.get("stdout", ""), reply.get("stderr", "")) if x) or f"{req.op}: done"
        self.call_from_thread(self.notify, text, timeout=6)
        return reply

    @work(thread=True, group="actions")
    def curl(self, pod_key: str, service: str, namespace: str, port: int) -> None:
        """curl from a pod to a service, the way `ambient-lab exec POD -- curl ...` does."""
        try:
            argv = commands.curl_command(self.pod_netns(pod_key), service, namespace, port)
        except (LabError, KeyError) as e:
            self.call_from_thread(self.notify, f"cannot curl from {pod_key}: {getattr(e, 'message', e)}",
                                  severity="error")
            return
        self.commands_run.append(argv)
        if not self.backend.can_exec:
            self.call_from_thread(self.notify, "recorded lab: on a live lab this runs " + " ".join(argv), timeout=8)
            return
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            out = (r.stdout + r.stderr).strip() or f"exit code {r.returncode}"
        except (OSError, subprocess.TimeoutExpired) as e:
            out = str(e)
        self.call_from_thread(self.notify, f"curl {service}.{namespace}:{port} from {pod_key}: {out}", timeout=8)
