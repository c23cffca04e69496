"""AuthorizationPolicy and PeerAuthentication -> ztunnel's L4 `Authorization` resources.

istiod converts each `security.istio.io` AuthorizationPolicy into the much smaller
`istio.security.Authorization` message that ztunnel enforces (is:pilot/pkg/serviceregistry/
ambient/authorization.go and policies.go; zt:proto/authorization.proto). ztunnel only sees L4:
who the peer is (its certificate identity, namespace, source IP) and where the connection goes
(destination IP and port). Everything the conversion decides is here, as pure functions over the
plain data of a cluster snapshot:

- scope: a policy without `selector` in the root namespace (istio-system) is GLOBAL; without
  `selector` elsewhere it is NAMESPACE; with a `selector` it is WORKLOAD_SELECTOR, and only the
  workloads it selects list it in their `authorization_policies` (the registry does that with
  `workload_policy_names`);
- policies with `targetRefs` (or the older `targetRef`) are for a waypoint: NOT sent to ztunnel;
- actions ALLOW and DENY convert; CUSTOM and AUDIT are not supported by ztunnel (not sent);
- a dry-run policy (annotation `istio.io/dry-run: "true"`) is sent, with `dry_run` set, only when
  istiod runs with the feature `AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY=true` (off by default,
  pilot/pkg/features/ambient.go); otherwise it is not sent and its status says why;
- HTTP (L7) attributes cannot be enforced by ztunnel. In an ALLOW rule the whole rule is
  dropped (more restrictive than written); in a DENY rule only the HTTP parts are dropped, and
  what named nothing but HTTP attributes is left as an empty Match that never matches (see
  `convert_rule`). The policy gets a status warning either way;
- PeerAuthentication: when any exists, istiod sends one static DENY policy
  `istio-system/istio_converted_static_strict` that refuses peers without an identity
  (plaintext), and attaches it to the workloads whose effective mTLS mode is STRICT.

The resource shape (field names of authorization.proto, as the lab carries them in JSON):

    Authorization{name, namespace, scope: GLOBAL|NAMESPACE|WORKLOAD_SELECTOR,
                  action: ALLOW|DENY, rules: [Rule], dry_run}
    Rule{clauses: [Clause]}        every clause must match (AND)
    Clause{matches: [Match]}       any match may match (OR)
    Match{namespaces, not_namespaces, principals, not_principals, service_accounts,
          not_service_accounts, source_ips, not_source_ips, destination_ips,
          not_destination_ips, destination_ports, not_destination_ports}
                                   every field that is set must match (AND); values of one
                                   field are alternatives (OR); `not_*` means "none of these".
                                   Only the fields that are set are present in the dict.
    StringMatch {"exact": s} | {"prefix": s} | {"suffix": s} | {"presence": {}}
    Address     {"address": "10.0.0.0", "length": 8}
    ServiceAccountMatch {"namespace": ns, "service_account": sa}

A policy matches a connection when any of its rules does. One AuthorizationPolicy rule
(`from` OR-list, `to` OR-list, `when` AND-list) becomes one Rule: a clause for `from`, a clause
for `to`, and one clause per `when` condition.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

#: meshConfig.rootNamespace: selector-less policies here apply mesh-wide.
ROOT_NAMESPACE = "istio-system"
#: The static policy istiod sends when PeerAuthentications exist (is:…/ambient/policies.go).
STATIC_STRICT_POLICY = "istio_converted_static_strict"

#: `when` keys ztunnel can evaluate, and the Match fields they fill (positive, negative).
L4_WHEN_KEYS: dict[str, tuple[str, str]] = {
    "source.ip": ("source_ips", "not_source_ips"),
    "source.namespace": ("namespaces", "not_namespaces"),
    "source.principal": ("principals", "not_principals"),
    "destination.ip": ("destination_ips", "not_destination_ips"),
    "destination.port": ("destination_ports", "not_destination_ports"),
}
#: HTTP attributes of `to.operation` and `from.source` (only a waypoint can enforce them).
L7_OPERATION_FIELDS = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
L7_SOURCE_FIELDS = ("requestPrincipals", "notRequestPrincipals", "remoteIpBlocks", "notRemoteIpBlocks")


#: istiod's feature flag for dry-run policies in ambient (pilot/pkg/features/ambient.go), off by default.
DRY_RUN_FEATURE = "AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY"
DRY_RUN_DISABLED = ("the policy is dry-run (istio.io/dry-run), and support for ambient dry-run "
                    f"authorizationPolicies isn't enabled: it is not sent to ztunnel. Set {DRY_RUN_FEATURE}=true "
                    "on istiod (ztunnel 1.29 or later) to have ztunnel log what it would decide.")


def l7_warning(action: str, found: list[str]) -> str:
    """The status message a policy gets when it names HTTP attributes ztunnel cannot see."""
    what = ("Within an ALLOW policy, rules matching HTTP attributes are omitted." if action == "ALLOW" else
            "A DENY policy with HTTP attributes is enforced without its HTTP parts.")
    return (f"ztunnel does not support HTTP attributes (found: {', '.join(sorted(found))}). In ambient "
            f"mode you must use a waypoint proxy to enforce HTTP rules. {what}")


# ---------------------------------------------------------------------------------------------
# Value conversions


def string_match(value: str) -> dict[str, Any]:
    """Istio's string syntax -> StringMatch: `*` is presence, `*x` a suffix, `x*` a prefix."""
    if value == "*":
        return {"presence": {}}
    if value.startswith("*"):
        return {"suffix": value[1:]}
    if value.endswith("*"):
        return {"prefix": value[:-1]}
    return {"exact": value}


