"""Throughput of one HBONE stream (HTTP/2 CONNECT over mutual TLS 1.3) on loopback, next to a
plain asyncio TCP relay and direct TCP, all measured in the same run.

Paths (each pushes --mib MiB one way, then waits for the receiver's byte count):

  direct TCP     sender --TCP--> sink
  asyncio relay  sender --TCP--> relay process (asyncio copy) --TCP--> sink
  HBONE relay    sender (HBONE client) --mTLS+h2--> HBONE server process (copy_bidirectional,
                 like a destination ztunnel) --TCP--> sink
  HBONE only     sender (HBONE client) --mTLS+h2--> HBONE server process that reads and discards

Every box is its own OS process (the sender is this one). Usage:

    .venv/bin/python bench/bench_hbone.py [--mib 256] [--repeat 1]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import multiprocessing as mp
import socket
import ssl
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID  # noqa: E402

from lab.hbone import ConnectRequest, copy_bidirectional, open_hbone_connection, serve_hbone  # noqa: E402

MiB = 1024 * 1024
CHUNK = MiB
DISCARD_HEADER = "x-bench-discard"


# ------------------------------------------------------------------ throwaway certificates

def make_pki(directory: Path) -> None:
    """A CA and two SPIFFE workload certificates (EC P-256), as files for ssl.load_cert_chain."""
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=1), now + datetime.timedelta(hours=1))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "cluster.local")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(valid[0]).not_valid_after(valid[1])
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    (directory / "root.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for sa in ("client", "server"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca_name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(valid[0]).not_valid_after(valid[1])
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
                    f"spiffe://cluster.local/ns/bench/sa/{sa}")]), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False),
                               critical=True)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        (directory / f"{sa}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file = directory / f"{sa}.key"
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_file.chmod(0o600)


def tls_context(directory: Path, server_side: bool) -> ssl.SSLContext:
    """TLS 1.3 only, ALPN h2, certificates required on both sides (as ztunnel)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(directory / "root.pem")
    name = "server" if server_side else "client"
    ctx.load_cert_chain(directory / f"{name}.pem", directory / f"{name}.key")
    return ctx


# ------------------------------------------------------------------ the processes

def run_sink(ready: mp.Queue) -> None:
    """Plain blocking TCP receiver: count bytes until EOF, answer the count (8 bytes)."""
    srv = socket.create_server(("127.0.0.1", 0))
    ready.put(srv.getsockname()[1])
    buf = bytearray(CHUNK)
    while True:
        conn, _ = srv.accept()
        total = 0
        while n := conn.recv_into(buf):
            total += n
        conn.sendall(struct.pack("!Q", total))
        conn.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(256 * 1024):
        writer.write(data)
        await writer.drain()
    writer.write_eof()


def run_relay(ready: mp.Queue, sink_port: int) -> None:
    """A plain asyncio TCP relay, half-closing like a proxy should."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", sink_port)
        await asyncio.gather(_pipe(reader, up_w), _pipe(up_r, writer))
        up_w.close()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        ready.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


def run_hbone_server(ready: mp.Queue, pki: str) -> None:
    """An HBONE listener: CONNECT to the authority and copy (or discard, for 'HBONE only')."""
    async def handler(request: ConnectRequest, respond) -> None:  # type: ignore[no-untyped-def]
        if request.get(DISCARD_HEADER):
            stream = await respond(200)
            total = 0
            while data := await stream.read(CHUNK):
                total += len(data)
            stream.write(struct.pack("!Q", total))
            stream.write_eof()
            return
        try:
            up_r, up_w = await asyncio.open_connection(*request.destination)
        except OSError:
            await respond(503)
            return
        stream = await respond(200)
        try:
            await copy_bidirectional(stream, up_r, up_w)
        finally:
            up_w.close()

    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: serve_hbone(r, w, handler), "127.0.0.1", 0,
                                            ssl=tls_context(Path(pki), True), limit=4 * MiB)
        ready.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


# ------------------------------------------------------------------ the sender (this process)

def send_tcp(port: int, total: int) -> float:
    payload = memoryview(b"\xa5" * CHUNK)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(total // CHUNK):
            sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        got = struct.unpack("!Q", _recv_exactly(sock, 8))[0]
    elapsed = time.perf_counter() - start
    assert got == total, (got, total)
    return elapsed


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("receiver closed early")
        data += chunk
    return data


async def send_hbone(port: int, pki: Path, authority: str, total: int, discard: bool) -> float:
    conn = await open_hbone_connection("127.0.0.1", port, tls_context(pki, False))
    headers = [(DISCARD_HEADER, "1")] if discard else []
    payload = b"\xa5" * CHUNK
    start = time.perf_counter()
    _, _, stream = await conn.connect_stream(authority, headers)
    for _ in range(total // CHUNK):
        stream.write(payload)
        await stream.drain()
    stream.write_eof()
    got = struct.unpack("!Q", await stream.readexactly(8))[0]
    elapsed = time.perf_counter() - start
    await conn.aclose()
    assert got == total, (got, total)
    return elapsed


def start(target, *args) -> tuple[mp.Process, int]:  # type: ignore[no-untyped-def]
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    proc = ctx.Process(target=target, args=(ready, *args), daemon=True)
    proc.start()
    return proc, ready.get(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="MiB per transfer (default 256)")
    parser.add_argument("--repeat", type=int, default=1, help="transfers per path; the best counts")
    args = parser.parse_args()
    total = args.mib * MiB

    procs: list[mp.Process] = []
    with tempfile.TemporaryDirectory(prefix="bench-hbone-") as tmp:
        pki = Path(tmp)
        make_pki(pki)
        try:
            sink, sink_port = start(run_sink)
            relay, relay_port = start(run_relay, sink_port)
            hbone, hbone_port = start(run_hbone_server, str(pki))
            procs += [sink, relay, hbone]
            runs = {
                "direct TCP": lambda: send_tcp(sink_port, total),
                "asyncio TCP relay": lambda: send_tcp(relay_port, total),
                "HBONE relay (mTLS+h2, to TCP sink)": lambda: asyncio.run(
                    send_hbone(hbone_port, pki, f"127.0.0.1:{sink_port}", total, discard=False)),
                "HBONE only (mTLS+h2, server discards)": lambda: asyncio.run(
                    send_hbone(hbone_port, pki, f"127.0.0.1:{sink_port}", total, discard=True)),
            }
            results = {name: min(run() for _ in range(args.repeat)) for name, run in runs.items()}
        finally:
            for proc in procs:
                proc.terminate()
                proc.join(5)

    rates = {name: total / MiB / secs for name, secs in results.items()}
    direct, relay = rates["direct TCP"], rates["asyncio TCP relay"]
    print(f"{args.mib} MiB one way on loopback, one connection / one stream, best of {args.repeat}")
    print(f"{'path':40} {'MiB/s':>8} {'seconds':>8} {'/direct':>8} {'/relay':>8}")
    for name, rate in rates.items():
        print(f"{name:40} {rate:8.0f} {results[name]:8.2f} {rate / direct:8.3f} {rate / relay:8.3f}")


if __name__ == "__main__":
    main()
