"""HTTPRoute filters at the waypoint: header modifiers, URL rewrite, mirror, redirect (no root)."""

from __future__ import annotations

import random

import pytest
import yaml

from lab.waypoint import filters as flt
from lab.waypoint.routes import BackendRef, Request, parse_route, route_request


def parse(doc: str) -> flt.Filter:
    return flt.parse_filter(yaml.safe_load(doc), "default")


def test_request_header_modifier_set_add_remove() -> None:
    f = parse("""
type: RequestHeaderModifier
requestHeaderModifier:
  set: [{name: X-Set, value: new}]
  add: [{name: X-Add, value: two}]
  remove: [x-remove]
""")
    assert isinstance(f, flt.RequestHeaderModifier)
    headers = [("x-set", "old"), ("X-Set", "older"), ("x-add", "one"), ("X-Remove", "a"), ("x-remove", "b"),
               ("keep", "k")]
    out = f.apply(headers)
    assert flt.get_header(out, "x-set") == "new"  # set overwrites every value
    assert [v for k, v in out if k.lower() == "x-add"] == ["one", "two"]  # add appends
    assert flt.get_header(out, "x-remove") is None  # remove takes every value, any case
    assert ("keep", "k") in out


def test_header_modifier_removes_before_set_and_add() -> None:
    m = flt.HeaderModifier(set=(("a", "1"),), add=(("b", "2"),), remove=("a", "b"))
    assert m.apply([("a", "0"), ("b", "0")]) == [("a", "1"), ("b", "2")]
    assert flt.HeaderModifier(set=(("new", "v"),)).apply([]) == [("new", "v")]


# The ReplacePrefixMatch table of the Gateway API spec (HTTPPathModifier).
@pytest.mark.parametrize("path,prefix,replacement,expected", [
    ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
    ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
    ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
    ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
    ("/foo", "/foo", "/xyz", "/xyz"),
    ("/foo/", "/foo", "/xyz", "/xyz/"),
    ("/foo/bar", "/foo", "", "/bar"),
    ("/foo/", "/foo", "", "/"),
    ("/foo", "/foo", "", "/"),
    ("/foo/", "/foo", "/", "/"),
    ("/foo", "/foo", "/", "/"),
    ("/foo/bar?x=1", "/foo", "/xyz", "/xyz/bar?x=1"),
])
def test_replace_prefix_match(path, prefix, replacement, expected) -> None:
    assert flt.replace_prefix(path, prefix, replacement) == expected


def test_url_rewrite_through_a_route() -> None:
    route = parse_route("default", "r", yaml.safe_load("""
spec:
  rules:
  - matches: [{path: {type: PathPrefix, value: /api/v1}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: backend.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
    backendRefs: [{name: api, port: 8080}]
"""))
    request = Request("GET", "/api/v1/items?id=3", headers=(("Host", "api:8080"), ("x", "y")))
    d = route_request([route], request, BackendRef("api", "default", 8080))
    out = flt.apply_request_filters(request, d.filters, matched_prefix=d.matched_prefix).request
    assert out.path == "/v2/items?id=3"
    assert out.authority == "backend.internal" and flt.get_header(out.headers, "host") == "backend.internal"
    assert request.path == "/api/v1/items?id=3"  # the original is untouched


def test_replace_full_path_keeps_the_query() -> None:
    f = flt.URLRewrite(path_type="ReplaceFullPath", path_value="/health")
    out = flt.apply_request_filters(Request("GET", "/a/b?v=1"), [f]).request
    assert out.path == "/health?v=1"


def test_replace_prefix_match_needs_one_path_prefix_match() -> None:
    route = parse_route("default", "r", yaml.safe_load("""
spec:
  rules:
  - matches: [{path: {type: Exact, value: /a}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]
"""))
    assert not route.accepted and "ReplacePrefixMatch" in route.problems[0]


