"""Network namespaces: create, enter (per thread), remove. The only place the lab calls setns.

Linux's setns(2) moves the calling THREAD, not the process, into another namespace. A socket or
netlink handle created while inside stays bound to that namespace for life: this is how the lab
(and ztunnel, zt:src/inpod/netns.rs) makes sockets "in" a pod. Named namespaces live as bind
mounts under /run/netns, exactly where `ip netns` looks, so learners can `ip netns exec` into them.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from pyroute2 import netns as _pyroute2_netns

NETNS_DIR = "/run/netns"


def path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def create(name: str) -> None:
    """`ip netns add NAME`."""
    _pyroute2_netns.create(name)


def remove(name: str) -> None:
    """`ip netns delete NAME`: the veths inside go with it. Missing namespaces are fine (idempotent)."""
    if exists(name):
        _pyroute2_netns.remove(name)


@contextlib.contextmanager
def entered(name_or_fd: str | int) -> Iterator[None]:
    """Run the body with the calling thread inside a namespace (a name, or an open netns fd).

    Always returns the thread to where it was, through an fd of its own namespace kept at entry.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(path(name_or_fd), os.O_RDONLY | os.O_CLOEXEC) if isinstance(name_or_fd, str) else name_or_fd
    try:
        os.setns(target, os.CLONE_NEWNET)
        yield
    finally:
        os.setns(own, os.CLONE_NEWNET)
        os.close(own)
        if isinstance(name_or_fd, str):
            os.close(target)


def write_sysctl(netns_name: str, key: str, value: str) -> None:
    """`ip netns exec NAME sysctl -w key=value` for net.* keys (they are per namespace)."""
    with entered(netns_name):
        with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
            f.write(value)

