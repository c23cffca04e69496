"""Workload certificates as ztunnel holds them (zt:src/tls/certificate.rs, zt:src/identity/manager.rs).

A `WorkloadCertificate` is what istiod returned for one identity: the chain (leaf first, root
last) plus the private key ztunnel generated. ztunnel reads from it:
- the validity window and its half-life, when rotation is due (`refresh_at`);
- the identity in the leaf's URI SAN, which must equal the identity it asked for.

`peer_identity` reads the other side's identity from a finished TLS connection, like ztunnel's
`identity_from_connection`: the first URI SAN of the peer's leaf that parses as a SPIFFE ID.

`CertificateStore` is the per-node cache (ztunnel's SecretManager state): one current
certificate per identity, plus the previous one kept until it expires, so rotation never
leaves a connection without a certificate.
"""

from __future__ import annotations

import os
import re
import ssl
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from lab.tls.identity import Identity


class NoPeerIdentity(ValueError):
    """The peer presented no certificate, or no URI SAN that parses as a SPIFFE ID."""


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _aware(moment: datetime | None) -> datetime:
    if moment is None:
        return _utcnow()
    if moment.tzinfo is None:
        raise ValueError("use timezone-aware datetimes (e.g. datetime.now(timezone.utc))")
    return moment


def identities_in_cert(cert: x509.Certificate) -> list[Identity]:
    """All SPIFFE identities in a certificate's URI SANs, in order (zt `tls::certificate::identities`).

    URIs that do not parse as SPIFFE workload IDs, and non-URI SANs, are skipped, as ztunnel does.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    found = []
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        try:
            found.append(Identity.parse(uri))
        except ValueError:
            continue
    return found


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> x509.Certificate:
    """The peer's leaf certificate of a finished handshake, parsed with cryptography.

    `getpeercert()` without binary_form returns nothing useful when the context verifies
    without hostnames; the DER form always works.
    """
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise NoPeerIdentity("peer presented no certificate")
    return x509.load_der_x509_certificate(der)


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> Identity:
    """The peer's workload identity: the first SPIFFE URI SAN of its leaf certificate
    (zt `identity_from_connection`)."""
    identities = identities_in_cert(peer_certificate(ssl_object))
    if not identities:
        raise NoPeerIdentity("peer certificate has no SPIFFE URI SAN")
    return identities[0]


def _safe(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", part) or "_"


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` atomically to `path` with mode 0600 (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass
class WorkloadCertificate:
    """One workload identity's certificate chain and private key (ztunnel's `tls::WorkloadCertificate`).

    `chain_pem` is the CA response order: leaf first, intermediates, root last.
    """

    identity: Identity
    chain_pem: list[bytes]
    key_pem: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not self.chain_pem:
            raise ValueError("certificate chain is empty")

    @classmethod
    def from_ca_response(cls, requested: Identity, chain_pem: list[bytes],
                         key_pem: bytes) -> WorkloadCertificate:
        """Accept a CA response the way ztunnel does: the leaf must carry the requested identity
        and match the private key we generated; otherwise ValueError."""
        cert = cls(requested, list(chain_pem), key_pem)
        carried = identities_in_cert(cert.leaf)
        if requested not in carried:
            raise ValueError(f"CA returned a certificate for {[str(i) for i in carried]}, "
                             f"but {requested} was requested")
        key = serialization.load_pem_private_key(key_pem, password=None)
        ours = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        theirs = cert.leaf.public_key().public_bytes(serialization.Encoding.DER,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)
        if ours != theirs:
            raise ValueError("CA returned a certificate for a different public key")
        return cert

    @cached_property
    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.chain_pem[0])

    @property
    def leaf_pem(self) -> bytes:
        return self.chain_pem[0]

    @property
    def root_pem(self) -> bytes:
        """The last certificate of the chain: the root that signed it."""
        return self.chain_pem[-1]

    @property
    def served_chain_pem(self) -> list[bytes]:
        """What goes on the wire in the TLS Certificate message: leaf and intermediates, not the
        root (the peer has its own copy of the root in its trust bundle)."""
        return self.chain_pem[:-1] if len(self.chain_pem) > 1 else list(self.chain_pem)

    @property
    def not_before(self) -> datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    @property
    def serial(self) -> str:
        """Serial number in lowercase hex."""
        return format(self.leaf.serial_number, "x")

    def refresh_at(self) -> datetime:
        """When ztunnel rotates this certificate: at half-life,
        not_before + (not_after - not_before) / 2 (zt `Certs::refresh_at`)."""
        return self.not_before + (self.not_after - self.not_before) / 2

    def is_valid(self, now: datetime | None = None) -> bool:
        """Whether `now` lies inside the validity window [not_before, not_after]."""
        moment = _aware(now)
        return self.not_before <= moment <= self.not_after

    def is_expired(self, now: datetime | None = None) -> bool:
        return _aware(now) > self.not_after

    def file_stem(self) -> str:
        """Base file name: the identity, then the serial (so a rotated cert never overwrites the
        files of the one still loaded elsewhere)."""
        i = self.identity
        return f"{_safe(i.trust_domain)}_ns_{_safe(i.namespace)}_sa_{_safe(i.service_account)}-{self.serial[:16]}"

    def write_files(self, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write the served chain and the key as PEM files (both 0600), for
        `ssl.SSLContext.load_cert_chain`, which only reads files. Returns (cert_path, key_path)."""
        target = Path(directory)
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert_path = target / f"{self.file_stem()}-cert.pem"
        key_path = target / f"{self.file_stem()}-key.pem"
        _write_private(key_path, self.key_pem)
        _write_private(cert_path, b"".join(self.served_chain_pem))
        return cert_path, key_path


