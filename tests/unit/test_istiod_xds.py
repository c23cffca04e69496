"""istiod's Delta xDS and CA over a real loopback TLS 1.3 connection (no root).

The server is the real `Istiod` (server.py) on 127.0.0.1; the client is a few lines of lab.proto.xds,
written here, acting as a ztunnel would. Events and logs are collected in lists.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509

from lab.istiod.ca import IMPERSONATION_FAILURE, CertificateAuthority
from lab.istiod.server import (
    ISTIOD_IDENTITY,
    ROOT_CERT_FILE,
    XDS_ALPN,
    Istiod,
    authenticate_token,
    build_config,
    client_tls_context,
    issue_istiod_certificate,
    server_tls_context,
    watch_cluster,
)
from lab.istiod.xds_server import resource_version
from lab.kube.manifests import load_files
from lab.kube.model import REDIRECTION_ANNOTATION
from lab.proto.xds import (
    ADDRESS_TYPE,
    AUTHORIZATION_TYPE,
    MAX_LINE,
    CreateCertificateRequest,
    CreateCertificateResponse,
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    decode,
    encode,
)
from lab.supervisor.server import Supervisor
from lab.tls.certificate import WorkloadCertificate
from lab.tls.contexts import verify_server_identity
from lab.tls.csr import build_csr, generate_key, private_key_pem
from lab.tls.identity import Identity
from tests.conftest import CONFORMANCE, require_conformance

ROOT = Path(__file__).resolve().parents[2]
TOKENS = {"n1": "token-of-n1", "n2": "token-of-n2"}


def pod(name: str, node: str, sa: str, labels: dict, ip: str, phase: str = "Running", **ann) -> dict:
    return {"name": name, "namespace": "shop", "uid": f"uid-{name}", "ip": ip, "node": node, "phase": phase,
            "labels": labels, "annotations": dict(ann), "owner": "", "service_account": sa, "ports": {}}


def base_snapshot() -> dict:
    return {
        "generation": 1,
        "nodes": [{"name": "n1", "ip": "172.18.0.2", "role": "control-plane"},
                  {"name": "n2", "ip": "172.18.0.3", "role": "worker"}],
        "namespaces": [{"name": "shop", "labels": {}}],
        "pods": [pod("web", "n1", "web", {"app": "web"}, "10.244.0.2"),
                 pod("db", "n2", "db", {"app": "db"}, "10.244.1.2"),
                 pod("cache", "n2", "cache", {"app": "cache"}, "10.244.1.3"),
                 pod("broken", "n1", "broken", {"app": "broken"}, "10.244.0.9", phase="Failed")],
        "services": [{"name": "web", "namespace": "shop", "cluster_ip": "10.96.0.10", "labels": {},
                      "selector": {"app": "web"},
                      "ports": [{"name": "http", "port": 80, "target_port": 8080, "protocol": "TCP"}]}],
        "objects": [{"kind": "AuthorizationPolicy", "api_version": "security.istio.io/v1", "namespace": "shop",
                     "name": "db-from-web", "labels": {},
                     "raw": {"spec": {"selector": {"matchLabels": {"app": "db"}},
                                      "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}]}]}}}],
    }


@dataclass
class Harness:
    istiod: Istiod
    port: int
    ca: CertificateAuthority
    events: list = field(default_factory=list)
    logs: list = field(default_factory=list)

    def kinds(self, kind: str) -> list[dict]:
        return [f for k, f in self.events if k == kind]


@pytest.fixture
async def harness():
    ca = CertificateAuthority.create(default_ttl=timedelta(hours=2))
    events: list = []
    logs: list = []
    ist = Istiod(ca, lambda t: authenticate_token(TOKENS, t), lambda kind, msg, **f: events.append((kind, f)),
                 lambda level, scope, msg: logs.append((level, scope, msg)), debounce=0.01)
    server = await ist.serve("127.0.0.1", 0, server_tls_context(issue_istiod_certificate(ca)))
    h = Harness(ist, server.sockets[0].getsockname()[1], ca, events, logs)
    yield h
    await ist.close(server)


class Ztunnel:
    """A minimal ztunnel-side client of lab.proto.xds."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, node: str) -> None:
        self.reader, self.writer, self.node = reader, writer, node

    @classmethod
    async def connect(cls, h: Harness, node: str = "n1") -> Ztunnel:
        reader, writer = await asyncio.open_connection("127.0.0.1", h.port, ssl=client_tls_context(h.ca.root_pem),
                                                       server_hostname="", limit=MAX_LINE)
        return cls(reader, writer, node)

    async def send(self, msg) -> None:
        self.writer.write(encode(msg))
        await self.writer.drain()

    async def recv(self, timeout: float = 2.0):
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        assert line, "istiod closed the connection"
        return decode(line)

    async def nothing_for(self, seconds: float) -> bool:
        try:
            line = await asyncio.wait_for(self.reader.readline(), seconds)
        except asyncio.TimeoutError:
            return True
        raise AssertionError(f"unexpected message: {line[:200]!r}")

    async def subscribe(self, type_url: str, token: str | None = None, initial: dict | None = None,
                        claimed: str | None = None) -> None:
        await self.send(DeltaDiscoveryRequest(
            type_url=type_url, node={"id": f"ztunnel~{self.node}", "metadata": {"NODE_NAME": claimed or self.node}},
            initial_resource_versions=initial or {}, token=TOKENS.get(self.node, "") if token is None else token))

    async def ack(self, resp: DeltaDiscoveryResponse, error: str = "") -> None:
        await self.send(DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce, error_detail=error))

    async def both(self) -> dict[str, DeltaDiscoveryResponse]:
        """Subscribe to both types; return the first response of each."""
        await self.subscribe(ADDRESS_TYPE)
        await self.subscribe(AUTHORIZATION_TYPE, token="")  # the token goes with the first request only
        got = {}
        for _ in range(2):
            r = await self.recv()
            got[r.type_url] = r
        return got

    def close(self) -> None:
        self.writer.close()


