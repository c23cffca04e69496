"""The certificate signing request a ztunnel sends to istiod (zt:src/tls/csr.rs).

For each workload identity on its node, ztunnel generates an ECDSA P-256 key and a CSR whose
subject is empty (no CN) and whose only subject alternative name is the workload's SPIFFE URI.
The private key never leaves ztunnel; istiod only sees the CSR.

`csr_identity` is the CA side: it reads the one identity a CSR asks for, and refuses anything
else (no SAN, several SANs, a DNS/IP SAN, a URI that is not a SPIFFE workload ID, a bad
signature).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lab.tls.identity import Identity


class InvalidCSR(ValueError):
    """A CSR the CA will not sign (istiod's CSRError)."""


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 private key, the key type ztunnel generates for workload certs."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM (what `ssl.SSLContext.load_cert_chain` reads)."""
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def build_csr(key: ec.EllipticCurvePrivateKey, identity: Identity) -> bytes:
    """Build a PEM CSR for `identity`: empty subject, one critical URI SAN, signed by `key`.

    The SAN is critical because the subject is empty (RFC 5280 4.2.1.6).
    """
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=True,
        )
    )
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def load_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR and check its self-signature (proof the requester holds the key)."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise InvalidCSR(f"cannot parse CSR: {exc}") from exc
    if not csr.is_signature_valid:
        raise InvalidCSR("CSR signature is not valid")
    return csr


def csr_identity(csr_pem: bytes) -> Identity:
    """The single SPIFFE identity a CSR asks for; InvalidCSR for anything else.

    Refused: no SAN extension, zero or several SANs, a SAN that is not a URI, a URI that
    does not parse as `spiffe://td/ns/<ns>/sa/<sa>`.
    """
    csr = load_csr(csr_pem)
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise InvalidCSR("CSR has no subject alternative name; exactly one SPIFFE URI is required") from None
    names = list(san)
    if len(names) != 1:
        rendered = ", ".join(_describe(n) for n in names) or "none"
        raise InvalidCSR(f"CSR must carry exactly one SAN (a SPIFFE URI), found {len(names)}: {rendered}")
    (name,) = names
    if not isinstance(name, x509.UniformResourceIdentifier):
        raise InvalidCSR(f"CSR SAN must be a URI, found {_describe(name)}")
    try:
        return Identity.parse(name.value)
    except ValueError as exc:
        raise InvalidCSR(f"CSR SAN is not a SPIFFE workload identity: {exc}") from exc


def _describe(name: x509.GeneralName) -> str:
    kind = {
        x509.UniformResourceIdentifier: "URI",
        x509.DNSName: "DNS",
        x509.IPAddress: "IP",
        x509.RFC822Name: "email",
    }.get(type(name), type(name).__name__)
    return f"{kind}:{name.value}"
