"""``httpbin`` (image ``mccutchen/go-httpbin``): an HTTP request and response service.

The sample's Deployment runs go-httpbin on container port 8080 behind a Service on port 8000.
It echoes requests back as indented JSON, the way go-httpbin shapes it: header names in Go's
canonical form with lists of values, ``origin`` the client address it saw (``ip:port``, or the
first ``X-Forwarded-For`` entry when a proxy such as a waypoint added one), ``url`` rebuilt from
``Host``. Endpoints: ``/get``, ``/post``, ``/put``, ``/patch``, ``/delete``, ``/anything[/...]``,
``/headers``, ``/ip``, ``/user-agent``, ``/uuid``, ``/hostname`` (the pod name, as with
go-httpbin's ``-use-real-hostname``), ``/status/<code>`` (``/status/200,503:3`` picks one at
random by weight), ``/delay/<seconds>`` (at most 10 s).
"""

from __future__ import annotations

import asyncio
import json
import random
from urllib.parse import parse_qs

from lab.apps import AppOptions
from lab.apps.bookinfo import pod_name
from lab.apps.http import REASONS, HttpServer, Request, Response, start_servers
from lab.apps.runtime import run

JSON_TYPE = "application/json; charset=utf-8"
TEXT_TYPE = "text/plain; charset=utf-8"
MAX_DELAY_SECONDS = 10.0

# Extra headers (and bodies) go-httpbin sends for some /status codes.
STATUS_SPECIAL_CASES: dict[int, tuple[dict[str, str], bytes]] = {
    300: ({"Location": "/image/jpeg"}, b""),
    301: ({"Location": "/redirect/1"}, b""),
    302: ({"Location": "/redirect/1"}, b""),
    303: ({"Location": "/redirect/1"}, b""),
    305: ({"Location": "/redirect/1"}, b""),
    307: ({"Location": "/redirect/1"}, b""),
    308: ({"Location": "/image/jpeg"}, b""),
    401: ({"WWW-Authenticate": 'Basic realm="Fake Realm"'}, b""),
    407: ({"Proxy-Authenticate": 'Basic realm="Fake Realm"'}, b""),
    418: ({"X-More-Info": "http://tools.ietf.org/html/rfc2324"}, b"I'm a teapot!"),
}

METHOD_ROUTES = {"/get": "GET", "/post": "POST", "/put": "PUT", "/patch": "PATCH",
                 "/delete": "DELETE"}


# ---------------------------------------------------------------- request echo (pure)

def canonical_header_key(name: str) -> str:
    """Go's ``CanonicalMIMEHeaderKey``: ``x-request-id`` -> ``X-Request-Id``."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def request_headers(request: Request) -> dict[str, list[str]]:
    """Headers as go-httpbin shows them: canonical names, lists of values, sorted by name."""
    headers: dict[str, list[str]] = {}
    for name, value in request.headers:
        headers.setdefault(canonical_header_key(name), []).append(value)
    host = request.headers.get("host")
    if host is not None:
        headers["Host"] = [host]
    return dict(sorted(headers.items()))


def client_origin(request: Request) -> str:
    """go-httpbin's ``getClientIP``: platform headers, then X-Forwarded-For, then the peer."""
    for name in ("Fly-Client-IP", "CF-Connecting-IP", "Fastly-Client-IP", "True-Client-IP"):
        value = request.headers.get(name)
        if value:
            return value
    forwarded = request.headers.get("x-forwarded-for")
    if forwarded:
        return forwarded.split(",", 1)[0].strip()
    return request.client_address


def request_url(request: Request) -> str:
    """The URL the client asked for, rebuilt from Host and the forwarding headers."""
    headers = request.headers
    scheme = headers.get("x-forwarded-proto") or headers.get("x-forwarded-protocol") or ""
    if not scheme and headers.get("x-forwarded-ssl") == "on":
        scheme = "https"
    if request.target.startswith(("http://", "https://")):
        return request.target  # absolute-form target (a forward proxy request)
    return f"{scheme or 'http'}://{headers.get('host', '')}{request.target}"


def query_args(request: Request) -> dict[str, list[str]]:
    return dict(sorted(parse_qs(request.query, keep_blank_values=True).items()))


def no_body_document(request: Request) -> dict:
    """What /get answers."""
    return {"args": query_args(request), "headers": request_headers(request),
            "method": request.method, "origin": client_origin(request),
            "url": request_url(request)}


