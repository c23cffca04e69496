"""The pod view's iptables tab: parsing `iptables-legacy-save -c`, and the rules a curl just hit.

The samples are real reads of productpage's namespace in a lab (tests/tui/fixtures/iptables/):
one before and one after a curl from the curl pod to productpage.
"""

from __future__ import annotations

from pathlib import Path

from lab.tui import iptables_view as iv
from lab.tui.app import LabApp
from lab.tui.screens.pod import PodScreen

from .conftest import FIXTURE, SIZE
from .test_snapshots import settle

SAMPLES = Path(__file__).parent / "fixtures" / "iptables"
BEFORE = (SAMPLES / "productpage-before-curl.txt").read_text()
AFTER = (SAMPLES / "productpage-after-curl.txt").read_text()
REDIRECT_15001 = "! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001"


def test_parse_reads_every_rule_with_its_table_chain_and_counters() -> None:
    rules = iv.parse_save(AFTER)
    assert len(rules) == sum(line.startswith("[") and " -A " in line for line in AFTER.splitlines()) == 12
    assert {r.table for r in rules} == {"nat", "mangle"}
    redirect = next(r for r in rules if r.spec == REDIRECT_15001)
    assert (redirect.table, redirect.chain, redirect.packets, redirect.bytes) == ("nat", "ISTIO_OUTPUT", 2, 120)
    assert AFTER.splitlines()[redirect.line].startswith("[2:120] -A ISTIO_OUTPUT")
    # chain policies (":OUTPUT ACCEPT [4:278]") are counters too, but not rules
    assert all(r.chain != "POSTROUTING" for r in rules)


def test_the_diff_names_the_rules_the_curl_hit_with_the_deltas() -> None:
    hits = {(h.rule.table, h.rule.chain, h.rule.spec): (h.packets, h.bytes) for h in iv.diff(iv.parse_save(BEFORE),
                                                                                            iv.parse_save(AFTER))}
    # the productpage pod's nat OUTPUT redirected its outgoing connections to ztunnel's 15001
    assert hits[("nat", "ISTIO_OUTPUT", REDIRECT_15001)] == (2, 120)
    assert hits[("mangle", "ISTIO_PRERT", "-m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff")] == (3, 180)
    # rules that matched nothing are not hits (the DNS-proxy and the health-probe rules)
    assert not any("169.254.7.127" in spec for _, _, spec in hits)
    assert len(hits) == 8


def test_no_change_no_hit_and_a_reset_counter_counts_from_zero() -> None:
    after = iv.parse_save(AFTER)
    assert iv.diff(after, after) == []
    # istio-cni re-wrote the rules (counters went down): what is there now is what matched since
    hits = iv.diff(after, iv.parse_save(BEFORE.replace("[0:0] -A PREROUTING", "[1:60] -A PREROUTING")))
    assert [(h.rule.chain, h.packets, h.bytes) for h in hits] == [("PREROUTING", 1, 60)]


def test_identical_rules_in_one_chain_are_told_apart() -> None:
    text = "*filter\n[1:10] -A OUTPUT -j ACCEPT\n[5:50] -A OUTPUT -j ACCEPT\nCOMMIT\n"
    later = "*filter\n[1:10] -A OUTPUT -j ACCEPT\n[7:70] -A OUTPUT -j ACCEPT\nCOMMIT\n"
    hits = iv.diff(iv.parse_save(text), iv.parse_save(later))
    assert [(h.rule.nth, h.rule.line, h.packets) for h in hits] == [(1, 2, 2)]


def test_render_highlights_the_hit_lines_only() -> None:
    assert iv.render(AFTER, None).plain == AFTER and not iv.render(AFTER, None).spans
    shown = iv.render(AFTER, BEFORE)
    lines = shown.plain.split("\n")
    redirect_line = next(i for i, line in enumerate(AFTER.split("\n")) if line.endswith(REDIRECT_15001))
    assert lines[redirect_line].endswith("+2 pkts +120 B")
    hit_style_lines = {shown.plain.count("\n", 0, s.start) for s in shown.spans if s.style == iv.HIT_STYLE}
    assert redirect_line in hit_style_lines and len(hit_style_lines) == 8
    assert "nat/ISTIO_OUTPUT +2 pkts" in iv.summary(AFTER, BEFORE)
    assert iv.summary(AFTER, AFTER) == "no rule matched a packet since the last read"


async def test_reloading_the_tab_highlights_the_rule_the_traffic_hit(app: LabApp) -> None:
    """Two successive reads of the recorded pod (iptables.txt, then iptables.2.txt after a curl)."""
    pod_dir = next((FIXTURE / "pods").glob("productpage-*"))
    first, second = (pod_dir / "iptables.txt").read_text(), (pod_dir / "iptables.2.txt").read_text()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        pod = next(p for p in app.model.pods.values() if p.name.startswith("productpage"))
        app.open_pod(pod.key, "iptables")
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, PodScreen)
        tab = screen.query_one("#tab-iptables")
        assert "pkts" not in tab.content.plain  # a first read has nothing to compare with
        await pilot.press("r")
        await settle(pilot)
        shown = tab.content
        text = shown.plain
        assert text.startswith("since the last read: ")
        assert "nat/ISTIO_OUTPUT +2 pkts" in text
        hit = next(line for line in text.split("\n") if line.startswith("[4:240] -A ISTIO_OUTPUT"))
        assert hit.endswith("+2 pkts +120 B") and REDIRECT_15001 in hit
        assert any(s.style == iv.HIT_STYLE for s in shown.spans)
        assert screen.previous["iptables"] == first and screen.outputs["iptables"] == second
