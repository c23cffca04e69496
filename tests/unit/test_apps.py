"""The stand-in apps: image mapping, HTTP/1.1 details, and each app's behaviour on loopback.

No root: apps run as real subprocesses (``python -m lab.apps ...``) listening on 127.0.0.1 with
ports chosen by the kernel (``--ports 0``; the app logs ``listening on 127.0.0.1:<port>``),
wired together with the same environment overrides the real bookinfo images accept.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.apps import AppOptions, app_for_image, image_repository
from lab.apps.__main__ import parse_args
from lab.apps.bookinfo import upstream
from lab.apps.http import (
    Headers,
    HttpError,
    HttpServer,
    Request,
    Response,
    body_framing,
    looks_like_http,
    parse_request_head,
    render_response,
    start_servers,
    wants_keep_alive,
)
from lab.apps.http import request as http_request
from lab.apps.httpbin import (
    canonical_header_key,
    format_go_duration,
    parse_delay,
    parse_status_choices,
    weighted_choice,
)
from lab.apps.productpage import ProductPage
from lab.apps.reviews import RATINGS_UNAVAILABLE, reviews_document, version_config
from lab.apps.tcp_echo import ports_and_prefix

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT.parent / "shared" / "conformance" / "istio" / "samples"


# ---------------------------------------------------------------- helpers

class AppProcess:
    """One app started as the supervisor starts it, on loopback, with its log captured."""

    def __init__(self, app: str, *args: str, env: dict[str, str] | None = None,
                 listeners: int = 1) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lab.apps", app, "--listen", "127.0.0.1", *args],
            cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.ports: list[int] = []
        while len(self.ports) < listeners:
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"{app} exited before listening: {self.lines}")
            self.lines.append(line.rstrip("\n"))
            match = re.match(r"listening on 127\.0\.0\.1:(\d+)", line)
            if match:
                self.ports.append(int(match.group(1)))

    @property
    def port(self) -> int:
        return self.ports[0]

    def stop(self) -> tuple[int, float]:
        """SIGTERM; (exit status, seconds it took). Remaining log lines go to self.lines."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=5)
        elapsed = time.monotonic() - started
        self.lines += out.splitlines()
        return self.proc.returncode, elapsed

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def apps():
    """Start apps with ``apps(name, *args, env=...)``; every one is killed at teardown."""
    started: list[AppProcess] = []

    def start(app: str, *args: str, env: dict[str, str] | None = None,
              listeners: int = 1) -> AppProcess:
        process = AppProcess(app, *args, env=env, listeners=listeners)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


