"""The waypoint's L7 features and its bad-input handling, as root, on one real lab: Istio's samples
bookinfo (+ bookinfo-versions), curl and httpbin in the mesh behind a waypoint, real curl inside the
curl pod, the real lab ztunnels carrying every request to the waypoint and on to the pods.

What each test shows, and where it looks:

- header-match routing (`end-user: jason` -> reviews-v2, the rest -> reviews-v1): the answering
  pod in the body, the route in the waypoint's access log;
- path (Exact, PathPrefix) and method matching, RequestHeaderModifier, ResponseHeaderModifier
  and URLRewrite on httpbin, whose `/headers` and `/anything` show what arrived;
- RequestMirror: the client gets the primary's answer only; the mirror's pod logs the copy;
- `timeouts.request` 1s on httpbin `/delay/3`: 504, flag UT;
- retries on httpbin `/status/503`: one try by Istio's default policy (it retries no status
  code), and with a rule whose `retry` lists 503, 3 tries in httpbin's log, flag URX and
  attempts="3" in the access log, `attempts` in the flow's metadata, two `waypoint.retry` events;
- a DestinationRule's connection pool (503 UO under parallel load, then success) and outlier
  detection (503 UH while the only endpoint is ejected, success after the ejection time);
- bad input, each followed by a normal request that still succeeds: a backendRef to a missing
  Service (route status BackendNotFound, 500 for its share, the rest unchanged), a parentRef port
  the Service lacks (not Accepted), weights summing to zero (500), an invalid regex (not Accepted,
  traffic unchanged), a malformed request inside the tunnel (400 DPE, and the source ztunnel's
  mTLS connection to the waypoint carries the next request), a 62 KB header block (431 DPE), and a
  backend that resets before (503 UC), during (the client's stream is reset, 200 UC in the log)
  or answers garbage (502 UPE).

The backend that resets is a real TCP server (`FLAKY_SERVER`) run with `ambient-lab exec` inside
the `flaky` pod, which is in the mesh (its Deployment's image maps to the lab's idle app, so port
8080 is free): the destination ztunnel connects to it, and what it does to its socket (close with
SO_LINGER 0 = RST) is what the waypoint sees through the HBONE stream.

Route status: the lab's `get httproute -o yaml` does not show a status; the waypoint's admin
`config` has it (`route_status`, Gateway API conditions per parent), which these tests read.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from lab.common.admin_socket import admin_request
from lab.supervisor.components import waypoint_dir
from lab.waypoint.flows import METADATA_KEY, read_flows
from tests.conftest import require_conformance
from tests.lab.conftest import Lab, down, new_lab_name, up
from tests.lab.test_capture import events, redirection, wait_for

pytestmark = pytest.mark.lab

FLAKY = """
apiVersion: v1
kind: Service
metadata:
  name: flaky
spec:
  ports:
  - {name: http, port: 80, targetPort: 8080}
  selector: {app: flaky}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: flaky
spec:
  replicas: 1
  selector:
    matchLabels: {app: flaky}
  template:
    metadata:
      labels: {app: flaky}
    spec:
      containers:
      - name: flaky
        image: busybox
        command: ["sleep", "infinity"]
"""

REVIEWS_ROUTE = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews
spec:
  parentRefs:
  - {group: "", kind: Service, name: reviews, port: 9080}
  rules:
  - matches:
    - headers: [{name: end-user, value: jason}]
    backendRefs:
    - {name: reviews-v2, port: 9080}
  - matches:
    - headers: [{name: x-mirror, value: "on"}]
    filters:
    - type: RequestMirror
      requestMirror:
        backendRef: {name: reviews-v3, port: 9080}
    backendRefs:
    - {name: reviews-v1, port: 9080}
  - backendRefs:
    - {name: reviews-v1, port: 9080}
"""

