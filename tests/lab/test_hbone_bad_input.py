"""Bad input on HBONE, as root, against a real lab: each attack is refused, ztunnel (or istiod)
logs a clear line, and ztunnel keeps serving everyone else without leaking file descriptors.

Istio ambient's security rests on port 15008 (ztunnel's inbound HBONE listener inside every
meshed pod) accepting only mutual TLS from mesh identities, HTTP/2 CONNECT to the pod itself,
and on istiod's CA signing only identities of the caller's node. Here a hostile process sends
what a buggy or malicious peer could: bytes that are not TLS, TLS without ALPN h2, no client
certificate, certificates from another CA, with a SAN that is not SPIFFE or in another trust
domain, requests that are not CONNECT, bad authorities, thousands of streams, slow clients,
a man in the middle presenting the wrong identity, and CSRs istiod must refuse.

Where the attacker stands. The `sleep` pod cannot reach `productpage:15008` raw: the in-pod nat
OUTPUT chain (lab/cni/iptables.py, Istio's ISTIO_OUTPUT) REDIRECTs every TCP connection the pod
opens, whatever its port, to the pod's own ztunnel on 15001, unless the packet carries ztunnel's
mark 0x539; that ztunnel then refuses a destination port of its own ("attempted recursive call to
ourselves") and the bytes never leave the pod. Only PREROUTING, on the *receiving* side, exempts
dport 15008 (a process with CAP_NET_ADMIN in the pod could set that mark; the node is the simpler
and stronger position). So the attacker runs in the network namespace of productpage's NODE, the position
of a compromised node or of anything routed to the pod network outside the mesh: its packets are
routed over the pod's veth straight to ztunnel's listener in the pod (no kube-proxy rule matches a
pod IP). With root on that node it also holds the node's istiod credential, which is exactly the
power a stolen ztunnel token gives: certificates for identities that have a pod on that node.

Each attack is one command to `Attacker`, a process in the node's netns driven over JSON lines on
its stdin/stdout (`python -m tests.lab.test_hbone_bad_input`), so that connections can be held
open while the test checks that others are still served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import ssl
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from lab.hbone import HboneHttpError, HboneStreamReset, open_hbone_connection
from lab.istiod.ca import CertificateAuthority, issue_leaf
from lab.tls.certificate import WorkloadCertificate
from lab.tls.contexts import server_context
from lab.tls.csr import build_csr, generate_key, private_key_pem
from lab.tls.identity import Identity
from lab.ztunnel.identity_manager import CaClient
from tests.lab.conftest import Lab, down, new_lab_name, up
from tests.lab.test_capture import curl, redirection, wait_for

ROOT = Path(__file__).resolve().parents[2]
TITLE = "<title>Simple Bookstore App</title>"
HBONE_PORT = 15008
MITM_PORT = 25008


# =============================================================================== the attacker
# Runs inside the node's network namespace (the `__main__` of this module), as root there.

class AttackerAgent:
    """The hostile process: one asyncio loop, commands as JSON lines, results as JSON lines."""

    def __init__(self, lab: str, node: str, istiod: str) -> None:
        self.lab, self.node, self.istiod = lab, node, istiod
        self.held: dict[str, tuple[asyncio.StreamWriter, asyncio.Task]] = {}
        self.ended: dict[str, str] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.mitm: asyncio.AbstractServer | None = None
        self.certs: dict[tuple[str, str], WorkloadCertificate] = {}
        self.mitm_seen: list[dict] = []

    # ------------------------------------------------------------------ certificates
    def root_pem(self) -> bytes:
        return Path(f"/run/ambient-lab/{self.lab}/istiod/root-cert.pem").read_bytes()

    def token(self) -> str:
        node = self.node.removeprefix(self.lab + "-")
        return Path(f"/run/ambient-lab/{self.lab}/nodes/{node}/token").read_text().strip()

    async def ca_call(self, csr: bytes, identity: str) -> dict:
        """istiod's CreateCertificate with this node's credential, impersonating `identity`."""
        ca = CaClient(self.istiod, self.root_pem(), self.token())
        try:
            chain = await ca.create_certificate(csr, Identity.parse(identity), 600)
            return {"signed": True, "chain": [c.decode() for c in chain]}
        except Exception as e:  # noqa: BLE001 - the refusal is the point
            return {"signed": False, "error": f"{type(e).__name__}: {e}"}
        finally:
            await ca.close()

    async def cert(self, kind: str, identity: str) -> WorkloadCertificate:
        """A client certificate (lab.tls WorkloadCertificate) of one of these kinds:
        valid (signed by the lab's istiod), other_ca (a CA of our own), not_spiffe and
        other_td (signed with the mesh root's key, which only a mis-issuing CA would do: the
        one way to reach ztunnel's identity check past the chain check)."""
        if (kind, identity) in self.certs:
            return self.certs[(kind, identity)]
        ident = Identity.parse(identity)
        key = generate_key()
        if kind == "valid":
            r = await self.ca_call(build_csr(key, ident), identity)
            if not r["signed"]:
                raise RuntimeError(r["error"])
            chain = [c.encode() for c in r["chain"]]
        else:
            if kind == "other_ca":
                ca, san = CertificateAuthority.create(), identity
            else:
                base = Path(f"/run/ambient-lab/{self.lab}/istiod")
                ca = CertificateAuthority("cluster.local",
                                          serialization.load_pem_private_key((base / "ca-key.pem").read_bytes(), None),
                                          x509.load_pem_x509_certificate((base / "ca-cert.pem").read_bytes()))
                san = ("https://attacker.example/not-spiffe" if kind == "not_spiffe"
                       else f"spiffe://evil.local/ns/{ident.namespace}/sa/{ident.service_account}")
            leaf = issue_leaf(key.public_key(), san, ca.root_cert, ca.root_key, ca.default_ttl)
            chain = [leaf.public_bytes(serialization.Encoding.PEM), ca.root_pem]
        c = WorkloadCertificate(ident, chain, private_key_pem(key))
        self.certs[(kind, identity)] = c
        return c

    def client_ctx(self, cert: WorkloadCertificate | None, alpn: list[str] | None) -> ssl.SSLContext:
        """TLS 1.3 as ztunnel speaks it, but with what the attack needs (no server verification:
        the attacker does not care who answers)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if alpn:
            ctx.set_alpn_protocols(alpn)
        if cert is not None:
            with tempfile.TemporaryDirectory() as tmp:
                ctx.load_cert_chain(*cert.write_files(tmp))
        return ctx

    # ------------------------------------------------------------------ helpers
    @staticmethod
    async def outcome(reader: asyncio.StreamReader, timeout: float = 5.0) -> str:
        """What the peer does next: closed (FIN), reset, an alert, data, or nothing."""
        try:
            data = await asyncio.wait_for(reader.read(65536), timeout)
        except TimeoutError:
            return "nothing (still open)"
        except ssl.SSLError as e:
            return f"tls alert: {e.reason or e}"
        except ConnectionResetError:
            return "reset"
        except OSError as e:
            return f"error: {e}"
        return f"data: {data[:16].hex()}" if data else "closed"

    async def tcp(self, dst: list) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(asyncio.open_connection(dst[0], dst[1]), 5)

    async def open_tls(self, dst: list, cert_kind: str | None, identity: str,
                       alpn: list[str] | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        cert = await self.cert(cert_kind, identity) if cert_kind else None
        return await asyncio.wait_for(
            asyncio.open_connection(dst[0], dst[1], ssl=self.client_ctx(cert, alpn), server_hostname=""), 5)

    # ------------------------------------------------------------------ the commands
    async def op_raw(self, dst: list, payload: str) -> dict:
        """Bytes that are not TLS at all."""
        data = os.urandom(4096) if payload == "random" else \
            b"GET / HTTP/1.1\r\nHost: productpage\r\nUser-Agent: attacker\r\n\r\n"
        reader, writer = await self.tcp(dst)
        local = writer.get_extra_info("sockname")[:2]
        try:
            writer.write(data)
            await writer.drain()
        except OSError:
            pass
        out = await self.outcome(reader)
        writer.transport.abort()
        return {"local": local, "outcome": out}

    async def op_tls(self, dst: list, cert: str | None, identity: str, alpn: list[str] | None) -> dict:
        """A TLS handshake, then the HTTP/2 preface: is anything served?"""
        try:
            reader, writer = await self.open_tls(dst, cert, identity, alpn)
        except (ssl.SSLError, OSError) as e:
            return {"handshake": f"failed: {e}", "outcome": "refused in the handshake", "local": None}
        ssl_object = writer.get_extra_info("ssl_object")
        res = {"handshake": "finished", "alpn": ssl_object.selected_alpn_protocol(),
               "local": writer.get_extra_info("sockname")[:2]}
        try:
            writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
            await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        res["outcome"] = await self.outcome(reader)
        writer.transport.abort()
        return res

    async def op_request(self, dst: list, identity: str, headers: list[list[str]]) -> dict:
        """Valid mTLS with a certificate from the lab's CA, then one request of our making."""
        cert = await self.cert("valid", identity)
        conn = await open_hbone_connection(dst[0], dst[1], self.client_ctx(cert, ["h2"]))
        local = conn.writer.get_extra_info("sockname")[:2]
        try:
            try:
                status, _, stream = await asyncio.wait_for(conn.request([tuple(h) for h in headers]), 5)
                stream.close()
                res = {"status": status}
            except HboneHttpError as e:
                res = {"status": e.status}
            except HboneStreamReset as e:
                res = {"status": None, "reset": str(e)}
            # the connection itself survives a bad stream: a good CONNECT on it still works
            authority = f"{dst[0]}:9080"
            status, _, stream = await asyncio.wait_for(conn.connect_stream(authority), 5)
            stream.write(b"GET /productpage HTTP/1.0\r\n\r\n")
            stream.write_eof()
            body = await asyncio.wait_for(stream.read(), 5)
            res["then_connect"] = status
            res["then_title"] = b"Simple Bookstore App" in body
        finally:
            await conn.aclose()
        res["local"] = local
        return res

    async def op_streams(self, dst: list, identity: str, n: int, authority: str) -> dict:
        """n CONNECT streams at once on one connection, all sent before the server's SETTINGS
        are read (so our own HTTP/2 stack does not hold them back). Held open until `release`."""
        reader, writer = await self.open_tls(dst, "valid", identity, ["h2"])
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        for _ in range(n):
            conn.send_headers(conn.get_next_available_stream_id(), [(":method", "CONNECT"), (":authority", authority)])
        writer.write(conn.data_to_send())
        ok = refused = other = 0
        pending = n
        deadline = time.monotonic() + 15
        while pending and time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(reader.read(65536), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                break
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    pending -= 1
                    if dict(ev.headers).get(b":status") == b"200":
                        ok += 1
                    else:
                        other += 1
                elif isinstance(ev, h2.events.StreamReset):
                    pending -= 1
                    if ev.error_code == 7:  # REFUSED_STREAM
                        refused += 1
                    else:
                        other += 1
            writer.write(conn.data_to_send())
        key = self.hold(None, writer)
        return {"ok": ok, "refused": refused, "other": other, "unanswered": pending, "held": key,
                "local": writer.get_extra_info("sockname")[:2]}

    def hold(self, reader: asyncio.StreamReader | None, writer: asyncio.StreamWriter) -> str:
        """Keep a connection open; a reader task notes when the server ends it."""
        key = secrets.token_hex(4)
        self.ended[key] = ""

        async def watch() -> None:
            if reader is None:
                return
            try:
                while await reader.read(65536):
                    pass
                self.ended[key] = "closed by the server"
            except (OSError, ssl.SSLError) as e:
                self.ended[key] = f"ended by the server: {e!r}"

        self.held[key] = (writer, asyncio.create_task(watch()))
        return key

    async def op_slow(self, dst: list, identity: str) -> dict:
        """Three slow clients held open: a TCP connection that never says hello, a finished mTLS
        handshake that never sends the HTTP/2 preface, and a ClientHello dripped a byte at a time."""
        silent = self.hold(*await self.tcp(dst))
        idle_tls = self.hold(*await self.open_tls(dst, "valid", identity, ["h2"]))
        reader, drip = await self.tcp(dst)
        hello = bytes.fromhex("16030100c8010000c40303") + os.urandom(32)  # a ClientHello's first bytes

        async def dripping() -> None:
            with contextlib.suppress(OSError):
                for b in hello:
                    drip.write(bytes([b]))
                    await drip.drain()
                    await asyncio.sleep(0.25)
        dripper = asyncio.create_task(dripping())
        key = self.hold(reader, drip)
        self.tasks[key] = dripper
        keys = {"silent": silent, "idle_tls": idle_tls, "drip": key}
        return {"held": keys, "local": {k: self.held[v][0].get_extra_info("sockname")[:2] for k, v in keys.items()}}

    async def op_held_state(self, keys: list[str]) -> dict:
        """For each held connection: "" while open, else how the server ended it."""
        return {k: self.ended[k] for k in keys}

    async def op_release(self, keys: list[str]) -> dict:
        for key in keys:
            writer, watcher = self.held.pop(key)
            watcher.cancel()
            if key in self.tasks:
                self.tasks.pop(key).cancel()
            writer.transport.abort()
        return {"released": keys}

    async def op_csr(self, identity: str, extra_sans: list[str]) -> dict:
        """A CSR to istiod with this node's credential."""
        sans = [x509.UniformResourceIdentifier(u) for u in [identity, *extra_sans]]
        csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
               .add_extension(x509.SubjectAlternativeName(sans), critical=True)
               .sign(generate_key(), hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        r = await self.ca_call(csr, identity)
        r.pop("chain", None)
        return r

    async def op_mitm(self, identity: str, port: int) -> dict:
        """A man in the middle: a TLS server presenting a VALID mesh certificate, but of
        `identity`, not of the workload the client wants to reach."""
        cert = await self.cert("valid", identity)
        ctx = server_context(cert, self.root_pem())

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = writer.get_extra_info("peername")
            self.mitm_seen.append({"peer": peer[:2], "outcome": await self.outcome(reader, 3)})
            writer.transport.abort()

        self.mitm = await asyncio.start_server(serve, "0.0.0.0", port, ssl=ctx)
        return {"listening": port}

    async def op_mitm_report(self) -> dict:
        if self.mitm is not None:
            self.mitm.close()
            self.mitm = None
        return {"seen": self.mitm_seen}

    async def op_close_all(self) -> dict:
        await self.op_release(list(self.held))
        await self.op_mitm_report()
        return {"closed": True}


async def _attacker_main(lab: str, node: str, istiod: str) -> None:
    agent = AttackerAgent(lab, node, istiod)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print(json.dumps({"ready": True}), flush=True)
    while line := await reader.readline():
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            result = await getattr(agent, f"op_{op}")(**cmd)
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            result = {"exception": f"{type(e).__name__}: {e}"}
        print(json.dumps(result), flush=True)
    await agent.op_close_all()



# =============================================================================== the tests
pytestmark = pytest.mark.lab

CURL = "spiffe://cluster.local/ns/default/sa/curl"
SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
PRODUCTPAGE = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"


class Attacker:
    """The test's side of the attacker process: `call(op, **args)` -> its JSON answer."""

    def __init__(self, lab: str, node: str, istiod: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", node, sys.executable, "-m", "tests.lab.test_hbone_bad_input", lab, node, istiod],
            cwd=str(ROOT), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert json.loads(self.proc.stdout.readline() or "{}").get("ready"), "the attacker did not start"

    def __call__(self, op: str, **args: Any) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline() or '{"exception": "the attacker died"}')
        assert "exception" not in answer, answer["exception"]
        return answer

    def close(self) -> None:
        """Close everything it holds (stdin EOF), then make sure it is gone."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


class Target:
    """The lab under attack: productpage's pod, its node's ztunnel, istiod, and the attacker
    standing in that node's network namespace."""

    def __init__(self, lab: Lab) -> None:
        from lab.supervisor.client import call

        self.lab = lab
        pods = {p["metadata"]["name"].rsplit("-", 2)[0]: p for p in lab.pods()}
        self.ip = {name: p["status"]["podIP"] for name, p in pods.items()}
        self.node = pods["productpage-v1"]["spec"]["nodeName"]
        assert pods["curl"]["spec"]["nodeName"] == pods["reviews-v1"]["spec"]["nodeName"] == self.node
        assert pods["sleep"]["spec"]["nodeName"] != self.node, "sleep must live on the other worker"
        nodes = json.loads(lab("get", "nodes", "-o", "json").stdout)["items"]
        cp = next(n for n in nodes if "node-role.kubernetes.io/control-plane" in n["metadata"]["labels"])
        self.istiod = next(a["address"] for a in cp["status"]["addresses"] if a["type"] == "InternalIP") + ":15012"
        rows = call(lab.name, "components")["components"]
        self.ztunnel_pid = next(r["pid"] for r in rows if r["component"] == "ztunnel" and r["node"] == self.node)
        self.istiod_pid = next(r["pid"] for r in rows if r["component"] == "istiod")
        self.hbone = [self.ip["productpage-v1"], HBONE_PORT]
        self.attacker: Attacker | None = None
        self.since = datetime.now(UTC)  # where the current attack's log lines start

    def ztunnel_log(self) -> str:
        return self.lab("logs", "ztunnel", "--node", self.node).stdout

    def istiod_log(self) -> str:
        return self.lab("logs", "istiod").stdout

    def logged(self, component: str, local: list | None, *fragments: str) -> str:
        """The `ztunnel` (this node's) or `istiod` log line of the current attack with these fragments."""
        return log_line(self.ztunnel_log if component == "ztunnel" else self.istiod_log, self.since, local, *fragments)

    def curl(self, source: str = "deploy/curl") -> subprocess.CompletedProcess:
        return self.lab.exec(source, "curl", "-s", "--max-time", "5", "http://productpage:9080/productpage",
                             check=False)


def fds(pid: int) -> dict[str, str]:
    """The open file descriptors of a process: number -> what it points at."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return out


def settled_fd_counts(pids: list[int], quiet: float = 0.3, timeout: float = 5.0) -> list[int]:
    """The fd counts once they stopped moving for `quiet` seconds (connections finishing, pools settling)."""
    deadline = time.monotonic() + timeout
    last, since = [len(fds(p)) for p in pids], time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = [len(fds(p)) for p in pids]
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


@contextlib.contextmanager
def still_serving_without_leaks(t: Target):
    """Around an attack: afterwards curl -> productpage must still return the bookstore title,
    and ztunnel's and istiod's file descriptors must come back to what they were (anything the
    attack opened closed again)."""
    pids = [t.ztunnel_pid, t.istiod_pid]
    before = {pid: (count, fds(pid)) for pid, count in zip(pids, settled_fd_counts(pids), strict=True)}
    t.since = datetime.now(UTC)
    yield
    p = t.curl()
    assert TITLE in p.stdout, f"ztunnel stopped serving: curl exit {p.returncode} {p.stderr}"
    for pid, (count, table) in before.items():
        try:
            wait_for(lambda pid=pid, count=count: len(fds(pid)) <= count, timeout=5,
                     what=f"fds of pid {pid} back to {count}")
        except AssertionError:
            now = fds(pid)
            extra = {k: v for k, v in now.items() if table.get(k) != v}
            raise AssertionError(f"pid {pid} holds {len(now)} fds, {count} before the attack; new: {extra}") from None


def log_line(read, since: datetime, local: list | None, *fragments: str, timeout: float = 5.0) -> str:
    """The log line written since `since` about the attacker's connection (matched by its source
    address, when given) that contains every fragment."""
    def find() -> str | None:
        for line in read().splitlines():
            stamp, _, rest = line.partition("\t")
            try:
                if datetime.fromisoformat(stamp) < since:
                    continue
            except ValueError:
                continue
            if (local is None or f"src.addr={local[0]}:{local[1]} " in rest) and all(f in rest for f in fragments):
                return line
        return None
    return wait_for(find, timeout=timeout, what=f"a log line with {fragments} from {local}")


@pytest.fixture(scope="module")
def target(root):
    """The default scenario enrolled in the mesh, its pooled tunnels warmed up, and the attacker."""
    name = new_lab_name("b2")
    try:
        lab = up(name)
        assert lab("label", "namespace", "default", "istio.io/dataplane-mode=ambient").returncode == 0
        wait_for(lambda: all(redirection(p) == "enabled" for p in lab.pods()), timeout=15, what="pods enabled")
        wait_for(lambda: TITLE in curl(lab, "deploy/curl", "http://productpage:9080/productpage").stdout,
                 timeout=15, what="the bookstore through the mesh")
        t = Target(lab)
        # Open every pooled tunnel the normal request uses (productpage calls each reviews pod,
        # reviews-v3 calls ratings), so that the fd count only moves because of the attacks.
        for backend in ("reviews-v1", "reviews-v2", "reviews-v3", "details-v1"):
            path = "details/0" if backend.startswith("details") else "reviews/0"
            assert curl(lab, "deploy/productpage-v1", f"http://{t.ip[backend]}:9080/{path}").returncode == 0
        for _ in range(3):
            assert TITLE in t.curl().stdout
        t.attacker = Attacker(name, t.node, t.istiod)
        yield t
    finally:
        if "t" in locals() and t.attacker is not None:
            t.attacker.close()
        down(name)


def refused(outcome: str) -> bool:
    """The attacker got nothing served: the server closed, reset, or sent a TLS alert."""
    return outcome == "closed" or outcome == "reset" or outcome.startswith("tls alert")


# ------------------------------------------------------------------------------- not HBONE
@pytest.mark.parametrize("payload, reason", [("random", "tls handshake error"),
                                             ("http", "tls handshake error: HTTP_REQUEST")])
def test_bytes_that_are_not_tls_are_closed(target: Target, payload: str, reason: str):
    with still_serving_without_leaks(target):
        r = target.attacker("raw", dst=target.hbone, payload=payload)
        assert refused(r["outcome"]), r
        target.logged("ztunnel", r["local"], "connection failed", 'direction="inbound"', reason)


@pytest.mark.parametrize("alpn", [None, ["http/1.1"]])
def test_tls_without_alpn_h2_is_closed(target: Target, alpn):
    """A valid mesh certificate, but no HTTP/2: nothing is served."""
    with still_serving_without_leaks(target):
        r = target.attacker("tls", dst=target.hbone, cert="valid", identity=CURL, alpn=alpn)
        assert r["handshake"] == "finished" and r["alpn"] is None and refused(r["outcome"]), r
        target.logged("ztunnel", r["local"], "connection failed", "did not negotiate ALPN h2")


# ------------------------------------------------------------------------------- client certificates
def test_control_a_valid_client_certificate_is_served(target: Target):
    """The attacker's harness itself works: with a certificate from the lab's CA (issued for an
    identity on the attacker's node) ztunnel answers the HTTP/2 preface with its SETTINGS."""
    r = target.attacker("tls", dst=target.hbone, cert="valid", identity=CURL, alpn=["h2"])
    assert r["alpn"] == "h2" and r["outcome"].startswith("data: "), r
    assert bytes.fromhex(r["outcome"].removeprefix("data: "))[3] == 0x4, r  # the first frame is SETTINGS


@pytest.mark.parametrize("cert, reason", [
    (None, "tls handshake error: PEER_DID_NOT_RETURN_A_CERTIFICATE"),
    ("other_ca", "tls handshake error: CERTIFICATE_VERIFY_FAILED"),
    ("not_spiffe", "tls handshake error: client identity [] is not in trust domain 'cluster.local'"),
    ("other_td", ("tls handshake error: client identity ['spiffe://evil.local/ns/default/sa/curl'] is not in "
                  "trust domain 'cluster.local'")),
])
def test_client_certificates_ztunnel_refuses(target: Target, cert, reason: str):
    """No certificate; one from a CA of the attacker's own; and two chained to the REAL mesh root
    (the test signs them with istiod's key, standing in for a mis-issuing CA), whose URI SAN is
    not a SPIFFE ID or is in another trust domain: ztunnel's TrustDomainVerifier must catch those."""
    with still_serving_without_leaks(target):
        r = target.attacker("tls", dst=target.hbone, cert=cert, identity=CURL, alpn=["h2"])
        assert refused(r["outcome"]), r
        target.logged("ztunnel", r["local"], "connection failed", reason)


# ------------------------------------------------------------------------------- HTTP/2 requests
def connect_headers(authority: str) -> list[list[str]]:
    return [[":method", "CONNECT"], [":authority", authority]]


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_methods_other_than_connect_are_400(target: Target, method: str):
    """Valid mTLS, then a plain HTTP/2 request: 400, logged, and the same connection still carries
    a proper CONNECT afterwards."""
    with still_serving_without_leaks(target):
        headers = [[":method", method], [":scheme", "https"], [":path", "/productpage"],
                   [":authority", f"{target.ip['productpage-v1']}:9080"]]
        r = target.attacker("request", dst=target.hbone, identity=CURL, headers=headers)
        assert r["status"] == 400 and r["then_connect"] == 200 and r["then_title"], r
        target.logged("ztunnel", r["local"], "connection failed",
                      f"bad request (400): method '{method}' is not CONNECT")


@pytest.mark.parametrize("authority, reason", [
    ("productpage:9080", "not an IP address in authority 'productpage:9080'"),
    ("{ip}", "malformed authority '{ip}'"),
    ("{ip}:0", "port out of range in authority '{ip}:0'"),
    ("{ip}:http", "bad port in authority '{ip}:http'"),
])
def test_malformed_authority_is_400(target: Target, authority: str, reason: str):
    with still_serving_without_leaks(target):
        ip = target.ip["productpage-v1"]
        headers = connect_headers(authority.format(ip=ip))
        r = target.attacker("request", dst=target.hbone, identity=CURL, headers=headers)
        assert r["status"] == 400 and r["then_connect"] == 200, r
        target.logged("ztunnel", r["local"], "connection failed", "bad request (400)", reason.format(ip=ip))


@pytest.mark.parametrize("who, port, status, reason", [
    ("details-v1", 9080, 400, "ip mismatch: {me} != {ip}"),     # a pod on the other node
    ("reviews-v1", 9080, 400, "ip mismatch: {me} != {ip}"),     # a pod on the same node, same ztunnel
    ("productpage-v1", 15008, 503, "attempted recursive call to ourselves"),  # zt: SelfCall -> 503
])
def test_authority_for_another_destination_or_ztunnels_own_port_is_refused(target: Target, who: str, port: int,
                                                                          status: int, reason: str):
    """A tunnel into productpage's pod may only reach productpage: ztunnel must not become an open
    relay to other pods (validate_destination: 400), nor to its own ports (503)."""
    with still_serving_without_leaks(target):
        ip = target.ip[who]
        r = target.attacker("request", dst=target.hbone, identity=CURL, headers=connect_headers(f"{ip}:{port}"))
        assert r["status"] == status and r["then_connect"] == 200, r
        target.logged("ztunnel", r["local"], "connection failed",
                      reason.format(me=target.ip["productpage-v1"], ip=ip))


# ------------------------------------------------------------------------------- floods and slow clients
def test_two_thousand_streams_on_one_connection(target: Target):
    """2000 CONNECTs at once on one connection: 100 (SETTINGS_MAX_CONCURRENT_STREAMS) are served,
    1900 refused with RST_STREAM(REFUSED_STREAM); others are served meanwhile."""
    with still_serving_without_leaks(target):
        r = target.attacker("streams", dst=target.hbone, identity=CURL, n=2000,
                            authority=f"{target.ip['productpage-v1']}:9080")
        try:
            assert (r["ok"], r["refused"], r["other"], r["unanswered"]) == (100, 1900, 0, 0), r
            assert TITLE in target.curl().stdout  # while the 100 streams are held open
        finally:
            target.attacker("release", keys=[r["held"]])
        target.logged("ztunnel", r["local"], "connection failed", "more than 100 concurrent streams", "REFUSED_STREAM")
        target.logged("ztunnel", None, f"HBONE connection from {r['local'][0]}:{r['local'][1]} ",
                      "1900 of its streams were refused")


def test_slow_clients_do_not_block_others(target: Target):
    """A silent TCP connection and a ClientHello dripped byte by byte are cut at ztunnel's 10 s TLS
    handshake timeout; an mTLS client that never sends the HTTP/2 preface is kept (it is a mesh
    identity; real ztunnel keeps idle tunnels too). Throughout, others are served at once."""
    with still_serving_without_leaks(target):
        r = target.attacker("slow", dst=target.hbone, identity=CURL)
        held = r["held"]
        try:
            t0 = time.monotonic()
            assert TITLE in target.curl().stdout and time.monotonic() - t0 < 2
            assert target.attacker("held_state", keys=list(held.values())) == {k: "" for k in held.values()}
            wait_for(lambda: all(target.attacker("held_state", keys=[held[k]])[held[k]] for k in ("silent", "drip")),
                     timeout=14, what="the handshake timeout")
            for k in ("silent", "drip"):
                target.logged("ztunnel", r["local"][k], "connection failed",
                              "tls handshake error", "SSL handshake is taking longer than 10.0 seconds")
            assert target.attacker("held_state", keys=[held["idle_tls"]]) == {held["idle_tls"]: ""}
            assert TITLE in target.curl().stdout
        finally:
            target.attacker("release", keys=list(held.values()))


# ------------------------------------------------------------------------------- the source side
def test_source_ztunnel_refuses_a_destination_with_the_wrong_identity(target: Target):
    """A man in the middle on productpage's node: new HBONE connections from reviews-v1 to
    productpage:15008 are REDIRECTed (an iptables rule in the lab's node netns, removed afterwards)
    to the attacker, who presents a VALID mesh certificate, but of `curl`. The source ztunnel must
    refuse it ("peer did not present the expected SAN") and send it nothing, not even the HTTP/2
    preface. reviews-v1 has no pooled tunnel to productpage, so its request opens a new one; it is
    not retried after the rule is gone, as that would add a pooled tunnel to the fd count."""
    pp = target.ip["productpage-v1"]
    rule = ["PREROUTING", "-s", target.ip["reviews-v1"], "-d", pp, "-p", "tcp", "--dport", str(HBONE_PORT),
            "-m", "comment", "--comment", "hbone-bad-input-mitm", "-j", "REDIRECT", "--to-ports", str(MITM_PORT)]
    ipt = ["ip", "netns", "exec", target.node, "iptables-legacy", "-t", "nat"]
    with still_serving_without_leaks(target):
        target.attacker("mitm", identity=CURL, port=MITM_PORT)
        subprocess.run([*ipt, "-I", *rule], check=True)
        try:
            p = target.curl("deploy/reviews-v1")
        finally:
            subprocess.run([*ipt, "-D", *rule], check=True)
            seen = target.attacker("mitm_report")["seen"]
        assert p.returncode == 56 and TITLE not in p.stdout, (p.returncode, p.stderr)
        assert [s["peer"][0] for s in seen] == [target.ip["reviews-v1"]], seen
        assert seen[0]["outcome"] == "closed", seen  # no HTTP/2 byte reached the impostor
        line = target.logged("ztunnel", None, 'direction="outbound"', "peer did not present the expected SAN",
                             f"src.addr={target.ip['reviews-v1']}:")
        assert f"expected one of ['{PRODUCTPAGE}'], got ['{CURL}']" in line


# ------------------------------------------------------------------------------- istiod's CA
def test_csr_for_an_identity_not_on_the_node_is_refused(target: Target):
    """The node's credential asks for `sleep`, whose only pod runs on the other worker."""
    with still_serving_without_leaks(target):
        r = target.attacker("csr", identity=SLEEP, extra_sans=[])
        assert not r["signed"] and f"no instances of default/sleep found on node '{target.node}'" in r["error"], r
        target.logged("istiod", None, f"CSR from {target.node} for {SLEEP} refused",
                      "request impersonation authentication failure")
        assert target.attacker("csr", identity=CURL, extra_sans=[])["signed"]  # istiod still signs the rest


@pytest.mark.parametrize("extra", [[PRODUCTPAGE], [SLEEP], ["spiffe://evil.local/ns/default/sa/curl"]])
def test_csr_with_extra_sans_is_refused(target: Target, extra: list[str]):
    """A CSR for curl (on this node) that also asks for more identities, even ones of this node."""
    with still_serving_without_leaks(target):
        r = target.attacker("csr", identity=CURL, extra_sans=extra)
        assert not r["signed"] and "CSR must carry exactly one SAN" in r["error"], r
        target.logged("istiod", None, f"CSR from {target.node} for {CURL} refused", "exactly one SAN", extra[0])


if __name__ == "__main__":  # the attacker: python -m tests.lab.test_hbone_bad_input LAB NODE ISTIOD (cwd = ROOT)
    asyncio.run(_attacker_main(*sys.argv[1:4]))
