"""The wire view's captures: what really crossed a pod's eth0, beside what its application sent.

In ambient mode the application in a pod writes plain text; istio-cni's in-pod rules redirect it
to ztunnel's port 15001 over the pod's loopback, and ztunnel sends it on as HBONE: TLS records to
the destination pod's port 15008, on the pod's eth0. The docs prove mTLS with a capture; this
module does the same for one flow, so a learner sees both legs side by side:

- on `eth0` (filter `tcp port 15008`): the TLS records, with their direction and size; with the
  lab's TLS key log (every proxy appends its session secrets to one NSS key log) tshark also
  decrypts them into HTTP/2 frames (SETTINGS, HEADERS for the CONNECT, DATA for your bytes);
- on `lo`: the application's own bytes, plain text (an HTTP request line, a response status).

A flow that is already over cannot be captured after the fact, and TLS 1.3 can be decrypted only
from its handshake: so a capture is armed on the pod before the next flow, and read once that flow
is over. The parsers of tshark's field output are pure; `LiveCapture` (tcpdump, then tshark) is
the only part that touches the kernel. No Textual here.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

HBONE_PORT = 15008

# tshark -T fields columns, in order, for each leg (the parsers read them in this order).
WIRE_FIELDS = ("frame.time_relative", "ip.src", "tcp.srcport", "ip.dst", "tcp.dstport", "tcp.len",
               "tls.record.content_type", "tls.record.opaque_type", "tls.record.length",
               "http2.type", "http2.streamid")
PLAIN_FIELDS = ("frame.time_relative", "ip.src", "tcp.srcport", "ip.dst", "tcp.dstport", "tcp.len", "tcp.payload")

TLS_CONTENT_TYPES = {20: "ChangeCipherSpec", 21: "Alert", 22: "Handshake", 23: "ApplicationData"}
HTTP2_FRAME_TYPES = {0: "DATA", 1: "HEADERS", 2: "PRIORITY", 3: "RST_STREAM", 4: "SETTINGS", 5: "PUSH_PROMISE",
                     6: "PING", 7: "GOAWAY", 8: "WINDOW_UPDATE", 9: "CONTINUATION"}


@dataclass(frozen=True)
class TlsRecord:
    length: int  # the record's length field (its payload, without the 5-byte header)
    content_type: int  # what it carries (decrypted: the inner type; else the outer one, 23)
    encrypted: bool = False  # on the wire an opaque ApplicationData record (everything after ServerHello)

    @property
    def kind(self) -> str:
        name = TLS_CONTENT_TYPES.get(self.content_type, f"type {self.content_type}")
        return f"{name} (encrypted)" if self.encrypted and self.content_type != 23 else name


@dataclass(frozen=True)
class WirePacket:
    """One TCP segment on eth0 to or from port 15008."""

    t: float
    src: str  # ip:port
    dst: str
    outgoing: bool  # from the captured pod
    tcp_len: int
    records: tuple[TlsRecord, ...] = ()
    frames: tuple[tuple[str, int], ...] = ()  # decrypted HTTP/2 frames: (type, stream id)


@dataclass(frozen=True)
class PlainPacket:
    """One TCP segment on lo: the application's bytes before ztunnel encrypts them."""

    t: float
    src: str
    dst: str
    outgoing: bool
    data: bytes

    @property
    def preview(self) -> str:
        """The first line of the bytes, printable (an HTTP request or status line)."""
        first = self.data.split(b"\n", 1)[0].rstrip(b"\r")
        return "".join(chr(b) if 32 <= b < 127 else "." for b in first[:80])


@dataclass
class Capture:
    """Both legs of one capture of a pod."""

    pod: str
    wire: list[WirePacket] = field(default_factory=list)
    plain: list[PlainPacket] = field(default_factory=list)
    note: str = ""  # how it was made, or why it is empty

    @property
    def decrypted(self) -> bool:
        return any(p.frames for p in self.wire)


def _ints(cell: str) -> list[int]:
    return [int(x) for x in cell.split(",") if x.strip().lstrip("-").isdigit()]


def _outgoing(src_ip: str, dport: int, pod_ip: str, toward: tuple[int, ...]) -> bool:
    """From the captured pod: its address is the source (without it: the port says which way)."""
    if pod_ip:
        return src_ip == pod_ip
    return dport in toward