def get(port: int, path: str, headers: dict[str, str] | None = None,
        method: str = "GET", body: bytes | None = None) -> tuple[int, dict, bytes, str]:
    """(status, lower-cased headers, body, client address) of one request on a new connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        client = "%s:%d" % conn.sock.getsockname()[:2]
        response = conn.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data, client
    finally:
        conn.close()


def closed_port() -> int:
    """A loopback port nobody listens on (connecting to it is refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bookinfo_env(details: int, reviews: int, ratings: int) -> dict[str, str]:
    return {"DETAILS_HOSTNAME": "localhost", "DETAILS_SERVICE_PORT": str(details),
            "REVIEWS_HOSTNAME": "localhost", "REVIEWS_SERVICE_PORT": str(reviews),
            "RATINGS_HOSTNAME": "localhost", "RATINGS_SERVICE_PORT": str(ratings)}


# ---------------------------------------------------------------- image -> app

def sample_images(name: str) -> list[str]:
    text = (SAMPLES / name).read_text()
    return re.findall(r"^\s*-?\s*image:\s*(\S+)", text, re.M)


def test_every_sample_image_maps_to_its_stand_in():
    found = {}
    for sample in ("bookinfo_bookinfo.yaml", "curl_curl.yaml", "sleep_sleep.yaml",
                   "httpbin_httpbin.yaml", "tcp-echo_tcp-echo.yaml"):
        for image in sample_images(sample):
            found[image_repository(image).rsplit("/", 1)[-1]] = app_for_image(image)
    assert found == {
        "examples-bookinfo-details-v1": ("details", {"version": "v1"}),
        "examples-bookinfo-ratings-v1": ("ratings", {"version": "v1"}),
        "examples-bookinfo-reviews-v1": ("reviews", {"version": "v1"}),
        "examples-bookinfo-reviews-v2": ("reviews", {"version": "v2"}),
        "examples-bookinfo-reviews-v3": ("reviews", {"version": "v3"}),
        "examples-bookinfo-productpage-v1": ("productpage", {"version": "v1"}),
        "curl": ("idle", {}),
        "go-httpbin": ("httpbin", {}),
        "tcp-echo-server": ("tcp-echo", {}),
    }


@pytest.mark.parametrize("image,expected", [
    ("docker.io/istio/examples-bookinfo-reviews-v3:1.20.3", ("reviews", {"version": "v3"})),
    ("curlimages/curl", ("idle", {})),
    ("curl", ("idle", {})),
    ("sleep", ("idle", {})),
    ("localhost:5000/curlimages/curl:latest", ("idle", {})),
    ("docker.io/kennethreitz/httpbin", ("httpbin", {})),
    ("nginx:1.27", ("echo", {})),
    ("ghcr.io/example/curl-like:1.0", ("echo", {})),
    ("registry.example.com/team/app@sha256:abcd", ("echo", {})),
])
def test_app_for_image(image, expected):
    assert app_for_image(image) == expected


def test_command_line_parsing():
    options = parse_args(["tcp-echo", "--pod", "tcp-echo-1", "--namespace", "ns1",
                          "--ports", "9000,9001", "--args", "9000,9001,9002", "hello"])
    assert options == AppOptions("tcp-echo", "tcp-echo-1", "ns1", (9000, 9001), "", "0.0.0.0",
                                 ("9000,9001,9002", "hello"))
    assert ports_and_prefix(options) == ((9000, 9001, 9002), "hello")
    assert parse_args(["reviews", "--version", "v2"]).ports == (9080,)
    assert parse_args(["httpbin"]).ports == (8080,)
    assert ports_and_prefix(parse_args(["tcp-echo"])) == ((9000,), "hello")
    with pytest.raises(SystemExit):
        parse_args(["no-such-app"])


def test_upstream_follows_the_real_environment_variables():
    assert upstream("details", {}) == ("details", 9080)
    assert upstream("reviews", {"SERVICES_DOMAIN": "default.svc.cluster.local"}) == (
        "reviews.default.svc.cluster.local", 9080)
    assert upstream("ratings", {"RATINGS_HOSTNAME": "r", "RATINGS_SERVICE_PORT": "81"}) == (
        "r", 81)


# ---------------------------------------------------------------- HTTP/1.1, pure parts

def test_parse_request_head_and_framing():
    method, target, version, headers = parse_request_head(
        b"POST /post?a=1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nX-A:  b \r\n")
    assert (method, target, version) == ("POST", "/post?a=1", "HTTP/1.1")
    assert headers.get("transfer-encoding") == "chunked" and headers.get("x-a") == "b"
    assert body_framing(headers) == ("chunked", 0)
    assert body_framing(Headers([("Content-Length", "12")])) == ("length", 12)
    assert body_framing(Headers()) == ("none", 0)
    for bad in (b"GET /\r\n", b"GET / HTTP/1.1\r\nno colon\r\n", b"GET  / HTTP/1.1"):
        with pytest.raises(HttpError):
            parse_request_head(bad)
    with pytest.raises(HttpError):
        body_framing(Headers([("Content-Length", "1"), ("Content-Length", "2")]))
    absolute = Request("GET", "http://details:9080/details/0?x=1", "HTTP/1.1", Headers())
    assert (absolute.path, absolute.query) == ("/details/0", "x=1")


def test_keep_alive_rules():
    assert wants_keep_alive("HTTP/1.1", Headers())
    assert not wants_keep_alive("HTTP/1.1", Headers([("Connection", "close")]))
    assert not wants_keep_alive("HTTP/1.0", Headers())
    assert wants_keep_alive("HTTP/1.0", Headers([("Connection", "Keep-Alive")]))


def test_render_response_has_content_length_and_client_address():
    raw = render_response(Response.text("hi"), keep_alive=True, client_address="10.244.1.5:4000")
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: 2" in head and b"x-lab-client-address: 10.244.1.5:4000" in head
    assert body == b"hi"
    head_only = render_response(Response.text("hi"), keep_alive=False, head_only=True)
    assert head_only.endswith(b"connection: close\r\n\r\n")


def test_looks_like_http():
    assert looks_like_http(b"GET / HTTP/1.1\r\n") is True
    assert looks_like_http(b"OPTIONS ") is True
    assert looks_like_http(b"GE") is None
    assert looks_like_http(b"hello world\n") is False
    assert looks_like_http(b"\x16\x03\x01") is False  # a TLS ClientHello
    assert looks_like_http(b"GETX / HTTP/1.1") is False


# ---------------------------------------------------------------- bookinfo, pure parts

def test_reviews_versions_and_documents():
    assert version_config("v1", {}) == (False, "black")
    assert version_config("v2", {}) == (True, "black")
    assert version_config("v3", {}) == (True, "red")
    assert version_config("v1", {"ENABLE_RATINGS": "true", "STAR_COLOR": "blue"}) == (True, "blue")
    v1 = reviews_document(0, "reviews-v1-x", "null", False, "black", None)
    assert v1["podname"] == "reviews-v1-x" and v1["id"] == "0"
    assert all("rating" not in review for review in v1["reviews"])
    v3 = reviews_document(0, "reviews-v3-x", "null", True, "red",
                          {"Reviewer1": 5, "Reviewer2": 4})
    assert [r["rating"] for r in v3["reviews"]] == [{"stars": 5, "color": "red"},
                                                    {"stars": 4, "color": "red"}]
    down = reviews_document(0, "reviews-v2-x", "null", True, "black", None)
    assert [r["rating"] for r in down["reviews"]] == [{"error": RATINGS_UNAVAILABLE}] * 2


# ---------------------------------------------------------------- httpbin, pure parts

def test_httpbin_helpers():
    assert canonical_header_key("x-request-id") == "X-Request-Id"
    assert canonical_header_key("USER-AGENT") == "User-Agent"
    choices = parse_status_choices("200,503:3")
    assert choices == [(200, 1.0), (503, 3.0)]
    assert weighted_choice(choices, 0.0) == 200 and weighted_choice(choices, 0.24) == 200
    assert weighted_choice(choices, 0.26) == 503 and weighted_choice(choices, 0.99) == 503
    with pytest.raises(ValueError):
        parse_status_choices("200,abc")
    assert parse_delay("1.5") == 1.5 and parse_delay("300ms") == pytest.approx(0.3)
    assert parse_delay("1m30s") == 90
    with pytest.raises(ValueError):
        parse_delay("soon")
    assert [format_go_duration(s) for s in (11, 1.5, 0.5, 90, 0)] == [
        "11s", "1.5s", "500ms", "1m30s", "0s"]


# ---------------------------------------------------------------- bookinfo, end to end

def test_productpage_shows_title_details_and_the_reviews_pod(apps):
    details = apps("details", "--pod", "details-v1-7d4d9d5fcb-aaaaa", "--ports", "0")
    ratings = apps("ratings", "--pod", "ratings-v1-5dc79b6bcd-bbbbb", "--ports", "0")
    reviews = apps("reviews", "--version", "v2", "--pod", "reviews-v2-65c4dc6fdc-ccccc",
                   "--ports", "0", env=bookinfo_env(closed_port(), 0, ratings.port))
    page = apps("productpage", "--pod", "productpage-v1-d5789fdfb-ddddd", "--ports", "0",
                env=bookinfo_env(details.port, reviews.port, ratings.port))

    status, headers, body, client = get(page.port, "/productpage",
                                        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-"
                                                        "b7ad6b7169203331-01"})
    html = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "<title>Simple Bookstore App</title>" in html
    assert re.findall(r"reviews-v.-\S+?(?=<)", html)[0] == "reviews-v2-65c4dc6fdc-ccccc"
    assert "PublisherA" in html and "1234567890" in html  # the details came from details
    assert html.count("glyphicon-star\"") == 9 and 'style="color: black"' in html  # 5 + 4
    assert headers["x-lab-client-address"] == client

    # The API routes, through the same upstream calls.
    assert json.loads(get(page.port, "/api/v1/products")[2])[0]["title"] == "The Comedy of Errors"
    assert json.loads(get(page.port, "/api/v1/products/0")[2])["publisher"] == "PublisherA"
    assert json.loads(get(page.port, "/api/v1/products/0/reviews")[2])["podname"].startswith(
        "reviews-v2-")
    assert json.loads(get(page.port, "/api/v1/products/0/ratings")[2])["ratings"] == {
        "Reviewer1": 5, "Reviewer2": 4}
    assert get(page.port, "/health")[2] == b"Product page is healthy"

    for process in (page, reviews, ratings, details):
        assert process.stop()[0] == 0
    # Each app logged, per request, the client address it saw.
    assert any(f"{client} \"GET /productpage HTTP/1.1\" 200" in line for line in page.lines)
    assert any('"GET /reviews/0 HTTP/1.1" 200' in line for line in reviews.lines)
    assert any('"GET /ratings/0 HTTP/1.1" 200' in line for line in ratings.lines)
    assert any('"GET /details/0 HTTP/1.1" 200' in line for line in details.lines)