async def wait_for(predicate, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def acked(h: Harness, node: str, type_url: str) -> dict[str, str]:
    conn = next(c for c in h.istiod.discovery.connections if c.node == node)
    return conn.subscriptions[type_url].acked


# ---------------------------------------------------------------------------------------------
# TLS


async def test_tls_13_with_istiod_identity(harness: Harness) -> None:
    zt = await Ztunnel.connect(harness)
    ssl_object = zt.writer.get_extra_info("ssl_object")
    assert ssl_object.version() == "TLSv1.3"
    assert ssl_object.selected_alpn_protocol() == XDS_ALPN
    assert verify_server_identity(ssl_object, [ISTIOD_IDENTITY]) == Identity.of("istio-system", "istiod")
    zt.close()


# ---------------------------------------------------------------------------------------------
# Delta xDS


async def test_subscribe_gets_full_state_then_only_diffs(harness: Harness) -> None:
    snap = base_snapshot()
    zt = await Ztunnel.connect(harness)
    await zt.subscribe(ADDRESS_TYPE)
    await zt.subscribe(AUTHORIZATION_TYPE, token="")
    assert await zt.nothing_for(0.1)  # istiod has not synced the cluster: no answer yet
    harness.istiod.on_snapshot(snap)
    first = {}
    for _ in range(2):
        r = await zt.recv()
        first[r.type_url] = r
    config, _ = build_config(snap)
    for type_url in (ADDRESS_TYPE, AUTHORIZATION_TYPE):
        r = first[type_url]
        assert {x.name: x.version for x in r.resources} == {n: resource_version(v) for n, v in config[type_url].items()}
        assert {x.name: x.resource for x in r.resources} == config[type_url]
        assert r.removed_resources == [] and r.nonce and r.system_version_info == harness.istiod.discovery.version
    assert sorted(x.name for x in first[ADDRESS_TYPE].resources) == [
        "shop/web.shop.svc.cluster.local", "uid-cache", "uid-db", "uid-web"]
    assert [x.name for x in first[AUTHORIZATION_TYPE].resources] == ["shop/db-from-web"]
    for r in first.values():
        await zt.ack(r)
    await wait_for(lambda: len(acked(harness, "n1", ADDRESS_TYPE)) == 4)

    # One pod enrolled by istio-cni, one deleted: only those two names travel.
    snap2 = copy.deepcopy(snap)
    snap2["pods"][0]["annotations"]["ambient.istio.io/redirection"] = "enabled"
    del snap2["pods"][2]
    t0 = time.monotonic()
    harness.istiod.on_snapshot(snap2)
    diff = await zt.recv()
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0
    assert diff.type_url == ADDRESS_TYPE
    assert [x.name for x in diff.resources] == ["uid-web"]
    assert diff.resources[0].resource["workload"]["tunnel_protocol"] == "HBONE"
    assert diff.removed_resources == ["uid-cache"]
    assert diff.nonce not in (first[ADDRESS_TYPE].nonce, first[AUTHORIZATION_TYPE].nonce)
    assert await zt.nothing_for(0.1)  # policies did not change: nothing for that type
    await zt.ack(diff)
    await wait_for(lambda: acked(harness, "n1", ADDRESS_TYPE).get("uid-web") == diff.resources[0].version)
    assert "uid-cache" not in acked(harness, "n1", ADDRESS_TYPE)

    push = harness.kinds("istiod.push")[-1]
    assert push["type_url"] == ADDRESS_TYPE and push["resources"] == ["uid-web"] and push["removed"] == ["uid-cache"]
    assert push["targets"] == ["n1"] and push["nonce"] == diff.nonce and push["version"] == diff.system_version_info
    assert push["bytes"] == push["bytes_per_target"] == len(encode(diff))
    assert push["reason"] == "change"
    full = harness.istiod.discovery.full_size(ADDRESS_TYPE)
    assert push["sidecar_equivalent_bytes"] == 2 * full  # web and db are left (broken is Failed)
    assert full > push["bytes"]

    # A snapshot that changes nothing ztunnel sees pushes nothing.
    snap3 = copy.deepcopy(snap2)
    snap3["generation"] = 99
    harness.istiod.on_snapshot(snap3)
    assert await zt.nothing_for(0.15)
    zt.close()


async def test_nack_does_not_advance_versions(harness: Harness) -> None:
    snap = base_snapshot()
    harness.istiod.on_snapshot(snap)
    await wait_for(lambda: harness.istiod.discovery.state is not None)
    zt = await Ztunnel.connect(harness)
    first = await zt.both()
    for r in first.values():
        await zt.ack(r)
    await wait_for(lambda: len(acked(harness, "n1", ADDRESS_TYPE)) == 4)
    before = dict(acked(harness, "n1", ADDRESS_TYPE))

    snap2 = copy.deepcopy(snap)
    snap2["pods"][0]["labels"]["version"] = "v2"
    harness.istiod.on_snapshot(snap2)
    diff = await zt.recv()
    assert [x.name for x in diff.resources] == ["uid-web"]
    await zt.ack(diff, error="uid-web: cannot parse workload")
    await wait_for(lambda: harness.kinds("istiod.nack"))
    assert acked(harness, "n1", ADDRESS_TYPE) == before
    nack = harness.kinds("istiod.nack")[0]
    assert nack["node"] == "n1" and nack["nonce"] == diff.nonce and nack["error"].startswith("uid-web")
    assert any(level == "warn" and "NACK" in msg for level, _, msg in harness.logs)
    status = {r["type_url"]: r for r in harness.istiod.discovery.status()}
    assert status[ADDRESS_TYPE]["status"] == "NACKED" and status[ADDRESS_TYPE]["last_nack"] == nack["error"]
    assert status[AUTHORIZATION_TYPE]["status"] == "SYNCED"

    # The next change carries the NACKed resource again, with the new one.
    snap3 = copy.deepcopy(snap2)
    snap3["pods"][1]["labels"]["version"] = "v2"
    harness.istiod.on_snapshot(snap3)
    again = await zt.recv()
    assert sorted(x.name for x in again.resources) == ["uid-db", "uid-web"]
    await zt.ack(again)
    await wait_for(lambda: acked(harness, "n1", ADDRESS_TYPE)["uid-web"] != before["uid-web"])
    assert acked(harness, "n1", ADDRESS_TYPE)["uid-db"] != before["uid-db"]
    await wait_for(lambda: {r["type_url"]: r["status"] for r in harness.istiod.discovery.status()}[ADDRESS_TYPE]
                   == "SYNCED")
    zt.close()


async def test_reconnect_with_initial_resource_versions(harness: Harness) -> None:
    snap = base_snapshot()
    harness.istiod.on_snapshot(snap)
    await wait_for(lambda: harness.istiod.discovery.state is not None)
    config, _ = build_config(snap)
    held = {n: resource_version(v) for n, v in config[ADDRESS_TYPE].items()}
    held["uid-db"] = "stale"
    del held["uid-cache"]
    held["uid-gone"] = "abc"
    zt = await Ztunnel.connect(harness)
    await zt.subscribe(ADDRESS_TYPE, initial=held)
    r = await zt.recv()
    assert sorted(x.name for x in r.resources) == ["uid-cache", "uid-db"]
    assert r.removed_resources == ["uid-gone"]
    assert harness.kinds("istiod.subscribe")[0]["initial_resource_versions"] == 4
    assert harness.kinds("istiod.push")[-1]["reason"] == "subscribe"
    zt.close()


async def test_two_ztunnels_share_one_push(harness: Harness) -> None:
    snap = base_snapshot()
    harness.istiod.on_snapshot(snap)
    await wait_for(lambda: harness.istiod.discovery.state is not None)
    a, b = await Ztunnel.connect(harness, "n1"), await Ztunnel.connect(harness, "n2")
    for zt in (a, b):
        for r in (await zt.both()).values():
            await zt.ack(r)
    await wait_for(lambda: len(harness.kinds("istiod.ack")) == 4)
    pushes = len(harness.kinds("istiod.push"))
    snap2 = copy.deepcopy(snap)
    snap2["objects"] = []  # the policy is deleted
    harness.istiod.on_snapshot(snap2)
    got = {}
    for zt in (a, b):
        for _ in range(2):
            r = await zt.recv()
            got[(zt.node, r.type_url)] = r
    for node in ("n1", "n2"):
        assert got[(node, AUTHORIZATION_TYPE)].removed_resources == ["shop/db-from-web"]
        # the policy also left db's authorization_policies: an Address diff too
        assert [x.name for x in got[(node, ADDRESS_TYPE)].resources] == ["uid-db"]
    assert got[("n1", AUTHORIZATION_TYPE)].nonce == got[("n2", AUTHORIZATION_TYPE)].nonce
    new = harness.kinds("istiod.push")[pushes:]
    assert len(new) == 2
    authz = next(p for p in new if p["type_url"] == AUTHORIZATION_TYPE)
    assert authz["targets"] == ["n1", "n2"] and authz["bytes"] == 2 * authz["bytes_per_target"]
    a.close(), b.close()


@pytest.mark.parametrize("token,claimed,reason", [
    ("not-a-token", None, "the token is not a node's token"),
    ("", None, "no token"),
    (TOKENS["n2"], "n1", "the token is node n2's but the ztunnel claims NODE_NAME=n1"),
])
async def test_bad_credentials_close_the_stream(harness: Harness, token: str, claimed: str | None, reason: str) -> None:
    harness.istiod.on_snapshot(base_snapshot())
    zt = await Ztunnel.connect(harness, "n1")
    await zt.subscribe(ADDRESS_TYPE, token=token, claimed=claimed)
    assert await asyncio.wait_for(zt.reader.read(), 2) == b""  # closed, nothing sent
    (rej,) = harness.kinds("istiod.xds.rejected")
    assert rej["reason"].endswith(reason)
    assert any(level == "error" and reason in msg for level, _, msg in harness.logs)
    assert harness.istiod.discovery.connections == []


# ---------------------------------------------------------------------------------------------
# CA


def csr_request(identity: Identity, token: str, validity: int = 0) -> tuple[CreateCertificateRequest, bytes]:
    key = generate_key()
    req = CreateCertificateRequest(csr=build_csr(key, identity).decode(), validity_duration=validity,
                                   metadata={"ImpersonatedIdentity": identity.uri}, token=token)
    return req, private_key_pem(key)


async def test_ca_signs_for_a_pod_on_the_callers_node(harness: Harness) -> None:
    harness.istiod.on_snapshot(base_snapshot())
    zt = await Ztunnel.connect(harness, "n2")
    wanted = Identity.of("shop", "db")
    req, key = csr_request(wanted, TOKENS["n2"], validity=3600)
    await zt.send(req)
    resp = await zt.recv()
    assert isinstance(resp, CreateCertificateResponse) and resp.error == ""
    assert len(resp.cert_chain) == 2
    assert resp.cert_chain[-1].encode() == harness.ca.root_pem  # root last
    cert = WorkloadCertificate.from_ca_response(wanted, [c.encode() for c in resp.cert_chain], key)
    assert cert.not_after - cert.not_before == timedelta(seconds=3600) + harness.ca.clock_skew_grace
    (signed,) = harness.kinds("istiod.csr.signed")
    assert signed == {"identity": wanted.uri, "node": "n2", "serial": cert.serial,
                      "not_after": cert.not_after.isoformat()}

    # validity_duration 0: istiod's default TTL (here 2h, --workload-cert-ttl)
    req, key = csr_request(Identity.of("shop", "cache"), TOKENS["n2"])
    await zt.send(req)
    leaf = x509.load_pem_x509_certificate((await zt.recv()).cert_chain[0].encode())
    assert leaf.not_valid_after_utc - datetime.now(timezone.utc) > timedelta(minutes=119)
    assert leaf.not_valid_after_utc - datetime.now(timezone.utc) <= timedelta(hours=2)
    zt.close()


@pytest.mark.parametrize("node,identity,token,why", [
    ("n1", Identity.of("shop", "db"), TOKENS["n1"], "no instances of shop/db found on node 'n1'"),
    ("n1", Identity.of("shop", "broken"), TOKENS["n1"], "no instances of shop/broken"),  # Failed pod
    ("n2", Identity.of("shop", "db"), "stolen?", "authentication failure"),
])
async def test_ca_refuses(harness: Harness, node: str, identity: Identity, token: str, why: str) -> None:
    harness.istiod.on_snapshot(base_snapshot())
    zt = await Ztunnel.connect(harness, node)
    req, _ = csr_request(identity, token)
    await zt.send(req)
    resp = await zt.recv()
    assert resp.cert_chain == [] and why in resp.error
    if token in TOKENS.values():
        assert resp.error.startswith(IMPERSONATION_FAILURE)
    (refused,) = harness.kinds("istiod.csr.refused")
    assert refused["identity"] == identity.uri and why in refused["reason"]
    # the connection stays usable: the same stream then gets xDS
    await zt.subscribe(ADDRESS_TYPE, token=TOKENS[node])
    assert isinstance(await zt.recv(), DeltaDiscoveryResponse)
    zt.close()


async def test_ca_and_xds_share_one_stream(harness: Harness) -> None:
    harness.istiod.on_snapshot(base_snapshot())
    zt = await Ztunnel.connect(harness, "n1")
    first = await zt.both()
    req, _ = csr_request(Identity.of("shop", "web"), TOKENS["n1"])
    await zt.send(req)
    resp = await zt.recv()
    assert isinstance(resp, CreateCertificateResponse) and not resp.error
    for r in first.values():
        await zt.ack(r)
    await wait_for(lambda: len(harness.kinds("istiod.ack")) == 2)
    zt.close()


# ---------------------------------------------------------------------------------------------
# From the supervisor's watch to a ztunnel


async def test_supervisor_change_reaches_ztunnel(harness: Harness) -> None:
    """The real supervisor's watch_cluster op on a unix socket -> istiod -> a ztunnel: a pod
    enrolled by istio-cni (annotation) becomes HBONE at the ztunnel within a second."""
    require_conformance()
    sup = Supervisor("e2e", 1, [])
    sup.api.apply(load_files([CONFORMANCE / "samples" / "bookinfo_bookinfo.yaml",
                              CONFORMANCE / "samples" / "curl_curl.yaml"]).resources)
    for p in sup.api.pods():
        p.phase = "Running"
    tmp = tempfile.mkdtemp(prefix="istiod-", dir="/tmp")  # unix socket paths must stay short
    path = os.path.join(tmp, "supervisor.sock")
    server = await asyncio.start_unix_server(sup.handle_client, path=path)
    watcher = asyncio.create_task(watch_cluster("e2e", harness.istiod.on_snapshot, harness.istiod.log,
                                                retry=0.05, path=path))
    try:
        zt = await Ztunnel.connect(harness, "n1")
        first = await zt.both()
        assert len([r for r in first[ADDRESS_TYPE].resources if "workload" in r.resource]) == 7
        for r in first.values():
            await zt.ack(r)
        pp = next(p for p in sup.api.pods() if p.name.startswith("productpage-"))
        t0 = time.monotonic()
        sup.set_annotation(pp, REDIRECTION_ANNOTATION, "enabled")  # what istio-cni does after ZDS
        diff = await zt.recv()
        elapsed = time.monotonic() - t0
        print(f"supervisor change -> ztunnel diff: {elapsed * 1000:.1f} ms")
        assert elapsed < 1.0
        (res,) = diff.resources
        assert res.resource["workload"]["name"] == pp.name
        assert res.resource["workload"]["tunnel_protocol"] == "HBONE"
        assert diff.removed_resources == []
        zt.close()
    finally:
        watcher.cancel()
        server.close()
        sup.changed()  # wake the supervisor's watch handler so it notices its client is gone
        await asyncio.sleep(0.05)
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    port = free_port()
    ca_dir = tmp_path / "ca"
    proc = subprocess.Popen([sys.executable, "-m", "lab.istiod", "--lab", f"istiodtest{os.getpid()}",
                             "--listen", f"127.0.0.1:{port}", "--ca-dir", str(ca_dir), "--tokens", str(tokens),
                             "--workload-cert-ttl", "600"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 10
        while not (ca_dir / ROOT_CERT_FILE).exists() or not _listening(port):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        root = (ca_dir / ROOT_CERT_FILE).read_bytes()
        assert root == (ca_dir / "ca-cert.pem").read_bytes()

        async def ask() -> CreateCertificateResponse:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_tls_context(root),
                                                           server_hostname="")
            req, _ = csr_request(Identity.of("default", "curl"), TOKENS["n1"])
            writer.write(encode(req))
            resp = decode(await asyncio.wait_for(reader.readline(), 5))
            writer.close()
            return resp

        resp = asyncio.run(ask())  # no supervisor: istiod has no snapshot yet
        assert "has not synced the cluster yet" in resp.error
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        assert time.monotonic() - t0 < 3
        out = proc.stdout.read()
        lines = [line.split("\t") for line in out.splitlines() if "\t" in line]
        assert lines and all(len(parts) == 4 and parts[0].endswith("Z") for parts in lines)
        assert any(parts[2] == "ca" and "refused" in parts[3] for parts in lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
