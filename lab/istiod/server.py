"""The lab's istiod: one process serving xDS and certificates on port 15012 over TLS.

Real istiod (is:pilot/pkg/bootstrap/server.go) watches the Kubernetes API with informers,
rebuilds the ambient registry on every change (debounced, PILOT_DEBOUNCE_AFTER), pushes Delta
xDS to every ztunnel and signs workload certificates, all on one gRPC port. The lab's istiod:

- watches the cluster through the supervisor (the lab's API server): `watch_cluster` sends the
  whole cluster as a snapshot now and after every change;
- turns each snapshot into config with pure functions (registry.build_addresses,
  authorization.build_authorizations) and hands it to the DiscoveryServer (xds_server.py),
  which pushes only the diff;
- answers CreateCertificate (ca_server.py) on the same connections;
- serves TLS 1.3 with its own certificate, `spiffe://cluster.local/ns/istio-system/sa/istiod`,
  issued by its CA at start, and writes the CA's root to `<ca-dir>/root-cert.pem` (what the
  istio-ca-root-cert ConfigMap gives ztunnel). Clients are not asked for a certificate: a
  ztunnel authenticates with its node's token, inside the messages.

On the wire: one JSON message per line (lab/proto/xds.py), lines up to lab.proto.xds.MAX_LINE bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from lab.common.procname import name_process
from lab.istiod import authorization, registry, waypoints
from lab.istiod.ca import CertificateAuthority, issue_leaf
from lab.istiod.ca_server import CaServer
from lab.istiod.xds_server import DiscoveryServer, XdsConnection, XdsRejected
from lab.proto.xds import (  # noqa: F401 - client_tls_context: the client side istiod's tests and peers use
    ADDRESS_TYPE,
    AUTHORIZATION_TYPE,
    MAX_LINE,
    XDS_ALPN,
    CreateCertificateRequest,
    DeltaDiscoveryRequest,
    XdsProtocolError,
    client_tls_context,
    decode,
    encode,
)
from lab.tls.certificate import WorkloadCertificate
from lab.tls.csr import generate_key, private_key_pem
from lab.tls.identity import DEFAULT_TRUST_DOMAIN, Identity

#: The ALPN protocol of the lab's xDS/CA port (real istiod speaks gRPC over h2).
ISTIOD_IDENTITY = Identity.of("istio-system", "istiod")
ROOT_CERT_FILE = "root-cert.pem"
ISTIOD_CERT_TTL = timedelta(days=90)
#: PILOT_DEBOUNCE_AFTER (istiod: 100ms): coalesce bursts of cluster changes into one push.
DEBOUNCE = 0.05

Emit = Callable[..., Any]
Log = Callable[[str, str, str], None]


# ---------------------------------------------------------------------------------------------
# Logs, tokens, certificates


LOG_LEVELS = ("debug", "info", "warn", "error")
#: --log-level (istiod's --log_output_level, default info): lines below it are not printed.
log_threshold = "info"


def istiod_log(level: str, scope: str, msg: str) -> None:
    """istiod's log line: RFC 3339 time, level, scope, message, tab-separated."""
    if LOG_LEVELS.index(level) < LOG_LEVELS.index(log_threshold):
        return
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    print(f"{now}\t{level}\t{scope}\t{msg}", flush=True)


class TokenFile:
    """The nodes' tokens (the lab's stand-in for ztunnel's service-account JWT): a JSON object
    `{"<node name>": "<token>"}`, re-read when the file changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._mtime: float | None = None
        self.tokens: dict[str, str] = {}
        self._reload()

    def _reload(self) -> None:
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return
        if mtime != self._mtime:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"{self.path}: expected a JSON object {{node: token}}")
            self.tokens = {str(k): str(v) for k, v in data.items()}
            self._mtime = mtime

    def authenticate(self, token: str) -> str | None:
        """The node whose token this is, or None."""
        with contextlib.suppress(ValueError, OSError):
            self._reload()
        return authenticate_token(self.tokens, token)


def authenticate_token(tokens: dict[str, str], token: str) -> str | None:
    """token -> node name, compared in constant time; None for an empty or unknown token."""
    if not token:
        return None
    for node, expected in tokens.items():
        if expected and hmac.compare_digest(expected.encode(), token.encode()):
            return node
    return None


def issue_istiod_certificate(ca: CertificateAuthority, ttl: timedelta = ISTIOD_CERT_TTL) -> WorkloadCertificate:
    """istiod's own serving certificate, signed by its CA (URI SAN spiffe://…/ns/istio-system/sa/istiod)."""
    identity = Identity.of(ISTIOD_IDENTITY.namespace, ISTIOD_IDENTITY.service_account, ca.trust_domain)
    key = generate_key()
    leaf = issue_leaf(key.public_key(), identity.uri, ca.root_cert, ca.root_key, ttl,
                      clock_skew_grace=ca.clock_skew_grace)
    return WorkloadCertificate(identity, [leaf.public_bytes(serialization.Encoding.PEM), ca.root_pem],
                               private_key_pem(key))


