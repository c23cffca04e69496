"""The waypoint's per-request pipeline (lab/waypoint/proxy.py), no root.

The HTTP/1.1 parser is tested over in-memory streams. The pipeline runs for real: the client's
tunnel is the HBONE library over a socketpair, the waypoint's upstream tunnels are the real
`HboneUpstream` (connect_originate) dialing small HBONE backends on loopback addresses
(127.31.0.x:15008, plain HBONE without TLS: mTLS is the lab test's business), and the config is
`build_waypoint_config` over a cluster snapshot shaped like the supervisor's. The backends are
test code: a minimal HTTP/1.1 server on each CONNECT stream, written independently of the
waypoint's parser, that answers its own name.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import socket
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from lab.common.admin_socket import admin_response
from lab.hbone import ConnectRequest, HboneConnection, HboneHttpError, HboneStream, serve_hbone
from lab.hbone.headers import Baggage, create_hbone_request, parse_forwarded, parse_traceparent
from lab.tls.identity import Identity
from lab.waypoint.admin import config_dump
from lab.waypoint.config import build_waypoint_config
from lab.waypoint.flows import FlowFile, format_flow_line, read_flows
from lab.waypoint.proxy import (
    HboneUpstream,
    HttpError,
    HttpReader,
    TunnelPeer,
    WaypointProxy,
    matching_san,
    read_request,
    upstream_san_prefix,
)
from lab.waypoint.telemetry import Metrics

TD = "cluster.local"
CLIENT_ID = Identity.of("default", "client")
WAYPOINT_ID = Identity.of("default", "waypoint")
CLIENT_ADDR = ("10.244.1.5", 40000)
FLOW = "4bf92f3577b34da6a3ce929d0e0e4736"


# ------------------------------------------------------------------------------------ the scenario
def k8s(kind: str, name: str, spec: dict, *, api: str, namespace: str = "default",
        labels: dict | None = None) -> dict:
    """A non-core object as the supervisor's cluster_snapshot() lists it."""
    return {"kind": kind, "api_version": api, "namespace": namespace, "name": name, "labels": labels or {},
            "raw": {"apiVersion": api, "kind": kind, "metadata": {"name": name, "namespace": namespace,
                                                                  "labels": labels or {}}, "spec": spec}}


def pod(name: str, ip: str, version: str, node: str = "n2", app: str = "svc", sa: str = "",
        labels: dict | None = None, annotations: dict | None = None) -> dict:
    return {"name": name, "namespace": "default", "uid": f"uid-{name}", "ip": ip, "node": node, "phase": "Running",
            "labels": labels if labels is not None else {"app": app, "version": version},
            "annotations": annotations if annotations is not None else {"ambient.istio.io/redirection": "enabled"},
            "owner": "", "service_account": sa or f"{app}-{version}", "ports": {"http": 8080}}


def service(name: str, vip: str, selector: dict, port: int = 80, target: int | str = 8080,
            labels: dict | None = None) -> dict:
    return {"name": name, "namespace": "default", "cluster_ip": vip, "labels": labels or {}, "selector": selector,
            "ports": [{"name": "http", "port": port, "target_port": target, "protocol": "TCP"}]}


SPLIT_RULE = {"backendRefs": [{"name": "svc-v1", "port": 80, "weight": 90}, {"name": "svc-v2", "port": 80,
                                                                              "weight": 10}]}
DENY_DELETE = k8s("AuthorizationPolicy", "deny-delete",
                  {"targetRefs": [{"kind": "Service", "group": "", "name": "svc"}], "action": "DENY",
                   "rules": [{"to": [{"operation": {"methods": ["DELETE"]}}]}]},
                  api="security.istio.io/v1")


