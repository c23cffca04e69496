"""The istio-cni node agent's in-pod redirection rules, as data first and kernel second.

Real counterpart: istio/istio ``cni/pkg/iptables/iptables.go`` (``AppendInpodRules``,
``CreateInpodRules``, ``DeleteInpodRules``) and ``iptables_linux.go`` (the ``ip rule`` and the
local route). Istio builds the rule set as data, renders it to ``iptables-restore`` text, checks
that text against golden files (``testdata/default.golden``) and installs it with
``iptables-restore --noflush`` inside the pod's network namespace. The same builder also knows
how to take the rules away again.

This module does the same in two layers:

1. Pure data (no root, no kernel): :class:`Rule`, :func:`inpod_rules`, :func:`render_save`,
   :func:`parse_spec` and :func:`normalise_save`. These decide *what* the pod's rules are and
   let a test compare them with Istio's golden file and with what the kernel reports.
2. A small kernel layer: :func:`install_inpod_rules`, :func:`remove_inpod_rules` and
   :func:`read_inpod_rules`. It enters the pod netns on the calling thread (as the node agent
   does in ``NetServer.AddPodToMesh``) and writes the very same :class:`Rule` objects with
   python-iptables (``import iptc``, legacy xtables), plus the policy routing with pyroute2.

Read the rules with ``ip netns exec <pod netns> iptables-legacy-save``: python-iptables writes
legacy xtables, which Debian's default (nft) ``iptables`` does not show.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import re
import shlex
import socket
import subprocess
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from lab.cni.constants import (
    CHAIN_INPOD_OUTPUT,
    CHAIN_INPOD_PREROUTING,
    DNS_CAPTURE_PORT,
    DNS_CONNTRACK_ZONE,
    DNS_PORT,
    HOST_PROBE_SNAT_IP,
    INPOD_CHAINS,
    INPOD_MARK,
    INPOD_MASK,
    INPOD_RESTORE_MASK,
    INPOD_RULE_PRIORITY,
    INPOD_TPROXY_MARK,
    INPOD_TPROXY_MASK,
    LOCALHOST_CIDR,
    ROUTE_TABLE_INBOUND,
    ZTUNNEL_INBOUND_PLAINTEXT_PORT,
    ZTUNNEL_INBOUND_PORT,
    ZTUNNEL_OUTBOUND_PORT,
)

log = logging.getLogger(__name__)

# Built-in chains of each legacy xtables table, in the order iptables-save prints them.
BUILTIN_CHAINS: dict[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}

# The tables the in-pod rules use, in the order Istio writes them.
INPOD_TABLES: tuple[str, ...] = ("mangle", "nat", "raw")


# ==================================================================================================
# 1. The rules as data
# ==================================================================================================


@dataclass(frozen=True)
class Rule:
    """One ``-A <chain> <spec>`` line of the in-pod rule set, in one table.

    ``spec`` holds the tokens after the chain name exactly as Istio writes them (so rendering
    reproduces the golden file byte for byte); ``why`` is the explanation for learners and takes
    no part in comparisons.
    """

    table: str
    chain: str
    spec: tuple[str, ...]
    why: str = field(default="", compare=False)

    def line(self) -> str:
        """The rule as an ``iptables-restore`` / ``iptables-save`` line."""
        return " ".join(("-A", self.chain, *self.spec))

    @property
    def target(self) -> str:
        """The ``-j`` target: a chain name (a jump) or an extension such as ``REDIRECT``."""
        return parse_spec(self.spec).target.name


def _mark(value: int, mask: int) -> str:
    """A mark/mask pair the way iptables writes it, e.g. ``0x539/0xfff``."""
    return f"{value:#x}/{mask:#x}"


def inpod_rules(dns_capture: bool = False) -> list[Rule]:
    """The rules istio-cni writes into every ambient pod's netns (``AppendInpodRules``).

    Same tables, chains, rules and order as Istio's ``default.golden``: mangle, then nat, then
    (only with DNS capture) raw. Without DNS capture the two port-53 REDIRECTs are left out of nat
    and there is no raw table at all.
    """
    ztunnel_mark = _mark(INPOD_MARK, INPOD_MASK)
    return_mark = _mark(INPOD_TPROXY_MARK, INPOD_TPROXY_MASK)
    restore = f"{INPOD_RESTORE_MASK:#x}"
    prert, output = CHAIN_INPOD_PREROUTING, CHAIN_INPOD_OUTPUT

    def rule(table: str, chain: str, spec: str, why: str) -> Rule:
        return Rule(table, chain, tuple(spec.split()), why)

    rules = [
        # --- mangle: remember which connections ztunnel opened to the app, and route their replies
        rule("mangle", "PREROUTING", f"-j {prert}",
             "Hook Istio's chain into mangle PREROUTING: every packet entering the pod passes it."),
        rule("mangle", "OUTPUT", f"-j {output}",
             "Hook Istio's chain into mangle OUTPUT: every packet the pod sends passes it."),
        rule("mangle", prert,
             f"-m mark --mark {ztunnel_mark} -j CONNMARK --set-xmark {return_mark}",
             "A packet carrying ztunnel's socket mark arrives over lo: it is ztunnel connecting to "
             "the app with the client's IP as source. Tag the whole connection with connmark 0x111."),
        rule("mangle", output,
             f"-m connmark --mark {return_mark} -j CONNMARK --restore-mark "
             f"--nfmask {restore} --ctmask {restore}",
             "The app answers on such a connection: copy connmark 0x111 onto the packet, so the "
             "'fwmark 0x111 lookup 100' rule delivers it locally to ztunnel instead of out of eth0."),
        # --- nat: the redirections themselves
        rule("nat", "OUTPUT", f"-j {output}",
             "Hook Istio's chain into nat OUTPUT (first packet of each connection the pod opens)."),
        rule("nat", "PREROUTING", f"-j {prert}",
             "Hook Istio's chain into nat PREROUTING (first packet of each connection into the pod)."),
        rule("nat", prert, f"-s {HOST_PROBE_SNAT_IP} -p tcp -m tcp -j ACCEPT",
             "kubelet's health probes (SNATed on the node to 169.254.7.127) reach the app directly, "
             "bypassing ztunnel, so probes keep working even when policy would deny them."),
        rule("nat", output, f"-d {HOST_PROBE_SNAT_IP} -p tcp -m tcp -j ACCEPT",
             "Replies to kubelet's probes go straight back, not through ztunnel."),
        rule("nat", prert,
             f"! -d {LOCALHOST_CIDR} -p tcp ! --dport {ZTUNNEL_INBOUND_PORT} "
             f"-m mark ! --mark {ztunnel_mark} -j REDIRECT --to-ports {ZTUNNEL_INBOUND_PLAINTEXT_PORT}",
             "Inbound plaintext TCP goes to ztunnel's 15006 listener. HBONE (port 15008) is not "
             "redirected: ztunnel listens on 15008 in the pod itself. ztunnel's own packets are skipped."),
    ]
    if dns_capture:
        rules += [
            rule("nat", output,
                 f"! -o lo -p udp -m mark ! --mark {ztunnel_mark} -m udp --dport {DNS_PORT} "
                 f"-j REDIRECT --to-port {DNS_CAPTURE_PORT}",
                 "DNS capture: the app's DNS queries over UDP go to ztunnel's DNS proxy on 15053."),
            rule("nat", output,
                 f"! -d {LOCALHOST_CIDR} -p tcp --dport {DNS_PORT} -m mark ! --mark {ztunnel_mark} "
                 f"-j REDIRECT --to-ports {DNS_CAPTURE_PORT}",
                 "DNS capture: the app's DNS queries over TCP go to ztunnel's DNS proxy on 15053."),
        ]
    rules += [
        rule("nat", output, f"-p tcp -m mark --mark {return_mark} -j ACCEPT",
             "The app's replies on a connection ztunnel opened to it (mark 0x111 restored in mangle) "
             "must not be captured as new outbound traffic."),
        rule("nat", output, f"! -d {LOCALHOST_CIDR} -o lo -j ACCEPT",
             "The app talking to its own pod IP leaves via lo: not captured."),
        rule("nat", output,
             f"! -d {LOCALHOST_CIDR} -p tcp -m mark ! --mark {ztunnel_mark} "
             f"-j REDIRECT --to-ports {ZTUNNEL_OUTBOUND_PORT}",
             "Every other outbound TCP connection of the app goes to ztunnel's 15001 listener; "
             "ztunnel reads the real destination with SO_ORIGINAL_DST. ztunnel's own sockets "
             "(mark 0x539) are skipped, or ztunnel would capture itself."),
    ]
    if dns_capture:
        rules += [
            rule("raw", "PREROUTING", f"-j {prert}",
                 "Hook Istio's chain into raw PREROUTING (before conntrack sees the packet)."),
            rule("raw", "OUTPUT", f"-j {output}",
                 "Hook Istio's chain into raw OUTPUT (before conntrack sees the packet)."),
            rule("raw", output,
                 f"-p udp -m mark --mark {ztunnel_mark} -m udp --dport {DNS_PORT} "
                 f"-j CT --zone {DNS_CONNTRACK_ZONE}",
                 "ztunnel's own upstream DNS queries are tracked in conntrack zone 1, apart from the "
                 "app's captured queries, so two flows with the same addresses cannot collide."),
            rule("raw", prert,
                 f"-p udp -m mark ! --mark {ztunnel_mark} -m udp --sport {DNS_PORT} "
                 f"-j CT --zone {DNS_CONNTRACK_ZONE}",
                 "DNS replies coming into the pod are looked up in zone 1 too, so they find "
                 "ztunnel's upstream query."),
        ]
    return rules


def rule_set_problem(value: object) -> str | None:
    """What is wrong with a value offered as a rule set (a learner's `inpod_rules`), or None."""
    if not isinstance(value, list) or not all(isinstance(r, Rule) for r in value):
        return "expected a list of Rule"
    bad = [r for r in value if r.table not in INPOD_TABLES]
    if bad:
        return f"table {bad[0].table!r} is not one of {', '.join(INPOD_TABLES)}"
    return None


def custom_chains(rules: Iterable[Rule]) -> list[str]:
    """The non-built-in chains the rules append to, in order of first use (Istio's ``-N`` order)."""
    chains: list[str] = []
    for rule in rules:
        if rule.chain not in BUILTIN_CHAINS.get(rule.table, ()) and rule.chain not in chains:
            chains.append(rule.chain)
    return chains


def render_save(rules: Sequence[Rule], with_dns: bool) -> str:
    """Render rules as ``iptables-restore`` input, as Istio's builder does (``BuildV4Restore``).

    One block per table (mangle, nat, then raw only when ``with_dns``): ``* table``, a ``-N`` line
    per custom chain, the ``-A`` lines in order, ``COMMIT``. Tables without rules are left out.
    A raw rule with ``with_dns`` false is a contradiction (Istio only writes raw for DNS capture)
    and raises ``ValueError``.
    """
    tables = ("mangle", "nat", "raw") if with_dns else ("mangle", "nat")
    stray = sorted({r.table for r in rules} - set(tables))
    if stray:
        raise ValueError(f"rules for table(s) {stray} cannot be rendered with with_dns={with_dns}")
    lines: list[str] = []
    for table in tables:
        in_table = [r for r in rules if r.table == table]
        if not in_table:
            continue
        lines.append(f"* {table}")
        lines += [f"-N {chain}" for chain in custom_chains(in_table)]
        lines += [r.line() for r in in_table]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# ==================================================================================================
# 2. Reading rule text: one parser feeds python-iptables and normalises iptables-save output
# ==================================================================================================


@dataclass(frozen=True)
class Option:
    """One ``[!] --name [value ...]`` option of a match or target (a flag has no values)."""

    name: str
    values: tuple[str, ...] = ()
    inverted: bool = False

    def tokens(self) -> list[str]:
        return (["!"] if self.inverted else []) + [f"--{self.name}", *self.values]


@dataclass(frozen=True)
class Module:
    """A match (``-m mark ...``) or target (``-j CONNMARK ...``) extension with its options."""

    name: str
    options: tuple[Option, ...] = ()


@dataclass(frozen=True)
class ParsedSpec:
    """A rule spec split the way the kernel stores it.

    ``header`` holds the fixed IP-header fields (source, destination, in/out interface, protocol),
    ``matches`` the match extensions in order, ``target`` the ``-j`` (or ``-g``) target.
    """

    header: tuple[Option, ...]
    matches: tuple[Module, ...]
    target: Module
    goto: bool = False

    def canonical(self) -> tuple[str, ...]:
        """Tokens in iptables-save's layout: header fields in fixed order, matches, target."""
        tokens: list[str] = []
        by_name = {o.name: o for o in self.header}
        for name in _HEADER_ORDER:
            if name in by_name:
                option = by_name[name]
                tokens += (["!"] if option.inverted else []) + [_HEADER_SHORT[name], *option.values]
        for match in self.matches:
            tokens += ["-m", match.name]
            for option in match.options:
                tokens += option.tokens()
        tokens += ["-g" if self.goto else "-j", self.target.name]
        for option in self.target.options:
            tokens += option.tokens()
        return tuple(tokens)

    def without_match(self, name: str) -> ParsedSpec:
        """The same spec without the named match (e.g. ``comment``, which matches nothing)."""
        kept = tuple(m for m in self.matches if m.name != name)
        return ParsedSpec(self.header, kept, self.target, self.goto)


_HEADER_FLAGS = {
    "-s": "source", "--source": "source", "--src": "source",
    "-d": "destination", "--destination": "destination", "--dst": "destination",
    "-i": "in-interface", "--in-interface": "in-interface",
    "-o": "out-interface", "--out-interface": "out-interface",
    "-p": "protocol", "--protocol": "protocol",
}
_HEADER_ORDER = ("source", "destination", "in-interface", "out-interface", "protocol")
_HEADER_SHORT = {"source": "-s", "destination": "-d", "in-interface": "-i",
                 "out-interface": "-o", "protocol": "-p"}

# Options iptables accepts after "-p tcp|udp" without "-m tcp|udp": it loads that match itself.
_IMPLICIT_PROTOCOL_OPTIONS = {
    "tcp": {"sport", "dport", "source-port", "destination-port", "tcp-flags", "syn", "tcp-option"},
    "udp": {"sport", "dport", "source-port", "destination-port"},
}

# Abbreviated or alternative option names iptables' getopt_long accepts, mapped to the name
# iptables-save prints (and the only one libxtables accepts through python-iptables).
_OPTION_ALIASES = {
    ("REDIRECT", "to-port"): "to-ports",
    ("tcp", "destination-port"): "dport",
    ("tcp", "source-port"): "sport",
    ("udp", "destination-port"): "dport",
    ("udp", "source-port"): "sport",
}


def _canonical_address(value: str) -> str:
    """``169.254.7.127`` -> ``169.254.7.127/32``; netmask or host bits as iptables-save prints them."""
    return str(ipaddress.ip_network(value, strict=False))


def parse_spec(tokens: Sequence[str]) -> ParsedSpec:
    """Parse the tokens after ``-A <chain>`` into header fields, matches and target.

    Handles what iptables itself handles: ``!`` before an option inverts it; ``-p tcp --dport``
    loads the ``tcp`` match implicitly; ``--to-port`` means ``--to-ports``; bare addresses get
    their ``/32``; ``-c pkts bytes`` counters are dropped. Anything else unknown raises ValueError.
    """
    header: list[Option] = []
    matches: list[Module] = []
    target: Module | None = None
    goto = False
    current: list[Option] | None = None  # options of the module being read
    current_name = ""
    protocol = ""
    inverted = False
    i = 0

    def close_module() -> None:
        nonlocal target
        if current is None:
            return
        module = Module(current_name, tuple(current))
        if in_target:
            target = module
        else:
            matches.append(module)

    in_target = False
    while i < len(tokens):
        token = tokens[i]
        if token == "!":
            inverted = True
            i += 1
            continue
        if token in _HEADER_FLAGS:
            name = _HEADER_FLAGS[token]
            value = tokens[i + 1]
            if name in ("source", "destination"):
                value = _canonical_address(value)
            if name == "protocol":
                value = value.lower()
                protocol = value
            header.append(Option(name, (value,), inverted))
            inverted = False
            i += 2
            continue
        if token in ("-c", "--set-counters"):
            i += 3
            continue
        if token in ("-m", "--match", "-j", "--jump", "-g", "--goto"):
            if in_target:
                raise ValueError(f"{token} after the target in {' '.join(tokens)!r}")
            close_module()
            current, current_name = [], tokens[i + 1]
            if token in ("-j", "--jump", "-g", "--goto"):
                in_target, goto = True, token in ("-g", "--goto")
            i += 2
            continue
        if token.startswith("--"):
            name = token[2:]
            if current is None:
                if name not in _IMPLICIT_PROTOCOL_OPTIONS.get(protocol, ()):
                    raise ValueError(f"option {token} outside any match in {' '.join(tokens)!r}")
                current, current_name = [], protocol  # iptables' implicit "-m tcp" / "-m udp"
            name = _OPTION_ALIASES.get((current_name, name), name)
            values: list[str] = []
            i += 1
            while i < len(tokens) and tokens[i] != "!" and not tokens[i].startswith("-"):
                values.append(tokens[i])
                i += 1
            current.append(Option(name, tuple(values), inverted))
            inverted = False
            continue
        raise ValueError(f"cannot parse {token!r} in {' '.join(tokens)!r}")
    close_module()
    if target is None:
        raise ValueError(f"rule without a target: {' '.join(tokens)!r}")
    return ParsedSpec(tuple(header), tuple(matches), target, goto)


@dataclass
class _SavedTable:
    custom_chains: set[str] = field(default_factory=set)
    policies: dict[str, str] = field(default_factory=dict)
    rules: dict[str, list[str]] = field(default_factory=dict)


_COUNTERS = re.compile(r"^\[\d+:\d+\]\s*")
_COMMAND_WORD = re.compile(r"^ip6?tables(-legacy|-nft)?(-save|-restore)?(\s.*)?$")


def normalise_save(text: str) -> list[str]:
    """Reduce ``iptables-save`` / ``iptables-restore`` text to canonical lines for comparison.

    Strict about what decides a packet's fate (tables, chains, per-chain rule order, addresses,
    interfaces, matches, marks, ports, targets) and blind to how it is written. Every
    normalisation below was needed to compare Istio's golden file with what
    ``iptables-legacy-save -c`` prints for the same rules:

    - drops ``#`` comment lines (``# Generated by ...``) and command words (``iptables-save`` /
      ``ip6tables-save``, the first two lines of Istio's golden files: its test harness records
      the commands it ran);
    - drops the ``[packets:bytes]`` counters that ``-c`` prints before each rule and chain;
    - custom chains: ``-N ISTIO_PRERT`` (restore input) and ``:ISTIO_PRERT - [0:0]`` (save output)
      become one ``-N`` line; built-in chains with the default ACCEPT policy are dropped, any
      other policy is kept as ``:CHAIN POLICY``;
    - orders output as the kernel holds it: tables by name, ``-N`` lines sorted, rules grouped by
      chain (built-in chains in hook order, then custom chains by name, as iptables-save prints
      them), keeping each chain's rule order. Istio's file interleaves the ``-A`` lines of
      different chains, an order the kernel does not keep; only the order within a chain matters;
    - a table with no custom chain, no rule and only ACCEPT policies is dropped: it is the
      kernel's empty default (merely touching a legacy table loads it in that netns);
    - in each rule (see :func:`parse_spec`): header fields in iptables-save's order
      (``-s -d -i -o -p``), bare addresses get ``/32`` (``-s 169.254.7.127``), the implicit
      protocol match is written out (``-p tcp --dport 53`` -> ``-p tcp -m tcp --dport 53``),
      ``--to-port`` becomes ``--to-ports``, and ``-m comment --comment ...`` is removed.
    """
    tables: dict[str, _SavedTable] = {}
    current: _SavedTable | None = None
    for raw_line in text.splitlines():
        line = _COUNTERS.sub("", raw_line.strip())
        if not line or line.startswith("#") or _COMMAND_WORD.match(line):
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), _SavedTable())
            continue
        if current is None:
            raise ValueError(f"line outside a table: {raw_line!r}")
        if line == "COMMIT":
            current = None
            continue
        if line.startswith(":"):
            chain, policy = line[1:].split()[:2]
            if policy == "-":
                current.custom_chains.add(chain)
            elif policy != "ACCEPT":
                current.policies[chain] = policy
            continue
        tokens = shlex.split(line)
        if tokens[0] in ("-N", "--new-chain"):
            current.custom_chains.add(tokens[1])
        elif tokens[0] in ("-A", "--append"):
            spec = parse_spec(tokens[2:]).without_match("comment").canonical()
            current.rules.setdefault(tokens[1], []).append(" ".join(("-A", tokens[1], *spec)))
        else:
            raise ValueError(f"unsupported line: {raw_line!r}")

    lines: list[str] = []
    for name in sorted(tables):
        table = tables[name]
        if not (table.custom_chains or table.rules or table.policies):
            continue
        builtin = BUILTIN_CHAINS.get(name, ())
        lines.append(f"*{name}")
        lines += [f":{c} {table.policies[c]}" for c in builtin if c in table.policies]
        lines += [f"-N {c}" for c in sorted(table.custom_chains)]
        chains = [c for c in builtin if c in table.rules]
        chains += sorted(c for c in table.rules if c not in builtin)
        for chain in chains:
            lines += table.rules[chain]
        lines.append("COMMIT")
    return lines