def test_rule_and_backend_filters_and_response_headers() -> None:
    route = parse_route("default", "r", yaml.safe_load("""
spec:
  rules:
  - filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x-rule, value: "1"}]}}
    - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-served-by, value: waypoint}], remove: [server]}}
    backendRefs:
    - name: reviews-v2
      port: 9080
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-backend, value: v2}]}}]
"""))
    request = Request("GET", "/")
    d = route_request([route], request, BackendRef("reviews", "default", 9080))
    out = flt.apply_request_filters(request, d.filters)
    assert flt.get_header(out.request.headers, "x-rule") == "1"
    assert flt.get_header(out.request.headers, "x-backend") == "v2"
    assert out.applied == ("RequestHeaderModifier", "RequestHeaderModifier")
    resp = flt.apply_response_filters([("Server", "envoy"), ("content-type", "text/html")], d.filters)
    assert resp == [("content-type", "text/html"), ("x-served-by", "waypoint")]


def test_request_mirror_target_and_percent() -> None:
    full = parse("{type: RequestMirror, requestMirror: {backendRef: {name: reviews-v3, port: 9080}}}")
    assert isinstance(full, flt.RequestMirror) and full.percent == 100
    out = flt.apply_request_filters(Request("GET", "/"), [full])
    assert out.mirrors == (flt.MirrorTarget("default", "reviews-v3", 9080),)
    half = parse("{type: RequestMirror, requestMirror: {backendRef: {name: m, port: 1}, fraction: {numerator: 1, denominator: 4}}}")
    assert half.percent == 25
    rng = random.Random(11)
    hits = sum(bool(flt.apply_request_filters(Request("GET", "/"), [half], rng=rng).mirrors) for _ in range(4000))
    assert 0.22 < hits / 4000 < 0.28
    never = parse("{type: RequestMirror, requestMirror: {backendRef: {name: m, port: 1}, percent: 0}}")
    assert not any(flt.apply_request_filters(Request("GET", "/"), [never], rng=rng).mirrors for _ in range(200))


def test_mirrored_copy_has_shadow_host() -> None:
    copy = flt.mirror_request(Request("GET", "/x", headers=(("host", "reviews:9080"),)))
    assert copy.authority == "reviews-shadow:9080" and flt.get_header(copy.headers, "host") == "reviews-shadow:9080"
    assert flt.mirror_request(Request("GET", "/", authority="reviews")).authority == "reviews-shadow"


def test_request_redirect() -> None:
    route = parse_route("default", "r", yaml.safe_load("""
spec:
  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {hostname: new.example, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
"""))
    d = route_request([route], Request("GET", "/old/page?q=1", authority="svc:9080"), BackendRef("svc", "default", 9080))
    assert (d.status, d.location) == (301, "http://new.example:9080/new/page?q=1")
    r = flt.RequestRedirect(scheme="https")
    assert flt.redirect_for(Request("GET", "/p", authority="svc:9080"), r) == (302, "https://svc/p")


@pytest.mark.parametrize("doc,needle", [
    ("{type: ExtensionRef, extensionRef: {name: x}}", "not supported"),
    ("{type: URLRewrite, urlRewrite: {path: {type: Nope}}}", "path type"),
    ("{type: RequestRedirect, requestRedirect: {statusCode: 200}}", "statusCode"),
    ("{type: RequestMirror, requestMirror: {}}", "backendRef.name"),
    ("{type: RequestHeaderModifier, requestHeaderModifier: {set: [{value: x}]}}", "name"),
])
def test_invalid_filters(doc, needle) -> None:
    with pytest.raises(flt.FilterError, match=needle):
        parse(doc)


def test_unsupported_filter_makes_the_route_not_accepted() -> None:
    route = parse_route("default", "r", yaml.safe_load("{spec: {rules: [{filters: [{type: CORS}]}]}}"))
    assert not route.accepted and "CORS" in route.problems[0]