def waypoint_snapshot(pods: list[dict], *, vip: str = "10.96.0.10", port: int = 80, target: int = 8080,
                      rules: list[dict] | None = None, objects: list[dict] = (),  # type: ignore[assignment]
                      deny_delete: bool = True, waypoint_pod: dict | None = None) -> dict:
    """The test cluster: Service `svc` (label istio.io/use-waypoint=waypoint) over pods of app
    svc, Services svc-v1 / svc-v2 per version, the Gateway `waypoint` (class istio-waypoint,
    listener mesh/15008/HBONE) and its Service, the HTTPRoute `svc-split` (`rules`, by default
    the canary 90/10 split), and the L7 AuthorizationPolicy denying DELETE."""
    base = vip.rsplit(".", 1)[0]
    last = int(vip.rsplit(".", 1)[1])
    services = [service("svc", vip, {"app": "svc"}, port, target, labels={"istio.io/use-waypoint": "waypoint"}),
                service("svc-v1", f"{base}.{last + 1}", {"app": "svc", "version": "v1"}, port, target),
                service("svc-v2", f"{base}.{last + 2}", {"app": "svc", "version": "v2"}, port, target),
                {"name": "waypoint", "namespace": "default", "cluster_ip": f"{base}.{last + 9}",
                 "labels": {"gateway.networking.k8s.io/gateway-name": "waypoint"},
                 "selector": {"gateway.networking.k8s.io/gateway-name": "waypoint"},
                 "ports": [{"name": "mesh", "port": 15008, "target_port": 15008, "protocol": "TCP"}]}]
    gateway = k8s("Gateway", "waypoint", {"gatewayClassName": "istio-waypoint",
                                          "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
                  api="gateway.networking.k8s.io/v1", labels={"istio.io/waypoint-for": "service"})
    route = k8s("HTTPRoute", "svc-split",
                {"parentRefs": [{"group": "", "kind": "Service", "name": "svc", "port": port}],
                 "rules": rules if rules is not None else [SPLIT_RULE]},
                api="gateway.networking.k8s.io/v1")
    all_pods = list(pods) + ([waypoint_pod] if waypoint_pod else [])
    return {"generation": 1, "nodes": [{"name": "n1", "ip": "127.0.0.1", "role": "worker"},
                                       {"name": "n2", "ip": "127.0.0.1", "role": "worker"}],
            "namespaces": [{"name": "default", "labels": {}}, {"name": "istio-system", "labels": {}}],
            "pods": all_pods, "services": services,
            "objects": [gateway, route, *([DENY_DELETE] if deny_delete else []), *objects]}


# ------------------------------------------------------------------------------------ backends
V1_IP, V2_IP, DEAD_IP = "127.31.0.10", "127.31.0.11", "127.31.0.12"


@dataclass
class Seen:
    authority: str
    connect_headers: dict[str, str]
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class HttpBackend:
    """An HBONE server on ip:15008 whose streams carry a tiny HTTP/1.1 server answering its name.

    Paths: `?ms=N` sleeps first; `/status/N` answers N; `/flaky` answers 503 the first time;
    `/reset-before` resets the stream without answering; `/reset-mid` sends half a body and
    resets; `/chunked` answers in three chunks."""

    name: str
    ip: str
    seen: list[Seen] = field(default_factory=list)
    connects: list[ConnectRequest] = field(default_factory=list)
    flaky_left: int = 1
    server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, self.ip, 15008)

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await serve_hbone(reader, writer, self._stream)

    async def _stream(self, req: ConnectRequest, respond: Any) -> None:
        self.connects.append(req)
        stream = await respond(200)
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = await stream.read(65536)
                if not data:
                    stream.write_eof()
                    return
                buf += data
            head, buf = buf.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ")
            headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
            length = int(headers.get("content-length", "0"))
            while len(buf) < length:
                buf += await stream.read(65536)
            body, buf = buf[:length], buf[length:]
            self.seen.append(Seen(req.authority, {k: v for k, v in req.headers if not k.startswith(":")},
                                  method, target, headers, body))
            url = urlsplit(target)
            ms = parse_qs(url.query).get("ms")
            if ms:
                await asyncio.sleep(int(ms[0]) / 1000)
            if url.path == "/reset-before":
                stream.close()
                return
            if url.path == "/reset-mid":
                stream.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"x" * 10)
                await stream.drain()
                await asyncio.sleep(0.05)
                stream.close()
                return
            if url.path == "/chunked":
                stream.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-backend: " + self.name.encode()
                             + b"\r\n\r\n")
                for part in (b"one ", b"two ", b"three\n"):
                    stream.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                    await stream.drain()
                stream.write(b"0\r\n\r\n")
                continue
            status = 200
            if url.path.startswith("/status/"):
                status = int(url.path.rsplit("/", 1)[1])
            if url.path == "/flaky" and self.flaky_left > 0:
                self.flaky_left -= 1
                status = 503
            text = f"{self.name}\n".encode()
            stream.write(f"HTTP/1.1 {status} X\r\ncontent-length: {len(text)}\r\nx-backend: {self.name}\r\n"
                         f"server: tiny\r\n\r\n".encode() + text)
            await stream.drain()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