def body_document(request: Request) -> dict:
    """What /post, /anything and friends answer; raises ValueError for a bad JSON body."""
    document = {**no_body_document(request), "data": "", "files": {}, "form": {}, "json": None}
    body = request.body
    if not body:
        return document
    document["data"] = body.decode("utf-8", "replace")
    content_type = (request.headers.get("content-type") or "").split(";", 1)[0].strip()
    if content_type in ("text/html", "text/plain", "multipart/form-data"):
        pass  # kept as data (multipart files are not split out by the stand-in)
    elif content_type == "application/x-www-form-urlencoded":
        document["form"] = dict(sorted(parse_qs(document["data"], keep_blank_values=True)
                                       .items()))
    elif content_type == "application/json":
        document["json"] = json.loads(body)
    else:
        import base64

        encoded = base64.urlsafe_b64encode(body).decode()
        document["data"] = f"data:{content_type or 'application/octet-stream'};base64,{encoded}"
    return document


# ---------------------------------------------------------------- status and delay (pure)

def parse_status_choices(raw: str) -> list[tuple[int, float]]:
    """``"200,503:3"`` -> [(200, 1.0), (503, 3.0)]; raises ValueError like go-httpbin."""
    choices = []
    for pair in raw.split(","):
        code_text, sep, weight_text = pair.partition(":")
        weight = 1.0
        if sep:
            try:
                weight = float(weight_text)
            except ValueError:
                raise ValueError(f'invalid weight value: "{weight_text}"') from None
        if not code_text.isdigit():
            raise ValueError(f'invalid choice value: "{code_text}"')
        choices.append((int(code_text), weight))
    return choices


def weighted_choice(choices: list[tuple[int, float]], roll: float) -> int:
    """The choice whose cumulative weight first exceeds ``roll`` (0 <= roll < 1) x total."""
    total = sum(weight for _, weight in choices)
    point, cumulative = roll * total, 0.0
    for code, weight in choices:
        cumulative += weight
        if point < cumulative:
            return code
    return choices[-1][0]


def parse_status_code(raw: str) -> int:
    if not raw.lstrip("-").isdigit():
        raise ValueError(f'invalid status code: "{raw}": strconv.Atoi: parsing "{raw}": '
                         "invalid syntax")
    code = int(raw)
    if not 100 <= code <= 599:
        raise ValueError(f"invalid status code: {code} not in range [100, 599]")
    return code


GO_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0,
            "m": 60.0, "h": 3600.0}


def parse_go_duration(text: str) -> float:
    """Go's ``time.ParseDuration`` (``1.5s``, ``300ms``, ``1m30s``), in seconds."""
    rest, sign = text, 1.0
    if rest[:1] in "+-" and rest:
        sign, rest = (-1.0 if rest[0] == "-" else 1.0), rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise ValueError(f'time: invalid duration "{text}"')
    total = 0.0
    while rest:
        i = 0
        while i < len(rest) and (rest[i].isdigit() or rest[i] == "."):
            i += 1
        number, rest = rest[:i], rest[i:]
        j = 0
        while j < len(rest) and not (rest[j].isdigit() or rest[j] == "."):
            j += 1
        unit, rest = rest[:j], rest[j:]
        if not number or number == "." or unit not in GO_UNITS:
            raise ValueError(f'time: invalid duration "{text}"')
        total += float(number) * GO_UNITS[unit]
    return sign * total


def parse_delay(text: str) -> float:
    """go-httpbin's ``parseDuration``: a Go duration, else a number of seconds."""
    try:
        return parse_go_duration(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f'strconv.ParseFloat: parsing "{text}": invalid syntax') from None


def format_go_duration(seconds: float) -> str:
    """Go's ``Duration.String`` for the values an error message needs: 10s, 1.5s, 500ms, 1m0s."""
    if seconds == 0:
        return "0s"
    sign = "-" if seconds < 0 else ""
    value = abs(seconds)
    if value < 1:
        for unit, scale in (("ms", 1e-3), ("\u00b5s", 1e-6), ("ns", 1e-9)):
            if value >= scale or unit == "ns":
                return f"{sign}{value / scale:.9g}{unit}"
    hours, rem = divmod(value, 3600)
    minutes, secs = divmod(rem, 60)
    text = f"{secs:.9f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{sign}{int(hours)}h{int(minutes)}m{text}"
    if minutes:
        return f"{sign}{int(minutes)}m{text}"
    return sign + text