def address_match(value: str) -> dict[str, Any]:
    """An IP or CIDR (ipBlocks, source.ip) -> Address{address, length}; ValueError if invalid."""
    net = ipaddress.ip_network(value.strip(), strict=False)
    return {"address": str(net.network_address), "length": net.prefixlen}


def port_match(value: str | int) -> int:
    """A port given as a string (Istio's schema) -> int; ValueError if it is not 1..65535."""
    port = int(str(value).strip())
    if not 0 < port < 65536:
        raise ValueError(f"port {value!r} is out of range")
    return port


def service_account_match(value: str, policy_namespace: str) -> dict[str, str]:
    """`serviceAccounts` entries: `ns/sa`, or a bare `sa` meaning the policy's namespace."""
    ns, _, sa = value.rpartition("/")
    return {"namespace": ns or policy_namespace, "service_account": sa}


@dataclass
class _Converter:
    """Collects the warnings of one policy while its values are converted."""

    namespace: str
    warnings: list[str] = field(default_factory=list)

    def values(self, kind: str, raw: Any, what: str) -> list:
        out = []
        for v in raw or []:
            try:
                if kind == "string":
                    out.append(string_match(str(v)))
                elif kind == "ip":
                    out.append(address_match(str(v)))
                elif kind == "port":
                    out.append(port_match(v))
                else:
                    out.append(service_account_match(str(v), self.namespace))
            except ValueError as exc:
                self.warnings.append(f"{what}: ignored invalid value {v!r} ({exc})")
        return out


def _set(match: dict[str, list], name: str, values: list) -> None:
    if values:
        match[name] = values


# ---------------------------------------------------------------------------------------------
# Rules


def source_match(source: dict, conv: _Converter) -> dict[str, list]:
    """One `from[].source` -> a Match over the peer (its L4 fields only)."""
    m: dict[str, list] = {}
    _set(m, "principals", conv.values("string", source.get("principals"), "principals"))
    _set(m, "not_principals", conv.values("string", source.get("notPrincipals"), "notPrincipals"))
    _set(m, "namespaces", conv.values("string", source.get("namespaces"), "namespaces"))
    _set(m, "not_namespaces", conv.values("string", source.get("notNamespaces"), "notNamespaces"))
    _set(m, "service_accounts", conv.values("sa", source.get("serviceAccounts"), "serviceAccounts"))
    _set(m, "not_service_accounts", conv.values("sa", source.get("notServiceAccounts"), "notServiceAccounts"))
    _set(m, "source_ips", conv.values("ip", source.get("ipBlocks"), "ipBlocks"))
    _set(m, "not_source_ips", conv.values("ip", source.get("notIpBlocks"), "notIpBlocks"))
    return m


def operation_match(operation: dict, conv: _Converter) -> dict[str, list]:
    """One `to[].operation` -> a Match over the destination port (its L4 field only)."""
    m: dict[str, list] = {}
    _set(m, "destination_ports", conv.values("port", operation.get("ports"), "ports"))
    _set(m, "not_destination_ports", conv.values("port", operation.get("notPorts"), "notPorts"))
    return m


def condition_match(condition: dict, conv: _Converter) -> dict[str, list]:
    """One L4 `when` condition -> a Match with `values` in the positive field, `notValues` in
    the `not_` one."""
    key = condition.get("key", "")
    positive, negative = L4_WHEN_KEYS[key]
    kind = {"source_ips": "ip", "destination_ips": "ip", "destination_ports": "port"}.get(positive, "string")
    m: dict[str, list] = {}
    _set(m, positive, conv.values(kind, condition.get("values"), f"when {key}"))
    _set(m, negative, conv.values(kind, condition.get("notValues"), f"when {key}"))
    return m