def server_tls_context(cert: WorkloadCertificate) -> ssl.SSLContext:
    """TLS 1.3, istiod's certificate, ALPN istio-xds-lab, no client certificate asked."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([XDS_ALPN])
    ctx.verify_mode = ssl.CERT_NONE
    ctx.num_tickets = 0
    with tempfile.TemporaryDirectory(prefix="ambient-lab-istiod-") as tmp:
        cert_path, key_path = cert.write_files(tmp)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


def write_root_cert(ca: CertificateAuthority, ca_dir: str | os.PathLike[str]) -> Path:
    """<ca-dir>/root-cert.pem (0644), written atomically: the trust bundle for ztunnels."""
    path = Path(ca_dir) / ROOT_CERT_FILE
    tmp = path.with_name(f".{ROOT_CERT_FILE}.{os.getpid()}.tmp")
    tmp.write_bytes(ca.root_pem)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# Config from the cluster


def build_config(snapshot: dict, trust_domain: str = DEFAULT_TRUST_DOMAIN,
                 root_namespace: str = authorization.ROOT_NAMESPACE, dry_run_enabled: bool = False
                 ) -> tuple[dict[str, dict[str, dict]], dict[str, list[str]]]:
    """A cluster snapshot -> ({type URL: {name: resource}}, policy statuses). `dry_run_enabled` is
    istiod's AMBIENT_ENABLE_DRY_RUN_AUTHORIZATION_POLICY feature (off by default)."""
    addresses = registry.build_addresses(snapshot, trust_domain, root_namespace=root_namespace,
                                         waypoint_of=waypoints.waypoint_lookup(snapshot),
                                         dry_run_enabled=dry_run_enabled)
    policies, statuses = authorization.build_authorizations(snapshot, root_namespace, dry_run_enabled)
    return {ADDRESS_TYPE: addresses, AUTHORIZATION_TYPE: policies}, statuses


def mesh_pod_count(snapshot: dict) -> int:
    """Pods a sidecar-mode mesh would run a sidecar in: those that are workloads."""
    return sum(1 for p in snapshot.get("pods") or [] if registry.is_workload_pod(p))


