"""``tcp-echo`` (image ``istio/tcp-echo-server``): a plain TCP service, no HTTP at all.

The image's arguments are a comma-separated list of ports and a prefix
(``args: ["9000,9001,9002", "hello"]``; the default is ``9000 hello``). On every port it reads
newline-terminated lines and answers each with ``<prefix> <line>``. A partial last line (no
newline before EOF) gets no answer, and the server closes when the client has finished
sending. Istio's TCP traffic-shifting task tells versions apart by their prefix
(``one``/``two``).

Being pure L4, it is what ztunnel sees of any non-HTTP protocol. The real server prints the
``request:`` and ``response:`` lines; the stand-in also logs each connection with the client
address it saw.
"""

from __future__ import annotations

import asyncio

from lab.apps import AppOptions
from lab.apps.http import format_address, log_line, start_servers
from lab.apps.runtime import run

DEFAULT_PORTS = "9000"
DEFAULT_PREFIX = "hello"


def ports_and_prefix(options: AppOptions) -> tuple[tuple[int, ...], str]:
    """The image's ``<ports> <prefix>`` arguments; --ports stands in when there are none."""
    args = options.args
    if args:
        ports = tuple(int(p) for p in args[0].split(",") if p.strip())
    elif options.ports:
        ports = options.ports
    else:
        ports = tuple(int(p) for p in DEFAULT_PORTS.split(","))
    prefix = args[1] if len(args) > 1 else DEFAULT_PREFIX
    return ports, prefix


def echo_line(prefix: str, line: bytes) -> bytes:
    """The answer to one line (which keeps its newline): ``<prefix> <line>``."""
    return prefix.encode() + b" " + line


class TcpEcho:
    """Echo each received line with the prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    async def serve_connection(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        client = format_address(writer.get_extra_info("peername") or ())
        local = writer.get_extra_info("sockname") or ("", 0)
        log_line(f"connection from {client} to port {local[1]}")
        lines = 0
        try:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    break  # EOF; a partial line is dropped, as the real server does
                except asyncio.LimitOverrunError as exc:
                    line = await reader.readexactly(exc.consumed)  # a very long line: echo it
                text = line.decode("utf-8", "replace")
                log_line(f"request: {text}".rstrip("\n"))
                answer = echo_line(self.prefix, line)
                log_line(f"response: {answer.decode('utf-8', 'replace')}".rstrip("\n"))
                writer.write(answer)
                await writer.drain()
                lines += 1
        except (ConnectionError, OSError) as exc:
            log_line(f"failed to read data, err: {exc}")
        finally:
            log_line(f"connection from {client} closed after {lines} lines")
            writer.close()


def main(options: AppOptions) -> int:
    ports, prefix = ports_and_prefix(options)
    service = TcpEcho(prefix)

    def log(text: str) -> None:
        log_line(f"{text}, prefix: {prefix}" if text.startswith("listening") else text)

    return run(lambda: start_servers(service.serve_connection, options.listen, ports, log=log))
