"""L7 AuthorizationPolicy at the waypoint: the HTTP half of Istio authorization.

Policies with `targetRefs` never reach ztunnel (lab/istiod/authorization.py drops them); istiod
gives them to the waypoint, whose Envoy enforces them with its RBAC HTTP filter
(is:pilot/pkg/security/authz/builder, model). A policy targets a Service (`kind: Service`,
group "" or core: requests to that Service) or the waypoint itself (`kind: Gateway`: every
request through it; also `kind: GatewayClass` `istio-waypoint` from the root namespace, for every
waypoint). config.py decides which policies apply; this module evaluates them.

What a rule can say (all fields are optional; an absent field matches anything):

    from[].source:   principals, namespaces, serviceAccounts, ipBlocks, remoteIpBlocks,
                     requestPrincipals, and the not* form of each
    to[].operation:  hosts, ports, methods, paths, and the not* form of each
    when[]:          key + values / notValues

A rule matches when (any `from` matches or there is none) and (any `to` matches or there is
none) and every `when` holds. Within a source or operation every field that is set must hold
(AND), any value of a field may (OR), a not* field holds when none of its values does.

String values use Istio's wildcards: `abc` exact, `abc*` prefix, `*abc` suffix, `*` any
non-empty value. Paths also accept `{*}` (one segment) and `{**}` (any segments, last). Paths are
compared without the query string, after dot-segment removal; methods exactly; hosts ignoring
case, with or without the port. `principals` compare against the peer's SPIFFE identity without
`spiffe://` (`cluster.local/ns/default/sa/curl`): the identity of the *client pod* from the
first HBONE hop. `namespaces` come from that identity too, so plaintext (no identity) never
matches them. `ports` and `destination.port` are the Service port the client addressed.
The lab has no RequestAuthentication: `requestPrincipals` and `request.auth.*` have no value,
so their positive forms never match and their negative forms always do.

`when` keys the waypoint knows: `request.headers[<name>]`, `source.ip`, `remote.ip`,
`source.namespace`, `source.principal`, `source.serviceAccount`, `destination.ip`,
`destination.port`, `connection.sni`, `request.auth.principal`, `request.auth.audiences`,
`request.auth.presenter`, `request.auth.claims[...]`. Anything else is a status warning, and
the condition is handled the restrictive way: in an ALLOW policy the rule is dropped, in a
DENY policy the condition is dropped (the rule then denies more).

Decision (the same order as ztunnel at L4): any DENY policy matches -> 403; no ALLOW policy ->
allowed; any ALLOW policy matches -> allowed; otherwise 403. A denied request gets Envoy's
local reply: status 403, body `RBAC: access denied`. AUDIT policies only mark the request,
CUSTOM (external authorizers) is not in the lab, and `istio.io/dry-run: "true"` policies are
evaluated and reported (shadow) but never enforced.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from lab.istiod.authorization import service_account_match
from lab.tls.identity import Identity
from lab.waypoint.routes import Request

DENIED_STATUS = 403
DENIED_BODY = "RBAC: access denied"
ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")
DRY_RUN_ANNOTATION = "istio.io/dry-run"

KNOWN_WHEN_KEYS = ("source.ip", "remote.ip", "source.namespace", "source.principal", "source.serviceAccount",
                   "destination.ip", "destination.port", "connection.sni", "request.auth.principal",
                   "request.auth.audiences", "request.auth.presenter")
KNOWN_WHEN_PREFIXES = ("request.headers[", "request.auth.claims[")


# ---------------------------------------------------------------------------------------------
# What the waypoint knows about a request


@dataclass(frozen=True)
class Attributes:
    """Everything an L7 policy can look at, for one request at the waypoint."""

    request: Request
    source_ip: str
    source_identity: Identity | None
    destination_ip: str
    destination_port: int
    remote_ip: str = ""  # the original client (X-Forwarded-For); defaults to source_ip
    sni: str = ""

    @property
    def principal(self) -> str:
        return self.source_identity.principal if self.source_identity else ""

    @property
    def namespace(self) -> str:
        return self.source_identity.namespace if self.source_identity else ""


# ---------------------------------------------------------------------------------------------
# Value matchers


@dataclass(frozen=True)
class StringPattern:
    """Istio's string syntax: exact, `prefix*`, `*suffix`, `*` (any non-empty value)."""

    text: str
    ignore_case: bool = False

    def matches(self, value: str) -> bool:
        t, v = (self.text.lower(), value.lower()) if self.ignore_case else (self.text, value)
        if t == "*":
            return v != ""
        if t.startswith("*"):
            return v.endswith(t[1:])
        if t.endswith("*"):
            return v.startswith(t[:-1])
        return v == t