def test_reviews_v1_has_no_stars_and_v3_red_ones(apps):
    ratings = apps("ratings", "--ports", "0")
    env = bookinfo_env(0, 0, ratings.port)
    v1 = apps("reviews", "--version", "v1", "--pod", "reviews-v1-1", "--ports", "0", env=env)
    v3 = apps("reviews", "--version", "v3", "--pod", "reviews-v3-1", "--ports", "0", env=env)
    one = json.loads(get(v1.port, "/reviews/0")[2])
    assert one["podname"] == "reviews-v1-1" and one["clustername"] == "null"
    assert [set(r) for r in one["reviews"]] == [{"reviewer", "text"}] * 2
    three = json.loads(get(v3.port, "/reviews/0")[2])
    assert {r["rating"]["color"] for r in three["reviews"]} == {"red"}
    assert json.loads(get(v1.port, "/health")[2]) == {"status": "Reviews is healthy"}
    assert get(v1.port, "/reviews/abc")[0] == 404
    # Only v3 asked ratings.
    ratings.stop()
    assert sum('"GET /ratings/0 HTTP/1.1"' in line for line in ratings.lines) == 1


def test_reviews_without_ratings_says_ratings_unavailable(apps):
    reviews = apps("reviews", "--version", "v2", "--pod", "reviews-v2-x", "--ports", "0",
                   env=bookinfo_env(0, 0, closed_port()))
    document = json.loads(get(reviews.port, "/reviews/0")[2])
    assert [r["rating"] for r in document["reviews"]] == [
        {"error": "Ratings service is currently unavailable"}] * 2


