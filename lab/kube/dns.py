"""Cluster DNS: the lab's stand-in for CoreDNS behind the ``kube-dns`` Service (10.96.0.10).

Real counterpart: CoreDNS with its ``kubernetes`` plugin (coredns/coredns ``plugin/kubernetes``),
deployed in ``kube-system`` as the ``kube-dns`` Service, and the kubelet, which writes every
pod's ``/etc/resolv.conf`` to point at it.

How names work in a Kubernetes pod
----------------------------------
The kubelet gives each pod a resolv.conf like::

    search default.svc.cluster.local svc.cluster.local cluster.local
    nameserver 10.96.0.10
    options ndots:5

``ndots:5`` means: a name with fewer than five dots is first tried with each search suffix
appended. So ``curl http://productpage:9080`` makes the C library ask for
``productpage.default.svc.cluster.local`` (found), and ``productpage.default`` is found on
its second try. The DNS server answers, from the cluster's state:

* ``<service>.<namespace>.svc.cluster.local``  A -> the Service's ClusterIP;
* ``<a-b-c-d>.<namespace>.pod.cluster.local``  A -> the pod IP a.b.c.d (CoreDNS's
  ``pods verified`` mode: only for pods that exist);
* a name in ``cluster.local`` that does not exist -> NXDOMAIN, so the resolver moves on to
  the next search suffix;
* a name that exists but has no record of the asked type (AAAA in an IPv4 cluster) ->
  NODATA: NOERROR with an empty answer (and the zone's SOA, for negative caching);
* anything outside ``cluster.local`` -> REFUSED. A real CoreDNS forwards those upstream;
  the lab has no upstream (no internet), and says so instead of timing out.

The records come from a JSON file the supervisor rewrites (write to a temporary file, then
rename over the old one) whenever Services or pods change::

    {"services": {"productpage.default.svc.cluster.local": "10.96.12.34"},
     "pods": {"10-244-1-5.default.pod.cluster.local": "10.244.1.5"}}

The server notices a new file by its ``os.stat`` (inode, mtime, size), checked at most
every 100 ms, the way CoreDNS's cache of the API server is refreshed by a watch.

Run it: ``python -m lab.kube.dns --records FILE --listen 10.96.0.10 [--port 53]``. It serves
UDP and TCP (DNS over TCP: each message prefixed by its 2-byte length) and logs one
line per query to stdout, shaped like CoreDNS's ``log`` plugin, plus the answer.

Pure parts: :func:`parse_query`, :func:`decide`, :func:`build_response`,
:func:`resolv_conf`. Only :class:`DNSServer` touches sockets. Standard library only.
Not supported: SRV records, headless Services, PTR (reverse) lookups, wildcards.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lab.common.procname import name_process

CLUSTER_DOMAIN = "cluster.local"
DEFAULT_NAMESERVER = "10.96.0.10"
#: CoreDNS's kubernetes plugin answers with TTL 5 s by default.
TTL = 5

# Record types and response codes (RFC 1035, RFC 3596, RFC 6891).
TYPE_A, TYPE_NS, TYPE_SOA, TYPE_AAAA, TYPE_OPT, TYPE_ANY = 1, 2, 6, 28, 41, 255
CLASS_IN, CLASS_ANY = 1, 255
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5

TYPE_NAMES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 16: "TXT", 28: "AAAA", 33: "SRV",
              41: "OPT", 65: "HTTPS", 255: "ANY"}
RCODE_NAMES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}

# Header flag bits.
_QR, _AA, _TC, _RD, _RA = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080

_HEADER = struct.Struct("!HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount


class DNSFormatError(ValueError):
    """The message is not a well-formed DNS query (the server answers FORMERR)."""


# --- the wire format -------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    name: str  # lower case, no trailing dot ("" is the root)
    qtype: int
    qclass: int = CLASS_IN


@dataclass(frozen=True)
class Query:
    """A parsed DNS query: what :func:`build_response` needs to answer it."""

    id: int
    flags: int
    question: Question
    raw_question: bytes  # the question section as sent (echoed back, original case kept)
    edns_udp_size: int | None = None  # set when the query carried an EDNS0 OPT record

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def recursion_desired(self) -> bool:
        return bool(self.flags & _RD)


def _read_name(data: bytes, offset: int) -> tuple[str, int]:
    """Decode a (possibly compressed) domain name; return it and the offset after it."""
    labels: list[str] = []
    end = None
    jumps = 0
    while True:
        if offset >= len(data):
            raise DNSFormatError("name runs past the end of the message")
        length = data[offset]
        if length & 0xC0 == 0xC0:  # compression pointer
            if offset + 1 >= len(data):
                raise DNSFormatError("truncated compression pointer")
            if end is None:
                end = offset + 2
            jumps += 1
            if jumps > 32:
                raise DNSFormatError("compression loop")
            offset = ((length & 0x3F) << 8) | data[offset + 1]
            continue
        if length & 0xC0:
            raise DNSFormatError("unsupported label type")
        offset += 1
        if length == 0:
            break
        label = data[offset:offset + length]
        if len(label) != length:
            raise DNSFormatError("truncated label")
        labels.append(label.decode("ascii", errors="replace"))
        offset += length
    name = ".".join(labels)
    if len(name) > 253:
        raise DNSFormatError("name too long")
    return name, (end if end is not None else offset)


def encode_name(name: str) -> bytes:
    """Wire form of a domain name (uncompressed): length-prefixed labels, then a zero byte."""
    out = bytearray()
    for label in name.strip(".").split(".") if name.strip(".") else []:
        raw = label.encode("ascii")
        if not 0 < len(raw) < 64:
            raise ValueError(f"bad label in {name!r}")
        out += bytes([len(raw)]) + raw
    return bytes(out + b"\x00")


def parse_query(data: bytes) -> Query:
    """Parse a DNS query message (one question; an EDNS0 OPT record is noted, others skipped)."""
    if len(data) < _HEADER.size:
        raise DNSFormatError("shorter than a DNS header")
    qid, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    if flags & _QR:
        raise DNSFormatError("a response, not a query")
    if qdcount != 1:
        raise DNSFormatError(f"expected one question, got {qdcount}")
    name, offset = _read_name(data, _HEADER.size)
    if offset + 4 > len(data):
        raise DNSFormatError("truncated question")
    qtype, qclass = struct.unpack_from("!HH", data, offset)
    raw_question = data[_HEADER.size:offset + 4]
    offset += 4

    edns_udp_size = None
    for _ in range(ancount + nscount + arcount):
        _, offset = _read_name(data, offset)
        if offset + 10 > len(data):
            raise DNSFormatError("truncated resource record")
        rtype, rclass, _ttl, rdlength = struct.unpack_from("!HHIH", data, offset)
        offset += 10 + rdlength
        if offset > len(data):
            raise DNSFormatError("truncated record data")
        if rtype == TYPE_OPT:
            edns_udp_size = max(rclass, 512)
    return Query(qid, flags, Question(name.lower(), qtype, qclass), raw_question, edns_udp_size)


# --- the records and the decision ------------------------------------------------------


def _norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


@dataclass
class Records:
    """The cluster's DNS data: fully qualified names to IPv4 addresses."""

    services: dict[str, str] = field(default_factory=dict)
    pods: dict[str, str] = field(default_factory=dict)
    serial: int = 1  # the SOA serial (the supervisor's file mtime, when loaded from a file)

    @classmethod
    def from_json(cls, doc: dict, serial: int = 1) -> "Records":
        services = {_norm(k): str(v) for k, v in (doc.get("services") or {}).items()}
        pods = {_norm(k): str(v) for k, v in (doc.get("pods") or {}).items()}
        return cls(services, pods, serial)

    def address(self, name: str) -> str | None:
        return self.services.get(name) or self.pods.get(name)

    def name_exists(self, name: str, zone: str = CLUSTER_DOMAIN) -> bool:
        """True for a name with records, and for an "empty non-terminal" above one
        (``default.svc.cluster.local`` exists because a Service lives below it)."""
        if name == zone or self.address(name) is not None:
            return True
        suffix = "." + name
        return any(known.endswith(suffix) for known in (*self.services, *self.pods))