def parse_wire_fields(text: str, pod_ip: str = "") -> list[WirePacket]:
    """tshark's `-T fields` output over WIRE_FIELDS (tab-separated, lists joined by commas)."""
    out: list[WirePacket] = []
    for line in text.splitlines():
        cells = line.split("\t")
        if len(cells) < 6 or not cells[5].strip().isdigit():
            continue
        cells += [""] * (len(WIRE_FIELDS) - len(cells))
        t, sip, sport, dip, dport, tlen, ctypes, opaque, lengths, h2types, h2streams = cells[:len(WIRE_FIELDS)]
        lens = _ints(lengths)
        types = _ints(ctypes)
        if len(types) < len(lens):  # not decrypted: encrypted records (after the clear ones) are opaque, type 23
            types += [23] * (len(lens) - len(types))
        first_encrypted = len(lens) - len(_ints(opaque))  # tshark lists an opaque type for each encrypted one
        kinds, streams = _ints(h2types), _ints(h2streams)
        frames = tuple((HTTP2_FRAME_TYPES.get(k, f"type {k}"), streams[i] if i < len(streams) else 0)
                       for i, k in enumerate(kinds))
        out.append(WirePacket(float(t or 0), f"{sip}:{sport}", f"{dip}:{dport}",
                              _outgoing(sip, int(dport or 0), pod_ip, (HBONE_PORT,)), int(tlen),
                              tuple(TlsRecord(n, ty, i >= first_encrypted)
                                    for i, (n, ty) in enumerate(zip(lens, types))), frames))
    return out


def parse_plain_fields(text: str, pod_ip: str = "") -> list[PlainPacket]:
    """tshark's `-T fields` output over PLAIN_FIELDS; segments without payload are left out."""
    out: list[PlainPacket] = []
    for line in text.splitlines():
        cells = line.split("\t")
        if len(cells) < 7 or not cells[5].strip().isdigit() or int(cells[5]) == 0:
            continue
        t, sip, sport, dip, dport, _tlen, payload = cells[:7]
        try:
            data = bytes.fromhex(payload.replace(":", "").strip())
        except ValueError:
            continue
        out.append(PlainPacket(float(t or 0), f"{sip}:{sport}", f"{dip}:{dport}",
                               _outgoing(sip, int(dport or 0), pod_ip, (15001,)), data))
    return out


def wire_rows(cap: Capture) -> list[tuple[str, str, str]]:
    """(time, direction, what) for each TLS record on eth0, and under it its HTTP/2 frames."""
    rows: list[tuple[str, str, str]] = []
    for p in cap.wire:
        if not p.records:
            continue
        arrow = "->" if p.outgoing else "<-"
        for r in p.records:
            rows.append((f"{p.t:.4f}", arrow, f"TLS {r.kind} record, {r.length} B"))
        for kind, stream in p.frames:
            rows.append(("", "", f"  HTTP/2 {kind}" + (f" (stream {stream})" if stream else "")))
    return rows


def plain_rows(cap: Capture) -> list[tuple[str, str, str]]:
    """(time, direction, what) for each segment of application bytes on lo."""
    return [(f"{p.t:.4f}", "->" if p.outgoing else "<-", f"{len(p.data)} B  {p.preview}") for p in cap.plain]


def totals(cap: Capture) -> str:
    """One line: how much crossed eth0 (in TLS records) against what the application exchanged."""
    out_rec = sum(r.length for p in cap.wire if p.outgoing for r in p.records)
    in_rec = sum(r.length for p in cap.wire if not p.outgoing for r in p.records)
    n_rec = sum(len(p.records) for p in cap.wire)
    sent = sum(len(p.data) for p in cap.plain if p.outgoing)
    recv = sum(len(p.data) for p in cap.plain if not p.outgoing)
    return (f"eth0: {n_rec} TLS records, {out_rec} B out / {in_rec} B in (port {HBONE_PORT}); "
            f"lo: the app sent {sent} B, received {recv} B in plain text")