# ------------------------------------------------------------------------------------ the rig
class Rig:
    """A WaypointProxy with real upstream HBONE to the test backends, and clients that open
    tunnels to it over socketpairs (as the source ztunnel would)."""

    def __init__(self, tmp: Path, snapshot: dict) -> None:
        self.events: list[dict] = []
        self.logs: list[str] = []
        self.flow_path = tmp / "flows.mitm"
        self.metrics = Metrics()

        async def no_tls() -> None:
            return None

        self.upstream = HboneUpstream(no_tls, upstream_san_prefix(TD, "default"), connect_timeout=2)
        self.proxy = WaypointProxy(self.upstream, identity=WAYPOINT_ID, emit=self._emit,
                                   write_access_log=self.logs.append, metrics=self.metrics,
                                   flows=FlowFile(self.flow_path), pod="waypoint-0", rng=random.Random(7))
        self.proxy.update_config(build_waypoint_config(snapshot, "default", "waypoint"))
        self.backends = {"v1": HttpBackend("v1", V1_IP), "v2": HttpBackend("v2", V2_IP)}
        self.clients: list[HboneConnection] = []
        self.tasks: list[asyncio.Task] = []

    def _emit(self, kind: str, msg: str, *, pod: str = "", flow: str = "", **fields: Any) -> None:
        json.dumps(fields, default=str)  # what EventEmitter would send must be JSON-able
        self.events.append({"kind": kind, "msg": msg, "pod": pod, "flow": flow, "fields": fields})

    async def start(self) -> "Rig":
        for b in self.backends.values():
            await b.start()
        return self

    async def tunnel(self, authority: str = "10.96.0.10:80", identity: Identity | None = CLIENT_ID,
                     flow: str = FLOW) -> HboneStream:
        a, b = socket.socketpair()
        sr, sw = await asyncio.open_connection(sock=a)
        cr, cw = await asyncio.open_connection(sock=b)
        peer = TunnelPeer(identity, CLIENT_ADDR)
        self.tasks.append(asyncio.create_task(
            serve_hbone(sr, sw, lambda req, respond: self.proxy.handle_connect(req, respond, peer))))
        client = HboneConnection(cr, cw)
        self.clients.append(client)
        hreq = create_hbone_request(*authority.rsplit(":", 1)[0:1], int(authority.rsplit(":", 1)[1]),
                                    src_ip=CLIENT_ADDR[0], src_port=51234,
                                    service_host="svc.default.svc.cluster.local",
                                    baggage=Baggage(cluster_name="Kubernetes", namespace="default",
                                                    workload_kind="deployment", workload_name="client",
                                                    service_name="client", service_version="v1"),
                                    trace_id=flow)
        _, _, stream = await client.connect_stream(hreq.authority, hreq.headers)
        return stream

    async def close(self) -> None:
        for c in self.clients:
            await c.aclose()
        await self.proxy.close()
        await self.upstream.close()
        for b in self.backends.values():
            await b.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def of_kind(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["kind"] == kind]


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    raw_head: str


async def read_response(stream: HboneStream, buf: bytearray, method: str = "GET") -> Response:
    """A minimal HTTP/1.1 response reader (independent of the waypoint's)."""
    while b"\r\n\r\n" not in buf:
        data = await stream.read(65536)
        if not data:
            raise EOFError(bytes(buf))
        buf += data
    idx = buf.index(b"\r\n\r\n")
    head = bytes(buf[:idx]).decode("latin-1")
    del buf[:idx + 4]
    lines = head.split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}

    async def need(n: int) -> None:
        while len(buf) < n:
            data = await stream.read(65536)
            if not data:
                raise EOFError(bytes(buf))
            buf.extend(data)

    body = b""
    if method == "HEAD" or status in (204, 304):
        pass
    elif "content-length" in headers:
        n = int(headers["content-length"])
        await need(n)
        body = bytes(buf[:n])
        del buf[:n]
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            while b"\r\n" not in buf:
                await need(len(buf) + 1)
            line, _, _ = bytes(buf).partition(b"\r\n")
            size = int(line, 16)
            del buf[:len(line) + 2]
            await need(size + 2)
            body += bytes(buf[:size])
            del buf[:size + 2]
            if size == 0:
                break
    else:
        while data := await stream.read(65536):
            buf.extend(data)
        body = bytes(buf)
        buf.clear()
    return Response(status, headers, body, head)


