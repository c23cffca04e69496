"""istiod's certificate authority (is:security/pkg/server/ca/server.go, node_auth.go,
is:security/pkg/pki/ca/ca.go, is:security/pkg/pki/util/generate_cert.go).

A self-signed root (EC P-256, CA:true, keyCertSign, subject O=<trust domain>) persisted to a
directory, like istiod's `istio-ca-secret` (ca-cert.pem, ca-key.pem). It answers ztunnel's
`CreateCertificate` for workloads of ztunnel's node:

1. the CSR is valid and asks for exactly one SPIFFE identity (lab check, see lab.tls.csr);
2. node authorization (NodeAuthorizer.authenticateImpersonation): a pod running as the
   requested (namespace, service account) must be scheduled on the caller's node;
3. the CSR's identity equals the requested (impersonated) identity;
4. TTL: <= 0 means the default (24h); above the maximum (90d) is refused, as istiod does.

Istio's error to the caller is opaque ("request impersonation authentication failure");
`CertificateRefused` carries that text plus the lab's detail, so learners see why.

Leaf certificates follow GenCertFromCSR: empty subject, critical URI SAN, keyUsage
digitalSignature+keyEncipherment, EKU serverAuth+clientAuth, a random 128-bit serial, and a
NotBefore backdated by istiod's ClockSkewGracePeriod (2 minutes). Because of that backdating
the half-life of a very short certificate lies before its issue time (with 2 min grace, a TTL
under 2 min is due for rotation immediately): real istiod behaves the same; pass a smaller
`clock_skew_grace` for demos with very short TTLs.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lab.tls.csr import InvalidCSR, csr_identity, load_csr, private_key_pem
from lab.tls.identity import DEFAULT_TRUST_DOMAIN, Identity

#: is:security/pkg/cmd/constants.go DefaultWorkloadCertTTL / DefaultMaxWorkloadCertTTL
DEFAULT_WORKLOAD_CERT_TTL = timedelta(hours=24)
MAX_WORKLOAD_CERT_TTL = timedelta(days=90)
#: Self-signed root lifetime (istiod: 10 years).
ROOT_CERT_TTL = timedelta(days=3650)
#: is:security/pkg/pki/util/generate_cert.go ClockSkewGracePeriod
CLOCK_SKEW_GRACE_PERIOD = timedelta(minutes=2)

CA_CERT_FILE = "ca-cert.pem"
CA_KEY_FILE = "ca-key.pem"

#: The opaque messages istiod returns over gRPC.
IMPERSONATION_FAILURE = "request impersonation authentication failure"
CSR_SIGNING_ERROR = "CSR signing error"

#: Pods on a node, as (namespace, service account) pairs: either the pairs themselves, or a
#: function from node name to those pairs (a view on the cluster's pod list).
PodsOnNode = Callable[[str], Iterable[tuple[str, str]]] | Iterable[tuple[str, str]]


class CertificateRefused(Exception):
    """istiod refused to sign. `str()` shows Istio's opaque message and the lab's reason."""

    def __init__(self, reason: str, *, istio_message: str = IMPERSONATION_FAILURE,
                 grpc_code: str = "Unauthenticated") -> None:
        self.reason = reason
        self.istio_message = istio_message
        self.grpc_code = grpc_code
        super().__init__(f"{istio_message}: {reason}")


# ---------------------------------------------------------------------------------------------
# Pure decisions


def node_authorization_failure(requested: Identity, caller_node: str,
                               pods_on_node: Iterable[tuple[str, str]]) -> str | None:
    """Istio's node authorization (NodeAuthorizer): may a node proxy on `caller_node` get a
    certificate for `requested`? Only if at least one pod with that (namespace, service
    account) runs on that node. Returns None when allowed, else the reason."""
    wanted = (requested.namespace, requested.service_account)
    if any(tuple(pair) == wanted for pair in pods_on_node):
        return None
    return (f"no instances of {requested.namespace}/{requested.service_account} found on node "
            f"{caller_node!r}: a ztunnel may only request identities of pods on its own node")


def effective_ttl(requested: timedelta | None, default: timedelta = DEFAULT_WORKLOAD_CERT_TTL,
                  maximum: timedelta = MAX_WORKLOAD_CERT_TTL) -> timedelta:
    """istiod's TTL rule (pki/ca/ca.go sign): non-positive (or missing) means the default;
    above the maximum is refused (ValueError), not clamped."""
    if requested is None or requested <= timedelta(0):
        return default
    if requested > maximum:
        raise ValueError(f"requested TTL {requested} is greater than the max allowed TTL {maximum}")
    return requested


# ---------------------------------------------------------------------------------------------
# Certificate building


def build_root(key: ec.EllipticCurvePrivateKey, trust_domain: str,
               now: datetime | None = None, ttl: timedelta = ROOT_CERT_TTL,
               clock_skew_grace: timedelta = CLOCK_SKEW_GRACE_PERIOD) -> x509.Certificate:
    """A self-signed root: subject = issuer = O=<trust domain>, CA:true, keyCertSign."""
    now = now or datetime.now(timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - clock_skew_grace)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )


def issue_leaf(public_key, san_uri: str, issuer_cert: x509.Certificate,
               issuer_key: ec.EllipticCurvePrivateKey, ttl: timedelta,
               now: datetime | None = None,
               clock_skew_grace: timedelta = CLOCK_SKEW_GRACE_PERIOD) -> x509.Certificate:
    """Sign a workload leaf for `public_key` carrying `san_uri` (istiod GenCertFromCSR).

    No checks here: `CertificateAuthority.sign` decides whether to call it.
    """
    now = now or datetime.now(timezone.utc)
    issuer_ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(secrets.randbelow((1 << 128) - 1) + 1)  # random, < 2^128 like istiod
        .not_valid_before(now - clock_skew_grace)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=True,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san_uri)]),
                       critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
                       critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# ---------------------------------------------------------------------------------------------
# The CA


@dataclass
class CertificateAuthority:
    """istiod's self-signed CA. Build with `load_or_create(directory)`."""

    trust_domain: str
    root_key: ec.EllipticCurvePrivateKey = field(repr=False)
    root_cert: x509.Certificate
    default_ttl: timedelta = DEFAULT_WORKLOAD_CERT_TTL
    max_ttl: timedelta = MAX_WORKLOAD_CERT_TTL
    clock_skew_grace: timedelta = CLOCK_SKEW_GRACE_PERIOD

    @classmethod
    def create(cls, trust_domain: str = DEFAULT_TRUST_DOMAIN, **options) -> CertificateAuthority:
        """A new root in memory (not persisted)."""
        key = ec.generate_private_key(ec.SECP256R1())
        grace = options.get("clock_skew_grace", CLOCK_SKEW_GRACE_PERIOD)
        return cls(trust_domain, key, build_root(key, trust_domain, clock_skew_grace=grace), **options)

    @classmethod
    def load_or_create(cls, directory: str | os.PathLike[str],
                       trust_domain: str = DEFAULT_TRUST_DOMAIN, **options) -> CertificateAuthority:
        """Reload the root from `directory` (ca-cert.pem, ca-key.pem), or create and save one.

        The key file is written 0600 and the directory 0700. A reloaded root keeps its own
        trust domain (its O=); asking for another one is an error.
        """
        base = Path(directory)
        cert_path, key_path = base / CA_CERT_FILE, base / CA_KEY_FILE
        if cert_path.exists() and key_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path}: expected an EC private key")
            if key.public_key().public_numbers() != cert.public_key().public_numbers():
                raise ValueError(f"{key_path} does not match {cert_path}")
            orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
            stored_td = orgs[0].value if orgs else ""
            if stored_td != trust_domain:
                raise ValueError(f"{cert_path} is the root of trust domain {stored_td!r}, "
                                 f"not {trust_domain!r}")
            return cls(trust_domain, key, cert, **options)
        ca = cls.create(trust_domain, **options)
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca.save(base)
        return ca

    def save(self, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ca-cert.pem (0644) and ca-key.pem (0600); returns their paths."""
        base = Path(directory)
        cert_path, key_path = base / CA_CERT_FILE, base / CA_KEY_FILE
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, private_key_pem(self.root_key))
        finally:
            os.close(fd)
        cert_path.write_bytes(self.root_pem)
        return cert_path, key_path

    @property
    def root_pem(self) -> bytes:
        """The trust bundle every proxy verifies peers against (istio-ca-root-cert)."""
        return _pem(self.root_cert)

    def sign(self, csr_pem: bytes, requested: Identity, ttl: timedelta | None,
             caller_node: str, pods_on_node: PodsOnNode) -> list[bytes]:
        """istiod `CreateCertificate` for a node proxy impersonating `requested`.

        Returns the chain as PEM blocks, leaf first and root last; raises CertificateRefused.
        """
        try:
            asked = csr_identity(csr_pem)
        except InvalidCSR as exc:
            raise CertificateRefused(str(exc), istio_message=CSR_SIGNING_ERROR,
                                     grpc_code="InvalidArgument") from exc

        local = pods_on_node(caller_node) if callable(pods_on_node) else pods_on_node
        failure = node_authorization_failure(requested, caller_node, local)
        if failure is not None:
            raise CertificateRefused(failure)

        if asked != requested:
            raise CertificateRefused(
                f"the CSR asks for {asked} but the request impersonates {requested}")

        try:
            lifetime = effective_ttl(ttl, self.default_ttl, self.max_ttl)
        except ValueError as exc:
            raise CertificateRefused(str(exc), istio_message=CSR_SIGNING_ERROR,
                                     grpc_code="InvalidArgument") from exc

        csr = load_csr(csr_pem)
        leaf = issue_leaf(csr.public_key(), requested.uri, self.root_cert, self.root_key,
                          lifetime, clock_skew_grace=self.clock_skew_grace)
        return [_pem(leaf), self.root_pem]