HTTPBIN_ROUTE = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: httpbin
spec:
  parentRefs:
  - {group: "", kind: Service, name: httpbin, port: 8000}
  rules:
  - matches:
    - path: {type: Exact, value: /headers}
      method: GET
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: user-agent, value: lab-waypoint}]
        add: [{name: x-lab-added, value: "yes"}]
        remove: [x-drop-me]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        add: [{name: x-lab-response, value: modified}]
    backendRefs:
    - {name: httpbin, port: 8000}
  - matches:
    - path: {type: PathPrefix, value: /api}
    filters:
    - type: URLRewrite
      urlRewrite:
        hostname: httpbin.rewritten
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /anything}
    backendRefs:
    - {name: httpbin, port: 8000}
  - matches:
    - path: {type: Exact, value: /delay/3}
    timeouts:
      request: 1s
    backendRefs:
    - {name: httpbin, port: 8000}
  - matches:
    - path: {type: Exact, value: /status/503}
      headers: [{name: x-retry, value: "503"}]
    retry: {attempts: 2, codes: [503]}
    backendRefs:
    - {name: httpbin, port: 8000}
  - backendRefs:
    - {name: httpbin, port: 8000}
"""

BREAKER = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: httpbin
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
    outlierDetection:
      consecutive5xxErrors: 3
      interval: 500ms
      baseEjectionTime: 1s
      maxEjectionPercent: 100
"""

BAD_ROUTES = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: ratings-broken
spec:
  parentRefs:
  - {group: "", kind: Service, name: ratings, port: 9080}
  rules:
  - matches:
    - headers: [{name: x-broken, value: missing}]
    backendRefs:
    - {name: ratings-missing, port: 9080}
  - matches:
    - headers: [{name: x-broken, value: port}]
    backendRefs:
    - {name: ratings, port: 1234}
  - matches:
    - headers: [{name: x-broken, value: zero}]
    backendRefs:
    - {name: ratings, port: 9080, weight: 0}
    - {name: reviews-v1, port: 9080, weight: 0}
  - backendRefs:
    - {name: ratings, port: 9080}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: details-badport
spec:
  parentRefs:
  - {group: "", kind: Service, name: details, port: 9999}
  rules:
  - backendRefs:
    - {name: details, port: 9080}
"""

BAD_REGEX = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: details-regex
spec:
  parentRefs:
  - {group: "", kind: Service, name: details, port: 9080}
  rules:
  - matches:
    - path: {type: RegularExpression, value: "/details/(["}
    backendRefs:
    - {name: details, port: 9080}
"""

# A real TCP server for the flaky pod: what it does depends on the request's path.
FLAKY_SERVER = r"""
import socket, struct, sys, threading, time
srv = socket.create_server(("0.0.0.0", 8080), reuse_port=False)
srv.settimeout(float(sys.argv[1]))  # gone by itself after that long without a connection

def reset(c):  # close with SO_LINGER 0: the kernel sends RST, not FIN
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()

def serve(c):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = c.recv(65536)
        if not chunk:
            return c.close()
        data += chunk
    path = data.split(b" ", 2)[1]
    print("request", path.decode(), flush=True)
    if path == b"/reset-before":
        reset(c)
    elif path == b"/reset-mid":
        c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"x" * 100)
        time.sleep(0.2)
        reset(c)
    elif path == b"/garbage":
        c.sendall(b"this is not HTTP\r\n\r\n")
        time.sleep(0.2)
        c.close()
    else:
        c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
        c.close()

print("listening", flush=True)
while True:
    try:
        conn, _ = srv.accept()
    except socket.timeout:
        break
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

# A raw client: bytes in, everything the server sends until it closes out (for what curl cannot send).
RAW_CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(sys.argv[3].encode("latin-1").decode("unicode_escape").encode("latin-1"))
out = b""
while chunk := s.recv(65536):
    out += chunk
sys.stdout.write(out.decode("latin-1"))
"""


# ------------------------------------------------------------------------------------ the lab
@pytest.fixture(scope="module")
def l7(root, tmp_path_factory):
    """bookinfo (+ versions), curl, httpbin and `flaky` in the mesh; the namespace's waypoint; the
    reviews and httpbin routes every test shares."""
    samples = require_conformance() / "samples"
    flaky = tmp_path_factory.mktemp("l7") / "flaky.yaml"
    flaky.write_text(FLAKY)
    files = [samples / f for f in ("bookinfo_bookinfo.yaml", "bookinfo_bookinfo-versions.yaml", "curl_curl.yaml",
                                   "httpbin_httpbin.yaml")] + [flaky]
    name = new_lab_name("l7")
    try:
        lab = up(name, *[a for f in files for a in ("-f", str(f))])
        lab("label", "namespace", "default", "istio.io/dataplane-mode=ambient")
        lab("waypoint", "apply", "--enroll-namespace", "--wait")
        wait_for(lambda: all(redirection(p) == "enabled" for p in lab.pods()
                             if not p["metadata"]["name"].startswith("waypoint-")), what="pods enabled")
        apply(lab, REVIEWS_ROUTE + "---" + HTTPBIN_ROUTE)
        wait_for(lambda: {"default/reviews", "default/httpbin"} <= set(config(lab)["route_status"]),
                 what="the waypoint has the routes")
        yield lab
    finally:
        down(name)