class Istiod:
    """istiod's brain: the latest snapshot, the xDS server and the CA service, and the
    per-connection message loop that dispatches to them."""

    def __init__(self, ca: CertificateAuthority, authenticate: Callable[[str], str | None],
                 emit: Emit, log: Log = istiod_log, *, root_namespace: str = authorization.ROOT_NAMESPACE,
                 debounce: float = DEBOUNCE, dry_run_enabled: bool = False) -> None:
        self.ca = ca
        self.emit = emit
        self.log = log
        self.root_namespace = root_namespace
        self.debounce = debounce
        self.dry_run_enabled = dry_run_enabled
        self.snapshot: dict | None = None
        self.statuses: dict[str, list[str]] = {}
        self.discovery = DiscoveryServer(authenticate, emit, log)
        self.ca_server = CaServer(ca, authenticate, lambda: self.snapshot, emit, log)
        self._push_task: asyncio.Task | None = None
        self._open: set[asyncio.StreamWriter] = set()  # every client connection, authenticated or not

    # -- the informer side ----------------------------------------------------------------------
    def on_snapshot(self, snapshot: dict) -> None:
        """A new view of the cluster: the CA uses it at once, the push follows after the debounce."""
        self.snapshot = snapshot
        if self._push_task is None or self._push_task.done():
            self._push_task = asyncio.get_running_loop().create_task(self._debounced_push())

    async def _debounced_push(self) -> None:
        await asyncio.sleep(self.debounce)
        try:
            self.recompute()
        except Exception as exc:  # noqa: BLE001 - a bad snapshot must not stop istiod; keep the last config
            self.log("error", "ads", f"cannot build the config from the cluster snapshot: "
                                     f"{type(exc).__name__}: {exc}; keeping version {self.discovery.version}")

    def recompute(self) -> bool:
        """Rebuild the config from the latest snapshot and push what changed."""
        if self.snapshot is None:
            return False
        t0 = time.monotonic()
        config, statuses = build_config(self.snapshot, self.ca.trust_domain, self.root_namespace,
                                        self.dry_run_enabled)
        self._report_statuses(statuses)
        changed = self.discovery.update(config, mesh_pod_count(self.snapshot))
        if changed:
            self.log("info", "ads", f"Push debounce stable: version {self.discovery.version}, "
                                    f"{len(config[ADDRESS_TYPE])} addresses, {len(config[AUTHORIZATION_TYPE])} "
                                    f"authorizations, built in {(time.monotonic() - t0) * 1000:.1f}ms")
        return changed

    def _report_statuses(self, statuses: dict[str, list[str]]) -> None:
        for key, warnings in sorted(statuses.items()):
            if warnings and self.statuses.get(key) != warnings:
                for w in warnings:
                    self.log("warn", "ambient", f"AuthorizationPolicy {key}: {w}")
                self.emit("istiod.policy.status", f"AuthorizationPolicy {key}: {warnings[0]}",
                          policy=key, warnings=warnings)
        self.statuses = statuses

    # -- the gRPC side --------------------------------------------------------------------------
    async def handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One TLS connection: requests in, responses out, one JSON line each."""
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)
        conn = XdsConnection(peer=peer, writer=writer)
        reason = ""
        self._open.add(writer)
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:
                    reason = f"a message longer than {MAX_LINE} bytes"
                    self.log("error", "ads", f"connection from {peer}: {reason}; closing")
                    break
                if not line:
                    reason = "EOF"
                    break
                try:
                    msg = decode(line)
                except XdsProtocolError as exc:
                    reason = f"protocol error: {exc}"
                    self.log("error", "ads", f"connection from {peer}: {reason}; closing")
                    break
                if isinstance(msg, DeltaDiscoveryRequest):
                    try:
                        self.discovery.on_request(conn, msg)
                    except XdsRejected as exc:
                        reason = str(exc)
                        break
                elif isinstance(msg, CreateCertificateRequest):
                    writer.write(encode(self.ca_server.create_certificate(msg, peer)))
                else:
                    reason = f"unexpected {type(msg).__name__} from a client"
                    self.log("error", "ads", f"connection from {peer}: {reason}; closing")
                    break
                await writer.drain()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        except asyncio.CancelledError:
            reason = "istiod is shutting down"  # the loop is closing: end quietly
        finally:
            self._open.discard(writer)
            self.discovery.disconnect(conn, reason)
            writer.close()

    async def close(self, server: asyncio.Server | None = None) -> None:
        """Stop accepting, close every client connection, wait (briefly) until they are gone."""
        if self._push_task is not None:
            self._push_task.cancel()
        if server is not None:
            server.close()
        for writer in list(self._open):
            writer.close()
        if server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 1)

    async def serve(self, host: str, port: int, ctx: ssl.SSLContext) -> asyncio.Server:
        return await asyncio.start_server(self.handle_connection, host, port, ssl=ctx, limit=MAX_LINE,
                                          reuse_address=True)


# ---------------------------------------------------------------------------------------------
# The watch on the lab's API server


async def watch_cluster(lab: str, on_snapshot: Callable[[dict], None], log: Log, retry: float = 1.0,
                        path: str | None = None) -> None:
    """List-then-watch on the supervisor: {"op": "watch_cluster"}, then one {"snapshot": …} line
    now and after every change. Reconnects when the supervisor goes away; istiod keeps serving
    the last config meanwhile (as istiod does when the API server is unreachable). `path`
    defaults to the lab's supervisor socket."""
    if path is None:
        from lab.supervisor.client import supervisor_socket  # the lab's API server endpoint

        path = supervisor_socket(lab)
    announced = False
    while True:
        writer = None
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=MAX_LINE)
            writer.write(b'{"op": "watch_cluster"}\n')
            await writer.drain()
            log("info", "kube", f"watching the cluster through {path}")
            announced = False
            while line := await reader.readline():
                msg = json.loads(line)
                if "snapshot" in msg:
                    on_snapshot(msg["snapshot"])
                elif msg.get("error"):
                    log("error", "kube", f"watch_cluster: {msg['error']}")
            log("warn", "kube", "the API server closed the watch; reconnecting")
        except (OSError, ValueError) as exc:
            if not announced:
                log("warn", "kube", f"cannot watch the cluster at {path}: {exc}; retrying every {retry:g}s")
                announced = True
        finally:
            if writer is not None:
                writer.close()
        await asyncio.sleep(retry)


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen wants IP:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


