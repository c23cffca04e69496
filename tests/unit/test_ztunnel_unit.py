"""Unit tests (no root) of the lab's ztunnel: the outbound and inbound decisions, illegal ports,
SO_ORIGINAL_DST decoding, the state manager's decisions, the access-log format, the config, the
admin answers, and the relay's half-close over real socket pairs."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import struct

import pytest

from lab.common.admin_socket import admin_response
from lab.ztunnel.access_log import ConnectionResult, format_line, level, message, timestamp
from lab.ztunnel.config import ILLEGAL_PORTS, Config, parse_config
from lab.ztunnel.inpod.netns import NetnsID
from lab.ztunnel.inpod.statemanager import decide_add, pods_to_drain
from lab.ztunnel.proxy import CONNECTION_DRAIN, SelfCall, io_error, listener_plan, new_trace_id
from lab.ztunnel.proxy.decision import Passthrough
from lab.ztunnel.proxy.inbound_passthrough import inbound_target
from lab.ztunnel.proxy.outbound import check_target, http_status_error, passthrough_without_mesh
from lab.ztunnel.proxy.relay import Transferred, copy_bidirectional
from lab.ztunnel.socket import decode_original_dst, format_addr


# ------------------------------------------------------------------ original destination
def sockaddr_in(ip: str, port: int) -> bytes:
    """What the kernel returns for SO_ORIGINAL_DST: struct sockaddr_in (16 bytes)."""
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + socket.inet_aton(ip) + bytes(8)


@pytest.mark.parametrize("ip,port", [("10.244.2.7", 9080), ("10.96.0.10", 53), ("127.0.0.1", 1),
                                     ("255.255.255.255", 65535)])
def test_original_dst_decodes_sockaddr_in(ip, port):
    assert decode_original_dst(sockaddr_in(ip, port)) == (ip, port)


def test_original_dst_refuses_a_short_or_long_buffer():
    with pytest.raises(ValueError, match="expected 16 bytes"):
        decode_original_dst(sockaddr_in("10.0.0.1", 80)[:8])
    with pytest.raises(ValueError):
        decode_original_dst(sockaddr_in("10.0.0.1", 80) + b"\0")


def test_format_addr():
    assert format_addr(("10.9.0.3", 8080)) == "10.9.0.3:8080"
    assert format_addr(("fd00::1", 80)) == "[fd00::1]:80"
    assert format_addr(None) == ""


# ------------------------------------------------------------------ decisions
def test_illegal_ports_are_ztunnels_own():
    assert ILLEGAL_PORTS == {15001, 15006, 15008, 15080}
    assert [p for p, _ in listener_plan(Config("l", "n", "/z"))] == [15001, 15006, 15008]


@pytest.mark.parametrize("port", sorted(ILLEGAL_PORTS))
def test_outbound_refuses_a_recursive_call_to_loopback_only(port):
    with pytest.raises(SelfCall, match="^attempted recursive call to ourselves$"):
        check_target(("127.0.0.1", port))
    # another pod's ztunnel port is not a call to ourselves: it is planned, and that pod refuses it
    assert check_target(("10.244.2.7", port)) == ("10.244.2.7", port)


@pytest.mark.parametrize("target", [("10.244.2.7", 9080), ("10.96.0.10", 53), ("10.9.0.3", 15000),
                                    ("10.9.0.3", 15009), ("10.9.0.3", 15021), ("127.0.0.6", 80)])
def test_without_a_control_plane_everything_passes_through_as_tcp(target):
    assert check_target(target) == target
    req = passthrough_without_mesh(target)
    assert isinstance(req, Passthrough) and req.original_dst == target
    assert req.upstream == target and req.protocol == "TCP" and "no xDS config" in req.reason


def test_http_status_errors_read_like_ztunnels():
    assert http_status_error(401) == "http status: 401 Unauthorized"
    assert http_status_error(503) == "http status: 503 Service Unavailable"
    assert http_status_error(599) == "http status: 599"


def test_outbound_uses_the_configured_illegal_ports():
    assert check_target(("127.0.0.1", 15001), illegal_ports=frozenset()) == ("127.0.0.1", 15001)
    with pytest.raises(SelfCall):
        check_target(("127.0.0.1", 8080), illegal_ports=frozenset({8080}))


def test_inbound_target_is_the_original_destination_unless_it_is_ztunnel():
    assert inbound_target(("10.9.0.3", 8080)) == ("10.9.0.3", 8080)
    for port in ILLEGAL_PORTS:
        with pytest.raises(SelfCall):
            inbound_target(("10.9.0.3", port))


@pytest.mark.parametrize("current,new,action", [
    (None, NetnsID(4, 100), "start"),
    (NetnsID(4, 100), NetnsID(4, 100), "keep"),
    (NetnsID(4, 100), NetnsID(4, 101), "replace"),
    (NetnsID(4, 100), NetnsID(5, 100), "replace"),  # same inode on another device is another netns
])
def test_decide_add(current, new, action):
    assert decide_add(current, new) == action


def test_pods_to_drain_are_those_missing_from_the_snapshot():
    assert pods_to_drain(["c", "a", "b"], frozenset({"a"})) == ["b", "c"]
    assert pods_to_drain(["a"], frozenset({"a", "z"})) == []
    assert pods_to_drain([], frozenset()) == []


def test_trace_ids_are_32_hex_and_random():
    ids = {new_trace_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 32 and int(i, 16) >= 0 and i == i.lower() for i in ids)


def test_io_error_text_like_ztunnel():
    assert io_error(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")) == \
        "io error: Connection refused (os error 111)"
    assert io_error(TimeoutError()) == "connection timed out"


# ------------------------------------------------------------------ access log
OUT = ConnectionResult(direction="outbound", src_addr=("10.244.1.12", 58508), src_workload="sleep-7d9c",
                       src_namespace="default", dst_addr=("10.244.1.10", 9080), bytes_sent=80, bytes_recv=175,
                       duration_ms=1.4)


def test_access_log_complete_line_has_ztunnels_fields_in_order():
    assert message(OUT) == (
        'connection complete src.addr=10.244.1.12:58508 src.workload="sleep-7d9c" src.namespace="default" '
        'dst.addr=10.244.1.10:9080 direction="outbound" bytes_sent=80 bytes_recv=175 duration="1ms"')
    assert format_line(OUT, now=0.25) == "1970-01-01T00:00:00.250000Z\tinfo\taccess\t" + message(OUT)


def test_access_log_inbound_and_unknown_fields_left_out():
    r = ConnectionResult(direction="inbound", src_addr=("10.9.0.2", 4000), dst_addr=("10.9.0.3", 8080),
                         dst_workload="pod-b", dst_namespace="ns", bytes_sent=0, bytes_recv=5, duration_ms=12.6)
    text = message(r)
    assert text == ('connection complete src.addr=10.9.0.2:4000 dst.addr=10.9.0.3:8080 dst.workload="pod-b" '
                    'dst.namespace="ns" direction="inbound" bytes_sent=0 bytes_recv=5 duration="13ms"')
    assert "identity" not in text and "src.workload" not in text


def test_access_log_future_fields_have_ztunnels_shape():
    r = ConnectionResult(direction="outbound", src_addr=("10.0.0.1", 1), src_identity="spiffe://cluster.local/ns/a/sa/b",
                         dst_addr=("10.0.0.2", 15008), dst_hbone_addr=("10.0.0.2", 9080), dst_service="x.a.svc.cluster.local")
    assert ('dst.addr=10.0.0.2:15008 dst.hbone_addr="10.0.0.2:9080" dst.service="x.a.svc.cluster.local"'
            in message(r))
    assert 'src.identity="spiffe://cluster.local/ns/a/sa/b"' in message(r)


def test_access_log_failures():
    early = ConnectionResult(direction="outbound", src_addr=("10.9.0.2", 5), src_workload="a",
                             dst_addr=("10.9.0.3", 15001), bytes_sent=0, bytes_recv=0, duration_ms=0,
                             error="attempted recursive call to ourselves")
    assert message(early, failed=True) == ('connection failed src.addr=10.9.0.2:5 dst.addr=10.9.0.3:15001 '
                                           'direction="outbound" error="attempted recursive call to ourselves"')
    assert level(early, failed=True) == "warn"
    drained = ConnectionResult(direction="inbound", src_addr=("10.9.0.2", 5), bytes_sent=3, bytes_recv=4,
                               duration_ms=9, error=CONNECTION_DRAIN)
    assert message(drained).startswith("connection complete ")
    assert message(drained).endswith(' duration="9ms" error="connection closed due to connection drain"')
    assert level(drained) == "error" and level(OUT) == "info"


def test_access_log_quotes_strings_safely():
    r = ConnectionResult(direction="outbound", error='bad "thing"\n')
    assert message(r, failed=True) == 'connection failed direction="outbound" error="bad \\"thing\\"\\n"'


def test_timestamp_is_rfc3339_utc_micros():
    assert timestamp(1_700_000_000.1234567) == "2023-11-14T22:13:20.123457Z"
    assert timestamp(59.9999999) == "1970-01-01T00:01:00.000000Z"


# ------------------------------------------------------------------ config and admin
def test_parse_config_from_command_line_and_environment():
    cfg = parse_config(["--lab", "l", "--node", "l-worker", "--zds-socket", "/z.sock"], {})
    assert (cfg.lab, cfg.node, cfg.zds_socket, cfg.admin_socket) == ("l", "l-worker", "/z.sock", "")
    assert cfg.packet_mark == 1337 and cfg.port_reuse is True
    cfg = parse_config(["--lab", "l", "--node", "n", "--zds-socket", "/z", "--admin-socket", "/a"],
                       {"PACKET_MARK": "0x539", "INPOD_PORT_REUSE": "false"})
    assert (cfg.admin_socket, cfg.packet_mark, cfg.port_reuse) == ("/a", 0x539, False)
    assert not cfg.mesh and cfg.cert_ttl == 24 * 3600 and cfg.cert_dir == "/ztunnel-certs"


def test_parse_config_control_plane_flags():
    cfg = parse_config(["--lab", "l", "--node", "n", "--zds-socket", "/z", "--admin-socket", "/run/x/admin.sock",
                        "--xds-address", "172.18.0.2:15012", "--token-file", "/t", "--root-cert", "/r",
                        "--keylog", "/k", "--cert-ttl", "4"], {})
    assert cfg.mesh and (cfg.xds_address, cfg.token_file, cfg.root_cert) == ("172.18.0.2:15012", "/t", "/r")
    assert (cfg.keylog, cfg.cert_ttl, cfg.cert_dir) == ("/k", 4, "/run/x/ztunnel-certs")
    cfg = parse_config(["--lab", "l", "--node", "n", "--zds-socket", "/z"], {"SECRET_TTL": "60", "SSLKEYLOGFILE": "/kl"})
    assert (cfg.cert_ttl, cfg.keylog, cfg.cert_dir) == (60, "/kl", "")


@pytest.mark.parametrize("argv,env", [([], {}), (["--lab", "l", "--node", "n"], {}),
                                      (["--lab", "l", "--node", "n", "--zds-socket", "/z"], {"PACKET_MARK": "x"}),
                                      (["--lab", "l", "--node", "n", "--zds-socket", "/z"],
                                       {"INPOD_PORT_REUSE": "maybe"}),
                                      (["--lab", "l", "--node", "n", "--zds-socket", "/z", "--xds-address", "1.2.3.4:1"], {}),
                                      (["--lab", "l", "--node", "n", "--zds-socket", "/z", "--xds-address", "nope",
                                        "--token-file", "/t", "--root-cert", "/r"], {}),
                                      (["--lab", "l", "--node", "n", "--zds-socket", "/z", "--cert-ttl", "0"], {})])
def test_parse_config_usage_errors_exit_2(argv, env, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(argv, env)
    assert e.value.code == 2


def test_admin_response():
    ops = dict(workloads=lambda: [{"uid": "u"}], connections=lambda: [{"flow": "f"}], ready=lambda: True)
    assert admin_response({"op": "workloads"}, ops) == {"workloads": [{"uid": "u"}]}
    assert admin_response({"op": "connections"}, ops) == {"connections": [{"flow": "f"}]}
    assert admin_response({"op": "ready"}, ops) == {"ready": True}
    assert "unknown op 'config_dump'" in admin_response({"op": "config_dump"}, ops)["error"]
    assert "error" in admin_response(["workloads"], ops)
    assert "error" in admin_response({"op": 3}, ops)
    json.dumps(admin_response({"op": "workloads"}, ops))


# ------------------------------------------------------------------ relay (real sockets)
async def _stream_pair() -> tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter], socket.socket]:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    return await asyncio.open_connection(sock=ours), theirs


async def test_relay_keeps_the_reply_after_a_half_close_and_counts_bytes():
    loop = asyncio.get_running_loop()
    down, client = await _stream_pair()
    up, server = await _stream_pair()
    counts = Transferred()
    relay = asyncio.create_task(copy_bidirectional(down, up, counts))

    await loop.sock_sendall(client, b"request")
    client.shutdown(socket.SHUT_WR)  # the client is done sending, but waits for the answer
    got = b""
    while chunk := await loop.sock_recv(server, 100):
        got += chunk
    assert got == b"request"  # the EOF was passed on, not a close
    await loop.sock_sendall(server, b"the reply, after the client's EOF")
    server.shutdown(socket.SHUT_WR)
    reply = b""
    while chunk := await loop.sock_recv(client, 100):
        reply += chunk
    assert reply == b"the reply, after the client's EOF"
    await asyncio.wait_for(relay, 2)
    assert counts == Transferred(downstream_to_upstream=7, upstream_to_downstream=33)
    client.close()
    server.close()


async def test_relay_cancelled_midway_keeps_the_counts_and_closes_both_sides():
    loop = asyncio.get_running_loop()
    down, client = await _stream_pair()
    up, server = await _stream_pair()
    counts = Transferred()
    relay = asyncio.create_task(copy_bidirectional(down, up, counts))
    await loop.sock_sendall(client, b"12345")
    assert await loop.sock_recv(server, 100) == b"12345"
    relay.cancel()  # a drain
    with pytest.raises(asyncio.CancelledError):
        await relay
    assert counts.downstream_to_upstream == 5
    for peer in (client, server):
        try:
            assert await asyncio.wait_for(loop.sock_recv(peer, 100), 2) == b""
        except ConnectionResetError:
            pass
        peer.close()
