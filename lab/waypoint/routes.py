"""HTTPRoute at the waypoint: which rule a request matches, which backend it goes to, with
which timeout and retries.

In ambient mode an HTTPRoute whose `parentRefs` name a **Service** (Gateway API's mesh support,
"GAMMA") is enforced by that Service's waypoint: istiod turns it into Envoy routes on the
waypoint's `main_internal` listener (is:pilot/pkg/config/kube/gateway/conversion.go,
is:pilot/pkg/networking/core/listener_waypoint.go). This module is the lab's version of what
Envoy's router then does with them, as pure functions:

- **Matching** (`RouteMatch.matches`): path `Exact`, `PathPrefix` (element by element: `/abc`
  matches `/abc`, `/abc/` and `/abc/def`, never `/abcd`; a trailing `/` in the prefix is
  ignored), `RegularExpression` (the whole path must match); headers `Exact` or
  `RegularExpression` (names case-insensitive, repeated headers joined with ","); query
  parameters (the first value of a name); method. All conditions of one match must hold; any
  match of a rule may. A rule without `matches` matches everything (`PathPrefix /`, the CRD's
  default). Paths are compared without the query, after removing `.`/`..` segments (Istio's
  default path normalization, BASE).
- **Precedence** across every rule of every route attached to the Service (the Gateway API
  spec, `HTTPRouteRule`): Exact path first, then (Istio's choice for what the spec leaves open)
  RegularExpression, then the longest PathPrefix; then a match with a method; then more header
  matches; then more query-param matches. Remaining ties: the older route (the lab has no
  creation time and uses the order in which routes are given, which config.py makes
  `namespace/name` alphabetical), then the first rule, then the first match.
- **No route attached**: the Service's own endpoints, default load balancing. **Routes attached
  but none matches**: 404 with response flag `NR` (GAMMA: "the request is rejected").
- **Backends** (`choose_backend`): a random choice weighted by `weight` (default 1); weight 0
  never receives traffic; all weights 0 is a 500. An invalid backendRef (no such Service or
  port, wrong kind) keeps its share of the traffic and answers 500 for it, as the spec says.
  A rule with no backendRefs sends to the parent Service itself (the lab's reading of GAMMA:
  the route re-shapes traffic to its Service, so the Service's own backend is the default).
- **Load balancing** over a backend's endpoints (`pick_endpoint`): Istio's default
  `LEAST_REQUEST` (Envoy picks two endpoints at random and takes the one with fewer active
  requests; with no counts that is a uniform random choice), or `RANDOM` / `ROUND_ROBIN`
  from a DestinationRule. On a retry, endpoints already tried are avoided when possible
  (Istio's `previous_hosts` retry predicate).
- **Timeouts**: `timeouts.request` bounds the whole request, retries included (Istio's default:
  none); `timeouts.backendRequest` bounds each try.
- **Retries** (`RetryPolicy`): Istio's default retry policy for HTTP routes
  (is:pilot/pkg/networking/core/route/retry/retry.go, `cachedDefaultPolicy`): **2 retries** (3
  tries at most), on `connect-failure`, `refused-stream`, `unavailable`, `cancelled` (the last two
  are gRPC statuses) and `retriable-status-codes` with **no code listed**: a backend's 503 is
  returned after one try, and only failures to get an answer are retried (users who want 503
  retried add the code, e.g. by an HTTPRoute `retry.codes`, istio/ztunnel#1662); no per-try timeout; a retry prefers another endpoint; backoff is Envoy's fully jittered
  exponential backoff starting at 25 ms, capped at 10 times that. Envoy's other conditions are
  understood too: `5xx` (any 5xx, or no answer at all: connect failure, reset, per-try
  timeout), `gateway-error` (502/503/504 or no answer), `reset` (no answer), `connect-failure`
  (the connection to the endpoint failed). A circuit-breaker overflow (UO) is never retried.
  An HTTPRoute `retry` (`attempts`, `codes`, `backoff`) replaces attempts, codes and backoff, as
  istiod converts it (pilot/pkg/config/kube/gateway/conversion.go): `connect-failure`,
  `refused-stream`, `unavailable`, `cancelled`, plus `retriable-status-codes` only when `codes`
  lists some; without `codes`, no status code is retried.

Times are seconds (floats). Durations in manifests use Gateway API / Go syntax (`parse_duration`).
"""

