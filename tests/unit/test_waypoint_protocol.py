"""Which chain a waypoint gives a port: Istio's protocol selection, and Envoy's http_inspector."""

from __future__ import annotations

import asyncio

import pytest

from lab.waypoint import protocol as p
from lab.waypoint.http1 import HttpReader


@pytest.mark.parametrize("port,expected", [
    ({"name": "http", "port": 9080}, p.HTTP),
    ({"name": "http-web", "port": 80}, p.HTTP),
    ({"name": "tcp", "port": 9000}, p.TCP),
    ({"name": "tcp-echo", "port": 9001}, p.TCP),
    ({"name": "redis", "port": 6379}, p.TCP),
    ({"name": "grpc-api", "port": 50051}, p.GRPC),
    ({"name": "http2", "port": 81}, p.HTTP2),
    ({"name": "web", "port": 8080}, p.AUTO),  # no known prefix: sniffed
    ({"name": "", "port": 8080}, p.AUTO),
    ({"name": "web", "port": 8080, "app_protocol": "http"}, p.HTTP),  # appProtocol wins over the name
    ({"name": "http", "port": 8080, "app_protocol": "tcp"}, p.TCP),
    ({"name": "x", "port": 8080, "app_protocol": "kubernetes.io/h2c"}, p.HTTP2),
    (None, p.AUTO),
])
def test_port_protocol_as_istio_reads_it(port, expected):
    assert p.port_protocol(port) == expected


@pytest.mark.parametrize("data,expected", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", p.HTTP),
    (b"POST /v1 HTTP/1.0\r\n", p.HTTP),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", p.HTTP2),
    (b"hello world\n", p.TCP),
    (b"*1\r\n$4\r\nPING\r\n", p.TCP),  # redis
    (b"GET /no-version\r\n", p.TCP),  # HTTP/0.9-like: not HTTP/1.x
])
def test_first_bytes_classified_as_envoys_http_inspector_does(data, expected):
    assert p.classify_first_bytes(data) == expected


def test_a_prefix_of_a_request_line_waits_for_more():
    assert p.could_still_be_http(b"GE") and p.could_still_be_http(b"GET /path")
    assert p.could_still_be_http(b"PRI * HT")
    assert not p.could_still_be_http(b"hello") and not p.could_still_be_http(b"GET / HTTP/1.1\r\n")


class Chunks:
    """A source that hands out chunks slowly, then nothing (a client that waits)."""

    def __init__(self, *chunks: bytes, then_wait: bool = True) -> None:
        self.chunks = list(chunks)
        self.then_wait = then_wait

    async def read(self, n: int) -> bytes:
        if self.chunks:
            await asyncio.sleep(0.01)
            return self.chunks.pop(0)
        if self.then_wait:
            await asyncio.sleep(3600)
        return b""


async def test_sniff_reads_until_it_can_tell_and_keeps_the_bytes():
    reader = HttpReader(Chunks(b"GE", b"T / HT", b"TP/1.1\r\nHost: a\r\n\r\n"))
    assert await p.sniff(reader, timeout=2) == p.HTTP
    assert reader.peek().startswith(b"GET / HTTP/1.1\r\n")  # nothing consumed: the HTTP chain reads it


async def test_sniff_a_server_first_protocol_times_out_to_tcp():
    reader = HttpReader(Chunks())
    assert await p.sniff(reader, timeout=0.05) == p.TCP and reader.peek() == b""


async def test_sniff_non_http_bytes_is_tcp_at_once():
    reader = HttpReader(Chunks(b"hello\n"))
    assert await p.sniff(reader, timeout=5) == p.TCP and reader.take_buffered() == b"hello\n"
