"""The lab's ztunnel process for one node: ZDS client, per-pod proxies, admin socket.

Real counterparts: zt:src/main.rs + zt:src/app.rs (wire everything, run until a signal),
zt:src/admin.rs (``localhost:15000``: ``config_dump`` and friends, read by ``istioctl
ztunnel-config``).

One ztunnel per node, started by the supervisor inside the node's network namespace::

    ip netns exec <node netns> python -m lab.ztunnel --lab LAB --node NODE \\
        --zds-socket /run/ambient-lab/LAB/nodes/NODE/ztunnel.sock \\
        [--admin-socket /run/ambient-lab/LAB/nodes/NODE/ztunnel-admin.sock]

It connects to the istio-cni node agent over ZDS and, for every pod handed over, opens the
in-pod listeners (15001/15006/15008) inside the pod's netns. Access-log lines go to stdout,
diagnostics to stderr, one event per step to the lab's event stream. SIGTERM (or SIGINT) closes
every listener and connection and exits with status 0.

Admin protocol (the lab's stand-in for ztunnel's HTTP admin port; a unix stream socket, one
JSON object per line in each direction)::

    {"op": "workloads"}    -> {"workloads": [{"uid", "name", "namespace", "service_account",
                               "netns_inode", "netns_dev", "listeners": [{"port", "what",
                               "address"}], "started"}]}
    {"op": "connections"}  -> {"connections": [{"flow", "uid", "workload", "direction",
                               "local", "remote", "target", "protocol"}]}
    {"op": "ready"}        -> {"ready": true|false}   (ztunnel's readiness: snapshot received)
    anything else          -> {"error": "..."}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import stat
import sys
from typing import Any, Callable

from lab.events import EventEmitter
from lab.ztunnel import access_log
from lab.ztunnel.config import Config, parse_config
from lab.ztunnel.inpod.netns import current_netns
from lab.ztunnel.inpod.statemanager import WorkloadProxyManagerState
from lab.ztunnel.inpod.workload_manager import WorkloadManager
from lab.ztunnel.proxy import ConnectionManager

log = logging.getLogger("ztunnel")

#: Largest admin request line accepted.
ADMIN_MAX_LINE = 64 * 1024


# ------------------------------------------------------------------------------------ admin
def admin_response(request: Any, *, workloads: Callable[[], list[dict[str, Any]]],
                   connections: Callable[[], list[dict[str, Any]]], ready: Callable[[], bool]) -> dict[str, Any]:
    """Answer one admin request from the given state readers (pure apart from calling them)."""
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        return {"error": 'expected a JSON object like {"op": "workloads"}'}
    op = request["op"]
    if op == "workloads":
        return {"workloads": workloads()}
    if op == "connections":
        return {"connections": connections()}
    if op == "ready":
        return {"ready": ready()}
    return {"error": f"unknown op {op!r}; one of: workloads, connections, ready"}


def _remove_stale_socket(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


async def start_admin(path: str, answer: Callable[[Any], dict[str, Any]]) -> asyncio.AbstractServer:
    """Serve the admin protocol on a unix stream socket at `path`."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    request = json.loads(line)
                except ValueError as e:
                    reply = {"error": f"not JSON: {e}"}
                else:
                    reply = answer(request)
                writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    _remove_stale_socket(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return await asyncio.start_unix_server(serve, path=path, limit=ADMIN_MAX_LINE)


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


# ------------------------------------------------------------------------------------ the app
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
    own_netns = current_netns()
    connections = ConnectionManager()
    state = WorkloadProxyManagerState(cfg, emit=emitter.emit, cur_netns=own_netns,
                                      write_access_log=write_access_log, connections=connections)
    manager = WorkloadManager(cfg.zds_socket, on_add=state.add, on_del=state.delete, on_keep=state.keep,
                              on_snapshot_sent=state.snapshot_sent)
    admin = None
    if cfg.admin_socket:
        admin = await start_admin(cfg.admin_socket, lambda req: admin_response(
            req, workloads=state.workloads,
            connections=lambda: [c.to_dict() for c in connections.connections()],
            ready=manager.ready.is_set))
    log.info("ztunnel for node %s starting: ZDS %s, admin %s, mark %d", cfg.node, cfg.zds_socket,
             cfg.admin_socket or "-", cfg.packet_mark)
    manager.start()
    flusher = asyncio.create_task(_flush_events(emitter), name="events flush")
    try:
        await stop.wait()
        log.info("received a termination signal, shutting down")
    finally:
        flusher.cancel()
        await manager.stop()  # no more ZDS requests while the proxies go away
        await state.shutdown()
        if admin is not None:
            admin.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(cfg.admin_socket)
        emitter.close()
        os.close(own_netns)
    return 0


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(sys.argv[1:] if argv is None else argv, os.environ)
    _setup_logging()
    return asyncio.run(run(cfg))