from __future__ import annotations

import posixpath
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from lab.waypoint import filters as flt
from lab.waypoint.filters import Filter, FilterError, Header

PATH_TYPES = ("Exact", "PathPrefix", "RegularExpression")
VALUE_TYPES = ("Exact", "RegularExpression")
#: Envoy's response flag when no route matched, and its response code details.
NO_ROUTE_FLAG = "NR"
#: The Envoy route name of the catch-all route to the Service itself.
DEFAULT_ROUTE_NAME = "default"

#: Istio's default retry conditions for HTTP routes.
ISTIO_DEFAULT_RETRY_ON = ("connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes")
# what istiod turns an HTTPRoute `retry` into, before any `codes`
HTTPROUTE_RETRY_ON = ("connect-failure", "refused-stream", "unavailable", "cancelled")
RETRY_CONDITIONS = ("5xx", "gateway-error", "reset", "connect-failure", "refused-stream", "retriable-status-codes",
                    "unavailable", "cancelled", "retriable-4xx")
#: Outcomes of a try that are not an HTTP status: the upstream never answered.
NO_ANSWER_OUTCOMES = ("connect-failure", "reset", "refused-stream", "per-try-timeout")
GATEWAY_ERRORS = (502, 503, 504)


class RouteError(ValueError):
    """Something in an HTTPRoute the lab (like Istio) rejects: the route is not Accepted."""