@dataclass(frozen=True)
class Decision:
    """What to answer: the response code, the A-record addresses, and whether to add the SOA."""

    rcode: int
    addresses: tuple[str, ...] = ()
    soa: bool = False  # SOA in the authority section (negative answers) or as the answer


def in_zone(name: str, zone: str = CLUSTER_DOMAIN) -> bool:
    return name == zone or name.endswith("." + zone)


def decide(question: Question, records: Records, zone: str = CLUSTER_DOMAIN) -> Decision:
    """The DNS server's decision for one question, as CoreDNS's kubernetes plugin makes it."""
    name = question.name
    if question.qclass not in (CLASS_IN, CLASS_ANY) or not in_zone(name, zone):
        return Decision(REFUSED)  # not our zone, and there is no upstream to forward to
    if not records.name_exists(name, zone):
        return Decision(NXDOMAIN, soa=True)
    address = records.address(name)
    if address is not None and question.qtype in (TYPE_A, TYPE_ANY):
        return Decision(NOERROR, (address,))
    # NODATA: the name exists, not with this type (AAAA in an IPv4 cluster). The SOA goes in
    # the authority section; a query for the zone's own SOA gets it as the answer.
    return Decision(NOERROR, soa=True)


def _soa_record(zone: str, serial: int) -> bytes:
    rdata = (encode_name(f"ns.dns.{zone}") + encode_name(f"hostmaster.{zone}")
             + struct.pack("!IIIII", serial & 0xFFFFFFFF, 7200, 1800, 86400, TTL))
    return encode_name(zone) + struct.pack("!HHIH", TYPE_SOA, CLASS_IN, TTL, len(rdata)) + rdata


