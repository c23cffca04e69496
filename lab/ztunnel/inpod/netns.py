"""A pod's network namespace as ztunnel holds it: an fd, its identity, and "run this in there".

Real counterpart: zt:src/inpod/netns.rs (``InpodNetns``, ``NetnsID``).

ztunnel runs in its node's network namespace. The istio-cni agent hands it each pod's netns as
an open fd (ZDS, SCM_RIGHTS). To open a socket *in the pod*, ztunnel moves the calling thread
into the pod's netns with ``setns(fd, CLONE_NEWNET)``, creates the socket, and moves the thread
back to its own netns. The socket belongs to the pod's netns for the rest of its life, although
the thread (and the whole process) lives in the node's: that is why ``ss -tlnp`` inside the pod
shows the ztunnel process owning ports 15001/15006/15008.

setns(2) switches one THREAD. The asyncio event loop is a single thread, and the body given to
:meth:`InpodNetns.run` is plain synchronous code (create, set options, bind): nothing else runs
while the thread is away, and it always comes back, also on an exception.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class NetnsID:
    """How ztunnel tells network namespaces apart: (st_dev, st_ino) of the netns fd.

    An AddWorkload for a known pod with a different NetnsID means the pod got a new sandbox
    (a new netns): the old proxy is drained and a new one started.
    """

    dev: int
    inode: int

    @classmethod
    def of_fd(cls, fd: int) -> NetnsID:
        st = os.fstat(fd)
        return cls(st.st_dev, st.st_ino)


def current_netns() -> int:
    """An fd of the calling thread's own netns (ztunnel's ``InpodNetns::current()``), kept open
    for the life of the process so that every ``run`` can come back to it."""
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


class InpodNetns:
    """One pod's netns, owned by ztunnel for as long as it proxies the pod.

    `workload_netns` is the fd received over ZDS; this object owns it and closes it in
    :meth:`close`. `cur_netns` is ztunnel's own netns fd (shared, not owned).
    """

    def __init__(self, cur_netns: int, workload_netns: int) -> None:
        self.cur_netns = cur_netns
        self.workload_netns = workload_netns
        self.id = NetnsID.of_fd(workload_netns)

    def run(self, body: Callable[[], T]) -> T:
        """Call `body()` with this thread inside the pod's netns, then return to ztunnel's."""
        if self.workload_netns < 0:
            raise OSError(f"netns {self.id.inode} was already closed")
        os.setns(self.workload_netns, os.CLONE_NEWNET)
        try:
            return body()
        finally:
            os.setns(self.cur_netns, os.CLONE_NEWNET)

    def close(self) -> None:
        """Let go of the pod's netns (the kernel frees it once nothing else holds it)."""
        if self.workload_netns >= 0:
            os.close(self.workload_netns)
            self.workload_netns = -1

    def __repr__(self) -> str:
        return f"InpodNetns(inode={self.id.inode}, dev={self.id.dev})"
