"""Unit tests for lab.kube.dns: the cluster DNS (CoreDNS stand-in), without root.

Queries are built by hand here (not with lab.kube.dns's own encoder) so that parse and build
are checked against the wire format, not against each other. The server tests use real
UDP/TCP sockets on 127.0.0.1 with an ephemeral port.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from lab.kube.dns import (
    DNSFormatError,
    DNSServer,
    Records,
    RecordStore,
    build_response,
    parse_query,
    resolv_conf,
)

ROOT = Path(__file__).resolve().parents[2]

RECORDS = Records(
    services={"productpage.default.svc.cluster.local": "10.96.12.34",
              "reviews.default.svc.cluster.local": "10.96.0.21"},
    pods={"10-244-1-5.default.pod.cluster.local": "10.244.1.5"},
)

A, SOA, AAAA, TXT = 1, 6, 28, 16


def wire_name(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p) + b"\x00"


def make_query(name: str, qtype: int = A, qid: int = 0xBEEF, flags: int = 0x0100,
               qclass: int = 1, edns: bool = False) -> bytes:
    header = struct.pack("!HHHHHH", qid, flags, 1, 0, 0, 1 if edns else 0)
    msg = header + wire_name(name) + struct.pack("!HH", qtype, qclass)
    if edns:  # OPT: root name, type 41, class = UDP size 1232, ttl 0, no rdata
        msg += b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0)
    return msg


def header(resp: bytes) -> dict:
    qid, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", resp)
    return {"id": qid, "qr": bool(flags & 0x8000), "aa": bool(flags & 0x0400), "tc": bool(flags & 0x0200),
            "rd": bool(flags & 0x0100), "rcode": flags & 0xF, "qd": qd, "an": an, "ns": ns, "ar": ar}


def ask(name: str, qtype: int = A, records: Records = RECORDS, **kw) -> bytes:
    return build_response(parse_query(make_query(name, qtype, **kw)), records)


# --- parsing -----------------------------------------------------------------------------


def test_parse_query_reads_header_and_question():
    q = parse_query(make_query("ProductPage.Default.svc.cluster.local", AAAA, qid=7))
    assert (q.id, q.question.name, q.question.qtype, q.question.qclass) == (
        7, "productpage.default.svc.cluster.local", AAAA, 1)
    assert q.recursion_desired and q.opcode == 0 and q.edns_udp_size is None
    assert q.raw_question == wire_name("ProductPage.Default.svc.cluster.local") + b"\x00\x1c\x00\x01"


def test_parse_query_notes_edns():
    assert parse_query(make_query("a.cluster.local", edns=True)).edns_udp_size == 1232


@pytest.mark.parametrize("data", [
    b"\x12\x34\x01",  # shorter than a header
    make_query("x.cluster.local", flags=0x8100),  # a response
    struct.pack("!HHHHHH", 1, 0, 2, 0, 0, 0) + wire_name("a.b") + b"\x00\x01\x00\x01" * 2,  # two questions
    make_query("x.cluster.local")[:-3],  # truncated question
    struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01",  # pointer to itself
    struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\x05ab",  # label runs off the end
])
def test_parse_query_rejects_malformed(data):
    with pytest.raises(DNSFormatError):
        parse_query(data)


# --- answers -----------------------------------------------------------------------------


def test_service_a_record_round_trip():
    query = make_query("productpage.default.svc.cluster.local", qid=0x1234)
    resp = build_response(parse_query(query), RECORDS)
    h = header(resp)
    assert h == {"id": 0x1234, "qr": True, "aa": True, "tc": False, "rd": True, "rcode": 0,
                 "qd": 1, "an": 1, "ns": 0, "ar": 0}
    question = query[12:]
    assert resp[12:12 + len(question)] == question  # the question is echoed
    answer = resp[12 + len(question):]
    # name = pointer to offset 12, type A, class IN, TTL 5, 4 bytes of address
    assert answer == b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 4) + bytes([10, 96, 12, 34])


def test_pod_record_and_case_insensitive_names():
    resp = ask("10-244-1-5.DEFAULT.pod.cluster.local")
    assert header(resp)["an"] == 1 and resp.endswith(bytes([10, 244, 1, 5]))
    assert b"DEFAULT" in resp  # the client's spelling is kept in the echoed question


def test_unknown_name_in_cluster_domain_is_nxdomain_with_soa():
    resp = ask("nope.default.svc.cluster.local")
    h = header(resp)
    assert (h["rcode"], h["an"], h["ns"], h["aa"]) == (3, 0, 1, True)
    assert wire_name("ns.dns.cluster.local") in resp  # the SOA's primary name server


def test_search_path_misses_are_nxdomain():
    # "productpage.default" tried with the first search suffix, as glibc does with ndots:5
    assert header(ask("productpage.default.default.svc.cluster.local"))["rcode"] == 3


def test_aaaa_of_known_name_is_nodata():
    h = header(ask("productpage.default.svc.cluster.local", AAAA))
    assert (h["rcode"], h["an"], h["ns"]) == (0, 0, 1)
    h = header(ask("productpage.default.svc.cluster.local", TXT))
    assert (h["rcode"], h["an"]) == (0, 0)


def test_empty_non_terminal_is_nodata_not_nxdomain():
    for name in ("default.svc.cluster.local", "svc.cluster.local", "cluster.local"):
        h = header(ask(name))
        assert (h["rcode"], h["an"]) == (0, 0), name


def test_zone_soa_is_answered():
    h = header(ask("cluster.local", SOA))
    assert (h["rcode"], h["an"], h["ns"]) == (0, 1, 0)


@pytest.mark.parametrize("name", ["example.com", "cluster.localhost", "local", "productpage"])
def test_names_outside_cluster_domain_are_refused(name):
    h = header(ask(name))
    assert (h["rcode"], h["an"], h["aa"]) == (5, 0, False)


def test_non_internet_class_is_refused_and_other_opcodes_not_implemented():
    assert header(ask("productpage.default.svc.cluster.local", qclass=3))["rcode"] == 5
    assert header(ask("productpage.default.svc.cluster.local", flags=0x1000))["rcode"] == 4  # STATUS


def test_edns_query_gets_an_opt_record_back():
    resp = ask("productpage.default.svc.cluster.local", edns=True)
    assert header(resp)["ar"] == 1
    assert resp.endswith(b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 0))


def test_oversized_udp_answer_is_truncated():
    query = parse_query(make_query("productpage.default.svc.cluster.local"))
    full = build_response(query, RECORDS)
    short = build_response(query, RECORDS, max_size=len(full) - 1)
    h = header(short)
    assert h["tc"] and h["an"] == 0 and len(short) < len(full)


def test_resolv_conf_is_the_kubelets():
    assert resolv_conf("bookinfo") == (
        "search bookinfo.svc.cluster.local svc.cluster.local cluster.local\n"
        "nameserver 10.96.0.10\n"
        "options ndots:5\n")
    assert "nameserver 10.96.0.53\n" in resolv_conf("default", nameserver="10.96.0.53")


# --- the records file --------------------------------------------------------------------


def write_records(path: Path, services: dict, pods: dict | None = None) -> None:
    """Write like the supervisor does: a temporary file renamed over the old one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"services": services, "pods": pods or {}}))
    os.replace(tmp, path)