def apply(lab: Lab, text: str) -> None:
    lab("apply", "-f", "-", input=text)


def config(lab: Lab) -> dict:
    """The waypoint's configuration from its admin socket (Envoy's /config_dump)."""
    return admin_request(os.path.join(waypoint_dir(lab.name, "default", "waypoint"), "admin.sock"), "config")


def sh(lab: Lab, script: str) -> str:
    """A shell script in the curl pod (real curl, real ztunnel capture)."""
    return lab.exec("deploy/curl", "sh", "-c", script).stdout


def status_of(lab: Lab, url: str, *headers: str) -> str:
    """`curl -w %{http_code}` of one request from the curl pod ("000" when there is no answer)."""
    args = [a for h in headers for a in ("-H", h)]
    return lab.exec("deploy/curl", "curl", "-s", "-o", "/dev/null", "--max-time", "5", "-w", "%{http_code}", *args,
                    url, check=False).stdout


def access_log(lab: Lab, *needles: str, count: int = 1) -> list[str]:
    """The waypoint's access log lines containing every needle, once there are `count` of them."""
    def lines() -> list[str]:
        found = [line for line in lab("logs", "deploy/waypoint").stdout.splitlines()
                 if line.startswith("[") and all(n in line for n in needles)]
        return found if len(found) >= count else []
    return wait_for(lines, timeout=5, what=f"{count} access log line(s) with {needles}")


def app_log(lab: Lab, deploy: str) -> str:
    return lab("logs", f"deploy/{deploy}").stdout


def normal_request_succeeds(lab: Lab) -> None:
    """After every bad input: ordinary traffic through the waypoint is unaffected."""
    assert status_of(lab, "http://httpbin:8000/get") == "200"
    assert "reviews-v1-" in sh(lab, "curl -s http://reviews:9080/reviews/0")


def flow_with_request_id(lab: Lab, rid: str):
    path = os.path.join(waypoint_dir(lab.name, "default", "waypoint"), "flows.mitm")
    return wait_for(lambda: next((f for f in read_flows(path) if f.request.headers.get("x-request-id") == rid), None),
                    what=f"the flow of request {rid}")


# ------------------------------------------------------------------------------------ routing
def test_header_match_sends_jason_to_reviews_v2(l7: Lab):
    script = ("for i in 1 2 3 4 5; do curl -s -H 'end-user: jason' http://reviews:9080/reviews/0; echo; "
              "curl -s http://reviews:9080/reviews/0; echo; done")
    pods = [json.loads(line)["podname"] for line in sh(l7, script).splitlines() if line.strip()]
    assert len(pods) == 10
    assert all(p.startswith("reviews-v2-") for p in pods[0::2]), pods
    assert all(p.startswith("reviews-v1-") for p in pods[1::2]), pods
    # the access log names the rule that matched: rule 0 (the header), rule 2 (the rest)
    sh(l7, "curl -s -H 'end-user: jason' -H 'x-request-id: l7-jason' http://reviews:9080/reviews/0 >/dev/null")
    line = access_log(l7, '"l7-jason"', '"GET /reviews/0 ')[0]
    assert " default.reviews.0 " in line and "inbound-vip|9080|http|reviews-v2.default.svc.cluster.local" in line