# ---------------------------------------------------------------------------------------------
# Durations


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(value: str | int | float) -> float:
    """`10s`, `1h30m`, `500ms`, `1.5s` (Gateway API and Go/protobuf durations) -> seconds.
    A bare number is seconds. Raises ValueError for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"negative duration {value!r}")
        return float(value)
    text = str(value).strip()
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(f"invalid duration {value!r} (want e.g. 10s, 500ms, 1h30m)")
    return total


# ---------------------------------------------------------------------------------------------
# The request


@dataclass(frozen=True)
class Request:
    """An HTTP request as the waypoint sees it after the HBONE tunnel: method, `:path` (query
    included), headers as (name, value) pairs, and the authority (Host)."""

    method: str
    path: str
    headers: tuple[Header, ...] = ()
    authority: str = ""
    scheme: str = "http"

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", tuple((str(k), str(v)) for k, v in self.headers))
        if not self.authority:
            host = flt.get_header(self.headers, "host")
            if host:
                object.__setattr__(self, "authority", host)

    def header(self, name: str) -> str | None:
        """All values of a header joined with "," (Envoy's view of repeated headers)."""
        if name.lower() in (":authority", "host"):
            return self.authority or flt.get_header(self.headers, "host")
        if name.lower() == ":method":
            return self.method
        if name.lower() == ":path":
            return self.path
        return flt.get_header(self.headers, name)

    @property
    def path_only(self) -> str:
        """The path without query, normalized (`.` and `..` segments removed)."""
        return normalize_path(self.path.partition("?")[0])

    @property
    def query_params(self) -> list[tuple[str, str]]:
        return parse_qsl(self.path.partition("?")[2], keep_blank_values=True)

    def query_param(self, name: str) -> str | None:
        """The first value of a query parameter (names are case-sensitive)."""
        for k, v in self.query_params:
            if k == name:
                return v
        return None


def normalize_path(path: str) -> str:
    """RFC 3986 dot-segment removal, as Envoy's `normalize_path` (Istio's BASE normalization)."""
    if not path:
        return "/"
    if not path.startswith("/"):
        path = "/" + path
    trailing = path.endswith("/") and path != "/"
    if "/." not in path:
        return path
    out = posixpath.normpath(path)
    if out.startswith("//"):  # normpath keeps a leading double slash
        out = "/" + out.lstrip("/")
    if trailing and not out.endswith("/"):
        out += "/"
    return out


# ---------------------------------------------------------------------------------------------
# Matches


_RE2_UNSUPPORTED = re.compile(r"\(\?[=!]|\(\?<[=!]|\\[1-9]")


def compile_regex(pattern: str, what: str) -> re.Pattern:
    """A RegularExpression of a route. Envoy uses RE2: lookarounds and backreferences, which
    Python would accept, are refused like every invalid pattern (RouteError)."""
    if _RE2_UNSUPPORTED.search(pattern):
        raise RouteError(f"{what}: regular expression {pattern!r} uses a lookaround or backreference, "
                         "which RE2 (Envoy's regex engine) does not support")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise RouteError(f"{what}: invalid regular expression {pattern!r}: {exc}") from None


@dataclass(frozen=True)
class PathMatch:
    type: str = "PathPrefix"
    value: str = "/"
    regex: re.Pattern | None = field(default=None, compare=False, repr=False)

    def matches(self, path: str) -> bool:
        if self.type == "Exact":
            return path == self.value
        if self.type == "RegularExpression":
            return self.regex is not None and self.regex.fullmatch(path) is not None
        prefix = self.value.rstrip("/")
        return prefix == "" or path == prefix or path.startswith(prefix + "/")

    @property
    def rank(self) -> int:
        """Exact > RegularExpression > PathPrefix (Istio's order; the spec leaves regex open)."""
        return {"Exact": 3, "RegularExpression": 2, "PathPrefix": 1}[self.type]


@dataclass(frozen=True)
class ValueMatch:
    """A header or query parameter condition: name, Exact or RegularExpression value."""

    name: str
    value: str
    type: str = "Exact"
    regex: re.Pattern | None = field(default=None, compare=False, repr=False)

    def matches(self, actual: str | None) -> bool:
        if actual is None:
            return False
        if self.type == "RegularExpression":
            return self.regex is not None and self.regex.fullmatch(actual) is not None
        return actual == self.value


@dataclass(frozen=True)
class RouteMatch:
    """One entry of `rules[].matches`: every condition must hold."""

    path: PathMatch = PathMatch()
    headers: tuple[ValueMatch, ...] = ()
    query_params: tuple[ValueMatch, ...] = ()
    method: str | None = None

    def matches(self, request: Request) -> bool:
        if self.method is not None and request.method != self.method:
            return False
        if not self.path.matches(request.path_only):
            return False
        if not all(h.matches(request.header(h.name)) for h in self.headers):
            return False
        return all(q.matches(request.query_param(q.name)) for q in self.query_params)

    def precedence(self) -> tuple[int, int, int, int, int]:
        """Sort key, smaller first: the spec's precedence order."""
        length = len(self.path.value) if self.path.type != "RegularExpression" else 0
        return (-self.path.rank, -length, 0 if self.method else 1, -len(self.headers), -len(self.query_params))


# ---------------------------------------------------------------------------------------------
# Rules and routes


@dataclass(frozen=True)
class BackendRef:
    """A `backendRefs` entry: a Service (namespace, name, port) and its weight. `problem` is
    set by config.py when the reference does not resolve; such a backend answers 500."""

    name: str
    namespace: str
    port: int | None
    weight: int = 1
    kind: str = "Service"
    group: str = ""
    filters: tuple[Filter, ...] = ()
    problem: str = ""

    @property
    def key(self) -> tuple[str, str, int | None]:
        return (self.namespace, self.name, self.port)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}:{self.port}"


