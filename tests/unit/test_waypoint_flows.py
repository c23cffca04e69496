"""Requests saved as mitmproxy flows (no root): read back with mitmproxy's FlowReader and with the
real `mitmdump -nr`."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

from mitmproxy import http, io
from mitmproxy.io import tnetstring

from lab.waypoint.flows import (
    METADATA_KEY,
    FlowFile,
    flow_state,
    format_flow_line,
    make_flow,
    read_flows,
    tnetstring_dumps,
)
from tests.unit.test_waypoint_telemetry import T0, record

PAGE = b"<html><head><title>Simple Bookstore App</title></head>" + b"x" * 2000


def sample_flows():
    ok = make_flow(record(method="GET", path="/productpage?u=normal", status=200, authority="productpage:9080",
                          downstream_local="10.96.194.224:9080", upstream_host="10.244.1.3:9080",
                          route_name="default", bytes_sent=len(PAGE)),
                   request_headers=[("host", "productpage:9080"), ("user-agent", "curl/8.5.0")],
                   response_headers=[("content-type", "text/html")], response_body=PAGE,
                   extra={"waypoint": "default/waypoint"})
    denied = make_flow(record(method="DELETE", path="/productpage", status=403, authority="productpage:9080",
                              downstream_local="10.96.194.224:9080", upstream_host="", upstream_cluster="",
                              response_code_details="rbac_access_denied_matched_policy[none]",
                              policy="allow policies exist, but none allowed"),
                       response_body=b"RBAC: access denied")
    return ok, denied


def test_flow_fields() -> None:
    ok, denied = sample_flows()
    assert ok.client_conn.peername == ("10.244.1.3", 51234)
    assert ok.client_conn.sockname == ("10.96.194.224", 9080)
    assert ok.server_conn.address == ("10.244.1.3", 9080) and ok.server_conn.peername == ("10.244.1.3", 15008)
    assert ok.request.host == "10.96.194.224" and ok.request.port == 9080
    assert ok.request.headers["host"] == "productpage:9080" and ok.request.path == "/productpage?u=normal"
    assert ok.request.timestamp_start == T0 and ok.response.timestamp_end == T0 + 0.0127
    assert denied.server_conn.address is None and denied.response.reason == "Forbidden"
    assert denied.request.headers["host"] == "productpage:9080"  # added from the authority


def test_append_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "waypoint.flows"
    ok, denied = sample_flows()
    f = FlowFile(path)
    f.append(ok)
    FlowFile(path).append(denied)  # a second writer appends to the same file
    with open(path, "rb") as fo:
        flows = list(io.FlowReader(fo).stream())
    assert [(x.request.method, x.response.status_code) for x in flows] == [("GET", 200), ("DELETE", 403)]
    assert flows[0].response.content == PAGE
    meta = flows[0].metadata[METADATA_KEY]
    assert meta["flow_id"] == "ab" * 16 and meta["route"] == "default" and meta["waypoint"] == "default/waypoint"
    assert meta["source"]["principal"] == "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
    assert meta["destination"]["pod"] == "reviews-v1-xyz" and meta["upstream_host"] == "10.244.1.3:9080"
    assert meta["backend"] == "inbound-vip|9080|http|reviews-v1.default.svc.cluster.local"
    assert flows[1].metadata[METADATA_KEY]["policy"] == "allow policies exist, but none allowed"
    assert [x.id for x in read_flows(path)] == [x.id for x in flows] == [x.id for x in f.read()]


def test_mitmdump_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "waypoint.flows"
    for flow in sample_flows():
        FlowFile(path).append(flow)
    mitmdump = Path(sys.executable).parent / "mitmdump"
    env = dict(os.environ, HOME=str(tmp_path))  # nothing may land in the real home directory
    out = subprocess.run([str(mitmdump), "-nr", str(path), "--set", f"confdir={tmp_path / 'conf'}"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    printed = out.stdout.strip().splitlines()
    assert printed[0] == "10.244.1.3:51234: GET http://10.96.194.224:9080/productpage?u=normal"
    assert printed[1].strip() == "<< 200 OK 2.0k"
    assert printed[3].strip() == "<< 403 Forbidden 19b"
    expected = "\n".join(format_flow_line(f) for f in read_flows(path))
    assert out.stdout.strip("\n") == expected
    assert not (tmp_path / ".mitmproxy").exists()


def test_flow_state_is_mitmproxys_own_state_and_bytes() -> None:
    """The fast writer's state is exactly what mitmproxy's HTTPFlow.get_state() gives for the same
    flow, and its tnetstrings are byte for byte mitmproxy's."""
    rec = record(method="GET", path="/reset-mid", status=200, authority="flaky",
                 downstream_local="10.96.0.20:80", upstream_host="10.244.2.6:8080", route_name="default")
    for kw in ({}, {"error": "stream reset: upstream_reset_after_response_started{connection_termination}"},
               {"request_headers": [("host", "flaky"), ("x-é", "latin-1 \xe9")], "request_body": b"\x00\xff"}):
        state = flow_state(rec, response_headers=[("content-length", "1000")], response_body=b"x" * 100,
                           extra={"waypoint": "default/waypoint"}, **kw)
        flow = http.HTTPFlow.from_state(copy.deepcopy(state))
        assert flow.get_state() == state
        assert tnetstring_dumps(state) == tnetstring.dumps(state) == tnetstring.dumps(flow.get_state())
        assert (flow.error.msg if flow.error else "") == kw.get("error", "")
    for value in (None, True, False, 0, -7, 2**70, 1.5, 1e-9, b"", "", "é", [], (), {}, [1, [b"a", {"k": None}]],
                  {"a": 1, "b": {"c": (1.0, "x")}, "d": [True]}):
        assert tnetstring_dumps(value) == tnetstring.dumps(value), value


def test_flow_file_keeps_one_descriptor_and_whole_flows(tmp_path: Path) -> None:
    path = tmp_path / "waypoint.flows"
    f = FlowFile(path)
    ok, denied = sample_flows()
    f.append(ok.get_state())
    f.append(denied)
    assert [x.id for x in read_flows(path)] == [ok.id, denied.id]
    f.close()
    f.append(ok)  # reopens on demand
    assert len(read_flows(path)) == 3
    f.close()
