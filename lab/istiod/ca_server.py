"""istiod's CreateCertificate service (is:security/pkg/server/ca/server.go, node_auth.go).

ztunnel asks for one certificate per workload identity on its node, on the same TLS port as
xDS (15012). The lab's request carries the node's token instead of a Kubernetes JWT:

1. authenticate: the token names the caller's node (a ztunnel is trusted for its node only);
2. the identity wanted is `metadata.ImpersonatedIdentity` (ztunnel is a node proxy: it always
   asks on behalf of a workload);
3. `CertificateAuthority.sign` checks the CSR, node authorization (a non-Failed pod of that
   namespace/service account must run on the caller's node, per the latest cluster snapshot)
   and the TTL, then signs.

The answer is a `CreateCertificateResponse`: the chain (leaf first, root last) or an error;
one event per decision, `istiod.csr.signed` or `istiod.csr.refused`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from cryptography import x509

from lab.istiod.ca import CertificateAuthority, CertificateRefused
from lab.proto.xds import CreateCertificateRequest, CreateCertificateResponse
from lab.tls.identity import Identity

IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
AUTHENTICATION_FAILURE = "authentication failure"


def pods_on_node(snapshot: dict | None, node: str) -> list[tuple[str, str]]:
    """The (namespace, service account) of every non-Failed pod scheduled on `node`: the
    index istiod's node authorizer keeps ({SA, node})."""
    return [(p["namespace"], p.get("service_account") or "default")
            for p in (snapshot or {}).get("pods", [])
            if p.get("node") == node and p.get("phase") != "Failed"]


@dataclass
class CaServer:
    """Answers CreateCertificateRequests. `authenticate(token)` returns the caller's node or None;
    `snapshot()` the latest cluster snapshot (None before the first one); `emit(kind, msg, **fields)`
    records an event; `log(level, scope, msg)` writes istiod's log."""

    ca: CertificateAuthority
    authenticate: Callable[[str], str | None]
    snapshot: Callable[[], dict | None]
    emit: Callable[..., Any]
    log: Callable[[str, str, str], None]

    def create_certificate(self, req: CreateCertificateRequest, peer: str = "") -> CreateCertificateResponse:
        node = self.authenticate(req.token)
        wanted = (req.metadata or {}).get(IMPERSONATED_IDENTITY, "")
        if node is None:
            return self._refuse(wanted, "", f"{AUTHENTICATION_FAILURE}: the token is not a node's token", peer)
        if not wanted:
            return self._refuse(wanted, node, f"{AUTHENTICATION_FAILURE}: no {IMPERSONATED_IDENTITY} in the "
                                "request metadata (a node proxy always asks for a workload's identity)", peer)
        try:
            requested = Identity.parse(wanted)
        except ValueError as exc:
            return self._refuse(wanted, node, str(CertificateRefused(str(exc))), peer)
        snap = self.snapshot()
        if snap is None:
            return self._refuse(wanted, node, str(CertificateRefused("istiod has not synced the cluster yet")), peer)
        ttl = timedelta(seconds=req.validity_duration) if req.validity_duration > 0 else None
        try:
            chain = self.ca.sign(req.csr.encode(), requested, ttl, node, pods_on_node(snap, node))
        except CertificateRefused as exc:
            return self._refuse(wanted, node, str(exc), peer)
        leaf = x509.load_pem_x509_certificate(chain[0])
        serial = format(leaf.serial_number, "x")
        not_after = leaf.not_valid_after_utc.isoformat()
        self.log("info", "ca", f"generated new certificate for {wanted} (node {node}), serial {serial}, "
                         f"expires {not_after}")
        self.emit("istiod.csr.signed", f"istiod signed a certificate for {wanted}, asked by the ztunnel of {node}",
                  identity=wanted, node=node, serial=serial, not_after=not_after)
        return CreateCertificateResponse(cert_chain=[pem.decode() for pem in chain])

    def _refuse(self, identity: str, node: str, error: str, peer: str) -> CreateCertificateResponse:
        self.log("warn", "ca", f"CSR from {node or peer or 'unknown caller'} for {identity or '?'} refused: {error}")
        self.emit("istiod.csr.refused", f"istiod refused a certificate for {identity or '?'}: {error}",
                  identity=identity, node=node, reason=error)
        return CreateCertificateResponse(error=error)