def test_productpage_degrades_when_details_and_reviews_fail(apps):
    page = apps("productpage", "--ports", "0",
                env=bookinfo_env(closed_port(), closed_port(), closed_port()))
    status, _, body, _ = get(page.port, "/productpage")
    html = body.decode()
    assert status == 200 and "<title>Simple Bookstore App</title>" in html
    assert "Error fetching product details" in html
    assert "Error fetching product reviews" in html
    assert "Sorry, product reviews are currently unavailable for this book." in html
    status, _, body, _ = get(page.port, "/api/v1/products/0/reviews")
    assert status == 500 and json.loads(body) == {
        "error": "Sorry, product reviews are currently unavailable for this book."}
    status, _, body, _ = get(page.port, "/api/v1/products/0/ratings")
    assert status == 500 and "ratings are currently unavailable" in json.loads(body)["error"]


def test_details_and_ratings_json(apps):
    details = apps("details", "--ports", "0")
    ratings = apps("ratings", "--ports", "0")
    status, headers, body, _ = get(details.port, "/details/7")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"id": 7, "author": "William Shakespeare", "year": 1595,
                                "type": "paperback", "pages": 200, "publisher": "PublisherA",
                                "language": "English", "ISBN-10": "1234567890",
                                "ISBN-13": "123-1234567890"}
    assert get(details.port, "/details/abc")[0] == 400
    assert json.loads(get(details.port, "/health")[2]) == {"status": "Details is healthy"}
    assert json.loads(get(ratings.port, "/ratings/0")[2]) == {
        "id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}
    assert get(ratings.port, "/ratings/x")[0] == 400
    status, _, body, _ = get(ratings.port, "/ratings/3", method="POST",
                             body=b'{"Reviewer1": 1}', headers={"content-type": "application/json"})
    assert status == 200 and json.loads(get(ratings.port, "/ratings/3")[2])["ratings"] == {
        "Reviewer1": 1}


async def test_productpage_propagates_trace_headers_and_resolves_names():
    """In-process: the calls carry the trace headers, to a name resolved by getaddrinfo."""
    seen: list[Request] = []

    async def upstream_handler(request: Request) -> Response:
        seen.append(request)
        if request.path.startswith("/reviews/"):
            return Response.json(reviews_document(0, "reviews-v1-zzz", "null", False, "", None))
        return Response.json({"publisher": "PublisherA"})

    server = HttpServer(upstream_handler, log=lambda line: None)
    servers = await start_servers(server.serve_connection, "127.0.0.1", [0], log=lambda l: None)
    port = servers[0].sockets[0].getsockname()[1]
    page = ProductPage(("localhost", port), ("localhost", port), ("localhost", port))
    trace = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
             "tracestate": "lab=1", "baggage": "k=v", "x-request-id": "req-1",
             "x-b3-traceid": "80f198ee56343ba864fe8b2a57d3eff7", "b3": "80f198ee-e457b5a2-1",
             "cookie": "user=jason"}
    incoming = Request("GET", "/productpage", "HTTP/1.1",
                       Headers([*trace.items(), ("host", "productpage:9080"),
                                ("x-not-forwarded", "1")]), client=("10.244.1.9", 40000))
    try:
        response = await page.handle(incoming)
    finally:
        for s in servers:
            s.close()
    assert response.status == 200 and b"reviews-v1-zzz" in response.body
    assert [r.path for r in seen] == ["/details/0", "/reviews/0"]
    for request in seen:
        for name, value in trace.items():
            assert request.headers.get(name) == value
        assert request.headers.get("end-user") == "jason"  # the signed-in user
        assert request.headers.get("x-not-forwarded") is None
        assert request.headers.get("host") == f"localhost:{port}"


