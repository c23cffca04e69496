"""The mTLS settings of an HBONE connection (zt:src/tls/lib.rs, workload.rs, certificate.rs).

ztunnel (rustls) uses, on both sides:
- TLS 1.3 only (TLS 1.2 only with TLS12_ENABLED=true); ALPN `h2`;
- cipher suites TLS13_AES_256_GCM_SHA384 and TLS13_AES_128_GCM_SHA256 (no ChaCha20);
- a client certificate is required: the SOURCE workload's certificate, not ztunnel's own;
- no SNI (rustls gets a dummy server name): with Python pass `server_hostname=""` or None.

Verification is split in two, as in ztunnel:
- the chain must verify to the trust bundle (OpenSSL does it during the handshake, here with
  VERIFY_X509_STRICT);
- then identities: the client checks that one URI SAN of the server equals one of the
  expected identities (`IdentityVerifier`, "peer did not present the expected SAN"), the server
  checks that the client's trust domain is its own (`TrustDomainVerifier`).

Python's ssl cannot run custom checks inside the handshake, so the identity checks are
functions to call right after it (`verify_server_identity`, `verify_client_trust_domain`);
on failure, close the connection. The peer then sees EOF instead of a TLS alert.

What Python 3.12's ssl module can not do: restrict the TLS 1.3 cipher suites (there is no
SSL_CTX_set_ciphersuites binding; `set_ciphers` only affects TLS <= 1.2). The contexts offer
OpenSSL's default TLS 1.3 list (AES-256-GCM, ChaCha20-Poly1305, AES-128-GCM); both ends
prefer AES-256-GCM, so that is what gets negotiated between two lab proxies. If the running
Python has `SSLContext.set_ciphersuites`, the two AES-GCM suites are set with it.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Callable, Iterable

from lab.tls.certificate import WorkloadCertificate, identities_in_cert, peer_certificate
from lab.tls.identity import Identity

#: zt:src/tls/lib.rs TLS_VERSIONS / cipher suites
ALPN_H2 = "h2"
TLS13_CIPHER_SUITES = "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256"
TLS12_CIPHERS = ("ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                 "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256")

#: Whether this Python can limit TLS 1.3 to the two AES-GCM suites ztunnel allows.
CAN_RESTRICT_TLS13_SUITES = hasattr(ssl.SSLContext, "set_ciphersuites")


class PeerVerificationError(Exception):
    """The peer's certificate chained to our roots but its identity is not acceptable."""


class IdentityMismatch(PeerVerificationError):
    """The server did not present any of the identities the client expected."""

    def __init__(self, expected: Iterable[Identity], presented: Iterable[Identity]) -> None:
        self.expected = list(expected)
        self.presented = list(presented)
        super().__init__("peer did not present the expected SAN")

    def detail(self) -> str:
        return (f"expected one of {[str(i) for i in self.expected]}, "
                f"got {[str(i) for i in self.presented]}")


class TrustDomainMismatch(PeerVerificationError):
    """The client's identity is not in the server's trust domain."""

    def __init__(self, trust_domain: str, presented: Iterable[Identity]) -> None:
        self.trust_domain = trust_domain
        self.presented = list(presented)
        super().__init__(f"client identity {[str(i) for i in self.presented]} "
                         f"is not in trust domain {trust_domain!r}")


def _configure(ctx: ssl.SSLContext, cert: WorkloadCertificate, roots_pem: bytes,
               keylog_filename: str | os.PathLike[str] | None, tls12_enabled: bool) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2 if tls12_enabled else ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    if tls12_enabled:
        ctx.set_ciphers(TLS12_CIPHERS)
    if CAN_RESTRICT_TLS13_SUITES:
        ctx.set_ciphersuites(TLS13_CIPHER_SUITES)  # Python versions that bind it
    ctx.set_alpn_protocols([ALPN_H2])
    ctx.check_hostname = False          # identity comes from the URI SAN, checked by us
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cadata=roots_pem.decode("ascii"))
    # load_cert_chain only reads files: write them in a private temporary directory and
    # remove them once loaded (the key stays in the context's memory).
    with tempfile.TemporaryDirectory(prefix="ambient-lab-cert-") as tmp:
        cert_path, key_path = cert.write_files(tmp)
        ctx.load_cert_chain(cert_path, key_path)
    if keylog_filename is not None:
        # NSS key log format, for Wireshark/tshark to decrypt the HBONE traffic.
        ctx.keylog_filename = os.fspath(keylog_filename)


def server_context(cert: WorkloadCertificate, roots_pem: bytes, *,
                   keylog_filename: str | os.PathLike[str] | None = None,
                   tls12_enabled: bool = False) -> ssl.SSLContext:
    """The context of an inbound HBONE listener (port 15008) presenting `cert`, the certificate
    of the DESTINATION workload. Client certificates are required and verified against
    `roots_pem`; call `verify_client_trust_domain` after the handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _configure(ctx, cert, roots_pem, keylog_filename, tls12_enabled)
    ctx.num_tickets = 0  # no session resumption (ztunnel disables it)
    return ctx


def client_context(cert: WorkloadCertificate, roots_pem: bytes, *,
                   keylog_filename: str | os.PathLike[str] | None = None,
                   tls12_enabled: bool = False) -> ssl.SSLContext:
    """The context of an outbound HBONE connection presenting `cert`, the certificate of the
    SOURCE workload. Wrap with `server_hostname=""` (no SNI, like ztunnel); call
    `verify_server_identity` after the handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _configure(ctx, cert, roots_pem, keylog_filename, tls12_enabled)
    return ctx


def match_server_identity(presented: list[Identity], expected: list[Identity]) -> Identity | None:
    """The decision inside zt `IdentityVerifier` (pure): the first SPIFFE identity the server
    presented that EXACTLY equals one the client expected, or None. Not a prefix, not a trust
    domain: `sa/productpage-evil` is not `sa/productpage`."""
    for identity in presented:
        if identity in expected:
            return identity
    return None


def verify_server_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket, expected: Iterable[Identity],
                           match: Callable[[list[Identity], list[Identity]], Identity | None] = match_server_identity
                           ) -> Identity:
    """Client side (zt `IdentityVerifier`): one SPIFFE URI SAN of the server's certificate must
    exactly equal one of `expected` (the destination workload's identity plus the service's
    subject_alt_names). Returns the matching identity; raises IdentityMismatch otherwise.
    `match` is the decision (a learner's, in the identity exercise)."""
    wanted = list(expected)
    presented = identities_in_cert(peer_certificate(ssl_object))
    found = match(presented, wanted)
    if found is None:
        raise IdentityMismatch(wanted, presented)
    return found


def verify_client_trust_domain(ssl_object: ssl.SSLObject | ssl.SSLSocket,
                               trust_domain: str) -> Identity:
    """Server side (zt `TrustDomainVerifier`): the client's certificate must carry a SPIFFE
    identity in `trust_domain`, the server's own. Returns that identity; raises
    TrustDomainMismatch otherwise (also when the certificate has no SPIFFE URI SAN)."""
    presented = identities_in_cert(peer_certificate(ssl_object))
    for identity in presented:
        if identity.trust_domain == trust_domain:
            return identity
    raise TrustDomainMismatch(trust_domain, presented)