async def get(stream: HboneStream, path: str = "/", method: str = "GET", headers: str = "",
              body: bytes = b"", buf: bytearray | None = None) -> Response:
    buf = buf if buf is not None else bytearray()
    extra = f"content-length: {len(body)}\r\n" if body else ""
    stream.write(f"{method} {path} HTTP/1.1\r\nhost: svc:80\r\nuser-agent: test\r\n{headers}{extra}\r\n".encode()
                 + body)
    return await read_response(stream, buf, method)


@pytest.fixture
async def rig(tmp_path: Path):
    r = await Rig(tmp_path, waypoint_snapshot(PODS, rules=RULES)).start()
    yield r
    await r.close()


PODS = [pod("svc-v1-0", V1_IP, "v1"), pod("svc-v2-0", V2_IP, "v2")]
ONLY_V1 = [{"name": "svc-v1", "port": 80}]
RULES = [
    {"matches": [{"path": {"type": "PathPrefix", "value": "/timeout"}}], "backendRefs": ONLY_V1,
     "timeouts": {"request": "300ms"}},
    {"matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}], "backendRefs": ONLY_V1},
    {"matches": [{"path": {"type": "Exact", "value": "/flaky"}}, {"path": {"type": "PathPrefix", "value": "/reset"}},
                 {"path": {"type": "PathPrefix", "value": "/status"}}, {"path": {"type": "Exact", "value": "/chunked"}}],
     "backendRefs": ONLY_V1, "retry": {"codes": [503]}},  # Istio retries no status code unless a route lists it
    {"matches": [{"path": {"type": "Exact", "value": "/mirror"}}], "backendRefs": ONLY_V1,
     "filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "svc-v2", "port": 80}}},
                 {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-lab", "value": "1"}]}},
                 {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"add": [{"name": "x-out",
                                                                                        "value": "2"}]}}]},
    {"matches": [{"path": {"type": "Exact", "value": "/nowhere"}}], "backendRefs": [{"name": "nope", "port": 80}]},
    {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}], **SPLIT_RULE},
]


# ------------------------------------------------------------------------------------ parsing
def reader_of(data: bytes) -> HttpReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return HttpReader(r, chunk=7)  # small reads: every boundary falls inside a read somewhere


async def test_keep_alive_pipelined_requests_and_chunked_bodies():
    data = (b"\r\nGET /a?x=1 HTTP/1.1\r\nHost: svc\r\nX-Multi: 1\r\nX-Multi: 2\r\n\r\n"
            b"POST /b HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
            b"PUT /c HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc")
    r = reader_of(data)
    a = await read_request(r)
    assert a is not None and (a.method, a.target, a.keep_alive, a.body) == ("GET", "/a?x=1", True, b"")
    assert [v for k, v in a.headers if k == "X-Multi"] == ["1", "2"]  # order and repeats kept
    b = await read_request(r)
    assert b is not None and b.body == b"hello world" and b.chunked and b.keep_alive
    c = await read_request(r)
    assert c is not None and c.body == b"abc" and not c.keep_alive
    assert await read_request(r) is None  # clean end of stream


