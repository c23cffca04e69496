"""HTTPRoute filters at the waypoint: what Envoy does to a request and its response once a route
rule matched (Gateway API `HTTPRouteFilter`; Istio turns them into Envoy route actions in
is:pilot/pkg/config/kube/gateway/conversion.go).

Core and extended filters reproduced here:

- `RequestHeaderModifier` / `ResponseHeaderModifier`: `set` (overwrite), `add` (append one
  more value), `remove` (delete every value). Header names are case-insensitive. Envoy first
  removes, then sets, then adds (its header parser applies `headers_to_remove` before
  `headers_to_add`, and Istio emits the `set` entries before the `add` ones);
- `URLRewrite`: `hostname` replaces the Host (`:authority`); `path` is `ReplaceFullPath` (the
  whole path, query kept) or `ReplacePrefixMatch` (only the part the rule's PathPrefix
  matched, segment-wise, following the table of the Gateway API spec);
- `RequestMirror`: a copy of the request is sent to another Service, fire and forget; the
  answer is ignored. Envoy adds `-shadow` to the Host of the copy. `percent`/`fraction`
  mirror only part of the traffic;
- `RequestRedirect`: answer 302 (or `statusCode`) with a `Location` built from the request.

Everything is a pure function over plain values: a header list is a list of `(name, value)`
pairs (the order and repeated names of HTTP/1.1 are kept). Nothing here opens a socket.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:  # routes imports this module; the request type is only needed for hints
    from lab.waypoint.routes import Request

Header = tuple[str, str]

#: Envoy's suffix on the Host of a mirrored request (request_mirror_policies).
SHADOW_SUFFIX = "-shadow"


class FilterError(ValueError):
    """A filter the lab cannot apply: the route gets `Accepted: False` (UnsupportedValue)."""


# ---------------------------------------------------------------------------------------------
# Filter types


@dataclass(frozen=True)
class HeaderModifier:
    """`set`, `add`, `remove` of a RequestHeaderModifier or ResponseHeaderModifier."""

    set: tuple[Header, ...] = ()
    add: tuple[Header, ...] = ()
    remove: tuple[str, ...] = ()

    def apply(self, headers: Iterable[Header]) -> list[Header]:
        out = list(headers)
        for name in self.remove:
            out = remove_header(out, name)
        for name, value in self.set:
            out = set_header(out, name, value)
        for name, value in self.add:
            out = add_header(out, name, value)
        return out


@dataclass(frozen=True)
class RequestHeaderModifier(HeaderModifier):
    """Changes the request headers before the request goes to the backend."""


@dataclass(frozen=True)
class ResponseHeaderModifier(HeaderModifier):
    """Changes the response headers before the response goes back to the client."""


@dataclass(frozen=True)
class URLRewrite:
    """Rewrites Host and/or path on the way to the backend (the client never sees it)."""

    hostname: str | None = None
    path_type: str | None = None  # "ReplaceFullPath" | "ReplacePrefixMatch" | None
    path_value: str | None = None


@dataclass(frozen=True)
class RequestMirror:
    """Send a copy of the request to `namespace/name:port` (a Service), `percent` % of the time."""

    name: str
    namespace: str
    port: int | None
    percent: float = 100.0
    kind: str = "Service"
    group: str = ""


@dataclass(frozen=True)
class RequestRedirect:
    """Answer the client with a redirect instead of forwarding the request."""

    scheme: str | None = None
    hostname: str | None = None
    port: int | None = None
    path_type: str | None = None
    path_value: str | None = None
    status_code: int = 302


Filter = Union[RequestHeaderModifier, ResponseHeaderModifier, URLRewrite, RequestMirror, RequestRedirect]

FILTER_TYPES = ("RequestHeaderModifier", "ResponseHeaderModifier", "URLRewrite", "RequestMirror",
                "RequestRedirect")
PATH_MODIFIER_TYPES = ("ReplaceFullPath", "ReplacePrefixMatch")
REDIRECT_CODES = (301, 302, 303, 307, 308)


# ---------------------------------------------------------------------------------------------
# Parsing (the manifest's filter entry -> a Filter)


def _pairs(raw: Any, what: str) -> tuple[Header, ...]:
    out = []
    for entry in raw or []:
        if not isinstance(entry, dict) or not entry.get("name"):
            raise FilterError(f"{what}: every entry needs a name and a value")
        out.append((str(entry["name"]), str(entry.get("value", ""))))
    return tuple(out)


def _path_modifier(raw: Any, what: str) -> tuple[str | None, str | None]:
    if not raw:
        return None, None
    kind = raw.get("type")
    if kind not in PATH_MODIFIER_TYPES:
        raise FilterError(f"{what}: path type {kind!r} is not one of {', '.join(PATH_MODIFIER_TYPES)}")
    value = raw.get("replaceFullPath" if kind == "ReplaceFullPath" else "replacePrefixMatch")
    if value is None:
        raise FilterError(f"{what}: {kind} needs its value")
    value = str(value)
    if value and not value.startswith("/"):
        raise FilterError(f"{what}: {kind} value {value!r} must start with /")
    return kind, value


def parse_filter(raw: dict, namespace: str) -> Filter:
    """One entry of `rules[].filters` (or `backendRefs[].filters`) -> a Filter.

    Raises FilterError for unknown types (ExtensionRef, CORS... are not in the lab) and for
    malformed entries."""
    if not isinstance(raw, dict):
        raise FilterError(f"a filter must be a mapping, got {raw!r}")
    kind = raw.get("type")
    if kind in ("RequestHeaderModifier", "ResponseHeaderModifier"):
        key = kind[0].lower() + kind[1:]
        body = raw.get(key) or {}
        cls = RequestHeaderModifier if kind == "RequestHeaderModifier" else ResponseHeaderModifier
        return cls(set=_pairs(body.get("set"), kind), add=_pairs(body.get("add"), kind),
                   remove=tuple(str(n) for n in body.get("remove") or []))
    if kind == "URLRewrite":
        body = raw.get("urlRewrite") or {}
        path_type, path_value = _path_modifier(body.get("path"), kind)
        hostname = body.get("hostname")
        return URLRewrite(hostname=str(hostname) if hostname else None, path_type=path_type, path_value=path_value)
    if kind == "RequestMirror":
        body = raw.get("requestMirror") or {}
        ref = body.get("backendRef") or {}
        if not ref.get("name"):
            raise FilterError("RequestMirror needs backendRef.name")
        percent = 100.0
        if body.get("percent") is not None:
            percent = float(body["percent"])
        elif body.get("fraction"):
            frac = body["fraction"]
            denominator = float(frac.get("denominator", 100) or 100)
            percent = 100.0 * float(frac.get("numerator", 0)) / denominator
        if not 0 <= percent <= 100:
            raise FilterError(f"RequestMirror percent {percent} is not within 0..100")
        port = ref.get("port")
        return RequestMirror(name=str(ref["name"]), namespace=str(ref.get("namespace") or namespace),
                             port=int(port) if port is not None else None, percent=percent,
                             kind=str(ref.get("kind") or "Service"), group=str(ref.get("group") or ""))
    if kind == "RequestRedirect":
        body = raw.get("requestRedirect") or {}
        path_type, path_value = _path_modifier(body.get("path"), kind)
        code = int(body.get("statusCode", 302))
        if code not in REDIRECT_CODES:
            raise FilterError(f"RequestRedirect statusCode {code} is not one of {REDIRECT_CODES}")
        port = body.get("port")
        return RequestRedirect(scheme=body.get("scheme"), hostname=body.get("hostname"),
                               port=int(port) if port is not None else None, path_type=path_type,
                               path_value=path_value, status_code=code)
    raise FilterError(f"filter type {kind!r} is not supported by the lab's waypoint "
                      f"(supported: {', '.join(FILTER_TYPES)})")


# ---------------------------------------------------------------------------------------------
# Header lists


def get_header(headers: Iterable[Header], name: str) -> str | None:
    """All values of a header joined with "," (how Envoy matches repeated headers); None if absent."""
    values = [v for k, v in headers if k.lower() == name.lower()]
    return ",".join(values) if values else None


def remove_header(headers: Iterable[Header], name: str) -> list[Header]:
    return [(k, v) for k, v in headers if k.lower() != name.lower()]


def set_header(headers: Iterable[Header], name: str, value: str) -> list[Header]:
    """Overwrite: the header ends up with exactly this one value (in the first one's place)."""
    out: list[Header] = []
    done = False
    for k, v in headers:
        if k.lower() == name.lower():
            if not done:
                out.append((k, value))
                done = True
            continue
        out.append((k, v))
    if not done:
        out.append((name, value))
    return out


def add_header(headers: Iterable[Header], name: str, value: str) -> list[Header]:
    """Append one more value; the existing ones stay."""
    return [*headers, (name, value)]


# ---------------------------------------------------------------------------------------------
# Paths


def split_query(path: str) -> tuple[str, str]:
    """`/a/b?x=1` -> (`/a/b`, `?x=1`)."""
    p, sep, q = path.partition("?")
    return p, sep + q


def replace_prefix(path: str, matched_prefix: str, replacement: str) -> str:
    """ReplacePrefixMatch, element-wise as the Gateway API spec's table says:
    `/foo/bar` with prefix `/foo` -> `/xyz/bar` (replacement `/xyz` or `/xyz/`), -> `/bar`
    (replacement `` or `/`); `/foo` -> `/xyz`; `/foo/` -> `/xyz/`. The query is kept."""
    only, query = split_query(path)
    prefix = matched_prefix.rstrip("/")
    if not (only == prefix or only.startswith(prefix + "/") or prefix == ""):
        return path  # the prefix did not match: nothing to replace
    rest = only[len(prefix):]
    out = replacement.rstrip("/") + rest
    if not out.startswith("/"):
        out = "/" + out
    return out + query


def rewrite_path(path: str, path_type: str | None, value: str | None, matched_prefix: str | None) -> str:
    """Apply a URLRewrite/RequestRedirect path modifier; the query string is kept."""
    if path_type == "ReplaceFullPath" and value is not None:
        return (value or "/") + split_query(path)[1]
    if path_type == "ReplacePrefixMatch" and value is not None and matched_prefix is not None:
        return replace_prefix(path, matched_prefix, value)
    return path


# ---------------------------------------------------------------------------------------------
# Applying the filters of a matched rule


@dataclass(frozen=True)
class MirrorTarget:
    """Where a mirrored copy goes; the caller sends it and forgets it."""

    namespace: str
    name: str
    port: int | None

    @property
    def key(self) -> tuple[str, str, int | None]:
        return (self.namespace, self.name, self.port)


@dataclass(frozen=True)
class FilteredRequest:
    """The request to forward (after header and URL changes) and the copies to mirror."""

    request: "Request"
    mirrors: tuple[MirrorTarget, ...] = ()
    applied: tuple[str, ...] = field(default=())  # filter types applied, for the events


def apply_request_filters(request: "Request", filters: Sequence[Filter], *, matched_prefix: str | None = None,
                          rng: random.Random | None = None) -> FilteredRequest:
    """Apply a rule's request-side filters in order (rule filters first, then the chosen
    backend's): header changes, URL rewrite, mirror choice. Response filters and redirects are
    not request changes and are skipped here (see `apply_response_filters`, `redirect_for`)."""
    rng = rng or random.Random()
    mirrors: list[MirrorTarget] = []
    applied: list[str] = []
    for f in filters:
        if isinstance(f, RequestHeaderModifier):
            request = replace(request, headers=tuple(f.apply(request.headers)))
        elif isinstance(f, URLRewrite):
            if f.hostname:
                request = replace(request, authority=f.hostname,
                                  headers=tuple(set_header(request.headers, "host", f.hostname))
                                  if get_header(request.headers, "host") is not None else request.headers)
            request = replace(request, path=rewrite_path(request.path, f.path_type, f.path_value, matched_prefix))
        elif isinstance(f, RequestMirror):
            if f.percent >= 100 or rng.random() * 100 < f.percent:
                mirrors.append(MirrorTarget(f.namespace, f.name, f.port))
            else:
                continue
        else:
            continue
        applied.append(type(f).__name__)
    return FilteredRequest(request, tuple(mirrors), tuple(applied))


def apply_response_filters(headers: Iterable[Header], filters: Sequence[Filter]) -> list[Header]:
    """Apply every ResponseHeaderModifier of the rule (and backend) to the response headers."""
    out = list(headers)
    for f in filters:
        if isinstance(f, ResponseHeaderModifier):
            out = f.apply(out)
    return out


def mirror_request(request: "Request") -> "Request":
    """The copy Envoy sends to a mirror: same request, Host suffixed with `-shadow`."""
    host, sep, port = request.authority.rpartition(":") if ":" in request.authority else (request.authority, "", "")
    shadow = f"{host}{SHADOW_SUFFIX}{sep}{port}"
    headers = request.headers
    if get_header(headers, "host") is not None:
        headers = tuple(set_header(headers, "host", shadow))
    return replace(request, authority=shadow, headers=headers)


def redirect_for(request: "Request", redirect: RequestRedirect, matched_prefix: str | None = None) -> tuple[int, str]:
    """(status, Location) of a RequestRedirect: each part of the URL the filter does not name
    comes from the request. A port equal to the scheme's default is left out."""
    scheme = redirect.scheme or request.scheme or "http"
    host_port = request.authority or get_header(request.headers, "host") or ""
    host, _, req_port = host_port.partition(":") if not host_port.startswith("[") else (host_port, "", "")
    host = redirect.hostname or host
    if redirect.port is not None:
        port: int | None = redirect.port
    elif redirect.scheme:
        port = None  # a scheme change drops the request's port (the spec's rule)
    else:
        port = int(req_port) if req_port.isdigit() else None
    default = {"http": 80, "https": 443}.get(scheme)
    netloc = host if port is None or port == default else f"{host}:{port}"
    path = rewrite_path(request.path, redirect.path_type, redirect.path_value, matched_prefix)
    return redirect.status_code, f"{scheme}://{netloc}{path}"