def _a_record(address: str) -> bytes:
    # 0xC00C: compression pointer to the question's name, right after the 12-byte header.
    return struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, TTL, 4) + socket.inet_aton(address)


def _opt_record(udp_size: int) -> bytes:
    return b"\x00" + struct.pack("!HHIH", TYPE_OPT, udp_size, 0, 0)


def _header(query_id: int, query_flags: int, rcode: int, authoritative: bool,
            counts: tuple[int, int, int, int], truncated: bool = False) -> bytes:
    flags = _QR | (query_flags & 0x7800) | (query_flags & _RD) | rcode
    if authoritative:
        flags |= _AA
    if truncated:
        flags |= _TC
    return _HEADER.pack(query_id, flags, *counts)


def build_response(query: Query, records: Records, max_size: int | None = None,
                   zone: str = CLUSTER_DOMAIN) -> bytes:
    """The response message to ``query`` from ``records``.

    ``max_size`` is the UDP limit (512, or the client's EDNS0 size); a longer answer is sent
    with the TC bit and no records, telling the client to retry over TCP. None: no limit.
    """
    if query.opcode != 0:
        decision = Decision(NOTIMP)
    else:
        decision = decide(query.question, records, zone)
    answers = [_a_record(a) for a in decision.addresses]
    authority: list[bytes] = []
    if decision.soa:
        soa = _soa_record(zone, records.serial)
        if decision.rcode == NOERROR and query.question.name == zone and query.question.qtype == TYPE_SOA:
            answers.append(soa)
        else:
            authority.append(soa)
    additional = [_opt_record(1232)] if query.edns_udp_size is not None else []
    authoritative = decision.rcode in (NOERROR, NXDOMAIN)
    counts = (1, len(answers), len(authority), len(additional))
    message = (_header(query.id, query.flags, decision.rcode, authoritative, counts)
               + query.raw_question + b"".join(answers + authority + additional))
    if max_size is not None and len(message) > max_size:
        counts = (1, 0, 0, len(additional))
        message = (_header(query.id, query.flags, decision.rcode, authoritative, counts, truncated=True)
                   + query.raw_question + b"".join(additional))
    return message


def build_error(data: bytes, rcode: int = FORMERR) -> bytes | None:
    """A bare error response to an unparsable message (None when not even the ID is there)."""
    if len(data) < 4:
        return None
    qid, flags = struct.unpack_from("!HH", data)
    return _header(qid, flags, rcode, False, (0, 0, 0, 0))


def summarize(response: bytes) -> tuple[int, list[str]]:
    """Response code and A-record addresses of a response built by :func:`build_response`."""
    _, flags, qdcount, ancount, _, _ = _HEADER.unpack_from(response)
    offset = _HEADER.size
    for _ in range(qdcount):
        _, offset = _read_name(response, offset)
        offset += 4
    addresses = []
    for _ in range(ancount):
        _, offset = _read_name(response, offset)
        rtype, _, _, rdlength = struct.unpack_from("!HHIH", response, offset)
        offset += 10
        if rtype == TYPE_A:
            addresses.append(socket.inet_ntoa(response[offset:offset + 4]))
        offset += rdlength
    return flags & 0xF, addresses


def resolv_conf(namespace: str, nameserver: str = DEFAULT_NAMESERVER,
                cluster_domain: str = CLUSTER_DOMAIN) -> str:
    """The /etc/resolv.conf the kubelet writes for a pod in ``namespace`` (dnsPolicy ClusterFirst)."""
    return (f"search {namespace}.svc.{cluster_domain} svc.{cluster_domain} {cluster_domain}\n"
            f"nameserver {nameserver}\n"
            "options ndots:5\n")


# --- the records file ------------------------------------------------------------------


def load_records(path: str) -> Records:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    return Records.from_json(doc, serial=int(os.stat(path).st_mtime))


