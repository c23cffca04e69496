"""Lab test (root, real namespaces) of the istio-cni node agent as a process in a node netns.

With no ztunnel connected a new pod is `pending` with its rules already in place; a ztunnel that
connects gets it in the snapshot (with a netns fd of the very pod) and the pod turns `enabled`;
a re-add reconciles instead of duplicating, also across an agent restart; a pod whose netns was
replaced gets the new netns; removal takes out rules, ip rule and the ztunnel's proxy.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lab.cni import plugin_events as pe
from lab.cni.iptables import inpod_rules
from lab.ztunnel.inpod.workload_manager import WorkloadManager
from tests.conftest import require_root
from tests.eventsink import EventSink

pytestmark = [pytest.mark.lab, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
NODE, POD = "altest-na-node", "altest-na-pod1"
UID = "0b7c5e0e-altest-na-pod1"
ADD = {"uid": UID, "name": "pod1", "namespace": "default", "service_account": "sleep", "ip": "10.244.1.9",
       "netns": f"/run/netns/{POD}", "source": "cni-plugin"}


def sh(*cmd: str, check: bool = True) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=check).stdout


def make_ns(name: str) -> None:
    sh("ip", "netns", "add", name)
    sh("ip", "-n", name, "link", "set", "lo", "up")


def del_ns(name: str) -> None:
    sh("ip", "netns", "delete", name, check=False)


def pod_save() -> str:
    return sh("ip", "netns", "exec", POD, "iptables-legacy-save")


def pod_rules() -> str:
    return sh("ip", "-n", POD, "rule")


class SupervisorRecorder:
    """Stands where the supervisor's socket would be and records the agent's `annotate` calls."""

    def __init__(self, path: str) -> None:
        self.requests: list[dict] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as f:
                self.requests.append(json.loads(f.readline()))
                f.write(b'{"done": true}\n')

    def values(self) -> list:
        return [r["value"] for r in self.requests]

    def close(self) -> None:
        self.sock.close()


class Agent:
    """`ip netns exec altest-na-node python -m lab.cni ...`, as the supervisor starts it."""

    def __init__(self, d: str, *extra: str) -> None:
        self.d = d
        self.extra = list(extra)
        self.plugin, self.zds = f"{d}/plugin.sock", f"{d}/zds.sock"
        self.log_path = f"{d}/agent.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", NODE, sys.executable, "-m", "lab.cni", "--lab", "altest-na", "--node", NODE,
                 "--plugin-socket", self.plugin, "--zds-socket", self.zds, "--ack-timeout", "2",
                 "--annotate-socket", f"{self.d}/sup.sock", "--events-socket", f"{self.d}/ev.sock", *self.extra],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 10
        while True:
            try:
                pe.get(self.plugin, "/healthz", timeout=2)
                return
            except (OSError, pe.PluginError):
                assert self.proc.poll() is None, f"agent exited:\n{self.log()}"
                assert time.monotonic() < deadline, f"agent not ready in 10 s:\n{self.log()}"
                time.sleep(0.02)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(10)
        self.proc = None
        return code

    def log(self) -> str:
        return Path(self.log_path).read_text()

    async def post(self, path: str, body: dict) -> dict:
        return await asyncio.to_thread(pe.post, self.plugin, path, body)

    async def pods(self) -> dict:
        return await asyncio.to_thread(pe.get, self.plugin, "/pods")


class Ztunnel:
    """The smallest ztunnel side of ZDS: keeps each pod's netns fd and acks."""

    def __init__(self, path: str) -> None:
        self.fds: dict[str, int] = {}
        self.adds: list[tuple[str, str, int]] = []  # (uid, "ns/name", netns inode)
        self.dels: list[str] = []
        self.wm = WorkloadManager(path, on_add=self.on_add, on_del=self.on_del, max_backoff=0.2)

    def on_add(self, uid, info, fd: int) -> None:
        self.adds.append((uid, f"{info.namespace}/{info.name}", os.fstat(fd).st_ino))
        if uid in self.fds:
            os.close(self.fds[uid])
        self.fds[uid] = fd

    def on_del(self, uid: str) -> None:
        self.dels.append(uid)
        if uid in self.fds:
            os.close(self.fds.pop(uid))

    async def stop(self) -> None:
        await self.wm.stop()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


