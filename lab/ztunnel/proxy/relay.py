"""Copy bytes both ways between the app's connection and the upstream one.

Real counterpart: zt:src/copy.rs (``copy_bidirectional``).

TCP has half-close: a client may send its request, shut down its sending side (FIN), and still
wait for the answer. So each direction is copied on its own, and when one side reaches EOF the
proxy passes the EOF on with ``write_eof`` (shutdown(SHUT_WR)) and keeps copying the other way.
Closing early would cut off the reply. Both sockets are closed only when both directions ended;
an error (reset) on either side aborts both.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

#: Bytes read per step. Large reads keep the relay's per-byte cost low.
CHUNK = 256 * 1024


@dataclass
class Transferred:
    """Bytes copied so far, per direction; readable at any time (also after a drain)."""

    downstream_to_upstream: int = 0  # from the connection ztunnel accepted towards upstream
    upstream_to_downstream: int = 0  # from upstream back to the accepted connection


async def _copy_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counts: Transferred,
                    downstream_to_upstream: bool) -> None:
    """Copy one direction until EOF, then half-close the writing side."""
    while True:
        data = await reader.read(CHUNK)
        if not data:
            break
        writer.write(data)
        if downstream_to_upstream:
            counts.downstream_to_upstream += len(data)
        else:
            counts.upstream_to_downstream += len(data)
        await writer.drain()
    if writer.can_write_eof() and not writer.is_closing():
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()


def _abort(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()


async def copy_bidirectional(downstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                             upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                             counts: Transferred) -> None:
    """Relay until both directions reached EOF; raise the first error (after aborting both).

    `counts` is updated as bytes flow, so a caller that cancels the relay (a drain) still knows
    how much was copied. Both writers are closed when this returns or raises.
    """
    (down_r, down_w), (up_r, up_w) = downstream, upstream
    tasks = [
        asyncio.create_task(_copy_one(down_r, up_w, counts, True), name="copy downstream->upstream"),
        asyncio.create_task(_copy_one(up_r, down_w, counts, False), name="copy upstream->downstream"),
    ]
    clean = False
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # raises the error of a failed direction
        clean = True
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for writer in (down_w, up_w):
            if clean:
                writer.close()
            else:
                _abort(writer)
