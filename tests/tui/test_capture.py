"""The wire view's captures: tshark's field output parsed (lab/tui/capture.py), and shown.

The sample (tests/tui/fixtures/bookinfo/captures/curl-...) was captured once from a real lab: tcpdump
on the curl pod's eth0 (`tcp port 15008`) and lo during `curl http://productpage:9080/productpage`,
then capture.decode_commands (tshark with the lab's TLS key log over capture.WIRE_FIELDS /
capture.PLAIN_FIELDS; eth0.no-keylog.tsv: the same pcap without the key log).
"""

from __future__ import annotations

from lab.tui import capture
from lab.tui.app import LabApp
from lab.tui.screens.wire import WireScreen

from .conftest import FIXTURE, SIZE, recorded_events
from .test_app import plain
from .test_snapshots import settle

SAMPLE = next((FIXTURE / "captures").glob("curl-*"))
POD_IP = "10.244.1.2"  # the curl pod's address in the recording


def sample() -> capture.Capture:
    return capture.Capture("curl", capture.parse_wire_fields((SAMPLE / "eth0.tsv").read_text(), POD_IP),
                           capture.parse_plain_fields((SAMPLE / "lo.tsv").read_text(), POD_IP))


def test_the_wire_leg_is_tls_records_to_15008_with_their_sizes() -> None:
    cap = sample()
    assert cap.wire and all(p.dst.endswith(":15008") == p.outgoing for p in cap.wire)
    first = next(p for p in cap.wire if p.records)
    assert first.outgoing and [(r.kind, r.length) for r in first.records] == [("Handshake", 229)]  # ClientHello
    # the server's flight: ServerHello in clear, then a ChangeCipherSpec, then encrypted handshake records
    reply = next(p for p in cap.wire if p.records and not p.outgoing)
    assert [r.kind for r in reply.records][:3] == ["Handshake", "ChangeCipherSpec", "Handshake (encrypted)"]
    for p in cap.wire:  # a segment's records fill it: 5-byte header + length each
        if p.records:
            assert sum(5 + r.length for r in p.records) == p.tcp_len


def test_decrypted_with_the_key_log_the_records_carry_the_http2_connect() -> None:
    cap = sample()
    assert cap.decrypted
    frames = [(f, s) for p in cap.wire for f, s in p.frames]
    assert ("HEADERS", 1) in frames and ("DATA", 1) in frames and ("SETTINGS", 0) in frames
    headers_out = [p for p in cap.wire if p.outgoing and ("HEADERS", 1) in p.frames]
    assert len(headers_out) == 1  # the CONNECT, once
    rows = capture.wire_rows(cap)
    assert ("0.0439", "<-", "TLS ApplicationData record, 2399 B") in rows  # the page, inside DATA frames
    assert not any("productpage" in what or "GET" in what for _, _, what in rows)  # never plain text on eth0


def test_the_plain_leg_is_what_the_app_wrote() -> None:
    cap = sample()
    assert [(p.outgoing, len(p.data), p.preview) for p in cap.plain] == \
        [(True, 91, "GET /productpage HTTP/1.1"), (False, 2373, "HTTP/1.1 200 OK")]
    assert capture.totals(cap).endswith("lo: the app sent 91 B, received 2373 B in plain text")
    assert "22 TLS records" in capture.totals(cap)
    assert capture.caveats(cap) == []


def test_without_the_key_log_or_the_handshake() -> None:
    """eth0.no-keylog.tsv: tshark over the same pcap without the key log (what anyone on the wire sees)."""
    cap = capture.Capture("curl", capture.parse_wire_fields((SAMPLE / "eth0.no-keylog.tsv").read_text(), POD_IP))
    assert not cap.decrypted
    assert [r.length for p in cap.wire for r in p.records] == [r.length for p in sample().wire for r in p.records]
    reply = next(p for p in cap.wire if p.records and not p.outgoing)
    assert [r.kind for r in reply.records] == ["Handshake", "ChangeCipherSpec"] + ["ApplicationData"] * 5
    assert capture.caveats(cap) == ["the handshake is here but tshark found no key for it in the lab's key log"]
    later = capture.Capture("curl", [p for p in cap.wire if p.t > 0.004])  # a pooled tunnel: no handshake seen
    assert "pooled" in capture.caveats(later)[0]


def test_the_commands_capture_both_legs_in_the_pod_and_decode_with_the_key_log() -> None:
    eth0, lo = capture.record_commands("lab-default-curl", "/run/x-eth0.pcap", "/run/x-lo.pcap")
    assert eth0[:4] == ["ip", "netns", "exec", "lab-default-curl"] and "--immediate-mode" in eth0
    assert eth0[-3:] == ["-w", "/run/x-eth0.pcap", "tcp port 15008"] and "eth0" in eth0
    assert lo[-4:] == ["lo", "-w", "/run/x-lo.pcap", "tcp and not port 15008"]
    wire, plain_cmd = capture.decode_commands("/run/x-eth0.pcap", "/run/x-lo.pcap", "/run/keylog.txt")
    assert "tls.keylog_file:/run/keylog.txt" in wire and "tcp.port==15008,tls" in wire
    assert [wire[i + 1] for i, a in enumerate(wire) if a == "-e"] == list(capture.WIRE_FIELDS)
    assert [plain_cmd[i + 1] for i, a in enumerate(plain_cmd) if a == "-e"] == list(capture.PLAIN_FIELDS)


async def test_the_wire_view_captures_and_shows_tls_record_sizes_beside_the_plain_text(app: LabApp) -> None:
    allowed = {e["flow"] for e in recorded_events() if e["kind"] == "rbac.decision" and e["fields"]["allowed"]}
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        flow = next(f for f in app.model.flows.values() if f.id in allowed and f.src_pod == SAMPLE.name)
        assert flow.dst_pod.startswith("productpage")  # the recorded curl, as in the captured one
        app.open_wire(flow.id)
        await settle(pilot)
        assert isinstance(app.screen, WireScreen)
        before = plain(app.screen.query_one("#wire-capture"))
        assert "cannot be captured after the fact" in before and f"c: capture the next flow from {SAMPLE.name}" in before
        await pilot.press("c")
        await settle(pilot)
        await settle(pilot)
        shown = plain(app.screen.query_one("#wire-capture"))
        assert app.screen.capture_state == "done"
        assert "eth0, the wire: TLS to 15008, decrypted" in shown and "lo: what the app sent and received" in shown
        assert "TLS ApplicationData record, 2399 B" in shown and "HTTP/2 HEADERS (stream 1)" in shown
        assert "91 B  GET /productpage HTTP/1.1" in shown and "2373 B  HTTP/1.1 200 OK" in shown
        assert "lo: the app sent 91 B, received 2373 B" in shown
        assert ":status 200" in plain(app.screen.query_one("#wire"))  # the layers are still there