def error_document(status: int, detail: str | None = None) -> dict:
    document: dict = {"status_code": status, "error": REASONS.get(status, "")}
    if detail:
        document["detail"] = detail
    return document


# ---------------------------------------------------------------- the service

def json_response(value: object, status: int = 200) -> Response:
    """Indented JSON with a trailing newline, as Go's json.Encoder with SetIndent writes it."""
    body = json.dumps(value, indent=2, ensure_ascii=False) + "\n"
    return Response(status, body.encode(), JSON_TYPE)


class HttpBin:
    """The httpbin service of one pod."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname

    async def handle(self, request: Request) -> Response:
        response = await self.route(request)
        origin = request.headers.get("origin") or "*"
        response.headers += [("Access-Control-Allow-Origin", origin),
                             ("Access-Control-Allow-Credentials", "true")]
        return response

    async def route(self, request: Request) -> Response:
        path, method = request.path, request.method
        if method == "OPTIONS":
            allowed = "GET, POST, HEAD, PUT, DELETE, PATCH, OPTIONS"
            return Response(200, b"", None, [("Access-Control-Allow-Methods", allowed),
                                             ("Access-Control-Max-Age", "3600")])
        if path in METHOD_ROUTES:
            wanted = METHOD_ROUTES[path]
            if method != wanted and not (wanted == "GET" and method == "HEAD"):
                return Response(405, b"Method Not Allowed\n", TEXT_TYPE, [("Allow", wanted)])
            if wanted == "GET":
                return json_response(no_body_document(request))
            return self.with_body(request)
        if path == "/anything" or path.startswith("/anything/"):
            if method == "HEAD":
                return json_response(no_body_document(request))
            return self.with_body(request)
        if path == "/headers":
            return json_response({"headers": request_headers(request)})
        if path == "/ip":
            origin = client_origin(request)
            if "format=text" in request.query.split("&"):
                return Response.text(origin + "\n")
            return json_response({"origin": origin})
        if path == "/user-agent":
            return json_response({"user-agent": request.headers.get("user-agent", "")})
        if path == "/uuid":
            import uuid

            return json_response({"uuid": str(uuid.uuid4())})
        if path == "/hostname":
            return json_response({"hostname": self.hostname})
        if path.startswith("/status/") and path.count("/") == 2:
            return self.status(path[len("/status/"):])
        if path.startswith("/delay/") and path.count("/") == 2:
            return await self.delay(request, path[len("/delay/"):])
        if path == "/":
            return Response.html("<!DOCTYPE html>\n<html><head><title>go-httpbin(1): HTTP "
                                 "Client Testing Service</title></head><body><h1>go-httpbin"
                                 "</h1><p>A lab stand-in for go-httpbin.</p></body></html>\n")
        return Response.text("404 page not found\n", 404)

    def with_body(self, request: Request) -> Response:
        try:
            return json_response(body_document(request))
        except ValueError as exc:
            return json_response(error_document(400, f"error parsing request body: {exc}"), 400)

    def status(self, raw: str) -> Response:
        try:
            if "," in raw:
                code = weighted_choice(parse_status_choices(raw), random.random())
            else:
                code = parse_status_code(raw)
        except ValueError as exc:
            return json_response(error_document(400, str(exc)), 400)
        headers, body = STATUS_SPECIAL_CASES.get(code, ({}, b""))
        return Response(code, body, TEXT_TYPE, list(headers.items()))

    async def delay(self, request: Request, raw: str) -> Response:
        try:
            seconds = parse_delay(raw)
            if seconds > MAX_DELAY_SECONDS:
                raise ValueError(f"duration {format_go_duration(seconds)} longer than "
                                 f"{format_go_duration(MAX_DELAY_SECONDS)}")
            if seconds < 0:
                raise ValueError(f"duration {format_go_duration(seconds)} shorter than 0s")
        except ValueError as exc:
            return json_response(error_document(400, f"invalid duration: {exc}"), 400)
        await asyncio.sleep(seconds)
        response = self.with_body(request)
        response.headers.append(
            ("Server-Timing", f'initial_delay;dur={seconds * 1000:.2f};desc="initial delay"'))
        return response


def main(options: AppOptions) -> int:
    service = HttpBin(pod_name(options.pod))
    server = HttpServer(service.handle)
    return run(lambda: start_servers(server.serve_connection, options.listen, options.ports))
