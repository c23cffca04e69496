"""``echo``: the stand-in for any image the lab does not know.

It listens on every port the pod spec declares. When a connection's first bytes are an HTTP
request line it answers HTTP/1.1 (keep-alive) with a small JSON document naming the pod, the
port and the client address it saw; otherwise it echoes the raw bytes back until the client
half-closes. So any manifest gets a workload that answers, both to curl and to ``nc``.
"""

from __future__ import annotations

import asyncio

from lab.apps import AppOptions
from lab.apps.bookinfo import pod_name
from lab.apps.http import HttpServer, Request, Response, format_address, log_line, looks_like_http, start_servers
from lab.apps.runtime import run

SNIFF_BYTES = 9  # the longest method we recognise ("OPTIONS", "CONNECT") plus a space, and one


def http_document(pod: str, namespace: str, request: Request) -> dict:
    """What echo answers to an HTTP request."""
    return {
        "pod": pod,
        "namespace": namespace,
        "port": request.local[1],
        "client": request.client_address,
        "method": request.method,
        "path": request.target,
        "headers": {name.lower(): value for name, value in request.headers},
    }


class Echo:
    """Decide per connection: HTTP (by the first bytes) or a raw byte echo."""

    def __init__(self, pod: str, namespace: str) -> None:
        self.pod = pod
        self.namespace = namespace
        self.http = HttpServer(self.handle_http)

    async def handle_http(self, request: Request) -> Response:
        return Response.json(http_document(self.pod, self.namespace, request), indent=2)

    async def serve_connection(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        first = b""
        verdict: bool | None = None
        while verdict is None:
            chunk = await reader.read(SNIFF_BYTES - len(first))
            if not chunk:
                break
            first += chunk
            verdict = looks_like_http(first)
        if verdict:
            await self.http.serve_connection(reader, writer, prefix=first)
        else:
            await self.echo_raw(reader, writer, first)

    async def echo_raw(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       first: bytes) -> None:
        """Send back every byte received; half-close when the client does."""
        client = format_address(writer.get_extra_info("peername") or ())
        port = (writer.get_extra_info("sockname") or ("", 0))[1]
        total = len(first)
        try:
            if first:
                writer.write(first)
            while chunk := await reader.read(65536):
                total += len(chunk)
                writer.write(chunk)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            log_line(f"{client} raw tcp to port {port}: echoed {total} bytes")
            writer.close()


def main(options: AppOptions) -> int:
    service = Echo(pod_name(options.pod), options.namespace)
    if not options.ports:
        log_line("no container ports declared: nothing to listen on")
    return run(lambda: start_servers(service.serve_connection, options.listen, options.ports))
