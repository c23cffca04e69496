"""The TLS side of HBONE, per workload identity (zt:src/tls/workload.rs ``InboundAcceptor``,
``OutboundConnector``; zt:src/tls/certificate.rs).

ztunnel never speaks with its own identity on the data path. For a connection out of pod A it
presents **A's** certificate (client side); on pod B's port 15008 it presents **B's** certificate
(server side). So it keeps one TLS configuration per identity and side, built from the
certificate the IdentityManager holds for that identity, and builds a new one when that
certificate rotates (a new serial). Connections already established keep the session they
negotiated; new ones get the new certificate.

The settings themselves (TLS 1.3, ALPN h2, client certificate required, no SNI) are
lab.tls.contexts'. Each certificate is also written, with its key (0600), to the certificate
directory next to the admin socket (0700), named by identity and serial, so a learner can
``openssl x509 -noout -text -in <file>``; the files of a rotated-out certificate are removed
once a newer one exists, and all of an identity's files when it is forgotten.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from pathlib import Path

from lab.tls.certificate import WorkloadCertificate
from lab.tls.contexts import client_context, server_context
from lab.tls.identity import Identity


class WorkloadTls:
    """SSLContexts by (side, identity), rebuilt when the certificate's serial changes."""

    def __init__(self, roots_pem: bytes, *, cert_dir: str = "", keylog: str = "") -> None:
        self.roots_pem = roots_pem
        self.cert_dir = cert_dir
        self.keylog = keylog or None
        self._contexts: dict[tuple[str, Identity], tuple[str, ssl.SSLContext]] = {}
        self._files: dict[Identity, dict[str, tuple[Path, Path]]] = {}  # identity -> serial -> files
        self.built = 0  # contexts built so far (a new one per rotation and side)
        if cert_dir:
            os.makedirs(cert_dir, mode=0o700, exist_ok=True)
            os.chmod(cert_dir, 0o700)

    def client(self, cert: WorkloadCertificate) -> ssl.SSLContext:
        """The outbound context presenting `cert` (the SOURCE workload's certificate)."""
        return self._context("client", cert)

    def server(self, cert: WorkloadCertificate) -> ssl.SSLContext:
        """The inbound (15008) context presenting `cert` (the DESTINATION workload's certificate)."""
        return self._context("server", cert)

    def _context(self, side: str, cert: WorkloadCertificate) -> ssl.SSLContext:
        cached = self._contexts.get((side, cert.identity))
        if cached is not None and cached[0] == cert.serial:
            return cached[1]
        build = client_context if side == "client" else server_context
        ctx = build(cert, self.roots_pem, keylog_filename=self.keylog)
        self._contexts[(side, cert.identity)] = (cert.serial, ctx)
        self.built += 1
        self._write(cert)
        return ctx

    def _write(self, cert: WorkloadCertificate) -> None:
        """Keep the current and the previous certificate of the identity on disk."""
        if not self.cert_dir:
            return
        files = self._files.setdefault(cert.identity, {})
        if cert.serial not in files:
            files[cert.serial] = cert.write_files(self.cert_dir)
        while len(files) > 2:
            oldest = next(iter(files))
            for path in files.pop(oldest):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def files(self, identity: Identity) -> list[Path]:
        return [p for pair in self._files.get(identity, {}).values() for p in pair]

    def forget(self, identity: Identity) -> None:
        """Drop the contexts and files of an identity no local workload uses any more."""
        for side in ("client", "server"):
            self._contexts.pop((side, identity), None)
        for pair in self._files.pop(identity, {}).values():
            for path in pair:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def close(self) -> None:
        """ztunnel stops: remove every certificate and key it wrote."""
        for identity in list(self._files):
            self.forget(identity)
        self._contexts.clear()