def test_store_reloads_when_file_is_replaced(tmp_path):
    path = tmp_path / "records.json"
    write_records(path, {"a.default.svc.cluster.local": "10.96.0.1"})
    now = [100.0]
    store = RecordStore(str(path), min_interval=0.1, clock=lambda: now[0])
    assert store.get().services == {"a.default.svc.cluster.local": "10.96.0.1"}

    write_records(path, {"A.default.svc.cluster.local.": "10.96.0.2"})
    now[0] += 0.05  # within 100 ms: not checked yet
    assert store.get().address("a.default.svc.cluster.local") == "10.96.0.1"
    now[0] += 0.06
    assert store.get().address("a.default.svc.cluster.local") == "10.96.0.2"
    assert store.reloads == 2


def test_store_keeps_old_records_on_a_bad_file(tmp_path):
    path = tmp_path / "records.json"
    write_records(path, {"a.default.svc.cluster.local": "10.96.0.1"})
    logs: list[str] = []
    store = RecordStore(str(path), min_interval=0, log=logs.append)
    assert store.get().address("a.default.svc.cluster.local") == "10.96.0.1"
    path.write_text("{not json")
    assert store.get().address("a.default.svc.cluster.local") == "10.96.0.1"
    assert any("cannot load" in line for line in logs)