async def test_client_reports_unresolvable_names_as_upstream_errors():
    from lab.apps.http import UpstreamError

    with pytest.raises(UpstreamError):
        await http_request("GET", "no-such-service.invalid", 9080, "/", timeout=5)


# ---------------------------------------------------------------- httpbin

def test_httpbin_endpoints(apps):
    httpbin = apps("httpbin", "--pod", "httpbin-6f4b-xyz", "--ports", "0")
    port = httpbin.port
    status, headers, body, client = get(port, "/get?b=2&a=1&a=3", {"X-Custom": "v"})
    document = json.loads(body)
    assert status == 200 and headers["content-type"] == "application/json; charset=utf-8"
    assert list(document) == ["args", "headers", "method", "origin", "url"]
    assert document["args"] == {"a": ["1", "3"], "b": ["2"]}
    assert document["origin"] == client == headers["x-lab-client-address"]
    assert document["headers"]["X-Custom"] == ["v"]
    assert document["headers"]["Host"] == [f"127.0.0.1:{port}"]
    assert document["url"] == f"http://127.0.0.1:{port}/get?b=2&a=1&a=3"
    assert body.endswith(b"}\n") and b'\n  "args"' in body  # indented like go-httpbin

    assert json.loads(get(port, "/headers", {"X-A": "1"})[2])["headers"]["X-A"] == ["1"]
    status, _, body, client = get(port, "/ip")
    assert json.loads(body) == {"origin": client}
    assert json.loads(get(port, "/ip", {"X-Forwarded-For": "10.244.2.7, 10.244.1.1"})[2]) == {
        "origin": "10.244.2.7"}
    assert json.loads(get(port, "/hostname")[2]) == {"hostname": "httpbin-6f4b-xyz"}
    assert get(port, "/status/418")[0:3:2] == (418, b"I'm a teapot!")
    assert get(port, "/status/503")[0] == 503
    assert get(port, "/status/204")[0] == 204
    assert {get(port, "/status/200,201")[0] for _ in range(20)} <= {200, 201}
    status, _, body, _ = get(port, "/status/abc")
    assert status == 400 and json.loads(body)["error"] == "Bad Request"
    assert get(port, "/post")[0] == 405
    assert get(port, "/nope")[0:3:2] == (404, b"404 page not found\n")

    status, _, body, _ = get(port, "/anything/x?q=1", method="PUT", body=b'{"k": [1]}',
                             headers={"Content-Type": "application/json"})
    document = json.loads(body)
    assert status == 200 and document["method"] == "PUT" and document["json"] == {"k": [1]}
    assert document["data"] == '{"k": [1]}' and document["args"] == {"q": ["1"]}

    started = time.monotonic()
    status, headers, body, _ = get(port, "/delay/0.3")
    assert status == 200 and time.monotonic() - started >= 0.3
    assert headers["server-timing"] == 'initial_delay;dur=300.00;desc="initial delay"'
    status, _, body, _ = get(port, "/delay/11")
    assert status == 400
    assert json.loads(body)["detail"] == "invalid duration: duration 11s longer than 10s"