def test_path_method_rewrite_and_header_modifiers(l7: Lab):
    # Exact /headers + GET: the request and response header modifiers apply
    out = sh(l7, "curl -s -i -H 'x-drop-me: 1' -H 'x-keep: 2' http://httpbin:8000/headers")
    head, _, body = out.partition("\n\n")  # text mode: CRLF read as LF
    seen = json.loads(body)["headers"]
    assert seen["User-Agent"] == ["lab-waypoint"] and seen["X-Lab-Added"] == ["yes"] and seen["X-Keep"] == ["2"]
    assert "X-Drop-Me" not in seen
    assert "x-lab-response: modified" in head.lower() and "server: istio-envoy" in head.lower()
    # the same path with POST is not rule 0: the catch-all rule, no modifiers
    out = sh(l7, "curl -s -i -X POST -H 'x-drop-me: 1' -H 'x-request-id: l7-post' http://httpbin:8000/headers")
    head, _, body = out.partition("\n\n")  # text mode: CRLF read as LF
    assert "x-lab-response" not in head.lower() and json.loads(body)["headers"]["X-Drop-Me"] == ["1"]
    assert " default.httpbin.4 " in access_log(l7, '"l7-post"')[0]
    # Exact means exact: /headers/ is not /headers (catch-all rule: httpbin's own 404)
    assert status_of(l7, "http://httpbin:8000/headers/") == "404"
    # PathPrefix /api, element-wise, rewritten to /anything, Host rewritten
    doc = json.loads(sh(l7, "curl -s 'http://httpbin:8000/api/books?x=1'"))
    assert doc["url"] == "http://httpbin.rewritten/anything/books?x=1" and doc["headers"]["Host"] == ["httpbin.rewritten"]
    assert status_of(l7, "http://httpbin:8000/apis") == "404"  # /apis is not under the prefix /api


def test_request_mirror_copies_to_v3_and_answers_from_v1(l7: Lab):
    t0 = time.time()
    body = sh(l7, "curl -s -H 'x-mirror: on' http://reviews:9080/reviews/777")
    assert json.loads(body)["podname"].startswith("reviews-v1-") and json.loads(body)["id"] == "777"
    wait_for(lambda: '"GET /reviews/777 ' in app_log(l7, "reviews-v3"), what="the mirrored copy at reviews-v3")
    assert "/reviews/777" not in app_log(l7, "reviews-v2")
    mirrors = [e for e in events(l7, t0) if e["kind"] == "waypoint.mirror"]
    assert mirrors and mirrors[-1]["fields"]["status"] == 200
    assert mirrors[-1]["fields"]["upstream_pod"].startswith("reviews-v3-") and "reviews-shadow" in mirrors[-1]["msg"]


# ------------------------------------------------------------------------------------ timeouts, retries, breaker
def test_request_timeout_is_504_ut(l7: Lab):
    t0 = time.monotonic()
    out = sh(l7, "curl -s -w ' %{http_code}' -H 'x-request-id: l7-timeout' http://httpbin:8000/delay/3")
    elapsed = time.monotonic() - t0
    assert out == "upstream request timeout 504" and 0.9 < elapsed < 2.8, (out, elapsed)
    line = access_log(l7, '"l7-timeout"')[0]
    assert '"GET /delay/3 HTTP/1.1" 504 UT response_timeout ' in line and " default.httpbin.2 " in line
    assert 'upstream.pod="httpbin-' in line  # the pod the waypoint waited for
    assert status_of(l7, "http://httpbin:8000/delay/0.1") == "200"  # other paths have no timeout


def test_503_is_returned_after_one_try_unless_the_route_lists_it(l7: Lab):
    # Istio's default retry policy retries no status code: one try, the backend's 503 as it came
    before = app_log(l7, "httpbin").count('"GET /status/503 ')
    assert status_of(l7, "http://httpbin:8000/status/503", "x-request-id: l7-default-503") == "503"
    line = access_log(l7, '"l7-default-503"')[0]
    assert "attempts=" not in line and " URX " not in line, line
    wait_for(lambda: app_log(l7, "httpbin").count('"GET /status/503 ') - before == 1, what="1 try at httpbin")
    # a rule whose `retry` lists 503: 3 tries
    t0 = time.time()
    before = app_log(l7, "httpbin").count('"GET /status/503 ')
    assert status_of(l7, "http://httpbin:8000/status/503", "x-retry: 503", "x-request-id: l7-retry") == "503"
    line = access_log(l7, '"l7-retry"')[0]
    assert " 503 URX via_upstream " in line and 'attempts="3"' in line
    wait_for(lambda: app_log(l7, "httpbin").count('"GET /status/503 ') - before == 3, what="3 tries at httpbin")
    flow = flow_with_request_id(l7, "l7-retry")
    assert flow.response.status_code == 503
    assert flow.metadata[METADATA_KEY]["attempts"] == 3 and flow.metadata[METADATA_KEY]["response_flags"] == "URX"
    # `ambient-lab flows` prints it as mitmdump does, the backend's reason phrase on the status line
    assert re.search(r"GET http://[\d.]+:8000/status/503\n +<< 503 Service Unavailable 0b\n", l7("flows").stdout)
    retries = [e for e in events(l7, t0) if e["kind"] == "waypoint.retry"]
    assert [e["fields"]["attempt"] for e in retries] == [1, 2] and {e["fields"]["outcome"] for e in retries} == {503}
    # a 500 is not in Istio's default retriable codes: one try
    assert status_of(l7, "http://httpbin:8000/status/500", "x-request-id: l7-noretry") == "500"
    assert "attempts=" not in access_log(l7, '"l7-noretry"')[0]


