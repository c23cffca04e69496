"""The lab's ztunnel process for one node: ZDS client, per-pod proxies, xDS, certificates, admin.

Real counterparts: zt:src/main.rs + zt:src/app.rs (wire everything, run until a signal),
zt:src/xds/client.rs (the state from istiod), zt:src/identity/manager.rs (certificates),
zt:src/cert_fetcher.rs (which ones to prefetch), zt:src/proxy/connection_manager.rs (the policy
watcher), zt:src/admin.rs (``config_dump`` and friends, read by ``istioctl ztunnel-config``).

One ztunnel per node, started by the supervisor inside the node's network namespace::

    ip netns exec <node netns> python -m lab.ztunnel --lab LAB --node NODE \\
        --zds-socket /run/ambient-lab/LAB/nodes/NODE/ztunnel.sock \\
        [--admin-socket /run/ambient-lab/LAB/nodes/NODE/ztunnel-admin.sock] \\
        [--xds-address 172.18.0.2:15012 --token-file TOKEN --root-cert ROOT] \\
        [--keylog PATH] [--cert-ttl SECONDS]

Start-up, in ztunnel's order: the admin socket; with ``--xds-address``, the trust bundle and the
node's token (waited for: istiod writes the root when it starts), the xDS client (workloads,
services, policies) and the identity manager (certificates, prefetched for every HBONE workload
of this node); then the ZDS client, which hands over the pods whose in-pod listeners ztunnel
opens. Access-log lines go to stdout, diagnostics to stderr, one event per step to the lab's
event stream. SIGTERM (or SIGINT) closes every listener and connection and exits with status 0.
The admin protocol is described in lab/ztunnel/admin.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from lab.common.admin_socket import admin_response, start_admin, stop_admin
from lab.common.events import EventEmitter
from lab.common.procname import name_process
from lab.common.seams import Seams
from lab.common.state import run_dir
from lab.ztunnel import access_log
from lab.ztunnel.admin import certificate_dump, config_dump
from lab.ztunnel.cert_fetcher import CertFetcher
from lab.ztunnel.config import Config, parse_config
from lab.ztunnel.identity_manager import CaClient, IdentityManager
from lab.ztunnel.inpod.netns import current_netns
from lab.ztunnel.inpod.statemanager import WorkloadProxyManagerState
from lab.ztunnel.inpod.workload_manager import WorkloadManager
from lab.ztunnel.metrics import Metrics
from lab.ztunnel.proxy import Emit, MeshInputs
from lab.ztunnel.proxy.connection_manager import ConnectionManager
from lab.ztunnel.proxy.inbound_passthrough import rbac_message
from lab.ztunnel.proxy.pool import WorkloadConnector, WorkloadHbonePool
from lab.ztunnel.state import ApplyResult, ProxyState, StateChanges
from lab.ztunnel.stepper import Stepper
from lab.ztunnel.tls_workload import WorkloadTls
from lab.ztunnel.xds.client import XdsClient

log = logging.getLogger("ztunnel")


# ------------------------------------------------------------------------------------ logging
class _ZtunnelFormatter(logging.Formatter):
    """``<RFC 3339 time>\\t<level>\\t<target>\\t<message>``, the shape of ztunnel's logs."""

    def format(self, record: logging.LogRecord) -> str:
        t = access_log.timestamp(record.created)
        level = {"WARNING": "warn", "CRITICAL": "error"}.get(record.levelname, record.levelname.lower())
        text = f"{t}\t{level}\t{record.name}\t{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ZtunnelFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def write_access_log(line: str) -> None:
    """Access-log lines go to stdout, one per connection, flushed at once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------ the mesh side
async def wait_for_file(path: str, stop: asyncio.Event, what: str, every: float = 0.2) -> bytes | None:
    """The contents of `path` once it exists and is not empty (None if ztunnel is stopped first):
    istiod writes the root certificate when it starts, possibly after ztunnel."""
    announced = False
    while not stop.is_set():
        try:
            data = Path(path).read_bytes()
            if data.strip():
                return data
        except OSError as e:
            if not announced:
                log.warning("waiting for %s at %s: %s", what, path, e)
                announced = True
        try:
            await asyncio.wait_for(stop.wait(), every)
        except TimeoutError:
            pass
    return None


class Mesh:
    """Everything ztunnel has only with a control plane: the xDS state, the certificates, the
    HBONE pool, and the reactions to config changes (cert prefetch, policy re-check)."""

    def __init__(self, cfg: Config, root_pem: bytes, token: str, emit: Emit, connections: ConnectionManager) -> None:
        self.cfg = cfg
        self.emit = emit
        self.connections = connections
        self.state = ProxyState()
        self.changes = StateChanges()
        address = cfg.xds_address
        self.identities = IdentityManager(lambda: CaClient(address, root_pem, token), ttl=cfg.cert_ttl,
                                          on_event=emit)
        self.tls = WorkloadTls(root_pem, cert_dir=cfg.cert_dir, keylog=cfg.keylog)
        seams = Seams(run_dir(cfg.lab))  # graded exercises plug learner code in here (lab/common/seams.py)
        self.pool = WorkloadHbonePool(WorkloadConnector(self.identities, self.tls, cfg.packet_mark,
                                                        cfg.connect_timeout, cfg.pool_max_streams, seams))
        self.fetcher = CertFetcher(cfg.node, self.identities, self.tls)
        self.inputs = MeshInputs(self.state, self.changes, self.identities, self.tls, self.pool, seams=seams)
        self.xds = XdsClient(address, root_pem, cfg.node, token, self.state, emit, on_change=self.on_change)

    def start(self) -> None:
        self.xds.start()

    def on_change(self, result: ApplyResult) -> None:
        """After every xDS response that changed the state: wake connections waiting for their
        workload, prefetch/forget certificates, re-check live inbound connections."""
        self.changes.notify()
        self.fetcher.update(self.state)
        for flow, ctx, decision in self.connections.recheck(self.state.assert_rbac):
            flow.emit("rbac.decision",
                      rbac_message(self.cfg.node, decision, ctx, flow.pod)
                      + " after a policy change, so ztunnel closes this open connection",
                      allowed=False, policy=decision.policy or "", reason=decision.reason, recheck=True,
                      src_ip=ctx.src_ip, src_identity=str(ctx.src_identity) if ctx.src_identity else "",
                      dst=f"{ctx.dst_ip}:{ctx.dst_port}")

    async def close(self) -> None:
        await self.xds.close()
        await self.pool.close()
        await self.identities.close()
        self.tls.close()

    def certificates(self) -> list[dict[str, Any]]:
        return certificate_dump(self.identities)


# ------------------------------------------------------------------------------------ the app
def unobserved_skipping(emitter: EventEmitter) -> Emit:
    """`emitter.emit`, minus the cost of building events nobody can receive: while the emitter has
    no connection to the supervisor and is not due to retry one, an event would be dropped anyway
    (ztunnel run without a lab, e.g. by bench/bench_mesh.py). Observing never slows the data path."""

    def emit(kind: str, msg: str, *, pod: str = "", flow: str = "", **fields: Any) -> Any:
        if emitter.sock is None and time.monotonic() < emitter.next_try:
            return None
        return emitter.emit(kind, msg, pod=pod, flow=flow, **fields)

    return emit


async def _flush_events(emitter: EventEmitter, every: float = 0.1) -> None:
    """Push out events the emitter buffered while the supervisor was slow (it sends only on emit)."""
    while True:
        await asyncio.sleep(every)
        if emitter.pending:
            emitter.flush()


async def run(cfg: Config) -> int:
    """Run ztunnel until SIGTERM/SIGINT; return the exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    emitter = EventEmitter(cfg.lab, "ztunnel", cfg.node)
    emit = unobserved_skipping(emitter)
    flusher = asyncio.create_task(_flush_events(emitter), name="events flush")
    own_netns = current_netns()
    connections = ConnectionManager()
    metrics = Metrics()
    stepper = Stepper(emit, component="ztunnel", node=cfg.node)  # step mode, off until the learner turns it on
    mesh: Mesh | None = None
    state: WorkloadProxyManagerState | None = None
    manager: WorkloadManager | None = None

    def ready() -> bool:
        return (manager is not None and manager.ready.is_set()
                and (mesh is None or mesh.xds.ready.is_set()) and not (cfg.mesh and mesh is None))

    def dump() -> dict[str, Any]:
        conns = [c.to_dict() for c in connections.connections()]
        if mesh is None:
            return config_dump(ProxyState(), [], conns)
        return config_dump(mesh.state, mesh.certificates(), conns)

    admin = None
    if cfg.admin_socket:
        admin = await start_admin(cfg.admin_socket, lambda req: admin_response(req, {
            "workloads": lambda: state.workloads() if state else [],
            "connections": lambda: [c.to_dict() for c in connections.connections()],
            "ready": ready,
            "config_dump": dump,
            "metrics": metrics.exposition,
        }, stepper.commands()))
    log.info("ztunnel for node %s starting: ZDS %s, admin %s, xDS %s, mark %d", cfg.node, cfg.zds_socket,
             cfg.admin_socket or "-", cfg.xds_address or "- (no control plane: plain TCP only)", cfg.packet_mark)
    try:
        if cfg.mesh:
            root_pem = await wait_for_file(cfg.root_cert, stop, "the mesh root certificate")
            token = await wait_for_file(cfg.token_file, stop, "the node's token") if root_pem else None
            if root_pem is not None and token is not None:
                mesh = Mesh(cfg, root_pem, token.decode().strip(), emit, connections)
                mesh.start()
        if not stop.is_set():
            state = WorkloadProxyManagerState(cfg, emit=emit, cur_netns=own_netns,
                                              write_access_log=write_access_log, connections=connections,
                                              metrics=metrics, mesh=mesh.inputs if mesh else None,
                                              stepper=stepper)
            manager = WorkloadManager(cfg.zds_socket, on_add=state.add, on_del=state.delete, on_keep=state.keep,
                                      on_snapshot_sent=state.snapshot_sent)
            manager.start()
            await stop.wait()
        log.info("received a termination signal, shutting down")
    finally:
        stepper.set_mode(False, reason="shutdown")  # nothing waits for a learner any more
        flusher.cancel()
        if manager is not None:
            await manager.stop()  # no more ZDS requests while the proxies go away
        if state is not None:
            await state.shutdown()
        if mesh is not None:
            await mesh.close()
        if admin is not None:
            stop_admin(admin, cfg.admin_socket)
        emitter.close()
        os.close(own_netns)
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(sys.argv[1:] if argv is None else argv, os.environ)
    name_process("ztunnel")
    _setup_logging()
    return asyncio.run(run(cfg))
