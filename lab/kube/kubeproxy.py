"""kube-proxy in iptables mode: ClusterIP load balancing as NAT rules in a node.

Real counterpart: kubernetes/kubernetes ``pkg/proxy/iptables/proxier.go`` (``syncProxyRules``).

What kube-proxy does, and what this module reproduces
-----------------------------------------------------
A Service's ClusterIP (e.g. 10.96.12.34:9080) belongs to no interface anywhere. It only
exists as iptables rules that kube-proxy writes into every node. When a pod sends a SYN to
the ClusterIP, the packet crosses the node's ``nat PREROUTING`` hook, jumps into
``KUBE-SERVICES``, matches the Service's rule, jumps into that Service port's ``KUBE-SVC-*``
chain, which picks one endpoint at random and jumps into that endpoint's ``KUBE-SEP-*``
chain, whose ``DNAT`` rewrites the destination to ``podIP:targetPort``. conntrack remembers
the translation, so the rest of the connection (and the replies) follow without touching
the rules again.

The chains, as ``iptables-save`` shows them on a real node:

``KUBE-SERVICES`` (nat)
    One rule per Service port: ``-d <clusterIP>/32 -p tcp --dport <port> -j KUBE-SVC-<hash>``,
    and last a jump to ``KUBE-NODEPORTS`` for packets addressed to the node itself.
``KUBE-SVC-<hash>`` (nat)
    First a rule that marks for masquerade any packet that did not come from the pod
    network (``! -s <clusterCIDR>``): a client outside the cluster would otherwise get a
    reply straight from the pod, which it never talked to. Then one rule per endpoint.
    Random choice with the ``statistic`` match: with n endpoints the first rule matches
    with probability 1/n, the second (of the remaining n-1) with 1/(n-1), ..., and the
    last one always: every endpoint ends up with the same 1/n share.
``KUBE-SEP-<hash>`` (nat)
    The hairpin rule (``-s <endpoint>/32 -j KUBE-MARK-MASQ``: a pod that reaches itself
    through its own Service must be masqueraded, or it would answer itself directly and
    the connection would break), then the ``DNAT --to-destination ip:port``.
``KUBE-MARK-MASQ`` / ``KUBE-POSTROUTING`` (nat)
    Masquerading is decided early (by setting the 0x4000 bit of the packet mark) and done
    late, in ``POSTROUTING``, where the source address can be rewritten.
``KUBE-SERVICES`` (filter)
    A Service port with no endpoints gets no nat rules; instead, the filter table rejects
    its ClusterIP with ``icmp-port-unreachable``, so clients fail fast with "connection
    refused" instead of timing out.
``KUBE-FORWARD`` (filter)
    Accepts forwarded packets that kube-proxy marked, and replies of tracked connections,
    even when the node's FORWARD policy is DROP.

Chain names are ``KUBE-SVC-`` / ``KUBE-SEP-`` plus the first 16 characters of the base32
encoding of a SHA-256 hash (``servicePortChainName`` and ``servicePortEndpointChainName``
in proxier.go): iptables limits chain names to 28 characters, and the hash keeps the names
stable across restarts, so ``KUBE-SVC-NPX46M4PTMTKRN6Y`` is ``default/kubernetes:https``
on every cluster in the world.

How kube-proxy writes the rules: it renders the complete set of its chains as text and
feeds it to ``iptables-restore --noflush``. Declaring a chain (``:KUBE-SVC-X - [0:0]``)
flushes it, so every sync rewrites all of kube-proxy's chains in one atomic transaction,
while leaving other programs' rules (CNI plugins, istio-cni) untouched. Chains that no
longer exist in the new state (an endpoint that went away) are declared and deleted
(``-X``) in the same transaction. The few rules in the built-in chains (``PREROUTING``,
``OUTPUT``, ...) that jump into kube-proxy's chains are "ensured" rather than rewritten:
added only when missing, so they are never duplicated.

Layout of this module: pure functions over plain data first (hashing, probabilities,
:func:`render_rules`, :func:`restore_payload`), then the small kernel-touching part
(:func:`install_rules`, :func:`read_rules`, :func:`validate_rules`), which shells out to
``iptables-legacy-restore`` / ``iptables-legacy-save`` inside a node's network namespace.

Differences from the real thing, on purpose: the lab renders in ``iptables-save`` order
(chains sorted by name, rules grouped by chain) so that what you read in this module's
output is line for line what ``iptables-legacy-save`` prints after installing it (except
that ``iptables-save`` prints probabilities with 11 decimals where kube-proxy writes 10).
Only ClusterIP services are handled: no NodePort, LoadBalancer, externalIPs, session
affinity or traffic policies.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import subprocess
from dataclasses import dataclass, field

# --- names and constants (as in proxier.go) -----------------------------------------

KUBE_SERVICES = "KUBE-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
SVC_CHAIN_PREFIX = "KUBE-SVC-"
SEP_CHAIN_PREFIX = "KUBE-SEP-"

#: kube-proxy's default ``--iptables-masquerade-bit`` is 14, i.e. mark bit 0x4000.
MASQ_MARK = "0x4000"

#: Built-in chains in the order iptables-save prints them, per table.
BUILTIN_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
}

#: Chains kube-proxy creates per Service port / endpoint; leftovers of these are deleted.
_PER_SERVICE_PREFIXES = (SVC_CHAIN_PREFIX, SEP_CHAIN_PREFIX)


# --- the data kube-proxy works from --------------------------------------------------


@dataclass(frozen=True, order=True)
class ServiceEndpoint:
    """One ready endpoint of a Service port (from its EndpointSlice): pod IP and target port."""

    ip: str
    port: int

    def __str__(self) -> str:
        # net.JoinHostPort(ip, port) in kube-proxy (IPv4 only in the lab).
        return f"{self.ip}:{self.port}"


@dataclass
class ServicePortRule:
    """One port of one Service, with its endpoints: the unit kube-proxy writes chains for.

    ``port_name`` is the Service port's ``name`` (may be empty for single-port Services);
    ``protocol`` is ``"TCP"`` or ``"UDP"`` as in the Service spec.
    """

    namespace: str
    name: str
    port_name: str
    cluster_ip: str
    port: int
    protocol: str = "TCP"
    endpoints: list[ServiceEndpoint] = field(default_factory=list)

    @property
    def service_port_name(self) -> str:
        """``ServicePortName.String()``: ``ns/name:port`` (``ns/name`` when the port is unnamed)."""
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port_name}" if self.port_name else base


# --- pure helpers: names, probabilities, ordering ------------------------------------


def port_proto_hash(service_port_name: str, protocol: str) -> str:
    """First 16 characters of base32(sha256(servicePortName + protocol)), as proxier.go does.

    ``protocol`` is lower case there (``"tcp"``); it is lowered here too.
    """
    digest = hashlib.sha256((service_port_name + protocol.lower()).encode()).digest()
    return base64.b32encode(digest).decode()[:16]


def service_port_chain_name(service_port_name: str, protocol: str) -> str:
    """``KUBE-SVC-<hash>``: the chain that load-balances one Service port."""
    return SVC_CHAIN_PREFIX + port_proto_hash(service_port_name, protocol)


def service_port_endpoint_chain_name(service_port_name: str, protocol: str, endpoint: str) -> str:
    """``KUBE-SEP-<hash>``: the chain that DNATs to one endpoint (``endpoint`` is ``ip:port``)."""
    data = service_port_name + protocol.lower() + endpoint
    digest = hashlib.sha256(data.encode()).digest()
    return SEP_CHAIN_PREFIX + base64.b32encode(digest).decode()[:16]


def compute_probability(n: int) -> str:
    """Probability that a rule picks its endpoint when ``n`` endpoints remain: 1/n, 10 decimals."""
    return f"{1.0 / n:0.10f}"


def ordered_endpoints(endpoints: list[ServiceEndpoint]) -> list[ServiceEndpoint]:
    """Endpoints without duplicates, sorted by their ``ip:port`` string.

    kube-proxy's endpoint cache sorts a Service port's endpoints the same way (as strings),
    so the rules come out identical on every sync and on every node.
    """
    unique = {str(ep): ep for ep in endpoints}
    return [unique[key] for key in sorted(unique)]


def _comment(text: str) -> str:
    return f'-m comment --comment "{text}"'


# --- rendering ------------------------------------------------------------------------


@dataclass
class _Table:
    """One table of the rendering: the user chains it declares and its rules, in order."""

    name: str
    chains: set[str] = field(default_factory=set)
    rules: dict[str, list[str]] = field(default_factory=dict)

    def declare(self, chain: str) -> None:
        self.chains.add(chain)

    def append(self, chain: str, rule: str) -> None:
        self.rules.setdefault(chain, []).append(f"-A {chain} {rule}")

    def render(self) -> list[str]:
        lines = [f"*{self.name}"]
        lines += [f":{chain} - [0:0]" for chain in sorted(self.chains)]
        # iptables-save order: built-in chains first, then user chains by name.
        order = list(BUILTIN_CHAINS[self.name]) + sorted(self.chains)
        for chain in order:
            lines += self.rules.get(chain, [])
        lines.append("COMMIT")
        return lines


def _render_base(nat: _Table, filt: _Table) -> None:
    """The fixed skeleton: jumps from the built-in chains and the masquerade machinery."""
    for chain in (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ):
        nat.declare(chain)
    portals = _comment("kubernetes service portals")
    nat.append("PREROUTING", f"{portals} -j {KUBE_SERVICES}")
    nat.append("OUTPUT", f"{portals} -j {KUBE_SERVICES}")
    nat.append("POSTROUTING", f'{_comment("kubernetes postrouting rules")} -j {KUBE_POSTROUTING}')
    # kube-proxy writes "--or-mark 0x4000" and "--xor-mark 0x4000"; iptables-save prints
    # them as "--set-xmark 0x4000/0x4000" and "--set-xmark 0x4000/0x0".
    nat.append(KUBE_MARK_MASQ, f"-j MARK --set-xmark {MASQ_MARK}/{MASQ_MARK}")
    nat.append(KUBE_POSTROUTING, f"-m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN")
    nat.append(KUBE_POSTROUTING, f"-j MARK --set-xmark {MASQ_MARK}/0x0")
    nat.append(
        KUBE_POSTROUTING,
        f'{_comment("kubernetes service traffic requiring SNAT")} -j MASQUERADE --random-fully',
    )

    for chain in (KUBE_SERVICES, KUBE_FORWARD):
        filt.declare(chain)
    new = "-m conntrack --ctstate NEW"
    filt.append("FORWARD", f'{_comment("kubernetes forwarding rules")} -j {KUBE_FORWARD}')
    filt.append("FORWARD", f"{new} {portals} -j {KUBE_SERVICES}")
    filt.append("OUTPUT", f"{new} {portals} -j {KUBE_SERVICES}")
    filt.append(KUBE_FORWARD, "-m conntrack --ctstate INVALID -j DROP")
    filt.append(
        KUBE_FORWARD,
        f'{_comment("kubernetes forwarding rules")} -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT',
    )
    filt.append(
        KUBE_FORWARD,
        f'{_comment("kubernetes forwarding conntrack rule")} '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    )


def _render_service_port(
    svc: ServicePortRule, nat: _Table, filt: _Table, cluster_cidr: str | None
) -> None:
    """The rules of one Service port: KUBE-SERVICES entry, KUBE-SVC chain, KUBE-SEP chains."""
    spn = svc.service_port_name
    proto = svc.protocol.lower()
    if proto not in ("tcp", "udp"):
        raise ValueError(f"{spn}: unsupported protocol {svc.protocol!r}")
    cluster_ip = str(ipaddress.IPv4Address(svc.cluster_ip))
    match_vip = f"-d {cluster_ip}/32 -p {proto}"
    dport = f"-m {proto} --dport {svc.port}"
    endpoints = ordered_endpoints(svc.endpoints)

    if not endpoints:
        # No endpoints: no nat rules at all, and a fast "connection refused" instead.
        filt.append(
            KUBE_SERVICES,
            f'{match_vip} {_comment(f"{spn} has no endpoints")} {dport} '
            "-j REJECT --reject-with icmp-port-unreachable",
        )
        return

    svc_chain = service_port_chain_name(spn, proto)
    nat.declare(svc_chain)
    cluster_ip_comment = _comment(f"{spn} cluster IP")
    nat.append(KUBE_SERVICES, f"{match_vip} {cluster_ip_comment} {dport} -j {svc_chain}")
    if cluster_cidr:
        # Traffic from outside the pod network is SNATed to the node, so replies come back here.
        nat.append(
            svc_chain,
            f"! -s {cluster_cidr} {match_vip} {cluster_ip_comment} {dport} -j {KUBE_MARK_MASQ}",
        )
    for i, ep in enumerate(endpoints):
        sep_chain = service_port_endpoint_chain_name(spn, proto, str(ep))
        statistic = ""
        remaining = len(endpoints) - i
        if remaining > 1:
            statistic = f" -m statistic --mode random --probability {compute_probability(remaining)}"
        nat.append(svc_chain, f'{_comment(f"{spn} -> {ep}")}{statistic} -j {sep_chain}')

        nat.declare(sep_chain)
        ip = str(ipaddress.IPv4Address(ep.ip))
        # Hairpin: a pod reaching itself through its Service must be masqueraded.
        nat.append(sep_chain, f"-s {ip}/32 {_comment(spn)} -j {KUBE_MARK_MASQ}")
        nat.append(sep_chain, f"-p {proto} {_comment(spn)} -m {proto} -j DNAT --to-destination {ep}")


def render_rules(services: list[ServicePortRule], cluster_cidr: str | None = "10.244.0.0/16") -> str:
    """Render kube-proxy's complete rule set for these Service ports as iptables-restore text.

    The same role as ``syncProxyRules`` in proxier.go: from the state of all Services and
    endpoints, produce the whole ``*filter`` and ``*nat`` content of kube-proxy's chains.
    Service ports are sorted by their service port name (kube-proxy iterates a Go map);
    endpoints by ``ip:port``. ``cluster_cidr`` is kube-proxy's ``--cluster-cidr``: packets
    from outside it are masqueraded (``None`` turns that off, as when kube-proxy runs
    without a cluster CIDR).
    """
    cidr = str(ipaddress.IPv4Network(cluster_cidr)) if cluster_cidr else None
    nat, filt = _Table("nat"), _Table("filter")
    _render_base(nat, filt)

    seen: set[tuple[str, str]] = set()
    for svc in sorted(services, key=lambda s: (s.service_port_name, s.protocol.upper())):
        key = (svc.service_port_name, svc.protocol.upper())
        if key in seen:
            raise ValueError(f"duplicate service port {key[0]} ({key[1]})")
        seen.add(key)
        _render_service_port(svc, nat, filt, cidr)

    # Must stay last: everything addressed to the node itself goes on to the NodePorts.
    nat.append(
        KUBE_SERVICES,
        _comment("kubernetes service nodeports; NOTE: this must be the last rule in this chain")
        + f" -m addrtype --dst-type LOCAL -j {KUBE_NODEPORTS}",
    )
    return "\n".join(filt.render() + nat.render()) + "\n"


# --- turning a rendering into a safe restore payload ----------------------------------


@dataclass
class SavedTable:
    """A table as parsed from iptables-save / iptables-restore text."""

    chains: list[str] = field(default_factory=list)  # every chain declared, in order
    rules: list[str] = field(default_factory=list)  # "-A CHAIN ..." lines, in order


def parse_tables(text: str) -> dict[str, SavedTable]:
    """Parse iptables-save (or restore) text into tables; comments and counters are dropped."""
    tables: dict[str, SavedTable] = {}
    current: SavedTable | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):  # "-c" counters prefix: "[3:180] -A ..."
            line = line.split("]", 1)[1].strip()
        if line.startswith("*"):
            current = tables.setdefault(line[1:], SavedTable())
        elif line == "COMMIT":
            current = None
        elif current is None:
            raise ValueError(f"rule outside a table: {raw!r}")
        elif line.startswith(":"):
            current.chains.append(line[1:].split()[0])
        else:
            current.rules.append(line)
    return tables


def _rule_chain(rule: str) -> str:
    return rule.split()[1]


def restore_payload(rendered: str, current: str) -> str:
    """What to feed ``iptables-restore --noflush`` so the node ends up with exactly ``rendered``.

    ``current`` is the node's present ``iptables-save`` text. Three adjustments, all as
    kube-proxy does them:

    * kube-proxy's own chains are declared, hence flushed and rewritten in full;
    * rules in built-in chains (the jumps into kube-proxy's chains) are only added when
      missing, and at the top of the chain (``-I CHAIN 1``, kube-proxy's ``EnsureRule``
      with ``Prepend``), so a second sync never duplicates them;
    * ``KUBE-SVC-*`` / ``KUBE-SEP-*`` chains present on the node but absent from the new
      rendering are declared (flushed) and deleted with ``-X`` in the same transaction.
    """
    wanted = parse_tables(rendered)
    existing = parse_tables(current)
    out: list[str] = []
    for name, table in wanted.items():
        have = existing.get(name, SavedTable())
        builtins = BUILTIN_CHAINS.get(name, ())
        declared = set(table.chains)
        stale = sorted(
            c for c in have.chains if c.startswith(_PER_SERVICE_PREFIXES) and c not in declared
        )
        out.append(f"*{name}")
        out += [f":{chain} - [0:0]" for chain in table.chains + stale]
        own_rules = [r for r in table.rules if _rule_chain(r) not in builtins]
        jumps = [r for r in table.rules if _rule_chain(r) in builtins and r not in have.rules]
        for rule in reversed(jumps):  # reversed: each insert goes to position 1
            _, chain, rest = rule.split(" ", 2)
            out.append(f"-I {chain} 1 {rest}")
        out += own_rules
        out += [f"-X {chain}" for chain in stale]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


# --- the kernel side: a node's network namespace --------------------------------------


def _run_in_netns(netns: str, argv: list[str], stdin: str | None = None) -> str:
    cmd = ["ip", "netns", "exec", netns, *argv]
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def read_rules(netns: str, table: str = "nat", counters: bool = False) -> str:
    """``iptables-legacy-save -t <table>`` in the node's netns (with ``-c``: packet counters)."""
    argv = ["iptables-legacy-save", "-t", table]
    if counters:
        argv.append("-c")
    return _run_in_netns(netns, argv)


def install_rules(netns: str, text: str) -> None:
    """Apply a :func:`render_rules` rendering to the node's netns in one transaction per table.

    Reads the current filter and nat tables, computes the payload with
    :func:`restore_payload` and runs ``iptables-legacy-restore --noflush`` with it: other
    programs' rules stay, kube-proxy's chains are replaced atomically, stale per-service
    chains disappear, and the built-in jumps exist exactly once.
    """
    current = "".join(read_rules(netns, table) for table in parse_tables(text))
    payload = restore_payload(text, current)
    _run_in_netns(netns, ["iptables-legacy-restore", "-w", "5", "--noflush"], stdin=payload)


def validate_rules(netns: str, text: str) -> None:
    """Check that the kernel accepts a rendering (``iptables-legacy-restore --test``), changing nothing."""
    _run_in_netns(netns, ["iptables-legacy-restore", "-w", "5", "--noflush", "--test"], stdin=text)