@dataclass(frozen=True)
class PathPattern:
    """A `paths` value: Istio's wildcards, or a template with `{*}` / `{**}`."""

    text: str
    regex: re.Pattern | None = field(default=None, compare=False)

    @classmethod
    def of(cls, text: str) -> PathPattern:
        if "{*}" in text or "{**}" in text:
            parts = []
            for seg in text.split("/"):
                if seg == "{*}":
                    parts.append("[^/]+")
                elif seg == "{**}":
                    parts.append(".+")
                else:
                    parts.append(re.escape(seg))
            return cls(text, re.compile("/".join(parts)))
        return cls(text)

    def matches(self, path: str) -> bool:
        if self.regex is not None:
            return self.regex.fullmatch(path) is not None
        return StringPattern(self.text).matches(path)


def _host_matches(pattern: StringPattern, host: str) -> bool:
    bare = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return pattern.matches(host) or pattern.matches(bare)


def _ip_in(networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network], ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in n for n in networks)


def _networks(values: Sequence[str], warnings: list[str], what: str) -> tuple:
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(str(v).strip(), strict=False))
        except ValueError:
            warnings.append(f"{what}: ignored invalid IP block {v!r}")
    return tuple(out)


def _ports(values: Sequence, warnings: list[str], what: str) -> tuple[int, ...]:
    out = []
    for v in values:
        try:
            out.append(int(str(v).strip()))
        except ValueError:
            warnings.append(f"{what}: ignored invalid port {v!r}")
    return tuple(out)


def _either(positive, negative, test) -> bool:
    """A field and its not* form: positive (if set) must match, negative (if set) must not."""
    if positive and not any(test(p) for p in positive):
        return False
    return not (negative and any(test(n) for n in negative))


# ---------------------------------------------------------------------------------------------
# Rules


@dataclass(frozen=True)
class Source:
    principals: tuple[StringPattern, ...] = ()
    not_principals: tuple[StringPattern, ...] = ()
    namespaces: tuple[StringPattern, ...] = ()
    not_namespaces: tuple[StringPattern, ...] = ()
    service_accounts: tuple[tuple[str, str], ...] = ()
    not_service_accounts: tuple[tuple[str, str], ...] = ()
    ip_blocks: tuple = ()
    not_ip_blocks: tuple = ()
    remote_ip_blocks: tuple = ()
    not_remote_ip_blocks: tuple = ()
    request_principals: tuple[StringPattern, ...] = ()
    not_request_principals: tuple[StringPattern, ...] = ()

    def matches(self, a: Attributes) -> bool:
        sa = (a.source_identity.namespace, a.source_identity.service_account) if a.source_identity else None
        return (_either(self.principals, self.not_principals, lambda p: p.matches(a.principal))
                and _either(self.namespaces, self.not_namespaces, lambda p: p.matches(a.namespace))
                and _either(self.service_accounts, self.not_service_accounts, lambda p: p == sa)
                and _either(self.ip_blocks, self.not_ip_blocks, lambda n: _ip_in([n], a.source_ip))
                and _either(self.remote_ip_blocks, self.not_remote_ip_blocks,
                            lambda n: _ip_in([n], a.remote_ip or a.source_ip))
                # no RequestAuthentication in the lab: the request principal is always empty
                and _either(self.request_principals, self.not_request_principals, lambda p: p.matches("")))