def test_circuit_breaker_opens_under_load_and_recovers(l7: Lab):
    apply(l7, BREAKER)
    try:
        wait_for(lambda: any(c["destination_rule"] == "default/httpbin" for c in config(l7)["clusters"]),
                 what="the DestinationRule at the waypoint")
        # connection pool: 1 connection, 1 pending; six parallel requests of 0.5 s
        script = ("for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{http_code}\\n' "
                  "-H \"x-request-id: l7-load-$i\" http://httpbin:8000/delay/0.5 & done; wait")
        codes = sh(l7, script).split()
        assert len(codes) == 6 and "200" in codes and codes.count("503") >= 3, codes
        overflow = access_log(l7, '"l7-load-', count=6)
        uo = [line for line in overflow if " 503 UO upstream_reset_before_response_started{overflow} " in line]
        assert len(uo) == codes.count("503"), overflow
        assert status_of(l7, "http://httpbin:8000/get") == "200"  # after the load: closed again
        # outlier detection: 3 consecutive 5xx eject the only endpoint, for baseEjectionTime (1 s)
        sh(l7, "for i in 1 2 3; do curl -s -o /dev/null http://httpbin:8000/status/500; done")
        assert status_of(l7, "http://httpbin:8000/get", "x-request-id: l7-ejected") == "503"
        assert " 503 UH no_healthy_upstream " in access_log(l7, '"l7-ejected"')[0]
        wait_for(lambda: status_of(l7, "http://httpbin:8000/get") == "200", timeout=4, what="the endpoint back")
    finally:
        l7("delete", "-f", "-", input=BREAKER)
    wait_for(lambda: not any(c["destination_rule"] for c in config(l7)["clusters"]), what="the rule gone")


# ------------------------------------------------------------------------------------ bad input
def test_routes_to_missing_backends_and_ports(l7: Lab):
    apply(l7, BAD_ROUTES)
    wait_for(lambda: "default/details-badport" in config(l7)["route_status"], what="the routes' status")
    status = config(l7)["route_status"]
    broken = {c["type"]: c for c in status["default/ratings-broken"]["Service/default/ratings:9080"]}
    assert broken["Accepted"]["status"] == "True"
    assert (broken["ResolvedRefs"]["status"], broken["ResolvedRefs"]["reason"]) == ("False", "BackendNotFound")
    assert "ratings-missing not found" in broken["ResolvedRefs"]["message"]
    assert "ratings has no port 1234" in broken["ResolvedRefs"]["message"]
    badport = {c["type"]: c for c in status["default/details-badport"]["Service/default/details:9999"]}
    assert (badport["Accepted"]["status"], badport["Accepted"]["reason"]) == ("False", "NoMatchingParent")
    # the missing backend's share gets 500; the rest of ratings and details are unchanged
    assert status_of(l7, "http://ratings:9080/ratings/0", "x-broken: missing") == "500"
    assert status_of(l7, "http://ratings:9080/ratings/0", "x-broken: port") == "500"
    assert status_of(l7, "http://ratings:9080/ratings/0") == "200"
    assert status_of(l7, "http://details:9080/details/0") == "200"
    # weights summing to zero: 500
    assert status_of(l7, "http://ratings:9080/ratings/0", "x-broken: zero", "x-request-id: l7-zero") == "500"
    assert " 500 - direct_response " in access_log(l7, '"l7-zero"')[0]
    normal_request_succeeds(l7)