def test_chunked_request_body_and_keep_alive(apps):
    httpbin = apps("httpbin", "--ports", "0")
    with socket.create_connection(("127.0.0.1", httpbin.port), timeout=5) as sock:
        client = "%s:%d" % sock.getsockname()
        reader = sock.makefile("rb")
        chunked = (b"POST /post HTTP/1.1\r\nHost: h\r\nContent-Type: text/plain\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n"
                   b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n")
        plain = b"GET /get HTTP/1.1\r\nHost: h\r\n\r\n"
        sock.sendall(chunked + plain)  # pipelined on one connection
        answers = []
        for _ in range(2):
            status_line = reader.readline()
            headers = {}
            while (line := reader.readline()) != b"\r\n":
                name, _, value = line.decode().partition(":")
                headers[name.lower()] = value.strip()
            body = reader.read(int(headers["content-length"]))
            answers.append((status_line, headers, json.loads(body)))
    (s1, h1, d1), (s2, h2, d2) = answers
    assert s1.startswith(b"HTTP/1.1 200") and s2.startswith(b"HTTP/1.1 200")
    assert d1["data"] == "hello, world" and d1["headers"]["Transfer-Encoding"] == ["chunked"]
    assert d2["method"] == "GET"
    assert h1["x-lab-client-address"] == h2["x-lab-client-address"] == client
    assert "connection" not in h1  # kept alive
    httpbin.stop()
    assert sum(line.split(" ")[1] == client for line in httpbin.lines if '"' in line) == 2


async def test_many_concurrent_connections():
    async def handler(request: Request) -> Response:
        await asyncio.sleep(0.05)
        return Response.text(request.client_address)

    server = HttpServer(handler, log=lambda line: None)
    servers = await start_servers(server.serve_connection, "127.0.0.1", [0], log=lambda l: None)
    port = servers[0].sockets[0].getsockname()[1]
    try:
        answers = await asyncio.gather(*(http_request("GET", "127.0.0.1", port, f"/{i}")
                                         for i in range(300)))
    finally:
        for s in servers:
            s.close()
    assert all(a.status == 200 for a in answers)
    assert len({a.body for a in answers}) == 300  # 300 distinct client addresses


# ---------------------------------------------------------------- tcp-echo and echo

def test_tcp_echo_prefixes_each_line_on_every_port(apps):
    echo = apps("tcp-echo", "--args", "0,0", "one", listeners=2)
    assert echo.lines[0].endswith(", prefix: one")
    for port in echo.ports:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"hello world\nsecond line\npartial")
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        assert data == b"one hello world\none second line\n"
    echo.stop()
    assert "request: hello world" in echo.lines and "response: one hello world" in echo.lines
    assert any(re.match(r"connection from 127\.0\.0\.1:\d+ to port", l) for l in echo.lines)


