"""The waypoint process: one Envoy-like proxy for one `Gateway` of class `istio-waypoint`,
running inside the waypoint pod's network namespace (reference §2.5, §3.5, §6).

Real counterpart: the waypoint Deployment istiod creates from
is:manifests/charts/istio-control/istio-discovery/files/waypoint.yaml, running istio-proxy
(pilot-agent + Envoy). The pod is labelled `istio.io/dataplane-mode: none`: it is NOT captured,
there are no in-pod rules, traffic reaches its port 15008 directly.

    python -m lab.waypoint --lab LAB --namespace NS --name GATEWAY --node NODE --pod POD \\
        --pod-ip IP --xds-address 172.18.0.2:15012 --token-file F --root-cert R --state-dir DIR \\
        [--keylog PATH] [--service-account SA] [--trust-domain TD]

What it does, in order:

- **Admin** on `DIR/admin.sock` (lab/waypoint/admin.py; Envoy's admin port 15000).
- **Certificate**: its own, `spiffe://<td>/ns/<NS>/sa/<GATEWAY>` (Istio runs a waypoint as a
  service account named after its Gateway), from istiod's CA on `--xds-address`, rotated at
  half-life (lab/ztunnel/identity_manager.py). Lab simplification: the request is authenticated
  with the node's token (`--token-file`) impersonating the waypoint's identity, like ztunnel does
  for the pods of its node (istiod checks that a pod of that service account runs on the node);
  the real istio-agent presents the waypoint pod's own service-account token instead.
- **Configuration**: the real waypoint gets listeners, routes and clusters from istiod over
  xDS. The lab's istiod does not speak Envoy's xDS; instead the waypoint watches the cluster
  itself (`watch_cluster` on the supervisor, the lab's API server) and computes the same facts
  with `lab.waypoint.config.build_waypoint_config`: that function stands in for the Envoy
  config istiod would push (listener_waypoint.go, cluster_waypoint.go).
- **Listeners**: `0.0.0.0:15008` HBONE (mTLS with the waypoint's certificate, client
  certificate required and kept as the source identity for L7 policy; then
  `WaypointProxy.handle_connect` per CONNECT stream) and `0.0.0.0:15021` readiness (plain
  HTTP `GET /healthz/ready`: 200 once it has config and a certificate, 503 before).
- **Telemetry**: the access log on stdout (one line per request), diagnostics on stderr, every
  request appended to `DIR/flows.mitm` (`mitmdump -nr DIR/flows.mitm`), events `waypoint.*` to
  the lab's event stream.

SIGTERM or SIGINT: stop listening, reset open tunnels, exit with status 0 within a second or two.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.common.admin_socket import admin_response, start_admin, stop_admin
from lab.common.errors import LabError
from lab.common.events import EventEmitter
from lab.common.procname import name_process
from lab.hbone import serve_hbone
from lab.tls.certificate import NoPeerIdentity, WorkloadCertificate
from lab.tls.contexts import PeerVerificationError, verify_client_trust_domain
from lab.tls.identity import DEFAULT_TRUST_DOMAIN, Identity
from lab.waypoint.admin import config_dump
from lab.waypoint.config import WaypointNotFound, build_waypoint_config
from lab.waypoint.flows import FlowFile
from lab.waypoint.proxy import HboneUpstream, TunnelPeer, WaypointProxy, upstream_san_prefix
from lab.waypoint.telemetry import Metrics
from lab.ztunnel.identity_manager import CaClient, CertificateUnavailable, IdentityManager
from lab.ztunnel.main import wait_for_file, write_access_log  # the same bootstrap and access-log output
from lab.ztunnel.stepper import Stepper
from lab.ztunnel.tls_workload import WorkloadTls

log = logging.getLogger("waypoint")

HBONE_PORT = 15008
READINESS_PORT = 15021
TLS_HANDSHAKE_TIMEOUT = 10.0
#: StreamReader buffer of a TLS connection (asyncio's 64 KiB default slows HTTP/2 down).
READER_LIMIT = 4 * 1024 * 1024
FLOWS_FILE = "flows.mitm"
ADMIN_SOCKET = "admin.sock"
CERT_DIR = "certs"


@dataclass
class Args:
    lab: str
    namespace: str
    name: str
    node: str
    pod: str
    pod_ip: str
    xds_address: str
    token_file: str
    root_cert: str
    state_dir: str
    keylog: str = ""
    service_account: str = ""
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    listen: str = "0.0.0.0"
    hbone_port: int = HBONE_PORT
    readiness_port: int = READINESS_PORT

    @property
    def identity(self) -> Identity:
        return Identity(self.trust_domain, self.namespace, self.service_account or self.name)


def parse_args(argv: list[str] | None = None) -> Args:
    ap = argparse.ArgumentParser(prog="python -m lab.waypoint",
                                 description="The lab's waypoint (Envoy in Istio): L7 routing and policy for "
                                             "the Services that use it, in the waypoint pod's netns.")
    ap.add_argument("--lab", required=True, help="lab name (supervisor socket, events)")
    ap.add_argument("--namespace", required=True, help="namespace of the waypoint Gateway")
    ap.add_argument("--name", required=True, help="name of the Gateway (class istio-waypoint)")
    ap.add_argument("--node", required=True, help="node the waypoint pod runs on (its token asks for the cert)")
    ap.add_argument("--pod", required=True, help="the waypoint pod's name")
    ap.add_argument("--pod-ip", required=True, help="the waypoint pod's IP")
    ap.add_argument("--xds-address", required=True, help="istiod's IP:PORT (CA)")
    ap.add_argument("--token-file", required=True, help="the node's token")
    ap.add_argument("--root-cert", required=True, help="the mesh root certificate (PEM)")
    ap.add_argument("--state-dir", required=True, help="directory for admin.sock, flows.mitm, certs/")
    ap.add_argument("--keylog", default="", help="write TLS keys here (NSS key log) for tshark/Wireshark")
    ap.add_argument("--service-account", default="", help="default: the Gateway's name (as Istio does)")
    ap.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    ap.add_argument("--listen", default="0.0.0.0", help=argparse.SUPPRESS)
    ap.add_argument("--hbone-port", type=int, default=HBONE_PORT, help=argparse.SUPPRESS)
    ap.add_argument("--readiness-port", type=int, default=READINESS_PORT, help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    return Args(**{k.replace("-", "_"): v for k, v in vars(ns).items()})


# ------------------------------------------------------------------------------------ logging
class _EnvoyFormatter(logging.Formatter):
    """`[2026-01-02 03:04:05.678][info][waypoint] message`, the shape of Envoy's log lines."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}"
        level = {"WARNING": "warning", "CRITICAL": "critical"}.get(record.levelname, record.levelname.lower())
        text = f"[{t}][{level}][{record.name}] {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_EnvoyFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def snapshot_watch(lab: str, deliver: Any, stopping: threading.Event, retry: float = 1.0) -> None:
    """List-then-watch the cluster through the supervisor (a blocking generator, so it runs in
    a thread of its own): every snapshot goes to `deliver(snapshot)`; reconnects after errors."""
    from lab.supervisor import client as supervisor

    announced = False
    while not stopping.is_set():
        try:
            for msg in supervisor.request(lab, "watch_cluster", timeout=None):
                announced = False
                if "snapshot" in msg:
                    deliver(msg["snapshot"])
        except (LabError, OSError, ValueError) as e:
            if not announced:
                log.warning("cannot watch the cluster: %s; retrying every %gs", e, retry)
                announced = True
        except RuntimeError:  # the event loop is gone: the process is stopping
            return
        stopping.wait(retry)