@dataclass
class _Slot:
    current: WorkloadCertificate
    previous: WorkloadCertificate | None = None


class CertificateStore:
    """A ztunnel's certificates, one slot per workload identity (SecretManager's cache).

    Rotation (`put` of a newer certificate) keeps the replaced one as `previous` until it
    expires, as ztunnel keeps serving the old certificate while a refresh is pending or failing.
    """

    def __init__(self) -> None:
        self._slots: dict[Identity, _Slot] = {}
        self._lock = threading.Lock()

    def put(self, cert: WorkloadCertificate) -> WorkloadCertificate | None:
        """Install `cert` as its identity's current certificate; returns the one it replaced."""
        with self._lock:
            slot = self._slots.get(cert.identity)
            if slot is None:
                self._slots[cert.identity] = _Slot(cert)
                return None
            replaced = slot.current
            slot.previous, slot.current = replaced, cert
            return replaced

    def current(self, identity: Identity) -> WorkloadCertificate | None:
        """The newest certificate for `identity`, whatever its validity."""
        with self._lock:
            slot = self._slots.get(identity)
            return slot.current if slot else None

    def previous(self, identity: Identity, now: datetime | None = None) -> WorkloadCertificate | None:
        """The certificate replaced by the last rotation, while it has not expired."""
        moment = _aware(now)
        with self._lock:
            slot = self._slots.get(identity)
            if slot is None or slot.previous is None or slot.previous.is_expired(moment):
                return None
            return slot.previous

    def get(self, identity: Identity, now: datetime | None = None) -> WorkloadCertificate | None:
        """A certificate usable now: the current one if valid, else the previous one if valid."""
        moment = _aware(now)
        with self._lock:
            slot = self._slots.get(identity)
            if slot is None:
                return None
            for cert in (slot.current, slot.previous):
                if cert is not None and cert.is_valid(moment):
                    return cert
            return None

    def identities(self) -> list[Identity]:
        with self._lock:
            return sorted(self._slots)

    def due_for_rotation(self, now: datetime | None = None) -> list[Identity]:
        """Identities whose current certificate has reached half-life (or expired)."""
        moment = _aware(now)
        with self._lock:
            return sorted(i for i, s in self._slots.items() if s.current.refresh_at() <= moment)

    def next_refresh(self) -> datetime | None:
        """The earliest half-life among current certificates: when to wake up next."""
        with self._lock:
            return min((s.current.refresh_at() for s in self._slots.values()), default=None)

    def prune(self, now: datetime | None = None) -> list[WorkloadCertificate]:
        """Drop previous certificates that have expired; returns what was dropped."""
        moment = _aware(now)
        dropped = []
        with self._lock:
            for slot in self._slots.values():
                if slot.previous is not None and slot.previous.is_expired(moment):
                    dropped.append(slot.previous)
                    slot.previous = None
        return dropped

    def forget(self, identity: Identity) -> bool:
        """Drop every certificate of `identity` (no local workload uses it any more).
        Returns whether there was anything to forget."""
        with self._lock:
            return self._slots.pop(identity, None) is not None

    def __contains__(self, identity: object) -> bool:
        with self._lock:
            return identity in self._slots

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)