async def test_http10_closes_unless_keep_alive():
    r = reader_of(b"GET / HTTP/1.0\r\n\r\nGET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    first, second = await read_request(r), await read_request(r)
    assert first is not None and not first.keep_alive  # no Host needed in HTTP/1.0
    assert second is not None and second.keep_alive


@pytest.mark.parametrize("raw, status, details", [
    (b"GARBAGE\r\n\r\n", 400, "http1.codec_error"),
    (b"GET / HTTP/9\r\nHost: a\r\n\r\n", 400, "http1.codec_error"),
    (b"GET / HTTP/1.1\r\n\r\n", 400, "missing_host_header"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n", 400, "http1.codec_error"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400,
     "http1.codec_error"),  # request smuggling shape
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400, "http1.codec_error"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "http1.codec_error"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nshort", 400, "http1.codec_error"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: y", 400, "http1.codec_error"),  # ends inside the head
    (b"CONNECT 10.0.0.1:80 HTTP/1.1\r\nHost: a\r\n\r\n", 400, "http1.codec_error"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (61 * 1024) + b"\r\n\r\n", 431, "http1.headers_too_large"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999\r\n\r\n", 413, "request_payload_too_large"),
])
async def test_requests_the_waypoint_refuses(raw: bytes, status: int, details: str):
    with pytest.raises(HttpError) as err:
        await read_request(reader_of(raw))
    assert (err.value.status, err.value.details) == (status, details)


async def test_just_under_60k_of_headers_is_fine():
    raw = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (59 * 1024) + b"\r\n\r\n"
    req = await read_request(reader_of(raw))
    assert req is not None and len(req.headers) == 2


async def test_expect_continue_is_answered_before_the_body():
    sent = []

    async def cont() -> None:
        sent.append(True)

    req = await read_request(reader_of(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                                       b"Content-Length: 2\r\n\r\nhi"), on_continue=cont)
    assert sent == [True] and req is not None and req.body == b"hi"
    assert all(k.lower() != "expect" for k, _ in req.headers)


def test_upstream_san_prefix_is_istios_namespace_prefix():
    prefix = upstream_san_prefix(TD, "default")
    assert prefix == "spiffe://cluster.local/ns/default/sa/"
    assert matching_san([Identity.of("default", "svc-v1")], prefix) == Identity.of("default", "svc-v1")
    assert matching_san([Identity.of("other", "svc-v1")], prefix) is None  # another namespace: refused
    assert matching_san([Identity("evil.td", "default", "x")], prefix) is None


# ------------------------------------------------------------------------------------ the pipeline
async def test_canary_split_on_kept_alive_tunnels(rig: Rig):
    stream = await rig.tunnel()
    buf = bytearray()
    names = Counter()
    for _ in range(200):
        resp = await get(stream, "/", buf=buf)
        assert resp.status == 200 and resp.headers["server"] == "istio-envoy"
        assert "x-envoy-upstream-service-time" in resp.headers
        names[resp.body.decode().strip()] += 1
    assert names["v1"] + names["v2"] == 200 and 160 <= names["v1"] <= 195, names  # ~90/10 (seeded rng)
    # Upstream HTTP/1.1 connections are kept alive: a handful of CONNECT streams, not 200.
    connects = rig.backends["v1"].connects + rig.backends["v2"].connects
    assert 2 <= len(connects) <= 10, len(connects)
    for b in rig.backends.values():
        for c in b.connects:
            assert c.authority == f"{b.ip}:8080"  # podIP:targetPort, not the VIP
            assert parse_traceparent(c.get("traceparent")).trace_id == FLOW  # one flow id end to end
            assert parse_forwarded(c.get("forwarded")).for_addr == f"{CLIENT_ADDR[0]}:51234"
            assert "k8s.deployment.name=waypoint" in c.get("baggage")
        for s in b.seen:
            assert s.headers["host"] == "svc:80" and s.headers["x-forwarded-proto"] == "http"
            assert s.headers["x-request-id"]
    assert len(rig.logs) == 200 and all('"GET / HTTP/1.1" 200 - via_upstream' in line for line in rig.logs)
    assert f'flow="{FLOW}"' in rig.logs[0] and 'src.identity="spiffe://cluster.local/ns/default/sa/client"' in rig.logs[0]
    assert "inbound-vip|80|http|svc-v" in rig.logs[0] and "default.svc-split.5" in rig.logs[-1]
    flows = read_flows(rig.flow_path)
    assert len(flows) == 200 and flows[0].request.path == "/" and flows[0].response.status_code == 200
    assert flows[0].metadata["ambient-lab"]["flow_id"] == FLOW
    assert flows[0].client_conn.peername == (CLIENT_ADDR[0], 51234)
    # the backend's reason phrase, as sent ("X"), without the line's CRLF: mitmdump prints one line
    assert flows[0].response.reason == "X" and format_flow_line(flows[0]).count("\n") == 1
    assert rig.metrics.requests_total(response_code="200", reporter="waypoint",
                                      source_workload="client") == 200
    kinds = {e["kind"] for e in rig.events}
    assert {"waypoint.tunnel.in", "waypoint.request", "waypoint.authz", "waypoint.route", "waypoint.tunnel.out",
            "waypoint.response"} <= kinds
    assert {e["flow"] for e in rig.events} == {FLOW} and {e["pod"] for e in rig.events} == {"waypoint-0"}
    route = rig.of_kind("waypoint.route")[0]["fields"]
    assert route["weights"] == [{"backend": "default/svc-v1:80", "weight": 90},
                                {"backend": "default/svc-v2:80", "weight": 10}]
    out = rig.of_kind("waypoint.tunnel.out")[0]["fields"]
    assert out["identity"] == str(WAYPOINT_ID) and out["reused"] is False


async def test_l7_policy_denies_delete_with_403(rig: Rig):
    stream = await rig.tunnel()
    resp = await get(stream, "/v1/x", method="DELETE")
    assert resp.status == 403 and resp.body == b"RBAC: access denied"
    assert rig.backends["v1"].seen == []  # never left the waypoint
    assert (await get(stream, "/v1/x")).status == 200  # the tunnel carries on
    authz = rig.of_kind("waypoint.authz")
    assert authz[0]["fields"]["allowed"] is False and authz[0]["fields"]["policy"] == "default/deny-delete"
    assert "rbac_access_denied_matched_policy[ns[default]-policy[deny-delete]-rule[0]]" in rig.logs[0]
    assert "403" in rig.logs[0] and 'policy="explicitly denied by: default/deny-delete"' in rig.logs[0]
    # The route was resolved before RBAC ran (Envoy caches it first): the denied line names it.
    assert " inbound-vip|80|http|svc-v1.default.svc.cluster.local " in rig.logs[0]
    assert " default.svc-split.1 " in rig.logs[0]


async def test_unknown_authority_is_refused_with_503(rig: Rig):
    with pytest.raises(HboneHttpError) as err:
        await rig.tunnel("10.96.0.99:80")
    assert err.value.status == 503
    with pytest.raises(HboneHttpError):
        await rig.tunnel("10.96.0.10:81")  # the VIP, but not a port of the Service
    ev = rig.of_kind("waypoint.tunnel.in")
    assert [e["fields"]["accepted"] for e in ev] == [False, False]


async def test_malformed_request_gets_400_and_the_stream_closes(rig: Rig):
    stream = await rig.tunnel()
    assert (await get(stream, "/v1")).status == 200
    stream.write(b"NOT HTTP AT ALL\r\n\r\n")
    buf = bytearray()
    resp = await read_response(stream, buf)
    assert resp.status == 400 and resp.headers["connection"] == "close"
    assert await stream.read(10) == b""  # the server ended the stream after its 400
    assert '"- - HTTP/1.1" 400 DPE http1.codec_error' in rig.logs[-1]  # Envoy's downstream protocol error
    other = await rig.tunnel()  # the HBONE connection and other tunnels are fine
    assert (await get(other, "/v1")).status == 200


async def test_oversized_header_block_gets_431(rig: Rig):
    stream = await rig.tunnel()
    resp = await get(stream, "/v1", headers="x-big: " + "a" * (70 * 1024) + "\r\n")
    assert resp.status == 431
    assert await stream.read(10) == b""
    assert " 431 DPE http1.headers_too_large " in rig.logs[-1]


async def test_chunked_request_and_response_and_no_route(rig: Rig):
    stream = await rig.tunnel()
    buf = bytearray()
    stream.write(b"POST /v1/up HTTP/1.1\r\nhost: svc\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert (await read_response(stream, buf)).status == 200
    seen = rig.backends["v1"].seen[-1]
    assert seen.body == b"abc" and seen.headers["content-length"] == "3" and "transfer-encoding" not in seen.headers
    resp = await get(stream, "/chunked", buf=buf)
    assert resp.body == b"one two three\n" and resp.headers["transfer-encoding"] == "chunked"
    assert resp.headers["x-backend"] == "v1"
    resp = await get(stream, "/nowhere", buf=buf)
    assert resp.status == 500  # an unresolved backendRef keeps its traffic and answers 500


async def test_a_route_that_lists_503_retries_it_on_another_try(rig: Rig):
    stream = await rig.tunnel()
    resp = await get(stream, "/flaky")
    assert resp.status == 200 and resp.body == b"v1\n"
    assert [s.path for s in rig.backends["v1"].seen] == ["/flaky", "/flaky"]
    retry = rig.of_kind("waypoint.retry")
    assert len(retry) == 1 and retry[0]["fields"]["outcome"] == 503
    assert rig.logs[-1].endswith('attempts="2"')
    assert (await get(stream, "/status/503")).status == 503  # 3 tries, then the last answer
    assert [s.path for s in rig.backends["v1"].seen].count("/status/503") == 3
    assert " 503 URX via_upstream " in rig.logs[-1]


async def test_connect_failure_is_retried_then_503_uf(tmp_path: Path):
    pods = [pod("svc-v1-0", DEAD_IP, "v1")]  # nothing listens on its 15008
    r = await Rig(tmp_path, waypoint_snapshot(pods, rules=RULES)).start()
    try:
        stream = await r.tunnel()
        resp = await get(stream, "/v1")
        assert resp.status == 503
        assert resp.body.startswith(b"upstream connect error or disconnect/reset before headers")
        assert " 503 UF,URX upstream_reset_before_response_started{connection_failure} " in r.logs[-1]
        assert len(r.of_kind("waypoint.retry")) == 2 and r.logs[-1].endswith('attempts="3"')
        assert r.proxy.stats["upstream_cx_connect_fail"] == 3
    finally:
        await r.close()


async def test_request_timeout_gives_504_ut(rig: Rig):
    stream = await rig.tunnel()
    t0 = asyncio.get_running_loop().time()
    resp = await get(stream, "/timeout?ms=2000")
    elapsed = asyncio.get_running_loop().time() - t0
    assert resp.status == 504 and resp.body == b"upstream request timeout" and elapsed < 1.5
    assert " 504 UT response_timeout " in rig.logs[-1]
    assert f'"{V1_IP}:8080"' in rig.logs[-1] and 'upstream.pod="svc-v1-0"' in rig.logs[-1]  # the pod it waited for
    assert (await get(stream, "/v1")).status == 200  # the client's tunnel is fine
    assert rig.proxy.backends[("default", "svc-v1", 80)].breaker.in_flight == 0  # nothing leaked


async def test_backend_reset_before_the_response_is_503_uc(rig: Rig):
    stream = await rig.tunnel()
    resp = await get(stream, "/reset-before")
    assert resp.status == 503 and b"connection termination" in resp.body
    assert " 503 UC upstream_reset_before_response_started{connection_termination} " in rig.logs[-1]
    assert len(rig.backends["v1"].seen) == 1  # a reset is not retried by Istio's default policy


async def test_backend_reset_mid_response_resets_the_client_stream(rig: Rig):
    stream = await rig.tunnel()
    stream.write(b"GET /reset-mid HTTP/1.1\r\nhost: svc\r\n\r\n")
    got = b""
    with pytest.raises(ConnectionResetError):
        while chunk := await stream.read(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 200 OK") and got.endswith(b"x" * 10)
    assert " 200 UC upstream_reset_after_response_started{connection_termination} " in rig.logs[-1]
    flows = read_flows(rig.flow_path)
    assert flows[-1].error is not None and flows[-1].response.status_code == 200


async def test_circuit_breaker_overflow_is_503_uo(tmp_path: Path):
    dr = k8s("DestinationRule", "svc-v1", {"host": "svc-v1", "trafficPolicy": {"connectionPool": {
        "http": {"http2MaxRequests": 1}}}}, api="networking.istio.io/v1")
    r = await Rig(tmp_path, waypoint_snapshot(PODS, rules=RULES, objects=[dr])).start()
    try:
        a, b = await r.tunnel(), await r.tunnel()
        slow = asyncio.create_task(get(a, "/v1/slow?ms=400"))
        await asyncio.sleep(0.15)
        fast = await get(b, "/v1/fast")
        assert fast.status == 503 and fast.body.endswith(b"reset reason: overflow")
        assert (await slow).status == 200
        assert any(" 503 UO upstream_reset_before_response_started{overflow} " in line for line in r.logs)
        assert r.of_kind("waypoint.breaker")[0]["fields"]["event"] == "overflow"
        assert (await get(b, "/v1/again")).status == 200  # the slot is free again
    finally:
        await r.close()


async def test_mirror_is_fire_and_forget_and_filters_apply(rig: Rig):
    stream = await rig.tunnel()
    resp = await get(stream, "/mirror")
    assert resp.status == 200 and resp.body == b"v1\n" and resp.headers["x-out"] == "2"
    assert rig.backends["v1"].seen[-1].headers["x-lab"] == "1"
    for _ in range(100):
        if rig.of_kind("waypoint.mirror"):
            break
        await asyncio.sleep(0.01)
    shadow = rig.backends["v2"].seen[-1]
    assert shadow.path == "/mirror" and shadow.headers["host"] == "svc-shadow:80"
    assert rig.of_kind("waypoint.mirror")[0]["fields"]["status"] == 200


async def test_connection_close_and_http10_end_the_tunnel(rig: Rig):
    stream = await rig.tunnel()
    resp = await get(stream, "/v1", headers="connection: close\r\n")
    assert resp.status == 200 and resp.headers["connection"] == "close"
    assert await stream.read(10) == b""
    stream = await rig.tunnel()
    stream.write(b"GET /chunked HTTP/1.0\r\n\r\n")
    resp = await read_response(stream, bytearray())
    assert resp.body == b"one two three\n" and "transfer-encoding" not in resp.headers  # read until close


def test_admin_config_dump_and_responses():
    cfg = build_waypoint_config(waypoint_snapshot(PODS), "default", "waypoint")
    dump = json.loads(json.dumps(config_dump(cfg, san_prefix="spiffe://cluster.local/ns/default/sa/")))
    assert dump["waypoint"] == "default/waypoint" and dump["identity"] == str(WAYPOINT_ID)
    chains = dump["listeners"][1]["filter_chains"]
    assert chains == [{"destination": "10.96.0.10:80", "service": "svc.default.svc.cluster.local",
                       "cluster": "inbound-vip|80|http|svc.default.svc.cluster.local"}]
    assert dump["listeners"][2]["san_prefix"] == "spiffe://cluster.local/ns/default/sa/"
    rules = dump["services"][0]["routes"][0]["rules"]
    assert rules[0]["backends"] == [{"backend": "default/svc-v1:80", "weight": 90, "problem": "", "filters": []},
                                    {"backend": "default/svc-v2:80", "weight": 10, "problem": "", "filters": []}]
    clusters = {c["name"]: c for c in dump["clusters"]}
    assert [e["address"] for e in clusters["inbound-vip|80|http|svc-v2.default.svc.cluster.local"]["endpoints"]] == \
        [f"{V2_IP}:8080"]
    assert dump["policies"] == [{"policy": "default/deny-delete", "action": "DENY", "dry_run": False, "rules": 1,
                                 "scope": "service", "warnings": []}]
    assert config_dump(None)["listeners"] == []
    assert admin_response({"op": "ready"}, {"ready": lambda: True}) == {"ready": True}
    assert "error" in admin_response({"op": "nope"}, {"ready": lambda: True})
    assert "error" in admin_response(["x"], {})


def test_snapshot_is_not_modified_by_the_config_builder():
    snap = waypoint_snapshot(PODS)
    before = copy.deepcopy(snap)
    build_waypoint_config(snap, "default", "waypoint")
    assert snap == before


async def test_config_changes_apply_to_the_next_request_of_an_open_tunnel(rig: Rig):
    stream = await rig.tunnel()
    buf = bytearray()
    assert (await get(stream, "/v1", method="DELETE", buf=buf)).status == 403
    rig.proxy.update_config(build_waypoint_config(waypoint_snapshot(PODS, rules=RULES, deny_delete=False),
                                                  "default", "waypoint"))
    assert (await get(stream, "/v1", method="DELETE", buf=buf)).status == 200  # the policy is gone
    snap = waypoint_snapshot(PODS, rules=RULES)
    snap["services"][0]["labels"] = {}  # svc no longer uses the waypoint
    rig.proxy.update_config(build_waypoint_config(snap, "default", "waypoint"))
    resp = await get(stream, "/v1", buf=buf)
    assert resp.status == 503 and resp.headers["connection"] == "close"
    assert await stream.read(10) == b""
    with pytest.raises(HboneHttpError):
        await rig.tunnel()  # and new tunnels to its VIP are refused


async def test_outlier_detection_ejects_a_dead_endpoint(tmp_path: Path):
    pods = [*PODS, pod("svc-v1-1", DEAD_IP, "v1")]  # a second v1 endpoint where nothing listens
    dr = k8s("DestinationRule", "svc-v1", {"host": "svc-v1", "trafficPolicy": {"outlierDetection": {
        "consecutive5xxErrors": 1, "interval": "10s", "baseEjectionTime": "30s", "maxEjectionPercent": 100}}},
        api="networking.istio.io/v1")
    r = await Rig(tmp_path, waypoint_snapshot(pods, rules=RULES, objects=[dr])).start()
    try:
        stream = await r.tunnel()
        buf = bytearray()
        for _ in range(12):
            assert (await get(stream, "/v1", buf=buf)).status == 200  # a failed try is retried elsewhere
        ejected = [e for e in r.of_kind("waypoint.breaker") if e["fields"]["event"] == "ejected"]
        assert [e["fields"]["endpoint"] for e in ejected] == [f"{DEAD_IP}:8080"]
        assert r.proxy.stats["upstream_cx_connect_fail"] == 1  # never tried again while ejected
        assert r.proxy.backends[("default", "svc-v1", 80)].outlier.is_ejected(f"{DEAD_IP}:8080")
    finally:
        await r.close()
