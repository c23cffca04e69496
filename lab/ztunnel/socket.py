"""ztunnel's socket helpers: original destination, marks, transparent sockets.

Real counterpart: zt:src/socket.rs (``orig_dst_addr``, ``set_transparent``, ``set_mark``) and the
listener set-up of zt:src/inpod/config.rs (``SO_MARK`` on every socket made in a pod, and
``SO_REUSEPORT`` when ``INPOD_PORT_REUSE`` is on).

Three socket options carry the whole in-pod design:

- ``SO_ORIGINAL_DST`` (``getsockopt(SOL_IP, 80)``): the in-pod ``REDIRECT`` rewrote the
  destination to ztunnel's port; conntrack still knows where the app meant to go.
- ``SO_MARK`` 1337 (0x539): the in-pod rules skip packets carrying it, so ztunnel's own
  connections out of the pod are not captured again.
- ``IP_TRANSPARENT``: lets ztunnel bind the *client's* address on the inbound leg, so the app
  sees the real client IP (the rules' connmark 0x111 + table 100 route the replies back).

All functions here act on the socket they are given, in whatever netns that socket was created:
creating the socket inside the pod is :class:`lab.ztunnel.inpod.netns.InpodNetns`'s job.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

#: linux/netfilter_ipv4.h: conntrack's record of the destination before NAT (REDIRECT/DNAT).
SO_ORIGINAL_DST = 80
#: linux/in.h: allow binding (and sending from) an address that is not local.
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
#: struct sockaddr_in as returned by SO_ORIGINAL_DST: family (2), port (2, network order),
#: IPv4 address (4), padding (8).
_SOCKADDR_IN = struct.Struct("!2xH4s8x")

Addr = tuple[str, int]

#: Listen backlog of ztunnel's in-pod listeners (tokio's default, as real ztunnel uses). With a
#: short queue, a burst of connects overflows it: the kernel drops the clients' final ACKs, and
#: those clients, already "connected", wait seconds for SYN-ACK retransmits.
LISTEN_BACKLOG = 1024


def decode_original_dst(raw: bytes) -> Addr:
    """Decode the ``sockaddr_in`` that ``getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)`` returns (pure).

    >>> decode_original_dst(bytes.fromhex("0002 1f90 0a090003 0000000000000000"))
    ('10.9.0.3', 8080)
    """
    if len(raw) != _SOCKADDR_IN.size:
        raise ValueError(f"SO_ORIGINAL_DST: expected {_SOCKADDR_IN.size} bytes, got {len(raw)}")
    port, packed_ip = _SOCKADDR_IN.unpack(raw)
    return str(ipaddress.IPv4Address(packed_ip)), port


def orig_dst_addr(sock: socket.socket) -> Addr:
    """Where the app meant to connect before the in-pod REDIRECT (zt ``socket::orig_dst_addr``).

    Raises OSError (ENOENT) when the connection was not NATed, e.g. a direct connect to 15001.
    """
    return decode_original_dst(sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN.size))


def set_mark(sock: socket.socket, mark: int) -> None:
    """``SO_MARK``: every packet of this socket carries `mark` (needs CAP_NET_ADMIN)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)


def set_transparent(sock: socket.socket) -> None:
    """``IP_TRANSPARENT``: the socket may bind a foreign (the client's) source address."""
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)


def listener_socket(port: int, *, mark: int, reuse_port: bool, address: str = "0.0.0.0",
                    backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """A listening TCP socket for one of ztunnel's in-pod ports, in the CALLING THREAD's netns.

    ``SO_MARK`` as on every socket ztunnel makes in a pod; ``SO_REUSEADDR`` so that a restart
    does not wait for TIME_WAIT; ``SO_REUSEPORT`` (``INPOD_PORT_REUSE``) so that a second
    ztunnel can bind the same port during an upgrade and take over without a gap.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        set_mark(sock, mark)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def set_nodelay(sock: socket.socket) -> None:
    """``TCP_NODELAY``: send small writes at once. A proxy relays many small segments (an HTTP/2
    HEADERS frame, a short reply); with Nagle's algorithm each would wait for the previous one's
    ACK, which the peer delays by up to 40 ms."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def upstream_socket(*, mark: int, bind_source: str | None = None) -> socket.socket:
    """An unconnected TCP socket for ztunnel's upstream leg, in the CALLING THREAD's netns.

    With `bind_source`, the socket is made transparent and bound to that (foreign) address with
    an ephemeral port: the inbound leg's "preserve the client's source IP". ``TCP_NODELAY`` is set,
    as ztunnel does on every socket it proxies with.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        set_mark(sock, mark)
        set_nodelay(sock)
        if bind_source is not None:
            set_transparent(sock)
            sock.bind((bind_source, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def format_addr(addr: Addr | None) -> str:
    """``ip:port`` as ztunnel prints socket addresses (IPv6 in brackets); "" for None."""
    if addr is None:
        return ""
    ip, port = addr[0], addr[1]
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
