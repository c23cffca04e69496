"""The life of a server app's process: listen, serve, stop on SIGTERM with exit status 0.

Kubernetes stops a container by sending SIGTERM and, after the grace period, SIGKILL. The real
sample apps exit at once on SIGTERM; so do these: the listening sockets close, the open
connections are dropped, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable

from lab.apps.http import log_line

Starter = Callable[[], Awaitable[list[asyncio.Server]]]


async def serve_until_terminated(start: Starter, log: Callable[[str], None] = log_line) -> int:
    """Run ``start()`` (which opens the listeners), then serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        servers = await start()
    except OSError as exc:
        log(f"failed to create listener, err: {exc}")
        return 1
    await stop.wait()
    log(f"received {received[0]}, shutting down")
    for server in servers:
        server.close()
    current = asyncio.current_task()
    pending = [task for task in asyncio.all_tasks() if task is not current]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=1.0)
    return 0


def run(start: Starter) -> int:
    """The process entry of a server app: an event loop until terminated; the exit status.

    Not ``asyncio.run``: that would wait (up to 300 s) for the resolver threads, and a DNS
    query stuck on an unreachable cluster DNS must not keep a terminated pod alive. A process
    left with such a thread exits at once with ``os._exit``, as a container's main process
    takes its other threads down with it.
    """
    loop = asyncio.new_event_loop()
    try:
        code = loop.run_until_complete(serve_until_terminated(start))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()  # shuts the resolver thread pool down without waiting for it
    if any(thread.is_alive() for thread in threading.enumerate()
           if thread is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