def l7_fields_of_rule(rule: dict) -> list[str]:
    """The HTTP attributes a rule uses, in the order they appear (deduplicated)."""
    found: list[str] = []
    for entry in rule.get("to") or []:
        found += [f for f in L7_OPERATION_FIELDS if (entry.get("operation") or {}).get(f)]
    for entry in rule.get("from") or []:
        found += [f for f in L7_SOURCE_FIELDS if (entry.get("source") or {}).get(f)]
    for cond in rule.get("when") or []:
        if cond.get("key", "") not in L4_WHEN_KEYS:
            found.append(cond.get("key", ""))
    return list(dict.fromkeys(found))


def convert_rule(rule: dict, action: str, conv: _Converter) -> dict | None:
    """One AuthorizationPolicy rule -> one Rule, or None when an ALLOW rule names HTTP attributes
    (dropped whole: nothing it allows gets through). In a DENY rule the HTTP attributes are left
    out and the L4 ones kept. A `from`/`to` entry or `when` condition that named only HTTP
    attributes becomes an empty Match, which ztunnel skips: a clause made only of those never
    matches, so such a DENY rule is a no-op (and a DENY policy with only such rules denies
    nothing)."""
    l7 = l7_fields_of_rule(rule)
    if l7:
        conv.warnings.append(l7_warning(action, l7))
        if action == "ALLOW":
            return None
    clauses = []
    if rule.get("from"):
        clauses.append({"matches": [source_match(e.get("source") or {}, conv) for e in rule["from"]]})
    if rule.get("to"):
        clauses.append({"matches": [operation_match(e.get("operation") or {}, conv) for e in rule["to"]]})
    for cond in rule.get("when") or []:
        # An HTTP `when` key (DENY only; an ALLOW rule was dropped above) leaves an empty Match.
        l4 = cond.get("key", "") in L4_WHEN_KEYS
        clauses.append({"matches": [condition_match(cond, conv) if l4 else {}]})
    return {"clauses": clauses}


# ---------------------------------------------------------------------------------------------
# Policies


def has_target_refs(spec: dict) -> bool:
    """Policies bound to a Gateway/Service with targetRefs are enforced by a waypoint."""
    return bool(spec.get("targetRefs") or spec.get("targetRef"))


def policy_scope(namespace: str, spec: dict, root_namespace: str = ROOT_NAMESPACE) -> str:
    if spec.get("selector") is not None:
        return "WORKLOAD_SELECTOR"
    return "GLOBAL" if namespace == root_namespace else "NAMESPACE"


def dry_run_feature_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """istiod's feature flag AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY (default false), read from
    istiod's environment as Istio's features are: `AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY=true
    ambient-lab up` turns it on for a lab."""
    return environ.get(DRY_RUN_FEATURE, "false").lower() in ("1", "true", "t", "yes")


def is_dry_run(raw: dict) -> bool:
    annotations = (raw.get("metadata") or {}).get("annotations") or {}
    return str(annotations.get("istio.io/dry-run", "")).lower() == "true"


def convert_policy(namespace: str, name: str, raw: dict, root_namespace: str = ROOT_NAMESPACE,
                   dry_run_enabled: bool = False) -> tuple[dict | None, list[str]]:
    """One AuthorizationPolicy manifest -> (the Authorization for ztunnel or None, warnings).

    None means "not for ztunnel": a policy with targetRefs (a waypoint enforces it), with an
    action ztunnel does not implement (CUSTOM, AUDIT), or a dry-run policy while istiod's dry-run
    feature is off (authorization.go `convertAuthorizationPolicy`)."""
    spec = raw.get("spec") or {}
    if has_target_refs(spec):
        return None, []
    action = spec.get("action") or "ALLOW"
    if action not in ("ALLOW", "DENY"):
        return None, [f"ztunnel does not support the {action} action"]
    if is_dry_run(raw) and not dry_run_enabled:
        return None, [DRY_RUN_DISABLED]
    conv = _Converter(namespace)
    rules = []
    for rule in spec.get("rules") or []:
        converted = convert_rule(rule or {}, action, conv)
        if converted is not None:
            rules.append(converted)
    return ({"name": name, "namespace": namespace, "scope": policy_scope(namespace, spec, root_namespace),
             "action": action, "rules": rules, "dry_run": is_dry_run(raw)},
            list(dict.fromkeys(conv.warnings)))


def static_strict_policy(root_namespace: str = ROOT_NAMESPACE) -> dict:
    """The DENY policy behind PeerAuthentication STRICT: deny any peer without a principal,
    i.e. every plaintext connection."""
    return {"name": STATIC_STRICT_POLICY, "namespace": root_namespace, "scope": "WORKLOAD_SELECTOR",
            "action": "DENY",
            "rules": [{"clauses": [{"matches": [{"not_principals": [{"presence": {}}]}]}]}],
            "dry_run": False}