def test_invalid_regex_route_is_not_accepted(l7: Lab):
    apply(l7, BAD_REGEX)
    status = wait_for(lambda: config(l7)["route_status"].get("default/details-regex"), what="route status")
    accepted = next(c for c in status["Service/default/details:9080"] if c["type"] == "Accepted")
    assert (accepted["status"], accepted["reason"]) == ("False", "UnsupportedValue")
    assert "invalid regular expression" in accepted["message"]
    # were the route accepted, /details/0 would not match it (404 NR): not accepted, details is unrouted
    assert status_of(l7, "http://details:9080/details/0", "x-request-id: l7-regex") == "200"
    assert " - default upstream.pod=" in access_log(l7, '"l7-regex"')[0]  # route "default": the Service itself
    normal_request_succeeds(l7)


def test_malformed_request_in_the_tunnel_is_400_and_the_tunnel_survives(l7: Lab):
    t0 = time.time()
    out = l7.exec("deploy/curl", sys.executable, "-c", RAW_CLIENT, "httpbin", "8000", "GARBAGE\\r\\n\\r\\n").stdout
    assert out.startswith("HTTP/1.1 400 Bad Request\n") and "connection: close" in out and out.endswith("Bad Request")
    line = access_log(l7, '"- - HTTP/1.1" 400 DPE http1.codec_error ')[-1]
    assert 'src.identity="spiffe://cluster.local/ns/default/sa/curl"' in line
    bad_flow = line.rsplit('flow="', 1)[1].split('"')[0]
    assert status_of(l7, "http://httpbin:8000/get", "x-request-id: l7-after-400") == "200"
    good_flow = access_log(l7, '"l7-after-400"')[0].rsplit('flow="', 1)[1].split('"')[0]
    # the source ztunnel's mTLS connection to the waypoint carried both: the 400 ended one stream only
    handshakes = {e["flow"]: e["fields"] for e in events(l7, t0)
                  if e["kind"] == "tls.handshake" and e["fields"].get("direction") == "outbound"}
    assert handshakes[good_flow]["local"] == handshakes[bad_flow]["local"] and handshakes[good_flow]["reused"]
    normal_request_succeeds(l7)


def test_header_block_over_60k_is_431(l7: Lab):
    out = sh(l7, "curl -s -w ' %{http_code}' -H \"x-big: $(head -c 62000 /dev/zero | tr '\\0' a)\" "
                 "http://httpbin:8000/get")
    assert out == "Request Header Fields Too Large 431"
    access_log(l7, " 431 DPE http1.headers_too_large ")
    normal_request_succeeds(l7)


@pytest.fixture
def flaky_server(l7: Lab):
    """FLAKY_SERVER inside the flaky pod (ambient-lab exec), stopped with its process group."""
    proc = subprocess.Popen([sys.executable, "-m", "lab", "exec", "--name", l7.name, "deploy/flaky", "--",
                             sys.executable, "-c", FLAKY_SERVER, "30"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def test_backend_resets_and_garbage(l7: Lab, flaky_server):
    assert status_of(l7, "http://flaky/ok") == "200"
    # reset before the response: 503 UC (not retried: `reset` is not in Istio's default retry_on)
    out = sh(l7, "curl -s -w ' %{http_code}' -H 'x-request-id: l7-reset-before' http://flaky/reset-before")
    assert out.endswith(" 503") and "reset reason: connection termination" in out
    line = access_log(l7, '"l7-reset-before"')[0]
    assert " 503 UC upstream_reset_before_response_started{connection_termination} " in line
    assert "attempts=" not in line
    # reset after the head and part of the body: the client's stream is reset (curl sees 200, then an error)
    p = l7.exec("deploy/curl", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                "-H", "x-request-id: l7-reset-mid", "http://flaky/reset-mid", check=False)
    assert p.returncode in (18, 56) and p.stdout == "200 100", (p.returncode, p.stdout)
    line = access_log(l7, '"l7-reset-mid"')[0]
    assert " 200 UC upstream_reset_after_response_started{connection_termination} " in line
    flow = flow_with_request_id(l7, "l7-reset-mid")
    assert flow.error is not None and "stream reset" in flow.error.msg and len(flow.response.content) == 100
    # not HTTP at all: 502 UPE
    assert status_of(l7, "http://flaky/garbage", "x-request-id: l7-garbage") == "502"
    assert " 502 UPE upstream_reset_before_response_started{protocol_error} " in access_log(l7, '"l7-garbage"')[0]
    assert status_of(l7, "http://flaky/ok") == "200"
    normal_request_succeeds(l7)
