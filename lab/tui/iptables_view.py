"""The pod view's iptables tab: the in-pod rules istio-cni installed, read live, with the rule a
flow just hit highlighted.

istio-cni writes its redirection rules (ISTIO_OUTPUT, ISTIO_PRERT in the nat and mangle tables)
inside each ambient pod's network namespace; `iptables-legacy-save -c` prints each rule with its
kernel counters as `[packets:bytes] -A CHAIN ...`. Two reads a moment apart tell which rule the
traffic in between matched: the rules whose packet counter moved. This module parses one read and
diffs two; pure, no Textual, no kernel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rich.text import Text

_RULE = re.compile(r"^\[(\d+):(\d+)\]\s+-A\s+(\S+)(.*)$")

HIT_STYLE = "bold reverse"


@dataclass(frozen=True)
class Rule:
    """One rule of one read: where it sits and its counters."""

    table: str  # nat, mangle, filter, raw
    chain: str  # e.g. ISTIO_OUTPUT
    spec: str  # the rule after `-A CHAIN`, e.g. "-p tcp ... -j REDIRECT --to-ports 15001"
    nth: int  # how many identical (table, chain, spec) rules came before it (usually 0)
    packets: int
    bytes: int
    line: int  # its line number in the read (0-based)

    @property
    def key(self) -> tuple[str, str, str, int]:
        """What stays the same for the same rule across two reads (the counters do not)."""
        return (self.table, self.chain, self.spec, self.nth)


@dataclass(frozen=True)
class Hit:
    """A rule whose counters moved between two reads."""

    rule: Rule
    packets: int
    bytes: int


def parse_save(text: str) -> list[Rule]:
    """Every `[packets:bytes] -A CHAIN ...` rule of an `iptables-save -c` output, in order."""
    rules: list[Rule] = []
    table = ""
    seen: dict[tuple[str, str, str], int] = {}
    for i, raw in enumerate(text.splitlines()):
        line = raw.strip()
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        m = _RULE.match(line)
        if not m:
            continue
        chain, spec = m.group(3), m.group(4).strip()
        nth = seen.get((table, chain, spec), 0)
        seen[(table, chain, spec)] = nth + 1
        rules.append(Rule(table, chain, spec, nth, int(m.group(1)), int(m.group(2)), i))
    return rules


def diff(before: list[Rule], after: list[Rule]) -> list[Hit]:
    """The rules of `after` whose packet counter grew since `before`, with the growth.

    A rule that is new in `after` counts from zero; a counter that went down (the rules were
    re-written, e.g. istio-cni re-enrolled the pod) counts from zero too.
    """
    old = {r.key: r for r in before}
    hits: list[Hit] = []
    for r in after:
        prev = old.get(r.key)
        p0, b0 = (prev.packets, prev.bytes) if prev is not None and prev.packets <= r.packets else (0, 0)
        if r.packets > p0:
            hits.append(Hit(r, r.packets - p0, r.bytes - b0))
    return hits


def render(text: str, previous: str | None) -> Text:
    """The read `text` as shown in the tab: rules hit since `previous` in reverse, with "+N pkts"."""
    out = Text(text)
    if previous is None:
        return out
    hits = {h.rule.line: h for h in diff(parse_save(previous), parse_save(text))}
    if not hits:
        return out
    out = Text()
    lines = text.split("\n")
    for i, line in enumerate(lines):
        h = hits.get(i)
        if h is None:
            out.append(line)
        else:
            out.append(line, style=HIT_STYLE)
            out.append(f"   +{h.packets} pkts +{h.bytes} B", style="bold yellow")
        if i < len(lines) - 1:
            out.append("\n")
    return out


def summary(text: str, previous: str | None) -> str:
    """One line for the tab: how many rules the traffic since the last read matched."""
    if previous is None:
        return ""
    hits = diff(parse_save(previous), parse_save(text))
    if not hits:
        return "no rule matched a packet since the last read"
    return "since the last read: " + "; ".join(f"{h.rule.table}/{h.rule.chain} +{h.packets} pkts" for h in hits)
