"""The node agent without root: the plugin-event HTTP channel, request parsing, and the agent's
reply paths that touch no pod (bad bodies, a vanished netns, removals, readiness, ZDS snapshot)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import threading

import pytest

from lab.cni import plugin_events as pe
from lab.cni.nodeagent import (
    Annotator,
    BadRequest,
    IstioLogFormatter,
    NodeAgent,
    netns_path,
    parse_pod_request,
    zds_event_message,
)
from lab.common.events import EventEmitter
from lab.ztunnel.inpod.workload_manager import WorkloadManager
from tests.eventsink import EventSink


@pytest.fixture
def short_dir():
    """A short directory for unix sockets (108-byte path limit; pytest's tmp_path can be long)."""
    d = tempfile.mkdtemp(prefix="na-u", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


class RecordingHandler:
    """A plugin-event handler that records bodies and answers as the agent would."""

    def __init__(self) -> None:
        self.adds: list[dict] = []
        self.dels: list[dict] = []
        self.is_ready = True

    async def cmd_add(self, body: dict) -> tuple[int, dict]:
        self.adds.append(body)
        if body.get("boom"):
            raise RuntimeError("boom")
        if body.get("fail"):
            return 500, {"redirection": "", "error": "cannot install", "message": "cannot install"}
        return 200, {"redirection": "pending", "error": "", "message": "ok"}

    async def cmd_del(self, body: dict) -> tuple[int, dict]:
        self.dels.append(body)
        return 200, {"redirection": "", "error": "", "message": "removed"}

    def pods_view(self) -> dict:
        return {"pods": [b["uid"] for b in self.adds]}

    def ready(self) -> bool:
        return self.is_ready


@pytest.fixture
async def http(short_dir):
    handler = RecordingHandler()
    server = pe.PluginEventServer(os.path.join(short_dir, "p.sock"), handler)
    await server.start()
    yield server, handler
    await server.close()


def raw_exchange(path: str, data: bytes, chunks: int = 1) -> bytes:
    """Send raw bytes (split into `chunks` writes), half-close, read everything back."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(path)
        step = max(1, len(data) // chunks)
        for i in range(0, len(data), step):
            s.sendall(data[i:i + step])
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


# ----------------------------------------------------------------------------- HTTP framing


def test_request_and_response_rendering_round_trip() -> None:
    raw = pe.render_request("POST", "/cmdadd", {"uid": "u1"})
    head, _, body = raw.partition(b"\r\n\r\n")
    req = pe.parse_request_head(head + b"\r\n\r\n")
    assert (req.method, req.path, req.version) == ("POST", "/cmdadd", "HTTP/1.1")
    assert req.headers["content-length"] == str(len(body)) and json.loads(body) == {"uid": "u1"}
    assert not req.keep_alive  # the client asks to close
    resp = pe.parse_response(pe.render_response(200, {"a": 1}, keep_alive=True))
    assert resp.status == 200 and resp.json() == {"a": 1} and resp.headers["connection"] == "keep-alive"


@pytest.mark.parametrize(("head", "status"), [
    (b"GET /pods\r\n\r\n", 400),
    (b"GET /pods HTTP/2.0\r\n\r\n", 505),
    (b"GET /pods HTTP/1.1\r\nBad header\r\n\r\n", 400),
    (b"\r\n\r\n", 400),
])
def test_parse_request_head_refuses(head: bytes, status: int) -> None:
    with pytest.raises(pe.FramingError) as e:
        pe.parse_request_head(head)
    assert e.value.status == status


def test_body_length_rules() -> None:
    assert pe.body_length({}) == 0
    assert pe.body_length({"content-length": "12"}) == 12
    for headers, status in [({"transfer-encoding": "chunked"}, 411), ({"content-length": "-1"}, 400),
                            ({"content-length": str(pe.MAX_BODY + 1)}, 413)]:
        with pytest.raises(pe.FramingError) as e:
            pe.body_length(headers)
        assert e.value.status == status


def test_parse_response_refuses_truncation() -> None:
    with pytest.raises(pe.PluginError):
        pe.parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}")
    with pytest.raises(pe.PluginError):
        pe.parse_response(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(pe.PluginError):
        pe.parse_response(b"SMTP 200 OK\r\n\r\n")


async def test_client_post_and_get(http) -> None:
    server, handler = http
    body = {"uid": "u1", "name": "p", "namespace": "default", "netns": "/run/netns/x", "source": "cni-plugin"}
    got = await asyncio.to_thread(pe.post, server.path, "/cmdadd", body)
    assert got == {"redirection": "pending", "error": "", "message": "ok"} and handler.adds == [body]
    assert (await asyncio.to_thread(pe.post, server.path, "/cmddel", {"uid": "u1"}))["message"] == "removed"
    assert await asyncio.to_thread(pe.get, server.path, "/pods") == {"pods": ["u1"]}
    assert await asyncio.to_thread(pe.get, server.path, "/healthz") == {"ready": True}
    # An agent error with a JSON body is a reply, not an exception: the caller reads "error".
    failed = await asyncio.to_thread(pe.post, server.path, "/cmdadd", {"uid": "u2", "fail": True})
    assert failed["error"] == "cannot install"


async def test_readiness_is_503_until_ready(http) -> None:
    server, handler = http
    handler.is_ready = False
    with pytest.raises(pe.PluginError) as e:
        await asyncio.to_thread(pe.get, server.path, "/healthz")
    assert e.value.status == 503
    handler.is_ready = True
    assert await asyncio.to_thread(pe.get, server.path, "/healthz") == {"ready": True}


async def test_errors_routes_and_methods(http) -> None:
    server, handler = http
    with pytest.raises(pe.PluginError) as e:
        await asyncio.to_thread(pe.get, server.path, "/nope")
    assert e.value.status == 404
    out = await asyncio.to_thread(raw_exchange, server.path, b"GET /cmdadd HTTP/1.1\r\n\r\n")
    resp = pe.parse_response(out)
    assert resp.status == 405 and resp.headers["allow"] == "POST"
    bad = b"POST /cmdadd HTTP/1.1\r\nContent-Length: 5\r\n\r\n{nope"
    assert pe.parse_response(await asyncio.to_thread(raw_exchange, server.path, bad)).status == 400
    arr = b"POST /cmdadd HTTP/1.1\r\nContent-Length: 2\r\n\r\n[]"
    assert pe.parse_response(await asyncio.to_thread(raw_exchange, server.path, arr)).status == 400
    chunked = b"POST /cmdadd HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    assert pe.parse_response(await asyncio.to_thread(raw_exchange, server.path, chunked)).status == 411
    assert handler.adds == []  # none of these reached the agent
    # A bug in the handler is a 500, and the server keeps serving.
    boom = await asyncio.to_thread(pe.post, server.path, "/cmdadd", {"boom": True})
    assert "RuntimeError: boom" in boom["error"]
    assert await asyncio.to_thread(pe.get, server.path, "/healthz") == {"ready": True}


async def test_keep_alive_pipelining_and_split_writes(http) -> None:
    server, handler = http
    one = b"POST /cmddel HTTP/1.1\r\nContent-Length: 12\r\n\r\n{\"uid\":\"a\"}\n"
    two = b"GET /pods HTTP/1.1\r\nConnection: close\r\n\r\n"
    out = await asyncio.to_thread(raw_exchange, server.path, one + two, 17)  # 17 small writes
    first_end = out.index(b"\r\n\r\n")
    first = pe.parse_response(out)
    assert first.status == 200 and first.json()["message"] == "removed"
    rest = out[first_end + 4 + int(first.headers["content-length"]):]
    second = pe.parse_response(rest)
    assert second.status == 200 and second.headers["connection"] == "close"
    assert handler.dels == [{"uid": "a"}]


async def test_socket_lifecycle(short_dir) -> None:
    path = os.path.join(short_dir, "p.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # a socket file left by a killed agent
    stale.close()
    server = pe.PluginEventServer(path, RecordingHandler())
    await server.start()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    await server.close()
    assert not os.path.exists(path)
    with pytest.raises(OSError):
        pe.post(path, "/cmdadd", {})  # no agent: the plugin's "failed to contact node Istio CNI agent"


# ----------------------------------------------------------------------------- request parsing


def test_netns_path() -> None:
    assert netns_path("lab-w1-default-curl") == "/run/netns/lab-w1-default-curl"
    assert netns_path("/run/netns/x") == "/run/netns/x"
    assert netns_path("/proc/42/ns/net") == "/proc/42/ns/net"
    for bad in ("", "/etc/passwd", "/run/netns/../../etc/passwd", "/proc/42/ns/mnt"):
        with pytest.raises(BadRequest):
            netns_path(bad)


def test_parse_pod_request() -> None:
    body = {"uid": "u", "name": "curl", "namespace": "default", "ip": "10.244.1.5", "netns": "n",
            "service_account": "curl", "source": "informer", "extra": 1}
    req = parse_pod_request(body, add=True)
    assert (req.key, req.netns, req.service_account, req.source) == ("default/curl", "/run/netns/n", "curl",
                                                                      "informer")
    assert parse_pod_request({**body, "service_account": ""}, add=True).service_account == "default"
    assert parse_pod_request({"uid": "u", "name": "c", "namespace": "d"}, add=False).netns == ""
    for broken in ({**body, "uid": ""}, {**body, "netns": ""}, {**body, "source": "kubelet"},
                   {k: v for k, v in body.items() if k != "name"}, {**body, "name": 3}):
        with pytest.raises(BadRequest):
            parse_pod_request(broken, add=True)


def test_zds_event_messages() -> None:
    assert zds_event_message({"kind": "zds.add", "ack": "ok", "snapshot": True}, "default/curl") == \
        "AddWorkload default/curl + netns fd (snapshot): acknowledged"
    assert "no ztunnel connected" in zds_event_message({"kind": "zds.add", "ack": "unavailable"}, "d/c")
    assert "refused: port taken" in zds_event_message({"kind": "zds.add", "ack": "nack", "error": "port taken"}, "x")
    assert zds_event_message({"kind": "zds.snapshot_sent", "ack": "ok", "pods": 2}, "") == \
        "SnapshotSent after 2 pod(s): acknowledged"


def test_log_format_is_istio_like() -> None:
    rec = logging.LogRecord("cni-agent", logging.WARNING, __file__, 1, "pod partially added", None, None)
    rec.scope, rec.fields = "cni-agent", {"pod": "default/curl", "reason": "no ztunnel"}
    ts, level, scope, msg, fields = IstioLogFormatter().format(rec).split("\t")
    assert ts.endswith("Z") and "T" in ts and level == "warn" and scope == "cni-agent"
    assert msg == "pod partially added" and fields == "pod=default/curl reason=no ztunnel"


# ----------------------------------------------------------------------------- the agent, no pod


class SupervisorRecorder:
    """Listens where the supervisor would and records the agent's `annotate` requests."""

    def __init__(self, path: str) -> None:
        self.requests: list[dict] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as f:
                self.requests.append(json.loads(f.readline()))
                f.write(b'{"done": true}\n')

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
async def agent(short_dir):
    events = EventSink(os.path.join(short_dir, "ev.sock"))
    emitter = EventEmitter("altest-na-u", "istio-cni", "n1")
    emitter.path = os.path.join(short_dir, "ev.sock")
    a = NodeAgent(lab="altest-na-u", node="n1", plugin_socket=os.path.join(short_dir, "p.sock"),
                  zds_socket=os.path.join(short_dir, "z.sock"),
                  annotator=Annotator("altest-na-u", os.path.join(short_dir, "sup.sock"), timeout=2),
                  emitter=emitter, ack_timeout=2)
    await a.start()
    a.events_sock = events  # type: ignore[attr-defined]
    yield a
    await a.close()
    events.close()


def drain_events(sink: EventSink) -> list[dict]:
    import time

    time.sleep(0.1)  # the sink reads on its own threads
    return sink.drain()


async def test_agent_refuses_bad_and_vanished_pods(agent, short_dir) -> None:
    path = agent.plugin.path
    assert await asyncio.to_thread(pe.get, path, "/healthz") == {"ready": True}
    bad = await asyncio.to_thread(pe.post, path, "/cmdadd", {"uid": "u1", "name": "p"})
    assert "namespace" in bad["error"] and bad["redirection"] == ""
    gone = {"uid": "u1", "name": "p1", "namespace": "default", "netns": "/run/netns/altest-na-u-gone",
            "source": "cni-plugin"}
    reply = await asyncio.to_thread(pe.post, path, "/cmdadd", gone)
    assert "does not exist" in reply["error"] and reply["redirection"] == ""
    not_ns = {**gone, "netns": "/proc/self/ns/../../../etc/hostname"}
    assert "neither under" in (await asyncio.to_thread(pe.post, path, "/cmdadd", not_ns))["error"]
    view = await asyncio.to_thread(pe.get, path, "/pods")
    assert view["pods"] == [] and view["zds_cache"] == {} and view["ztunnels_connected"] == 0
    kinds = [e["kind"] for e in drain_events(agent.events_sock)]
    assert "cni.ready" in kinds and kinds.count("cni.pod.failed") == 1 and "cni.rules.installed" not in kinds


async def test_agent_removal_and_annotations(agent, short_dir) -> None:
    path = agent.plugin.path
    # No supervisor yet: the annotation attempt fails, is recorded, and nothing else breaks.
    r = await asyncio.to_thread(pe.post, path, "/cmddel", {"uid": "u9", "name": "p9", "namespace": "default"})
    assert r == {"redirection": "", "error": "", "message": "default/p9 was not in the mesh"}
    await asyncio.wait_for(agent._annotate_q.join(), 5)
    assert agent.annotations[-1]["result"].startswith("failed:")
    sup = SupervisorRecorder(os.path.join(short_dir, "sup.sock"))
    try:
        await asyncio.to_thread(pe.post, path, "/cmddel", {"uid": "u9", "name": "p9", "namespace": "default"})
        await asyncio.wait_for(agent._annotate_q.join(), 5)
        assert sup.requests == [{"op": "annotate", "namespace": "default", "pod": "p9",
                                 "key": "ambient.istio.io/redirection", "value": None}]
        assert agent.annotations[-1]["result"] == "ok"
    finally:
        sup.close()


async def test_ztunnel_gets_an_empty_snapshot(agent) -> None:
    acks = []
    wm = WorkloadManager(agent.zds.path, on_add=lambda *a: None, on_snapshot_sent=acks.append)
    wm.start()
    try:
        await asyncio.wait_for(wm.ready.wait(), 5)
        assert acks == [frozenset()]
        view = await asyncio.to_thread(pe.get, agent.plugin.path, "/pods")
        assert view["ztunnels_connected"] == 1
    finally:
        await wm.stop()
    kinds = [e["kind"] for e in drain_events(agent.events_sock)]
    assert {"zds.connected", "zds.hello", "zds.snapshot_sent"} <= set(kinds)