class RecordStore:
    """The records file, reloaded when it changes (checked at most every ``min_interval`` s).

    A change is a new (inode, mtime, size): the supervisor replaces the file by renaming a
    new one over it, so a reader never sees a half-written file. An unreadable file keeps
    the previous records (and is retried on the next check).
    """

    def __init__(self, path: str, min_interval: float = 0.1,
                 clock: Callable[[], float] = time.monotonic,
                 log: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.min_interval = min_interval
        self._clock = clock
        self._log = log
        self._lock = threading.Lock()
        self._key: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")
        self._records = Records()
        self.reloads = 0

    def get(self) -> Records:
        with self._lock:
            now = self._clock()
            if now - self._checked_at >= self.min_interval:
                self._checked_at = now
                self._maybe_reload()
            return self._records

    def _maybe_reload(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self._key:
            return
        try:
            self._records = load_records(self.path)
        except (OSError, ValueError) as exc:
            if self._log:
                self._log(f"[ERROR] cannot load {self.path}: {exc}")
            return
        self._key = key
        self.reloads += 1
        if self._log:
            self._log(f"[INFO] loaded {self.path}: {len(self._records.services)} services, "
                      f"{len(self._records.pods)} pods")


# --- the server --------------------------------------------------------------------------


def _print_line(line: str) -> None:
    print(line, flush=True)


class DNSServer:
    """UDP and TCP DNS on one address, one thread each (plus one per TCP connection)."""

    def __init__(self, store: RecordStore, listen: str, port: int = 53,
                 log: Callable[[str], None] = _print_line) -> None:
        self.store = store
        self.log = log
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.udp.bind((listen, port))
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.tcp.bind((listen, self.udp.getsockname()[1]))  # same port when port=0
            self.tcp.listen(64)
        except OSError:
            self.udp.close()
            self.tcp.close()
            raise
        self.udp.settimeout(0.2)
        self.tcp.settimeout(0.2)
        self.address = self.udp.getsockname()

    def start(self) -> "DNSServer":
        for target in (self._serve_udp, self._serve_tcp):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2)
        self.udp.close()
        self.tcp.close()

    def answer(self, data: bytes, client: tuple[str, int], proto: str) -> bytes | None:
        """Answer one message and log it (one line per query, CoreDNS ``log`` plugin style)."""
        started = time.monotonic()
        try:
            query = parse_query(data)
        except DNSFormatError as exc:
            self.log(f"[INFO] {client[0]}:{client[1]} - malformed {proto} query: {exc} FORMERR")
            return build_error(data)
        limit = None if proto == "tcp" else (query.edns_udp_size or 512)
        response = build_response(query, self.store.get(), max_size=limit)
        rcode, addresses = summarize(response)
        q = query.question
        qtype = TYPE_NAMES.get(q.qtype, f"TYPE{q.qtype}")
        elapsed = time.monotonic() - started
        self.log(f'[INFO] {client[0]}:{client[1]} - {query.id} "{qtype} IN {q.name}. {proto} '
                 f'{len(data)}" {RCODE_NAMES.get(rcode, rcode)} {len(response)} {elapsed:.6f}s '
                 f'answer={",".join(addresses) or "-"}')
        return response

    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                data, client = self.udp.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            response = self.answer(data, client, "udp")
            if response is not None:
                try:
                    self.udp.sendto(response, client)
                except OSError:
                    pass

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, client = self.tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._tcp_connection, args=(conn, client), daemon=True)
            t.start()

    def _tcp_connection(self, conn: socket.socket, client: tuple[str, int]) -> None:
        conn.settimeout(5)
        with conn:
            while not self._stop.is_set():
                try:
                    prefix = _recv_exact(conn, 2)
                    if prefix is None:
                        return
                    message = _recv_exact(conn, struct.unpack("!H", prefix)[0])
                    if message is None:
                        return
                except OSError:
                    return
                response = self.answer(message, client, "tcp")
                if response is None:
                    return
                try:
                    conn.sendall(struct.pack("!H", len(response)) + response)
                except OSError:
                    return


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def main(argv: list[str] | None = None) -> int:
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="python -m lab.kube.dns", description=__doc__.splitlines()[0])
    parser.add_argument("--records", required=True, help="JSON file of services and pods")
    parser.add_argument("--listen", default=DEFAULT_NAMESERVER, help="address to serve on")
    parser.add_argument("--port", type=int, default=53)
    args = parser.parse_args(argv)
    name_process("kube-dns")

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before the ready line: stop cleanly from then on
        signal.signal(sig, lambda *_: done.set())
    store = RecordStore(args.records, log=_print_line)
    server = DNSServer(store, args.listen, args.port).start()
    store.get()
    _print_line(f"[INFO] lab.kube.dns serving {CLUSTER_DOMAIN} on {args.listen}:{server.address[1]} "
                f"(udp, tcp), records from {args.records}")
    while not done.wait(0.5):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
