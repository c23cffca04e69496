"""Which certificates ztunnel fetches ahead of time, and which it drops (zt:src/cert_fetcher.rs,
zt:src/identity/manager.rs ``forget_certificate``).

A connection from pod A needs A's certificate *now*; fetching it then costs a round trip to
istiod on the first connection. So whenever a workload on THIS node appears in WDS and speaks
HBONE (or tunnels natively), ztunnel prefetches its identity's certificate (Warmup priority).
When no workload on this node runs as an identity any more, its certificate is forgotten: its
rotation stops and its key is dropped. (A workload of the node that is not HBONE yet still counts
as "using" the identity, so enrolment does not make a certificate come and go.)

`certificate_changes` is the pure decision; `CertFetcher.update` applies it after every xDS change.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from lab.tls.identity import Identity
from lab.ztunnel.state import ProxyState, Workload

if TYPE_CHECKING:
    from lab.ztunnel.identity_manager import IdentityManager
    from lab.ztunnel.tls_workload import WorkloadTls

log = logging.getLogger("ztunnel.cert_fetcher")


def wants_certificate(w: Workload, node: str) -> bool:
    """zt ``should_track_certificates_for_removal`` + prefetch rule: a workload of this node that
    ztunnel carries over HBONE (or that terminates HBONE itself)."""
    return w.node == node and (w.hbone or w.native_tunnel)


def certificate_changes(workloads: Iterable[Workload], node: str,
                        managed: Iterable[Identity]) -> tuple[list[Identity], list[Identity]]:
    """(identities to prefetch, identities to forget) for this node (pure).

    Prefetch: identities of the node's HBONE workloads not managed yet. Forget: managed
    identities that no workload of the node runs as any more.
    """
    workloads = list(workloads)
    managed = set(managed)
    wanted = {w.identity for w in workloads if wants_certificate(w, node)}
    in_use = {w.identity for w in workloads if w.node == node}
    return sorted(wanted - managed), sorted(managed - in_use - wanted)


class CertFetcher:
    """Keeps the IdentityManager's set of identities in step with the node's workloads."""

    def __init__(self, node: str, identities: IdentityManager, tls: WorkloadTls | None = None) -> None:
        self.node = node
        self.identities = identities
        self.tls = tls

    def update(self, state: ProxyState) -> tuple[list[Identity], list[Identity]]:
        prefetch, forget = certificate_changes(state.workloads.values(), self.node, self.identities.identities())
        for identity in prefetch:
            try:
                self.identities.prefetch(identity)
            except ValueError as e:  # another trust domain: not ours to ask for
                log.warning("not prefetching %s: %s", identity, e)
        for identity in forget:
            self.identities.forget(identity)
            if self.tls is not None:
                self.tls.forget(identity)
        return prefetch, forget
