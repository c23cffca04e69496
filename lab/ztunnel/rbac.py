"""L4 authorization, as ztunnel enforces it at the destination (zt:src/rbac.rs, zt:src/state.rs
`assert_rbac`).

istiod turns every AuthorizationPolicy that ztunnel can enforce into an `Authorization`
resource (zt:proto/authorization.proto) and pushes it over xDS:

    Authorization{name, namespace, scope GLOBAL|NAMESPACE|WORKLOAD_SELECTOR, action ALLOW|DENY,
                  rules[], dry_run}
    Rule{clauses[]}      a rule matches when ALL its clauses match   (from, to, when)
    Clause{matches[]}    a clause matches when ANY of its matches matches
    Match{namespaces, service_accounts, principals, source_ips, destination_ips,
          destination_ports, and a not_* list of each}

Inside one Match the different fields are ANDed and the values of one field are ORed; a
`not_*` list means "none of these". A policy with no rules never matches; a Match with no field
at all is skipped; a Clause with no Match at all matches.

The connection is described by what the destination ztunnel knows (`Connection`): the client's
IP, the client's SPIFFE identity from its mTLS certificate (None for plaintext that arrived on
15006), and the real destination pod IP and application port (never 15008). `namespaces` and
`service_accounts` come from the certificate identity only, so they never match plaintext;
`principals` are compared with the `spiffe://` prefix removed (`cluster.local/ns/default/sa/curl`).

`assert_rbac` decides: any DENY policy matches -> deny ("explicitly denied by: ns/name"); no ALLOW
policy -> allow; any ALLOW policy matches -> allow; else deny ("allow policies exist, but none
allowed"). Dry-run policies are evaluated and reported, never enforced (istiod sends them only
when its AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY feature is on; it is off by default).

Everything here is pure: plain data in, a `Decision` out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lab.tls.identity import SPIFFE_PREFIX, Identity

SCOPES = ("GLOBAL", "NAMESPACE", "WORKLOAD_SELECTOR")
ACTIONS = ("ALLOW", "DENY")
STRING_MATCH_KINDS = ("exact", "prefix", "suffix", "presence")

#: ztunnel's deny reasons (zt:src/proxy.rs AuthorizationRejectionError), as they appear after
#: "connection closed due to policy rejection: " in the access log.
NOT_ALLOWED = "allow policies exist, but none allowed"
EXPLICITLY_DENIED = "explicitly denied by: {key}"
NO_WORKLOAD = "workload not found"

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class InvalidAuthorization(ValueError):
    """An Authorization resource ztunnel cannot use (unknown scope or action, wrong types)."""


# ---------------------------------------------------------------------------------------------
# The connection


@dataclass(frozen=True)
class Connection:
    """What the destination ztunnel knows about an inbound connection (zt `rbac::Connection`).

    `src_identity` is the peer's SPIFFE identity from its certificate (HBONE on 15008), or None
    for plaintext (15006). `dst_port` is the application port from the CONNECT authority, not
    15008.
    """

    src_ip: str
    src_identity: Identity | None
    dst_ip: str
    dst_port: int

    def __str__(self) -> str:
        return f"{self.src_ip}({self.src_identity or 'None'})->{self.dst_ip}:{self.dst_port}"


# ---------------------------------------------------------------------------------------------
# Matchers


@dataclass(frozen=True)
class StringMatch:
    """exact | prefix | suffix | presence (zt `rbac::StringMatch`)."""

    kind: str
    value: str = ""

    def matches(self, check: str) -> bool:
        if self.kind == "exact":
            return check == self.value
        if self.kind == "prefix":
            return check.startswith(self.value)
        if self.kind == "suffix":
            return check.endswith(self.value)
        return check != ""  # presence: any non-empty value

    def matches_principal(self, identity_uri: str) -> bool:
        """Istio writes principals without `spiffe://`: strip it from the peer's identity first;
        an identity without it (including no identity, "") never matches."""
        if not identity_uri.startswith(SPIFFE_PREFIX):
            return False
        return self.matches(identity_uri[len(SPIFFE_PREFIX):])

    def __str__(self) -> str:
        return "presence" if self.kind == "presence" else f"{self.kind}:{self.value}"


@dataclass(frozen=True)
class ServiceAccountMatch:
    """A (namespace, service account) pair, compared with the certificate identity."""

    namespace: str
    service_account: str

    def matches(self, identity: Identity | None) -> bool:
        return (identity is not None and identity.namespace == self.namespace
                and identity.service_account == self.service_account)


@dataclass(frozen=True)
class Match:
    """One `Match` of a clause: every non-empty field must hold (AND); within a field, any value
    (OR); a `not_*` field holds when none of its values does."""

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[IpNetwork, ...] = ()
    not_source_ips: tuple[IpNetwork, ...] = ()
    destination_ips: tuple[IpNetwork, ...] = ()
    not_destination_ips: tuple[IpNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()

    def is_empty(self) -> bool:
        return not any(getattr(self, f) for f in _MATCH_FIELDS)


_MATCH_FIELDS = tuple(Match.__dataclass_fields__)


@dataclass(frozen=True)
class Authorization:
    """One L4 policy as ztunnel holds it. `rules[i][j]` is clause j of rule i: a tuple of Matches."""

    name: str
    namespace: str
    scope: str
    action: str
    rules: tuple[tuple[tuple[Match, ...], ...], ...] = ()
    dry_run: bool = False

    @property
    def key(self) -> str:
        """The xDS resource name and the name in deny messages: `namespace/name`."""
        return f"{self.namespace}/{self.name}"

    @classmethod
    def from_resource(cls, resource: Mapping[str, Any]) -> Authorization:
        """Parse an Authorization dict (authorization.proto field names) as istiod sends it.

        Like ztunnel: an unknown scope or action is an error; a StringMatch without a kind and
        an IP that does not parse are dropped.
        """
        if not isinstance(resource, Mapping):
            raise InvalidAuthorization(f"an Authorization must be an object, got {type(resource).__name__}")
        name = _str(resource, "name", required=True)
        namespace = _str(resource, "namespace")
        scope = _enum(resource.get("scope", "GLOBAL"), SCOPES, "scope")
        action = _enum(resource.get("action", "ALLOW"), ACTIONS, "action")
        rules = []
        for rule in _list(resource, "rules"):
            clauses = []
            for clause in _list(rule, "clauses"):
                clauses.append(tuple(_parse_match(m) for m in _list(clause, "matches")))
            rules.append(tuple(clauses))
        return cls(name, namespace, scope, action, tuple(rules), bool(resource.get("dry_run", False)))


def _str(d: Mapping[str, Any], key: str, required: bool = False) -> str:
    value = d.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InvalidAuthorization(f"{key} must be a string, got {value!r}")
    if required and not value:
        raise InvalidAuthorization(f"{key} is required")
    return value


def _enum(value: Any, allowed: tuple[str, ...], what: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(allowed):
        return allowed[value]  # proto enum number
    if isinstance(value, str) and value.upper() in allowed:
        return value.upper()
    raise InvalidAuthorization(f"unknown {what} {value!r} (expected one of {', '.join(allowed)})")


def _list(d: Any, key: str) -> list[Any]:
    if not isinstance(d, Mapping):
        raise InvalidAuthorization(f"expected an object holding {key!r}, got {d!r}")
    value = d.get(key) or []
    if not isinstance(value, list):
        raise InvalidAuthorization(f"{key} must be a list, got {value!r}")
    return value


def _string_matches(values: list[Any], what: str) -> tuple[StringMatch, ...]:
    out = []
    for v in values:
        if not isinstance(v, Mapping):
            raise InvalidAuthorization(f"{what}: a StringMatch must be an object, got {v!r}")
        kinds = [k for k in STRING_MATCH_KINDS if k in v]
        if not kinds:
            continue  # no match_type set: ztunnel drops it
        kind = kinds[0]
        value = "" if kind == "presence" else v[kind]
        if not isinstance(value, str):
            raise InvalidAuthorization(f"{what}: {kind} must be a string, got {value!r}")
        out.append(StringMatch(kind, value))
    return tuple(out)


def _service_accounts(values: list[Any]) -> tuple[ServiceAccountMatch, ...]:
    out = []
    for v in values:
        if not isinstance(v, Mapping):
            raise InvalidAuthorization(f"service_accounts: expected {{namespace, service_account}}, got {v!r}")
        out.append(ServiceAccountMatch(str(v.get("namespace", "")), str(v.get("service_account", ""))))
    return tuple(out)


def _networks(values: list[Any]) -> tuple[IpNetwork, ...]:
    """"10.0.0.0/8", "10.1.2.3" (a /32) or {"address": "10.1.2.3", "length": 32}; an address
    that does not parse is dropped, as ztunnel does."""
    out = []
    for v in values:
        try:
            if isinstance(v, Mapping):
                addr = ipaddress.ip_address(v["address"])
                length = v.get("length", addr.max_prefixlen)
                out.append(ipaddress.ip_network(f"{addr}/{length}", strict=False))
            else:
                out.append(ipaddress.ip_network(str(v), strict=False))
        except (KeyError, ValueError, TypeError):
            continue
    return tuple(out)


def _ports(values: list[Any], what: str) -> tuple[int, ...]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 65536:
            raise InvalidAuthorization(f"{what}: not a port number: {v!r}")
        out.append(v)
    return tuple(out)


def _parse_match(m: Any) -> Match:
    if not isinstance(m, Mapping):
        raise InvalidAuthorization(f"a Match must be an object, got {m!r}")
    g = lambda k: _list(m, k)
    return Match(
        namespaces=_string_matches(g("namespaces"), "namespaces"),
        not_namespaces=_string_matches(g("not_namespaces"), "not_namespaces"),
        service_accounts=_service_accounts(g("service_accounts")),
        not_service_accounts=_service_accounts(g("not_service_accounts")),
        principals=_string_matches(g("principals"), "principals"),
        not_principals=_string_matches(g("not_principals"), "not_principals"),
        source_ips=_networks(g("source_ips")),
        not_source_ips=_networks(g("not_source_ips")),
        destination_ips=_networks(g("destination_ips")),
        not_destination_ips=_networks(g("not_destination_ips")),
        destination_ports=_ports(g("destination_ports"), "destination_ports"),
        not_destination_ports=_ports(g("not_destination_ports"), "not_destination_ports"),
    )


# ---------------------------------------------------------------------------------------------
# Matching


def _field_holds(positive: Iterable[Any], negative: Iterable[Any], predicate) -> bool:
    """One field of a Match: some positive value holds (or none declared), and no negative
    value holds (or none declared)."""
    positive, negative = tuple(positive), tuple(negative)
    pos = not positive or any(predicate(v) for v in positive)
    neg = not negative or not any(predicate(v) for v in negative)
    return pos and neg


def match_holds(m: Match, conn: Connection) -> bool:
    """Whether every field of one (non-empty) Match holds for `conn`."""
    src_ip = ipaddress.ip_address(conn.src_ip)
    dst_ip = ipaddress.ip_address(conn.dst_ip)
    identity_uri = conn.src_identity.uri if conn.src_identity else ""
    namespace = conn.src_identity.namespace if conn.src_identity else ""
    return (
        _field_holds(m.destination_ips, m.not_destination_ips, lambda n: dst_ip in n)
        and _field_holds(m.source_ips, m.not_source_ips, lambda n: src_ip in n)
        and _field_holds(m.destination_ports, m.not_destination_ports, lambda p: p == conn.dst_port)
        and _field_holds(m.service_accounts, m.not_service_accounts,
                         lambda sa: sa.matches(conn.src_identity))
        and _field_holds(m.principals, m.not_principals, lambda s: s.matches_principal(identity_uri))
        and _field_holds(m.namespaces, m.not_namespaces, lambda s: s.matches(namespace))
    )


def matches(policy: Authorization | Mapping[str, Any], conn: Connection) -> bool:
    """Whether `policy` matches `conn` (zt `Authorization::matches`).

    Any rule matches <- all its clauses match <- any of a clause's (non-empty) Matches holds.
    A policy without rules matches nothing; a clause without matches matches everything.
    """
    if not isinstance(policy, Authorization):
        policy = Authorization.from_resource(policy)
    if not policy.rules:
        return False
    for rule in policy.rules:
        rule_matches = True
        for clause in rule:
            clause_matches = not clause or any(
                match_holds(m, conn) for m in clause if not m.is_empty())
            if not clause_matches:
                rule_matches = False
                break
        if rule_matches:
            return True
    return False


# ---------------------------------------------------------------------------------------------
# The decision


@dataclass(frozen=True)
class DryRun:
    """A dry-run policy's result: evaluated and reported, never enforced."""

    policy: str
    action: str
    matched: bool

    def __str__(self) -> str:
        verb = "would deny" if self.action == "DENY" else "would allow"
        return f"dry-run {self.action} {self.policy}: {verb if self.matched else 'does not match'}"