# ------------------------------------------------------------------------------------ the process
class Waypoint:
    """Everything of one waypoint process, wired together."""

    def __init__(self, args: Args, emitter: EventEmitter) -> None:
        self.args = args
        self.emitter = emitter
        self.identity = args.identity
        self.state_dir = Path(args.state_dir)
        self.metrics = Metrics()
        self.identities: IdentityManager | None = None
        self.tls: WorkloadTls | None = None
        self.upstream: HboneUpstream | None = None
        self.proxy: WaypointProxy | None = None
        self.config_digest = ""
        self.tunnels: set[asyncio.Task[Any]] = set()
        self.stopping = threading.Event()
        self.stepper = Stepper(emitter.emit, component="waypoint", node=args.node)  # step mode, off at start

    # -- events and state -------------------------------------------------------------------
    def emit(self, kind: str, msg: str, **fields: Any) -> None:
        fields.setdefault("pod", self.args.pod)
        self.emitter.emit(kind, msg, **fields)

    def _cert_event(self, kind: str, msg: str, **fields: Any) -> None:
        """The identity manager's events (written for ztunnel), as the waypoint's own."""
        self.emit(kind.replace("ztunnel.", "waypoint.", 1),
                  msg.replace("ztunnel's own token", "its node's token").replace("ztunnel", "the waypoint"), **fields)

    def certificate(self) -> WorkloadCertificate | None:
        return self.identities.store.get(self.identity) if self.identities else None

    def ready(self) -> bool:
        return self.proxy is not None and self.proxy.config is not None and self.certificate() is not None

    def stats(self) -> dict[str, Any]:
        proxy = self.proxy
        if proxy is None:
            return {}
        clusters = {}
        for state in proxy.backends.values():
            b = state.breaker
            clusters[state.backend.cluster_name] = {
                **b.stats, "open_connections": b.open_connections, "idle_connections": b.idle_connections,
                "pending": len(b.pending), "active": len(b.active), "retries_in_flight": b.retries_in_flight,
                "outlier": dict(state.outlier.stats, ejected=sorted(state.outlier.ejected())) if state.outlier else None}
        hbone = {"connections_opened": self.upstream.pool.connections_opened if self.upstream else 0,
                 "destinations": [f"{k[0]}:{k[1]}" for k in self.upstream.pool.keys()] if self.upstream else []}
        return {**proxy.stats, "clusters": clusters, "hbone_upstream": hbone, "tunnels_open": len(self.tunnels)}

    def admin_ops(self) -> dict[str, Any]:
        prefix = upstream_san_prefix(self.args.trust_domain, self.args.namespace)
        return {
            "config": lambda: config_dump(self.proxy.config if self.proxy else None, san_prefix=prefix,
                                          listen=f"{self.args.listen}:{self.args.hbone_port}"),
            "metrics": self.metrics.render,
            "stats": self.stats,
            "ready": self.ready,
        }

    # -- config from the cluster ------------------------------------------------------------
    def on_snapshot(self, snapshot: dict) -> None:
        """A cluster snapshot: recompute the config (what istiod would push) and apply it."""
        assert self.proxy is not None
        try:
            cfg = build_waypoint_config(snapshot, self.args.namespace, self.args.name,
                                        trust_domain=self.args.trust_domain)
        except WaypointNotFound as e:
            log.warning("%s; keeping the last configuration", e)
            return
        except Exception:  # noqa: BLE001 - a bad snapshot must not stop the waypoint
            log.exception("cannot build the configuration from the cluster snapshot; keeping the last one")
            return
        dump = config_dump(cfg)
        digest = hashlib.sha256(json.dumps(dump, sort_keys=True, default=str).encode()).hexdigest()
        first = self.proxy.config is None
        self.proxy.update_config(cfg)
        if digest == self.config_digest:
            return
        self.config_digest = digest
        services = sorted(cfg.services)
        routes = sum(len(s.producer_routes) + sum(len(v) for v in s.consumer_routes.values())
                     for s in cfg.services.values())
        policies = len(dump["policies"])
        log.info("configuration %s: %d services, %d routes, %d clusters, %d L7 policies", digest[:12],
                 len(services), routes, len(cfg.backends), policies)
        self.emit("waypoint.config",
                  f"waypoint {cfg.namespace}/{cfg.name} {'got its first' if first else 'updated its'} configuration: "
                  f"{len(services)} Service(s) ({', '.join(services) or 'none'}), {routes} HTTPRoute(s), "
                  f"{len(cfg.backends)} backend cluster(s), {policies} L7 AuthorizationPolicy(ies)",
                  services=services, routes=routes, clusters=sorted(b.cluster_name for b in cfg.backends.values()),
                  policies=[p["policy"] for p in dump["policies"]], version=digest[:12])

    # -- listeners --------------------------------------------------------------------------
    async def serve_tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """connect_terminate: one TCP connection on 15008 -> mTLS -> HTTP/2 CONNECT streams."""
        task = asyncio.current_task()
        assert task is not None and self.proxy is not None and self.tls is not None
        self.tunnels.add(task)
        peer = writer.get_extra_info("peername")[:2]
        local = writer.get_extra_info("sockname")[:2]
        error = ""
        try:
            cert = self.certificate()
            if cert is None:
                error = "the waypoint has no certificate yet"
                return
            await writer.start_tls(self.tls.server(cert), ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
            client = verify_client_trust_domain(writer.get_extra_info("ssl_object"), self.args.trust_domain)
            tunnel_peer = TunnelPeer(client, (peer[0], peer[1]), (local[0], local[1]))
            proxy = self.proxy
            await serve_hbone(reader, writer, lambda req, respond: proxy.handle_connect(req, respond, tunnel_peer))
        except (ssl.SSLError, PeerVerificationError, NoPeerIdentity) as e:
            error = f"tls handshake error: {getattr(e, 'reason', None) or e}"
        except (OSError, asyncio.TimeoutError, TimeoutError) as e:
            error = f"connection error: {e or type(e).__name__}"
        except asyncio.CancelledError:
            # Shutting down. The task ends normally: asyncio's start_server callback would log a
            # cancelled connection task as an error ("Exception in callback").
            writer.transport.abort()
            return
        finally:
            self.tunnels.discard(task)
            if error:
                writer.transport.abort()
                log.warning("connection from %s:%s on %d refused: %s", peer[0], peer[1], self.args.hbone_port, error)
                self.emit("waypoint.tunnel.in",
                          f"waypoint {self.args.namespace}/{self.args.name} closed a connection from "
                          f"{peer[0]}:{peer[1]} before any CONNECT: {error}", src=f"{peer[0]}:{peer[1]}",
                          accepted=False, error=error)
            else:
                writer.close()

    async def serve_readiness(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Port 15021, `GET /healthz/ready` (istio-agent's readiness endpoint, probed by kubelet)."""
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            while await asyncio.wait_for(reader.readline(), 5) not in (b"\r\n", b"\n", b""):
                pass  # the headers: nothing in them matters here
            parts = line.split()
            if len(parts) >= 2 and parts[0] in (b"GET", b"HEAD") and parts[1] == b"/healthz/ready":
                ok = self.ready()
                status, body = (200, b"") if ok else (503, b"not ready: waiting for config and certificate\n")
            else:
                status, body = 404, b"not found\n"
            reason = {200: "OK", 503: "Service Unavailable", 404: "Not Found"}[status]
            writer.write(f"HTTP/1.1 {status} {reason}\r\ncontent-length: {len(body)}\r\n"
                         f"content-type: text/plain\r\nconnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (OSError, asyncio.TimeoutError, TimeoutError, ValueError):
            pass
        finally:
            writer.close()

    # -- run --------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        args = self.args
        self.state_dir.mkdir(parents=True, exist_ok=True)
        admin_path = str(self.state_dir / ADMIN_SOCKET)
        admin = await start_admin(admin_path, lambda req: admin_response(req, self.admin_ops(),
                                                                         self.stepper.commands()))
        servers: list[asyncio.AbstractServer] = []
        watcher: threading.Thread | None = None
        flusher = loop.create_task(self._flush_events())
        log.info("waypoint %s/%s (pod %s, %s, node %s) starting as %s; admin %s", args.namespace, args.name,
                 args.pod, args.pod_ip, args.node, self.identity, admin_path)
        try:
            root_pem = await wait_for_file(args.root_cert, stop, "the mesh root certificate")
            token = await wait_for_file(args.token_file, stop, "the node's token") if root_pem else None
            if root_pem is None or token is None:
                return 0
            address, node_token = args.xds_address, token.decode().strip()
            self.identities = IdentityManager(lambda: CaClient(address, root_pem, node_token),
                                              trust_domain=args.trust_domain, on_event=self._cert_event)
            self.tls = WorkloadTls(root_pem, cert_dir=str(self.state_dir / CERT_DIR), keylog=args.keylog)
            identities, tls, identity = self.identities, self.tls, self.identity

            async def client_context() -> ssl.SSLContext:
                return tls.client(await identities.get(identity))

            self.upstream = HboneUpstream(client_context, upstream_san_prefix(args.trust_domain, args.namespace))
            self.proxy = WaypointProxy(self.upstream, identity=identity, emit=self.emitter.emit,
                                       write_access_log=write_access_log, metrics=self.metrics,
                                       flows=FlowFile(self.state_dir / FLOWS_FILE), pod=args.pod,
                                       stepper=self.stepper)
            self.identities.prefetch(identity)
            watcher = threading.Thread(target=snapshot_watch, name="watch_cluster", daemon=True,
                                       args=(args.lab, lambda snap: loop.call_soon_threadsafe(self.on_snapshot, snap),
                                             self.stopping))
            watcher.start()
            servers.append(await asyncio.start_server(self.serve_tunnel, args.listen, args.hbone_port,
                                                      limit=READER_LIMIT, reuse_address=True))
            servers.append(await asyncio.start_server(self.serve_readiness, args.listen, args.readiness_port,
                                                      reuse_address=True))
            log.info("listening on %s:%d (HBONE, mTLS) and %s:%d (readiness)", args.listen, args.hbone_port,
                     args.listen, args.readiness_port)
            self.emit("waypoint.started",
                      f"waypoint {args.namespace}/{args.name} listens for HBONE on {args.pod_ip}:{args.hbone_port} "
                      f"as {identity}, and computes its config from the cluster",
                      identity=str(identity), address=f"{args.pod_ip}:{args.hbone_port}")
            ready_task = loop.create_task(self._announce_ready(stop))
            await stop.wait()
            ready_task.cancel()
            log.info("received a termination signal, shutting down")
        finally:
            self.stepper.set_mode(False, reason="shutdown")  # nothing waits for a learner any more
            self.stopping.set()
            for server in servers:
                server.close()
            for task in list(self.tunnels):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*self.tunnels, return_exceptions=True), 1)
            with contextlib.suppress(Exception):
                if self.proxy is not None:
                    await asyncio.wait_for(self.proxy.close(), 1)
            with contextlib.suppress(Exception):
                if self.upstream is not None:
                    await asyncio.wait_for(self.upstream.close(), 1)
            with contextlib.suppress(Exception):
                if self.identities is not None:
                    await asyncio.wait_for(self.identities.close(), 1)
            if self.tls is not None:
                self.tls.close()
            flusher.cancel()
            stop_admin(admin, admin_path)
            self.emitter.close()
        return 0

    async def _announce_ready(self, stop: asyncio.Event) -> None:
        """Log and emit once when the waypoint becomes ready (config + certificate)."""
        assert self.identities is not None
        last_reason = ""
        while not stop.is_set():
            try:
                await self.identities.get(self.identity)
            except CertificateUnavailable as e:
                if e.reason != last_reason:  # the manager retries with backoff; say each new reason once
                    log.warning("no certificate yet: %s", e.reason)
                    last_reason = e.reason
                await asyncio.sleep(1)
                continue
            if self.ready():
                cert = self.certificate()
                log.info("ready: configuration received, certificate %s (serial %s)", self.identity,
                         cert.serial[:16] if cert else "?")
                self.emit("waypoint.ready",
                          f"waypoint {self.args.namespace}/{self.args.name} is ready: it has its configuration and "
                          f"its certificate {self.identity}", identity=str(self.identity))
                return
            await asyncio.sleep(0.1)

    async def _flush_events(self, every: float = 0.1) -> None:
        """Push out events the emitter buffered while the supervisor was slow."""
        while True:
            await asyncio.sleep(every)
            if self.emitter.pending:
                self.emitter.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name_process("waypoint")
    _setup_logging()
    emitter = EventEmitter(args.lab, "waypoint", args.node)
    try:
        return asyncio.run(Waypoint(args, emitter).run())
    except OSError as e:
        log.error("the waypoint failed: %s", e)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