@dataclass(frozen=True)
class Operation:
    hosts: tuple[StringPattern, ...] = ()
    not_hosts: tuple[StringPattern, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    methods: tuple[StringPattern, ...] = ()
    not_methods: tuple[StringPattern, ...] = ()
    paths: tuple[PathPattern, ...] = ()
    not_paths: tuple[PathPattern, ...] = ()

    def matches(self, a: Attributes) -> bool:
        host = a.request.authority or ""
        path = a.request.path_only
        return (_either(self.hosts, self.not_hosts, lambda p: _host_matches(p, host))
                and _either(self.ports, self.not_ports, lambda p: p == a.destination_port)
                and _either(self.methods, self.not_methods, lambda p: p.matches(a.request.method))
                and _either(self.paths, self.not_paths, lambda p: p.matches(path)))


@dataclass(frozen=True)
class Condition:
    """One `when` entry. `values` must contain the attribute's value; `notValues` must not."""

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()

    def attribute(self, a: Attributes) -> str | None:
        k = self.key
        if k.startswith("request.headers[") and k.endswith("]"):
            return a.request.header(k[len("request.headers["):-1])
        return {
            "source.ip": a.source_ip,
            "remote.ip": a.remote_ip or a.source_ip,
            "source.namespace": a.namespace or None,
            "source.principal": a.principal or None,
            "source.serviceAccount": (f"{a.source_identity.namespace}/{a.source_identity.service_account}"
                                      if a.source_identity else None),
            "destination.ip": a.destination_ip,
            "destination.port": str(a.destination_port),
            "connection.sni": a.sni or None,
        }.get(k)  # request.auth.*: no JWT in the lab -> None

    def _one(self, pattern: str, value: str) -> bool:
        if self.key in ("source.ip", "remote.ip", "destination.ip"):
            try:
                return ipaddress.ip_address(value) in ipaddress.ip_network(pattern, strict=False)
            except ValueError:
                return False
        if self.key == "destination.port":
            return pattern.strip() == value
        return StringPattern(pattern).matches(value)

    def matches(self, a: Attributes) -> bool:
        value = self.attribute(a)
        if self.values and (value is None or not any(self._one(p, value) for p in self.values)):
            return False
        return not (self.not_values and value is not None and any(self._one(p, value) for p in self.not_values))


@dataclass(frozen=True)
class Rule:
    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    conditions: tuple[Condition, ...] = ()

    def matches(self, a: Attributes) -> bool:
        if self.sources and not any(s.matches(a) for s in self.sources):
            return False
        if self.operations and not any(o.matches(a) for o in self.operations):
            return False
        return all(c.matches(a) for c in self.conditions)


@dataclass(frozen=True)
class L7Policy:
    """An AuthorizationPolicy as the waypoint enforces it."""

    namespace: str
    name: str
    action: str = "ALLOW"
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False
    warnings: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def matching_rule(self, a: Attributes) -> int | None:
        """Index of the first rule that matches, or None. No rules: never matches (an ALLOW
        policy with `spec: {}` therefore denies everything it targets)."""
        for i, rule in enumerate(self.rules):
            if rule.matches(a):
                return i
        return None


def _strings(values, ignore_case: bool = False) -> tuple[StringPattern, ...]:
    return tuple(StringPattern(str(v), ignore_case) for v in values or [])


def _known_key(key: str) -> bool:
    return key in KNOWN_WHEN_KEYS or (any(key.startswith(p) for p in KNOWN_WHEN_PREFIXES) and key.endswith("]"))


def parse_source(raw: dict, namespace: str, warnings: list[str]) -> Source:
    def sas(values) -> tuple[tuple[str, str], ...]:
        out = []
        for v in values or []:
            m = service_account_match(str(v), namespace)
            out.append((m["namespace"], m["service_account"]))
        return tuple(out)

    return Source(principals=_strings(raw.get("principals")), not_principals=_strings(raw.get("notPrincipals")),
                  namespaces=_strings(raw.get("namespaces")), not_namespaces=_strings(raw.get("notNamespaces")),
                  service_accounts=sas(raw.get("serviceAccounts")),
                  not_service_accounts=sas(raw.get("notServiceAccounts")),
                  ip_blocks=_networks(raw.get("ipBlocks") or [], warnings, "ipBlocks"),
                  not_ip_blocks=_networks(raw.get("notIpBlocks") or [], warnings, "notIpBlocks"),
                  remote_ip_blocks=_networks(raw.get("remoteIpBlocks") or [], warnings, "remoteIpBlocks"),
                  not_remote_ip_blocks=_networks(raw.get("notRemoteIpBlocks") or [], warnings, "notRemoteIpBlocks"),
                  request_principals=_strings(raw.get("requestPrincipals")),
                  not_request_principals=_strings(raw.get("notRequestPrincipals")))


def parse_operation(raw: dict, warnings: list[str]) -> Operation:
    return Operation(hosts=_strings(raw.get("hosts"), True), not_hosts=_strings(raw.get("notHosts"), True),
                     ports=_ports(raw.get("ports") or [], warnings, "ports"),
                     not_ports=_ports(raw.get("notPorts") or [], warnings, "notPorts"),
                     methods=_strings(raw.get("methods")), not_methods=_strings(raw.get("notMethods")),
                     paths=tuple(PathPattern.of(str(p)) for p in raw.get("paths") or []),
                     not_paths=tuple(PathPattern.of(str(p)) for p in raw.get("notPaths") or []))


def parse_rule(raw: dict, namespace: str, action: str, warnings: list[str]) -> Rule | None:
    """One rule; None when it must be dropped (an unknown `when` key in an ALLOW policy)."""
    conditions = []
    for cond in raw.get("when") or []:
        key = str(cond.get("key", ""))
        if not _known_key(key):
            warnings.append(f"when key {key!r} is not supported by the waypoint; "
                            + ("the rule is ignored" if action != "DENY" else "the condition is ignored"))
            if action != "DENY":
                return None
            continue
        conditions.append(Condition(key, tuple(str(v) for v in cond.get("values") or []),
                                    tuple(str(v) for v in cond.get("notValues") or [])))
    return Rule(sources=tuple(parse_source(e.get("source") or {}, namespace, warnings) for e in raw.get("from") or []),
                operations=tuple(parse_operation(e.get("operation") or {}, warnings) for e in raw.get("to") or []),
                conditions=tuple(conditions))


def parse_policy(namespace: str, name: str, raw: dict) -> L7Policy:
    """An AuthorizationPolicy manifest -> L7Policy (its `warnings` are status messages)."""
    spec = raw.get("spec") or {}
    action = str(spec.get("action") or "ALLOW").upper()
    warnings: list[str] = []
    if action not in ACTIONS:
        warnings.append(f"unknown action {action!r}: the policy is ignored")
    if action == "CUSTOM":
        warnings.append("CUSTOM (external authorization) is not available in the lab: the policy is ignored")
    rules = []
    for r in spec.get("rules") or []:
        rule = parse_rule(r or {}, namespace, action, warnings)
        if rule is not None:
            rules.append(rule)
    annotations = (raw.get("metadata") or {}).get("annotations") or {}
    return L7Policy(namespace=namespace, name=name, action=action, rules=tuple(rules),
                    dry_run=str(annotations.get(DRY_RUN_ANNOTATION, "")).lower() == "true",
                    warnings=tuple(dict.fromkeys(warnings)))


# ---------------------------------------------------------------------------------------------
# The decision


@dataclass(frozen=True)
class AuthzDecision:
    """The RBAC filter's verdict. `details` is Envoy's response code details string."""

    allowed: bool
    policy: str = ""  # "ns/name" of the deciding policy ("" when none decided)
    rule: int | None = None
    reason: str = ""
    details: str = ""
    shadow: tuple[str, ...] = ()  # what dry-run policies would have done
    audit: tuple[str, ...] = ()  # AUDIT policies that matched

    @property
    def status(self) -> int | None:
        return None if self.allowed else DENIED_STATUS

    @property
    def body(self) -> str:
        return "" if self.allowed else DENIED_BODY


def _policy_id(p: L7Policy, rule: int | None) -> str:
    return f"ns[{p.namespace}]-policy[{p.name}]-rule[{rule}]"


def evaluate(policies: Sequence[L7Policy], attrs: Attributes) -> AuthzDecision:
    """DENY first, then "no ALLOW policy -> allow", then "any ALLOW matches -> allow", else deny."""
    live = [p for p in policies if not p.dry_run and p.action in ("ALLOW", "DENY")]
    shadow = []
    for p in policies:
        if p.dry_run and p.action in ("ALLOW", "DENY"):
            hit = p.matching_rule(attrs)
            verb = ("would deny" if hit is not None else "would not deny") if p.action == "DENY" else \
                ("would allow" if hit is not None else "would not allow")
            shadow.append(f"{p.key}: {verb}")
    audit = tuple(p.key for p in policies if p.action == "AUDIT" and p.matching_rule(attrs) is not None)
    extra = dict(shadow=tuple(shadow), audit=audit)
    for p in sorted((p for p in live if p.action == "DENY"), key=lambda p: p.key):
        rule = p.matching_rule(attrs)
        if rule is not None:
            return AuthzDecision(False, p.key, rule, f"explicitly denied by: {p.key}",
                                 f"rbac_access_denied_matched_policy[{_policy_id(p, rule)}]", **extra)
    allows = sorted((p for p in live if p.action == "ALLOW"), key=lambda p: p.key)
    if not allows:
        return AuthzDecision(True, "", None, "no ALLOW policy applies", "", **extra)
    for p in allows:
        rule = p.matching_rule(attrs)
        if rule is not None:
            return AuthzDecision(True, p.key, rule, f"allowed by: {p.key}", "", **extra)
    return AuthzDecision(False, "", None, "allow policies exist, but none allowed",
                         "rbac_access_denied_matched_policy[none]", **extra)