async def run(lab: str, listen: str, ca_dir: str, tokens_file: str, workload_cert_ttl: int,
              trust_domain: str = DEFAULT_TRUST_DOMAIN, clock_skew_grace: int | None = None) -> int:
    """The istiod process: CA, TLS server, cluster watch, until SIGTERM/SIGINT."""
    import signal

    from lab.common.events import EventEmitter

    host, port = parse_listen(listen)
    emitter = EventEmitter(lab, "istiod")
    extra = {} if clock_skew_grace is None else {"clock_skew_grace": timedelta(seconds=clock_skew_grace)}
    ca = CertificateAuthority.load_or_create(ca_dir, trust_domain,
                                             default_ttl=timedelta(seconds=workload_cert_ttl), **extra)
    root_path = write_root_cert(ca, ca_dir)
    cert = issue_istiod_certificate(ca)
    tokens = TokenFile(tokens_file)
    if not tokens.tokens:
        istiod_log("warn", "ca", f"no node tokens in {tokens_file} (yet): every ztunnel will be refused "
                                 f"until the file names its node")
    istiod = Istiod(ca, tokens.authenticate, emitter.emit, dry_run_enabled=authorization.dry_run_feature_enabled())
    server = await istiod.serve(host, port, server_tls_context(cert))
    host, port = server.sockets[0].getsockname()[:2]
    istiod_log("info", "ca", f"CA root {root_path} (trust domain {trust_domain}), workload cert TTL "
                             f"{workload_cert_ttl}s; serving as {cert.identity}")
    istiod_log("info", "ads", f"xDS and CA listening on {host}:{port} (TLS 1.3, ALPN {XDS_ALPN})")
    emitter.emit("istiod.started", f"istiod is serving xDS and certificates on {host}:{port}",
                 listen=f"{host}:{port}", root_cert=str(root_path), identity=str(cert.identity),
                 nodes=sorted(tokens.tokens))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = loop.create_task(watch_cluster(lab, istiod.on_snapshot, istiod_log))
    await stop.wait()
    istiod_log("info", "ads", "received a termination signal; shutting down")
    watcher.cancel()
    await istiod.close(server)
    emitter.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lab.istiod",
                                 description="The lab's istiod: ambient registry, Delta xDS and CA on one TLS port.")
    ap.add_argument("--lab", required=True, help="lab name (supervisor socket, events)")
    ap.add_argument("--listen", default="0.0.0.0:15012", help="IP:PORT of the xDS/CA port (default %(default)s)")
    ap.add_argument("--ca-dir", required=True, help="CA directory (ca-cert.pem, ca-key.pem, root-cert.pem)")
    ap.add_argument("--tokens", required=True, help='JSON file {"<node>": "<token>"}: the nodes\' credentials')
    ap.add_argument("--workload-cert-ttl", type=int, default=24 * 3600,
                    help="default workload certificate TTL in seconds (DEFAULT_WORKLOAD_CERT_TTL, %(default)s)")
    ap.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    ap.add_argument("--clock-skew-grace", type=int, default=None, metavar="SECONDS",
                    help="how far back certificates' not-before is set (istiod: 2 minutes); 0 for short-TTL demos")
    ap.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                    help="debug also prints every ACK (default %(default)s)")
    args = ap.parse_args(argv)
    name_process("istiod")
    global log_threshold
    log_threshold = args.log_level
    try:
        parse_listen(args.listen)
    except ValueError as exc:
        ap.error(str(exc))
    try:
        return asyncio.run(run(args.lab, args.listen, args.ca_dir, args.tokens, args.workload_cert_ttl,
                               args.trust_domain, args.clock_skew_grace))
    except (OSError, ValueError) as exc:
        istiod_log("error", "bootstrap", f"istiod failed to start: {exc}")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