def test_store_without_file_is_empty(tmp_path):
    store = RecordStore(str(tmp_path / "missing.json"), min_interval=0)
    assert header(build_response(parse_query(make_query("a.default.svc.cluster.local")), store.get()))["rcode"] == 3


# --- the server over loopback ------------------------------------------------------------


def udp_ask(address, data: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.sendto(data, address)
        return s.recv(4096)


def tcp_ask(address, *messages: bytes) -> list[bytes]:
    out = []
    with socket.create_connection(address, timeout=3) as s:
        for data in messages:  # several queries on one connection
            s.sendall(struct.pack("!H", len(data)) + data)
            (n,) = struct.unpack("!H", s.recv(2, socket.MSG_WAITALL))
            out.append(s.recv(n, socket.MSG_WAITALL))
    return out


@pytest.fixture
def server(tmp_path):
    path = tmp_path / "records.json"
    write_records(path, {"productpage.default.svc.cluster.local": "10.96.12.34"})
    logs: list[str] = []
    srv = DNSServer(RecordStore(str(path), min_interval=0), "127.0.0.1", 0, log=logs.append).start()
    yield srv, path, logs
    srv.stop()


def test_server_answers_udp_and_tcp_and_logs_each_query(server):
    srv, _, logs = server
    resp = udp_ask(srv.address, make_query("productpage.default.svc.cluster.local", qid=11))
    assert header(resp)["id"] == 11 and resp.endswith(bytes([10, 96, 12, 34]))
    r1, r2 = tcp_ask(srv.address, make_query("productpage.default.svc.cluster.local", qid=12),
                     make_query("example.com", qid=13))
    assert header(r1)["an"] == 1 and header(r2)["rcode"] == 5
    assert len(logs) == 3
    assert re.search(r'127\.0\.0\.1:\d+ - 11 "A IN productpage\.default\.svc\.cluster\.local\. udp \d+" '
                     r"NOERROR .* answer=10\.96\.12\.34$", logs[0])
    assert '"A IN example.com. tcp' in logs[2] and "REFUSED" in logs[2]


def test_server_sees_a_rewritten_records_file(server):
    srv, path, _ = server
    assert header(udp_ask(srv.address, make_query("ratings.default.svc.cluster.local")))["rcode"] == 3
    write_records(path, {"ratings.default.svc.cluster.local": "10.96.0.99"})
    resp = udp_ask(srv.address, make_query("ratings.default.svc.cluster.local"))
    assert resp.endswith(bytes([10, 96, 0, 99]))


def test_server_answers_garbage_with_formerr(server):
    srv, _, _ = server
    resp = udp_ask(srv.address, struct.pack("!HHHHHH", 77, 0, 1, 0, 0, 0) + b"\x3f")
    assert header(resp)["id"] == 77 and header(resp)["rcode"] == 1


def test_module_entry_point(tmp_path):
    path = tmp_path / "records.json"
    write_records(path, {"productpage.default.svc.cluster.local": "10.96.12.34"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab.kube.dns", "--records", str(path), "--listen", "127.0.0.1", "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stdout:
            m = re.search(r"serving cluster\.local on 127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "no ready line"
        resp = udp_ask(("127.0.0.1", port), make_query("productpage.default.svc.cluster.local"))
        assert resp.endswith(bytes([10, 96, 12, 34]))
        assert "answer=10.96.12.34" in proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