async def until(pred, what: str, timeout: float = 8.0):
    deadline = time.monotonic() + timeout
    while True:
        result = pred()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


class EventCollector(EventSink):
    """The agent's event stream, read all the time (see tests/eventsink.py)."""


@pytest.fixture
def env():
    require_root()
    d = f"/tmp/na-{os.getpid()}"
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    for ns in (NODE, POD):
        del_ns(ns)
        make_ns(ns)
    events = EventCollector(f"{d}/ev.sock")
    agent = Agent(d)
    try:
        yield d, agent, events
    finally:
        if agent.proc is not None:
            agent.proc.kill()
            agent.proc.wait()
        events.close()
        for ns in (NODE, POD):
            del_ns(ns)
        shutil.rmtree(d, ignore_errors=True)
    assert not [n for n in sh("ip", "netns", "list").split() if n.startswith("altest-na-")]


async def test_pending_snapshot_enabled_reconcile_replace_remove(env) -> None:
    d, agent, events = env
    n_rules = len(inpod_rules(False))
    await asyncio.to_thread(agent.start)

    # 1. No ztunnel: rules go in, the pod is pending, and the ADD still fails (HTTP 500), so the
    #    plugin fails the sandbox; the supervisor is not there either.
    reply = await agent.post("/cmdadd", ADD)
    assert reply["redirection"] == "pending" and reply["error"].startswith("failed to add pod to the mesh: "), reply
    save = pod_save()
    assert "-A OUTPUT -j ISTIO_OUTPUT" in save and "--to-ports 15001" in save
    assert "32764:\tfrom all fwmark 0x111/0xfff lookup 100" in pod_rules()
    view = await agent.pods()
    assert view["pending"] == ["default/pod1"] and view["pods"][0]["netns_inode"] == os.stat(ADD["netns"]).st_ino
    attempts = await until(_annotations(agent), "pending annotation attempted")
    assert attempts[0]["value"] == "pending" and attempts[0]["result"].startswith("failed:")

    # 2. The supervisor comes up, then a ztunnel connects: the pod is in its snapshot, with a netns fd
    #    of pod1 itself, and turns enabled.
    sup = SupervisorRecorder(f"{d}/sup.sock")
    zt = Ztunnel(agent.zds)
    zt.wm.start()
    try:
        await asyncio.wait_for(zt.wm.ready.wait(), 8)
        inode1 = os.stat(ADD["netns"]).st_ino
        assert zt.adds == [(UID, "default/pod1", inode1)]
        await until(lambda: sup.values() == ["enabled"], "annotate enabled")
        view = await agent.pods()
        assert view["pending"] == [] and view["pods"][0]["redirection"] == "enabled"

        # 3. The informer adds it again: acked at once, rules reconciled, not duplicated.
        reply = await agent.post("/cmdadd", {**ADD, "source": "informer"})
        assert reply["redirection"] == "enabled", reply
        assert _rule_lines(pod_save()) == n_rules
        assert pod_rules().count("32764:") == 1

        # 4. Agent restart: sockets go, rules stay; the new agent knows nothing until the informer
        #    re-sends the pod; then the rules are reconciled, still not duplicated.
        assert await asyncio.to_thread(agent.stop) == 0
        assert not os.path.exists(agent.plugin) and not os.path.exists(agent.zds)
        assert _rule_lines(pod_save()) == n_rules
        await asyncio.to_thread(agent.start)
        await asyncio.wait_for(zt.wm.ready.wait(), 8)
        assert (await agent.pods())["pods"] == []
        reply = await agent.post("/cmdadd", {**ADD, "source": "informer"})
        assert reply["redirection"] == "enabled", reply
        assert _rule_lines(pod_save()) == n_rules and pod_rules().count("32764:") == 1

        # 5. The pod's sandbox is recreated (new netns inode): the Add replaces the cached netns.
        del_ns(POD)
        make_ns(POD)
        inode2 = os.stat(ADD["netns"]).st_ino
        assert inode2 != inode1
        reply = await agent.post("/cmdadd", ADD)
        assert reply["redirection"] == "enabled", reply
        assert zt.adds[-1] == (UID, "default/pod1", inode2)
        assert (await agent.pods())["pods"][0]["netns_inode"] == inode2
        assert _rule_lines(pod_save()) == n_rules

        # 6. A pod that is gone before the agent opens its netns: a clear error, nothing cached.
        ghost = {**ADD, "uid": "ghost", "name": "ghost", "netns": "/run/netns/altest-na-ghost"}
        reply = await agent.post("/cmdadd", ghost)
        assert "does not exist" in reply["error"] and reply["redirection"] == ""
        assert [p["uid"] for p in (await agent.pods())["pods"]] == [UID]

        # 7. Removal: rules, ip rule and route out; ztunnel got the Del; the annotation goes.
        reply = await agent.post("/cmddel", {"uid": UID, "name": "pod1", "namespace": "default",
                                             "netns": ADD["netns"]})
        assert reply["error"] == "", reply
        save = pod_save()
        assert "ISTIO" not in save
        assert "32764" not in pod_rules()
        assert sh("ip", "-n", POD, "route", "show", "table", "100") == ""
        assert zt.dels == [UID] and UID not in zt.fds
        await until(lambda: sup.values()[-1:] == [None], "annotation removed")
        assert (await agent.pods())["pods"] == []
    finally:
        await zt.stop()
        sup.close()

    # 8. The event stream told the whole story.
    await until(lambda: any(e["kind"] == "cni.pod.removed" for e in events.events), "cni.pod.removed event")
    kinds = [e["kind"] for e in events.events]
    for kind in ("cni.ready", "cni.pod.add", "cni.rules.installed", "cni.pod.pending", "zds.connected",
                 "zds.hello", "zds.add", "zds.snapshot_sent", "cni.pod.enabled", "cni.pod.handed",
                 "cni.pod.failed", "zds.del", "cni.rules.removed", "cni.pod.removed"):
        assert kind in kinds, (kind, kinds)
    assert kinds.index("cni.pod.pending") < kinds.index("cni.pod.enabled")

    # 9. Stop: exit 0, sockets gone, no agent left; the log reads like istio-cni's.
    assert await asyncio.to_thread(agent.stop) == 0
    assert sorted(os.listdir(d)) == ["agent.log", "ev.sock", "sup.sock"]
    log = agent.log()
    assert "\tinfo\tcni-agent\tCNI node agent ready" in log
    assert "\twarn\tcni-agent\tpod partially added" in log and "\tinfo\tztunnelserver\t" in log


async def test_dns_capture_adds_the_dns_rules(env) -> None:
    d, agent, events = env
    agent.extra = ["--dns-capture"]
    await asyncio.to_thread(agent.start)
    reply = await agent.post("/cmdadd", ADD)
    assert reply["redirection"] == "pending", reply
    save = pod_save()
    assert "*raw" in save and "--to-ports 15053" in save and "CT --zone 1" in save
    assert _rule_lines(save) == len(inpod_rules(True))
    installed = await until(lambda: [e for e in events.events if e["kind"] == "cni.rules.installed"],
                            "cni.rules.installed event")
    assert installed[0]["fields"]["rules"] == len(inpod_rules(True))
    assert installed[0]["fields"]["dns_capture"] is True
    assert await asyncio.to_thread(agent.stop) == 0


def _rule_lines(save: str) -> int:
    """In-pod `-A` lines in iptables-save output (the jumps plus the Istio chains' rules)."""
    return sum(1 for line in save.splitlines() if line.startswith("-A ") and "ISTIO" in line)


def _annotations(agent: Agent):
    async def attempted() -> list:
        return (await agent.pods())["annotations"]
    return attempted