def _objects(snapshot: dict, kind: str) -> list[dict]:
    return sorted((o for o in snapshot.get("objects", []) if o.get("kind") == kind),
                  key=lambda o: (o.get("namespace", ""), o.get("name", "")))


def build_authorizations(snapshot: dict, root_namespace: str = ROOT_NAMESPACE, dry_run_enabled: bool = False
                         ) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """Every Authorization istiod sends to ztunnel, keyed "ns/name", and the status warnings of
    every AuthorizationPolicy ("ns/name" -> list of messages, empty when all is well)."""
    resources: dict[str, dict] = {}
    statuses: dict[str, list[str]] = {}
    for obj in _objects(snapshot, "AuthorizationPolicy"):
        key = f"{obj['namespace']}/{obj['name']}"
        converted, warnings = convert_policy(obj["namespace"], obj["name"], obj.get("raw") or {}, root_namespace,
                                             dry_run_enabled)
        statuses[key] = warnings
        if converted is not None:
            resources[key] = converted
    if _objects(snapshot, "PeerAuthentication"):
        resources[f"{root_namespace}/{STATIC_STRICT_POLICY}"] = static_strict_policy(root_namespace)
    return resources, statuses


# ---------------------------------------------------------------------------------------------
# Which workloads carry which selector policies


def selector_selects(selector: dict | None, labels: dict[str, str]) -> bool:
    """An Istio WorkloadSelector: every matchLabels entry is among the pod's labels (an empty
    matchLabels selects every workload of the namespace)."""
    match_labels = (selector or {}).get("matchLabels") or {}
    return all(labels.get(k) == v for k, v in match_labels.items())


def peer_authentication_mode(snapshot: dict, namespace: str, labels: dict[str, str],
                             root_namespace: str = ROOT_NAMESPACE) -> str:
    """A workload's effective PeerAuthentication mTLS mode: the workload-selector policy of its
    namespace, else its namespace's policy, else the mesh-wide one in the root namespace; UNSET
    (or no mode) inherits from the next level; PERMISSIVE when nothing says otherwise.
    (portLevelMtls is not modelled.)"""
    pas = _objects(snapshot, "PeerAuthentication")

    def mode(obj: dict) -> str:
        return str((((obj.get("raw") or {}).get("spec") or {}).get("mtls") or {}).get("mode") or "UNSET")

    def selector(obj: dict) -> dict | None:
        """A selector with no matchLabels counts as none (namespace- or mesh-wide)."""
        sel = ((obj.get("raw") or {}).get("spec") or {}).get("selector")
        return sel if (sel or {}).get("matchLabels") else None

    levels = [
        [p for p in pas if p["namespace"] == namespace and namespace != root_namespace
         and selector(p) is not None and selector_selects(selector(p), labels)],
        [p for p in pas if p["namespace"] == namespace and selector(p) is None],
        [p for p in pas if p["namespace"] == root_namespace and selector(p) is None],
    ]
    for candidates in levels:
        for p in candidates:  # several at one level: the first by name decides (Istio: the oldest)
            if mode(p) != "UNSET":
                return mode(p)
            break
    return "PERMISSIVE"


def workload_policy_names(snapshot: dict, namespace: str, labels: dict[str, str],
                          root_namespace: str = ROOT_NAMESPACE, dry_run_enabled: bool = False) -> list[str]:
    """The `authorization_policies` of one workload: the WORKLOAD_SELECTOR policies (of its own
    namespace or the root namespace) that select it, sorted, then the static STRICT policy when
    its PeerAuthentication mode is STRICT. NAMESPACE and GLOBAL policies are not listed:
    ztunnel finds those by scope."""
    names = []
    for obj in _objects(snapshot, "AuthorizationPolicy"):
        if obj["namespace"] not in (namespace, root_namespace):
            continue
        spec = (obj.get("raw") or {}).get("spec") or {}
        if spec.get("selector") is None or not selector_selects(spec["selector"], labels):
            continue
        converted, _ = convert_policy(obj["namespace"], obj["name"], obj.get("raw") or {}, root_namespace,
                                      dry_run_enabled)
        if converted is not None:
            names.append(f"{obj['namespace']}/{obj['name']}")
    names.sort()
    if _objects(snapshot, "PeerAuthentication") and \
            peer_authentication_mode(snapshot, namespace, labels, root_namespace) == "STRICT":
        names.append(f"{root_namespace}/{STATIC_STRICT_POLICY}")
    return names