# ==================================================================================================
# 3. The kernel: enter the pod netns, write with python-iptables, route with pyroute2
# ==================================================================================================

# libiptc and python-iptables keep process-wide state and are not thread-safe: one user at a time.
_IPTC_LOCK = threading.Lock()

# A pod's network namespace: an open fd, a name under /run/netns, or a path such as /proc/PID/ns/net.
NetnsRef = int | str | os.PathLike


def _netns_path(netns: str | os.PathLike) -> str:
    path = os.fspath(netns)
    return path if "/" in path else f"/run/netns/{path}"


@contextmanager
def _entered_netns(netns: NetnsRef) -> Iterator[None]:
    """Run the body on this thread inside the pod netns, then come back (Istio's ``NetnsDo``).

    setns(2) switches only the calling thread. The way back is an fd of this thread's own netns
    (``/proc/thread-self/ns/net``), taken before leaving and used in ``finally``.
    """
    own_fd = None
    if isinstance(netns, int):
        target = netns
    else:
        target = own_fd = os.open(_netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.setns(target, os.CLONE_NEWNET)
        try:
            yield
        finally:
            os.setns(home, os.CLONE_NEWNET)
    finally:
        os.close(home)
        if own_fd is not None:
            os.close(own_fd)


def _loaded_tables() -> set[str]:
    """Legacy xtables tables already present in this thread's netns (touching one loads it)."""
    try:
        with open("/proc/thread-self/net/ip_tables_names") as f:
            return set(f.read().split())
    except FileNotFoundError:
        return set()


@functools.cache
def _iptc_classes():
    """python-iptables classes adapted to per-pod use (imported lazily: pure code needs no iptc).

    Two traps of python-iptables are avoided here rather than papered over:

    - ``iptc.Table(name)`` is a per-process cache: the handle stays bound to the netns it was
      opened in (libiptc reads a snapshot and commits through a socket of that netns), so after a
      setns a cached table silently writes into the previous pod. ``PodTable`` is never cached:
      each use opens a fresh handle in the calling thread's netns, and dropping it frees it.
    - Creating any target asks *every* table (through that same cache) whether the target's name
      is a user chain, which also loads ``filter`` and ``security`` into the pod netns. A jump can
      only go to a chain of the rule's own table, so ``PodRule`` asks only that table.
    """
    import iptc

    class PodTable(iptc.Table):
        """An ``iptc.Table`` opened in the calling thread's netns, never shared, never cached."""

        def __new__(cls, name: str):
            table = object.__new__(cls)
            table._init(name, False)  # autocommit off: one atomic commit per table
            return table

    class PodRule(iptc.Rule):
        """An ``iptc.Rule`` that resolves jump targets in its own table only."""

        def __init__(self, table, entry=None, chain=None):
            self._own_table = table
            super().__init__(entry, chain)

        @property
        def tables(self):
            return [self._own_table]

    return iptc, PodTable, PodRule


def _with_inversion(option: Option) -> str | list[str]:
    """An option value the way python-iptables takes it ("!" prefix inverts)."""
    if len(option.values) > 1:
        return (["!"] if option.inverted else []) + list(option.values)
    value = option.values[0] if option.values else ""
    return f"!{value}" if option.inverted else value


# ParsedSpec header field -> python-iptables Rule attribute.
_IPTC_HEADER_ATTRIBUTES = {"source": "src", "destination": "dst", "in-interface": "in_interface",
                           "out-interface": "out_interface", "protocol": "protocol"}


def _to_iptc(rule: Rule, table):
    """Build the python-iptables rule for one :class:`Rule` (same spec, parsed by parse_spec)."""
    _, _, PodRule = _iptc_classes()
    parsed = parse_spec(rule.spec)
    entry = PodRule(table)
    for option in parsed.header:
        setattr(entry, _IPTC_HEADER_ATTRIBUTES[option.name], _with_inversion(option))
    for match in parsed.matches:
        iptc_match = entry.create_match(match.name)
        for option in match.options:
            iptc_match.set_parameter(option.name, _with_inversion(option))
    iptc_target = entry.create_target(parsed.target.name, goto=parsed.goto)
    for option in parsed.target.options:
        iptc_target.set_parameter(option.name, _with_inversion(option))
    return entry


def _fingerprint(entry) -> tuple:
    """What makes two python-iptables rules the same rule: header, matches in order, target."""
    return (
        entry.src, entry.dst, entry.in_interface, entry.out_interface, entry.protocol,
        tuple((m.name, sorted(m.get_all_parameters().items())) for m in entry.matches),
        entry.target.name, sorted(entry.target.get_all_parameters().items()),
    )


def _chain_fingerprints(table, chain: str) -> list[tuple]:
    """The rules the kernel has in one chain, as fingerprints (read without iptc's table cache)."""
    iptc, _, PodRule = _iptc_classes()
    prints = []
    entry = table.first_rule(chain)
    while entry:
        prints.append(_fingerprint(PodRule(table, entry, iptc.Chain(table, chain))))
        entry = table.next_rule(entry)
    return prints


def _reconcile_table(name: str, wanted: list[Rule]) -> bool:
    """Make one table hold exactly ``wanted`` (Istio's reconcile-on-restart); True if it changed.

    Custom Istio chains whose rules differ in any way are flushed and refilled; jumps from
    built-in chains are deduplicated and restored; Istio chains that should not exist (raw after
    DNS capture was turned off) are unhooked and deleted. Rules of others are left alone.
    All edits go into one libiptc handle and reach the kernel in a single atomic commit.
    """
    table = _iptc_classes()[1](name)
    try:
        return _reconcile_open_table(table, name, wanted)
    finally:
        table.close()  # free the handle now; it holds a socket in the pod's netns


def _reconcile_open_table(table, name: str, wanted: list[Rule]) -> bool:
    """Body of :func:`_reconcile_table`, on a freshly opened table handle."""
    iptc = _iptc_classes()[0]
    changed = False
    wanted_chains = custom_chains(wanted)
    # 1. Istio's chains exist (before any jump to them can be built).
    for chain in wanted_chains:
        if not table.is_chain(chain):
            table.create_chain(chain)
            changed = True

    # 2. Each Istio chain holds exactly its rules, in order; otherwise refill it.
    for chain in wanted_chains:
        desired = [_to_iptc(r, table) for r in wanted if r.chain == chain]
        if _chain_fingerprints(table, chain) != [_fingerprint(r) for r in desired]:
            table.flush_entries(chain)
            for entry in desired:
                iptc.Chain(table, chain).append_rule(entry)
            changed = True

    # 3. Exactly one jump from a built-in chain to each wanted Istio chain (like `-A OUTPUT -j
    #    ISTIO_OUTPUT`), none to the others; other software's rules stay where they are.
    for builtin in BUILTIN_CHAINS[name]:
        present = _chain_fingerprints(table, builtin)
        for istio_chain in INPOD_CHAINS:
            if not table.is_chain(istio_chain):
                continue
            jump = _to_iptc(Rule(name, builtin, ("-j", istio_chain)), table)
            wanted_here = any(r.chain == builtin and r.spec == ("-j", istio_chain) for r in wanted)
            count = present.count(_fingerprint(jump))
            keep = 1 if wanted_here else 0
            for _ in range(count - keep):
                iptc.Chain(table, builtin).delete_rule(jump)
                changed = True
            if count < keep:
                iptc.Chain(table, builtin).append_rule(jump)
                changed = True

    # 4. Istio chains this table should not have (now unreferenced): flush and delete them.
    for chain in INPOD_CHAINS:
        if chain not in wanted_chains and table.is_chain(chain):
            table.flush_entries(chain)
            table.delete_chain(chain)
            changed = True

    if changed:
        table.commit()
    return changed


def _policy_routing(add: bool) -> None:
    """``ip rule fwmark 0x111/0xfff pref 32764 lookup 100`` + ``ip route local 0.0.0.0/0 dev lo
    table 100`` (Istio's iptables_linux.go, via netlink): add if missing, or delete if present."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        has_rule = any(
            r.get("priority") == INPOD_RULE_PRIORITY and r.get("fwmark") == INPOD_TPROXY_MARK
            and r.get("fwmask") == INPOD_TPROXY_MASK and r.get("table") == ROUTE_TABLE_INBOUND
            for r in ipr.get_rules(family=socket.AF_INET)
        )
        has_route = any(
            r["type"] == 2 and r["dst_len"] == 0 and r.get("oif") == lo  # 2 = RTN_LOCAL
            for r in ipr.get_routes(family=socket.AF_INET, table=ROUTE_TABLE_INBOUND)
            if r.get("table") == ROUTE_TABLE_INBOUND
        )
        rule = dict(fwmark=INPOD_TPROXY_MARK, fwmask=INPOD_TPROXY_MASK,
                    priority=INPOD_RULE_PRIORITY, table=ROUTE_TABLE_INBOUND)
        route = dict(dst="0.0.0.0/0", type="local", oif=lo, table=ROUTE_TABLE_INBOUND,
                     scope="host")
        if add:
            if not has_rule:
                ipr.rule("add", **rule)
            if not has_route:
                # proto "boot" is what `ip route add` uses; `ip route show` then prints no proto.
                ipr.route("add", proto="boot", **route)
        else:
            if has_rule:
                ipr.rule("del", **rule)
            if has_route:
                ipr.route("del", **route)


def install_inpod_rules(netns_fd_or_path: NetnsRef, dns_capture: bool = False,
                        wanted: Sequence[Rule] | None = None) -> None:
    """Write the in-pod rules into a pod's netns (``CreateInpodRules``), idempotently.

    ``netns_fd_or_path``: an open netns fd, a name under /run/netns, or a path. The calling thread
    enters the netns and always comes back. Rules already exactly in place are left untouched;
    a partial or outdated set (an agent restart, DNS capture toggled) is reconciled without
    duplicates. Then the fwmark ip rule and the local route of table 100 are ensured. `wanted`
    replaces the rule set (a learner's `inpod_rules`, plugged in by a graded exercise).
    """
    wanted = list(inpod_rules(dns_capture) if wanted is None else wanted)
    with _IPTC_LOCK, _entered_netns(netns_fd_or_path):
        loaded = _loaded_tables()
        for name in INPOD_TABLES:
            in_table = [r for r in wanted if r.table == name]
            if not in_table and name not in loaded:
                continue  # do not load a table (raw) the pod does not need
            changed = _reconcile_table(name, in_table)
            log.debug("in-pod %s rules %s", name, "written" if changed else "already in place")
        _policy_routing(add=True)


def remove_inpod_rules(netns: NetnsRef) -> None:
    """Take the in-pod rules out of a pod's netns (``DeleteInpodRules``), in Istio's order.

    Per table (mangle, nat, raw): delete the jumps from the built-in chains, then flush and delete
    the Istio chains; then delete the ip rule and the route. Missing pieces are fine.
    """
    with _IPTC_LOCK, _entered_netns(netns):
        loaded = _loaded_tables()
        for name in INPOD_TABLES:
            if name in loaded:
                _reconcile_table(name, [])
        _policy_routing(add=False)


def read_inpod_rules(netns: NetnsRef, table: str | None = None) -> str:
    """``iptables-legacy-save -c [-t TABLE]`` of a pod's netns: the rules with their counters.

    A name runs ``ip netns exec <name> iptables-legacy-save -c`` (what a learner types); a path or
    an fd goes through ``nsenter --net=...``.
    """
    pass_fds: tuple[int, ...] = ()
    if isinstance(netns, int):
        prefix = ["nsenter", f"--net=/proc/self/fd/{netns}"]
        pass_fds = (netns,)
    elif "/" in os.fspath(netns):
        prefix = ["nsenter", f"--net={os.fspath(netns)}"]
    else:
        prefix = ["ip", "netns", "exec", os.fspath(netns)]
    result = subprocess.run([*prefix, "iptables-legacy-save", "-c", *(["-t", table] if table else [])],
                            capture_output=True,
                            text=True, check=True, pass_fds=pass_fds)
    return result.stdout