@dataclass(frozen=True)
class Decision:
    """The outcome of `assert_rbac`: allowed or not, why (a sentence), and the deciding policy."""

    allowed: bool
    reason: str
    policy: str | None = None
    evaluated: tuple[str, ...] = ()
    dry_run: tuple[DryRun, ...] = field(default=())


def assert_rbac(policies: Iterable[Authorization], conn: Connection) -> Decision:
    """ztunnel's authorization decision for one inbound connection (zt:src/state.rs `assert_rbac`).

    `policies` are those that apply to the destination workload (ProxyState.policies_for):
    its namespace's policies, the GLOBAL ones, and its selector policies.

    1. any DENY policy matches -> deny, "explicitly denied by: ns/name";
    2. no ALLOW policy -> allow;
    3. any ALLOW policy matches -> allow;
    4. otherwise deny, "allow policies exist, but none allowed".
    """
    enforced, dry = [], []
    for p in policies:
        (dry if p.dry_run else enforced).append(p)
    dry_results = tuple(DryRun(p.key, p.action, matches(p, conn)) for p in dry)
    evaluated = tuple(p.key for p in enforced)
    deny = [p for p in enforced if p.action == "DENY"]
    allow = [p for p in enforced if p.action == "ALLOW"]

    for p in deny:
        if matches(p, conn):
            return Decision(False, EXPLICITLY_DENIED.format(key=p.key), p.key, evaluated, dry_results)
    if not allow:
        reason = ("no ALLOW policy applies to this workload, so every connection not denied is allowed"
                  if not deny else "no DENY policy matched and no ALLOW policy applies")
        return Decision(True, reason, None, evaluated, dry_results)
    for p in allow:
        if matches(p, conn):
            return Decision(True, f"allowed by: {p.key}", p.key, evaluated, dry_results)
    return Decision(False, NOT_ALLOWED, None, evaluated, dry_results)