@dataclass(frozen=True)
class RetryPolicy:
    """Envoy's retry policy on a route (see the module docstring for the lab's defaults).

    `attempts` is the number of *retries* (Envoy `num_retries`), so at most attempts+1 tries.
    """

    attempts: int = 2
    retry_on: tuple[str, ...] = ISTIO_DEFAULT_RETRY_ON
    retriable_status_codes: tuple[int, ...] = ()  # Istio's default lists none
    per_try_timeout: float | None = None
    backoff_base: float = 0.025
    backoff_max: float | None = None

    def retriable(self, outcome: int | str) -> bool:
        """Does this outcome of a try (an HTTP status, or one of NO_ANSWER_OUTCOMES) call for a
        retry under `retry_on`? Circuit-breaker overflow ("overflow") never does."""
        on = set(self.retry_on)
        if isinstance(outcome, str):
            if outcome not in NO_ANSWER_OUTCOMES:
                return False
            if on & {"5xx", "gateway-error", "reset"}:
                return True
            if outcome == "connect-failure" and "connect-failure" in on:
                return True
            return outcome == "refused-stream" and "refused-stream" in on
        if "5xx" in on and 500 <= outcome <= 599:
            return True
        if "gateway-error" in on and outcome in GATEWAY_ERRORS:
            return True
        if "retriable-4xx" in on and outcome == 409:
            return True
        return "retriable-status-codes" in on and outcome in self.retriable_status_codes

    def should_retry(self, retries_done: int, outcome: int | str) -> bool:
        return retries_done < self.attempts and self.retriable(outcome)

    def backoff(self, retries_done: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number `retries_done + 1`: fully jittered exponential
        (a random time in [0, base * 2^n)), capped at `backoff_max` (default 10 x base)."""
        rng = rng or random.Random()
        cap = self.backoff_max if self.backoff_max is not None else 10 * self.backoff_base
        return min(cap, rng.random() * self.backoff_base * (2 ** retries_done))


#: What a rule without a retry stanza gets: Istio's default.
ISTIO_DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True)
class RouteRule:
    index: int
    matches: tuple[RouteMatch, ...]
    filters: tuple[Filter, ...] = ()
    backends: tuple[BackendRef, ...] = ()
    timeout: float | None = None  # timeouts.request; None = no timeout
    retry: RetryPolicy = ISTIO_DEFAULT_RETRY
    name: str = ""


@dataclass(frozen=True)
class ParentRef:
    kind: str
    group: str
    name: str
    namespace: str
    port: int | None = None
    section_name: str = ""

    @property
    def is_service(self) -> bool:
        return self.kind == "Service" and self.group in ("", "core")

    def __str__(self) -> str:
        port = f":{self.port}" if self.port else ""
        return f"{self.kind}/{self.namespace}/{self.name}{port}"


@dataclass(frozen=True)
class Route:
    """One HTTPRoute, parsed. `problems` non-empty means not Accepted: it routes nothing."""

    namespace: str
    name: str
    parents: tuple[ParentRef, ...]
    rules: tuple[RouteRule, ...]
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def accepted(self) -> bool:
        return not self.problems

    def route_name(self, rule: RouteRule) -> str:
        """The Envoy route name the access log shows: `namespace.name.<rule index>`."""
        return f"{self.namespace}.{self.name}.{rule.index}"


def _value_matches(raw: Any, what: str) -> tuple[ValueMatch, ...]:
    out = []
    seen = set()
    for entry in raw or []:
        kind = entry.get("type") or "Exact"
        if kind not in VALUE_TYPES:
            raise RouteError(f"{what}: match type {kind!r} is not one of {', '.join(VALUE_TYPES)}")
        name, value = str(entry.get("name", "")), str(entry.get("value", ""))
        if not name:
            raise RouteError(f"{what}: a match needs a name")
        key = name.lower() if what.endswith("headers") else name
        if key in seen:  # the spec: only the first entry of a name counts
            continue
        seen.add(key)
        regex = compile_regex(value, what) if kind == "RegularExpression" else None
        out.append(ValueMatch(name=name, value=value, type=kind, regex=regex))
    return tuple(out)


def parse_match(raw: dict, what: str) -> RouteMatch:
    path_raw = raw.get("path") or {"type": "PathPrefix", "value": "/"}
    ptype = path_raw.get("type") or "PathPrefix"
    pvalue = str(path_raw.get("value", "/"))
    if ptype not in PATH_TYPES:
        raise RouteError(f"{what}: path type {ptype!r} is not one of {', '.join(PATH_TYPES)}")
    if ptype != "RegularExpression" and not pvalue.startswith("/"):
        raise RouteError(f"{what}: path {pvalue!r} must start with /")
    regex = compile_regex(pvalue, f"{what}.path") if ptype == "RegularExpression" else None
    method = raw.get("method")
    return RouteMatch(path=PathMatch(ptype, pvalue, regex),
                      headers=_value_matches(raw.get("headers"), f"{what}.headers"),
                      query_params=_value_matches(raw.get("queryParams"), f"{what}.queryParams"),
                      method=str(method).upper() if method else None)


def parse_retry(raw: dict | None, backend_timeout: float | None) -> RetryPolicy:
    """An HTTPRoute rule's `retry` (+ `timeouts.backendRequest` as the per-try timeout)."""
    if not raw:
        return RetryPolicy(per_try_timeout=backend_timeout)
    codes = tuple(int(c) for c in raw.get("codes") or [])
    attempts = int(raw["attempts"]) if raw.get("attempts") is not None else ISTIO_DEFAULT_RETRY.attempts
    base = parse_duration(raw["backoff"]) if raw.get("backoff") else ISTIO_DEFAULT_RETRY.backoff_base
    retry_on = HTTPROUTE_RETRY_ON + (("retriable-status-codes",) if codes else ())
    return RetryPolicy(attempts=attempts, retry_on=retry_on, retriable_status_codes=codes,
                       per_try_timeout=backend_timeout, backoff_base=base)


def parse_rule(index: int, raw: dict, namespace: str, problems: list[str], warnings: list[str]) -> RouteRule:
    what = f"rules[{index}]"
    matches_raw = raw.get("matches") or [{}]
    matches = []
    for j, m in enumerate(matches_raw):
        try:
            matches.append(parse_match(m or {}, f"{what}.matches[{j}]"))
        except RouteError as exc:
            problems.append(str(exc))
    filters = []
    for j, f in enumerate(raw.get("filters") or []):
        try:
            filters.append(flt.parse_filter(f, namespace))
        except (FilterError, ValueError, TypeError) as exc:
            problems.append(f"{what}.filters[{j}]: {exc}")
    for f in filters:
        prefix_rewrite = ((isinstance(f, flt.URLRewrite) or isinstance(f, flt.RequestRedirect))
                          and f.path_type == "ReplacePrefixMatch")
        if prefix_rewrite and not (len(matches) == 1 and matches[0].path.type == "PathPrefix"):
            problems.append(f"{what}: ReplacePrefixMatch needs exactly one match, of type PathPrefix")
    backends = []
    for j, b in enumerate(raw.get("backendRefs") or []):
        port = b.get("port")
        weight = b.get("weight", 1)
        if not isinstance(weight, int) or weight < 0:
            problems.append(f"{what}.backendRefs[{j}]: weight must be a whole number >= 0, got {weight!r}")
            weight = 0
        bfilters = []
        for k, f in enumerate(b.get("filters") or []):
            try:
                bfilters.append(flt.parse_filter(f, namespace))
            except (FilterError, ValueError, TypeError) as exc:
                problems.append(f"{what}.backendRefs[{j}].filters[{k}]: {exc}")
        backends.append(BackendRef(name=str(b.get("name", "")), namespace=str(b.get("namespace") or namespace),
                                   port=int(port) if port is not None else None, weight=weight,
                                   kind=str(b.get("kind") or "Service"), group=str(b.get("group") or ""),
                                   filters=tuple(bfilters)))
    timeout = backend_timeout = None
    timeouts = raw.get("timeouts") or {}
    try:
        if timeouts.get("request") is not None:
            timeout = parse_duration(timeouts["request"]) or None  # 0s: no timeout
        if timeouts.get("backendRequest") is not None:
            backend_timeout = parse_duration(timeouts["backendRequest"]) or None
    except ValueError as exc:
        problems.append(f"{what}.timeouts: {exc}")
    if timeout and backend_timeout and backend_timeout > timeout:
        problems.append(f"{what}.timeouts: backendRequest ({backend_timeout:g}s) is longer than request ({timeout:g}s)")
    try:
        retry = parse_retry(raw.get("retry"), backend_timeout)
    except (ValueError, TypeError) as exc:
        problems.append(f"{what}.retry: {exc}")
        retry = ISTIO_DEFAULT_RETRY
    if backends and not any(b.weight for b in backends):
        warnings.append(f"{what}: every backendRef has weight 0: matching requests get 500")
    return RouteRule(index=index, matches=tuple(matches), filters=tuple(filters), backends=tuple(backends),
                     timeout=timeout, retry=retry, name=str(raw.get("name") or ""))


def parse_route(namespace: str, name: str, raw: dict) -> Route:
    """An HTTPRoute manifest (v1 or v1beta1: same schema) -> Route. Never raises: what Istio
    would reject is listed in `problems` (the route is then not Accepted)."""
    spec = raw.get("spec") or {}
    problems: list[str] = []
    warnings: list[str] = []
    parents = []
    for p in spec.get("parentRefs") or []:
        port = p.get("port")
        parents.append(ParentRef(kind=str(p.get("kind") or "Gateway"),
                                 group=str(p.get("group") if p.get("group") is not None else
                                           "gateway.networking.k8s.io"),
                                 name=str(p.get("name", "")), namespace=str(p.get("namespace") or namespace),
                                 port=int(port) if port is not None else None,
                                 section_name=str(p.get("sectionName") or "")))
    rules = tuple(parse_rule(i, r or {}, namespace, problems, warnings)
                  for i, r in enumerate(spec.get("rules") or [{}]))
    if spec.get("hostnames"):
        warnings.append("hostnames are ignored on routes attached to a Service (GAMMA)")
    return Route(namespace=namespace, name=name, parents=tuple(parents), rules=rules, problems=tuple(problems),
                 warnings=tuple(warnings))


# ---------------------------------------------------------------------------------------------
# Choosing the rule


@dataclass(frozen=True)
class MatchedRule:
    route: Route
    rule: RouteRule
    match: RouteMatch

    @property
    def route_name(self) -> str:
        return self.route.route_name(self.rule)

    @property
    def matched_prefix(self) -> str | None:
        return self.match.path.value if self.match.path.type == "PathPrefix" else None


def ordered_matches(routes: Sequence[Route]) -> list[MatchedRule]:
    """Every (route, rule, match) of the Accepted routes, in the order Envoy tries them."""
    candidates = []
    for r_order, route in enumerate(routes):
        if not route.accepted:
            continue
        for rule in route.rules:
            for m_order, match in enumerate(rule.matches):
                candidates.append((match.precedence(), r_order, rule.index, m_order, MatchedRule(route, rule, match)))
    candidates.sort(key=lambda c: c[:4])
    return [c[4] for c in candidates]


def select_rule(routes: Sequence[Route], request: Request) -> MatchedRule | None:
    """The highest-precedence rule whose match accepts the request, or None."""
    for candidate in ordered_matches(routes):
        if candidate.match.matches(request):
            return candidate
    return None


def choose_backend(backends: Sequence[BackendRef], rng: random.Random) -> BackendRef | None:
    """Weighted random choice; weight 0 never chosen; None when no weight is positive."""
    live = [b for b in backends if b.weight > 0]
    total = sum(b.weight for b in live)
    if total <= 0:
        return None
    point = rng.random() * total
    for b in live:
        point -= b.weight
        if point < 0:
            return b
    return live[-1]


# ---------------------------------------------------------------------------------------------
# The routing decision


@dataclass(frozen=True)
class RouteDecision:
    """What the router decided. `status` None means forward to `backend`; otherwise the waypoint
    answers itself with `status` (404 no route, 500 bad backend, 3xx redirect)."""

    status: int | None
    backend: BackendRef | None
    route_name: str
    response_flags: str = "-"
    details: str = "via_upstream"
    matched: MatchedRule | None = None
    filters: tuple[Filter, ...] = ()
    timeout: float | None = None
    retry: RetryPolicy = ISTIO_DEFAULT_RETRY
    location: str = ""
    message: str = ""

    @property
    def matched_prefix(self) -> str | None:
        return self.matched.matched_prefix if self.matched else None


def route_request(routes: Sequence[Route], request: Request, default_backend: BackendRef,
                  rng: random.Random | None = None) -> RouteDecision:
    """Route one request to a Service. `routes` are the HTTPRoutes attached to it (for this
    port and this client, see config.ServiceConfig.routes_for); `default_backend` is the
    Service itself."""
    rng = rng or random.Random()
    accepted = [r for r in routes if r.accepted]
    if not accepted:
        return RouteDecision(status=None, backend=default_backend, route_name=DEFAULT_ROUTE_NAME)
    matched = select_rule(accepted, request)
    if matched is None:
        return RouteDecision(status=404, backend=None, route_name="", response_flags=NO_ROUTE_FLAG,
                             details="route_not_found", message="")
    rule = matched.rule
    common = dict(route_name=matched.route_name, matched=matched, timeout=rule.timeout, retry=rule.retry)
    for f in rule.filters:
        if isinstance(f, flt.RequestRedirect):
            status, location = flt.redirect_for(request, f, matched.matched_prefix)
            return RouteDecision(status=status, backend=None, details="direct_response", location=location,
                                 filters=rule.filters, **common)
    if not rule.backends:
        return RouteDecision(status=None, backend=default_backend, filters=rule.filters, **common)
    backend = choose_backend(rule.backends, rng)
    if backend is None:
        return RouteDecision(status=500, backend=None, details="direct_response",
                             message="every backendRef of the rule has weight 0", filters=rule.filters, **common)
    if backend.problem:
        return RouteDecision(status=500, backend=backend, details="direct_response",
                             message=f"backend {backend} is invalid: {backend.problem}",
                             filters=rule.filters + backend.filters, **common)
    return RouteDecision(status=None, backend=backend, filters=rule.filters + backend.filters, **common)


# ---------------------------------------------------------------------------------------------
# Load balancing over a backend's endpoints


E = TypeVar("E")
LB_POLICIES = ("LEAST_REQUEST", "RANDOM", "ROUND_ROBIN")


def _address(endpoint: Any) -> str:
    return getattr(endpoint, "address", None) or str(endpoint)


def pick_endpoint(endpoints: Sequence[E], rng: random.Random | None = None, *, policy: str = "LEAST_REQUEST",
                  active: Mapping[str, int] | None = None, exclude: Sequence[str] = (),
                  round_robin: Callable[[], int] | None = None) -> E | None:
    """Choose one endpoint (objects with an `.address` "ip:port"), or None when there is none.

    `exclude` are addresses already tried (retries): avoided unless nothing else is left.
    `active` maps address -> requests in flight (LEAST_REQUEST). `round_robin` returns the
    next counter value (ROUND_ROBIN keeps its position between requests)."""
    rng = rng or random.Random()
    if not endpoints:
        return None
    pool = [e for e in endpoints if _address(e) not in set(exclude)] or list(endpoints)
    if policy == "ROUND_ROBIN" and round_robin is not None:
        return pool[round_robin() % len(pool)]
    if policy == "LEAST_REQUEST" and active and len(pool) > 1:
        a, b = rng.sample(pool, 2)
        return a if active.get(_address(a), 0) <= active.get(_address(b), 0) else b
    return pool[rng.randrange(len(pool))]