def caveats(cap: Capture) -> list[str]:
    """What a learner may wonder about this capture, in plain words."""
    out: list[str] = []
    records = [r for p in cap.wire for r in p.records]
    if records and not any(r.content_type == 22 and not r.encrypted for r in records):
        out.append("no TLS handshake in this capture: the flow rode a tunnel opened before it (ztunnel keeps one "
                   "pooled HBONE connection per pair of identities), so it cannot be decrypted; the sizes are real")
    elif records and not cap.decrypted:
        out.append("the handshake is here but tshark found no key for it in the lab's key log")
    if cap.plain and not records:
        out.append("plain text only: this flow was not tunnelled (passthrough), so it crossed eth0 as it was sent")
    return out


# -- the commands (pure) ------------------------------------------------------------------------
def record_commands(netns: str, eth0_pcap: str, lo_pcap: str) -> list[list[str]]:
    """tcpdump on the pod's eth0 (HBONE only) and on its lo (the app's plain-text leg)."""
    base = ["ip", "netns", "exec", netns, "tcpdump", "-n", "-U", "--immediate-mode", "-Z", "root", "-c", "5000"]
    return [[*base, "-i", "eth0", "-w", eth0_pcap, f"tcp port {HBONE_PORT}"],
            [*base, "-i", "lo", "-w", lo_pcap, f"tcp and not port {HBONE_PORT}"]]


def decode_commands(eth0_pcap: str, lo_pcap: str, keylog: str) -> list[list[str]]:
    """tshark over each pcap: TLS records (decrypted with the key log) on eth0, payloads on lo."""
    def fields(names: tuple[str, ...]) -> list[str]:
        return ["-T", "fields", "-E", "separator=/t", *[a for n in names for a in ("-e", n)]]

    wire = ["tshark", "-r", eth0_pcap, "-n", "-d", f"tcp.port=={HBONE_PORT},tls"]
    if keylog:
        wire += ["-o", f"tls.keylog_file:{keylog}"]
    return [wire + fields(WIRE_FIELDS), ["tshark", "-r", lo_pcap, "-n"] + fields(PLAIN_FIELDS)]


# -- the live part (root, a running lab) --------------------------------------------------------
class LiveCapture:
    """A capture armed on one pod: tcpdump on eth0 and lo until `collect()`, then tshark."""

    def __init__(self, pod: str, netns: str, pod_ip: str, directory: str, keylog: str) -> None:
        self.pod, self.netns, self.pod_ip, self.keylog = pod, netns, pod_ip, keylog
        stem = os.path.join(directory, f"tui-capture-{os.getpid()}-{pod}")
        self.pcaps = (f"{stem}-eth0.pcap", f"{stem}-lo.pcap")
        self.procs: list[subprocess.Popen] = []
        self.started = 0.0

    def start(self, ready_timeout: float = 5.0) -> None:
        """Start both tcpdumps; return once both listen (their "listening on" line), so the next flow is in."""
        for argv in record_commands(self.netns, *self.pcaps):
            self.procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        deadline = time.monotonic() + ready_timeout
        for p in self.procs:
            while time.monotonic() < deadline and p.poll() is None:
                ready, _, _ = select.select([p.stderr], [], [], max(0.0, deadline - time.monotonic()))
                if not ready or b"listening on" in (p.stderr.readline() if p.stderr else b""):
                    break
        self.started = time.time()

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stderr:
                p.stderr.close()

    def discard(self) -> None:
        """Stop recording and delete the pcaps unread."""
        self.stop()
        for p in self.pcaps:
            Path(p).unlink(missing_ok=True)

    def decode(self, keylog: str) -> tuple[str, str]:
        """tshark's field output for eth0 (decrypted when `keylog` names a key log) and for lo."""
        texts = []
        for argv in decode_commands(*self.pcaps, keylog=keylog):
            r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
            texts.append(r.stdout)
        return texts[0], texts[1]

    def collect(self) -> Capture:
        """Stop recording, decode both legs, delete the pcaps."""
        self.stop()
        try:
            wire_text, plain_text = self.decode(self.keylog if os.path.exists(self.keylog) else "")
        except (OSError, subprocess.TimeoutExpired) as e:
            return Capture(self.pod, note=f"tshark failed: {e}")
        finally:
            self.discard()
        return Capture(self.pod, parse_wire_fields(wire_text, self.pod_ip), parse_plain_fields(plain_text, self.pod_ip),
                       note=f"captured live on {self.pod}'s eth0 and lo")