def test_echo_answers_http_and_echoes_raw_bytes(apps):
    echo = apps("echo", "--pod", "mystery-1", "--namespace", "team", "--ports", "0,0",
                listeners=2)
    status, headers, body, client = get(echo.ports[1], "/some/path")
    document = json.loads(body)
    assert status == 200 and document["pod"] == "mystery-1" and document["namespace"] == "team"
    assert document["port"] == echo.ports[1] and document["client"] == client
    assert headers["x-lab-client-address"] == client
    with socket.create_connection(("127.0.0.1", echo.ports[0]), timeout=5) as sock:
        sock.sendall(b"\x00\x01 not http\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    assert data == b"\x00\x01 not http\n"
    echo.stop()
    assert any("raw tcp to port" in line and "echoed 12 bytes" in line for line in echo.lines)


# ---------------------------------------------------------------- process lifecycle

def test_sigterm_stops_a_server_promptly_even_mid_request(apps):
    httpbin = apps("httpbin", "--ports", "0")
    conn = http.client.HTTPConnection("127.0.0.1", httpbin.port, timeout=10)
    conn.request("GET", "/delay/10")
    time.sleep(0.2)  # the request is being served
    status, elapsed = httpbin.stop()
    conn.close()
    assert status == 0 and elapsed < 2.0
    assert "received SIGTERM, shutting down" in httpbin.lines


def test_sigterm_is_not_held_up_by_a_stuck_dns_lookup():
    """A lookup blocked in the resolver thread (cluster DNS unreachable) must not delay exit."""
    code = ("import socket, sys, time\n"
            "real = socket.getaddrinfo\n"
            "def stuck(host, *a, **k):\n"
            "    if host == 'details': time.sleep(60)\n"
            "    return real(host, *a, **k)\n"
            "socket.getaddrinfo = stuck\n"
            "from lab.apps.__main__ import main\n"
            "sys.exit(main(['productpage', '--listen', '127.0.0.1', '--ports', '0']))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        port = int(re.search(r":(\d+)$", proc.stdout.readline().strip()).group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /productpage HTTP/1.1\r\nHost: productpage\r\n\r\n")
            time.sleep(0.3)  # productpage is now resolving "details"
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and time.monotonic() - started < 2.0


def test_idle_waits_for_sigterm_without_sockets_or_heavy_imports():
    code = ("import runpy, sys; sys.argv = ['lab.apps', 'idle', '--pod', 'curl-1'];"
            "import atexit; atexit.register(lambda: print('MODULES', ' '.join(sys.modules)));"
            "runpy.run_module('lab.apps', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "curl-1: sleeping until terminated"
        rss_kib = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{proc.pid}/status")
                                .read_text()).group(1))
        sockets = [fd for fd in os.listdir(f"/proc/{proc.pid}/fd")
                   if os.readlink(f"/proc/{proc.pid}/fd/{fd}").startswith("socket:")]
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and time.monotonic() - started < 1.0
    assert sockets == []
    assert rss_kib < 40 * 1024
    modules = set(out.split("MODULES", 1)[1].split())
    assert not modules & {"asyncio", "yaml", "h2", "mitmproxy", "cryptography", "textual"}


def test_server_apps_import_no_heavy_dependencies():
    code = ("import sys, lab.apps.productpage, lab.apps.httpbin, lab.apps.echo,"
            " lab.apps.tcp_echo, lab.apps.details, lab.apps.ratings, lab.apps.reviews;"
            "print(' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    roots = {name.split(".")[0] for name in out.split()}
    assert not roots & {"yaml", "h2", "mitmproxy", "cryptography", "textual", "pyroute2",
                        "iptc"}
