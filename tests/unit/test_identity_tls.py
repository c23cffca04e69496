"""Workload identity, istiod's CA and the HBONE mTLS contexts (no root needed).

Handshakes run over socket pairs in this process: a real TLS 1.3 exchange, nothing mocked.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from lab.istiod.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CLOCK_SKEW_GRACE_PERIOD,
    IMPERSONATION_FAILURE,
    CertificateAuthority,
    CertificateRefused,
    issue_leaf,
    node_authorization_failure,
)
from lab.tls.certificate import (
    CertificateStore,
    NoPeerIdentity,
    WorkloadCertificate,
    peer_identity,
)
from lab.tls.contexts import (
    IdentityMismatch,
    TrustDomainMismatch,
    client_context,
    server_context,
    verify_client_trust_domain,
    verify_server_identity,
)
from lab.tls.csr import InvalidCSR, build_csr, csr_identity, generate_key, private_key_pem
from lab.tls.identity import DEFAULT_TRUST_DOMAIN, Identity

SLEEP = Identity.of("default", "sleep")
HTTPBIN = Identity.of("default", "httpbin")
NODE = "worker"
PODS = [("default", "sleep"), ("default", "httpbin"), ("istio-system", "ztunnel")]


# ------------------------------------------------------------------------------------ helpers

@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


def issue(ca: CertificateAuthority, identity: Identity,
          ttl: timedelta | None = None) -> WorkloadCertificate:
    """What a ztunnel does: key + CSR, CreateCertificate, check the response."""
    key = generate_key()
    chain = ca.sign(build_csr(key, identity), identity, ttl, NODE,
                    [(identity.namespace, identity.service_account)])
    return WorkloadCertificate.from_ca_response(identity, chain, private_key_pem(key))


def raw_cert(ca: CertificateAuthority, san_uri: str) -> WorkloadCertificate:
    """A leaf signed by `ca` for an arbitrary URI, bypassing the CA's checks (an attacker's or a
    misconfigured issuer's cert). WorkloadCertificate's identity is only a label here."""
    key = generate_key()
    leaf = issue_leaf(key.public_key(), san_uri, ca.root_cert, ca.root_key, timedelta(hours=1))
    return WorkloadCertificate(SLEEP, [leaf.public_bytes(serialization.Encoding.PEM), ca.root_pem],
                               private_key_pem(key))


def csr_with_sans(names: list[x509.GeneralName] | None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    csr = builder.sign(generate_key(), hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


class Handshake:
    """Server and client ends of one mTLS handshake over a socketpair (server in a thread)."""

    def __init__(self, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
        self.sockets = socket.socketpair()
        for s in self.sockets:
            s.settimeout(5)
        self.server: ssl.SSLSocket | None = None
        self.client: ssl.SSLSocket | None = None
        self.server_error: BaseException | None = None
        self.client_error: BaseException | None = None
        self.server_sent = threading.Event()
        a, b = self.sockets

        def serve() -> None:
            try:
                self.server = server_ctx.wrap_socket(a, server_side=True)
                self.server.sendall(b"hello from server")
                self.server_sent.set()
            except (ssl.SSLError, OSError) as exc:
                self.server_error = exc
                a.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            self.client = client_ctx.wrap_socket(b, server_hostname=None)  # no SNI, like ztunnel
        except (ssl.SSLError, OSError) as exc:
            self.client_error = exc
            b.close()
        thread.join(5)
        assert not thread.is_alive(), "server side of the handshake hung"

    def close(self) -> None:
        for s in (self.client, self.server, *self.sockets):
            if s is not None:
                s.close()


@pytest.fixture
def handshakes():
    made: list[Handshake] = []

    def run(server_ctx, client_ctx) -> Handshake:
        h = Handshake(server_ctx, client_ctx)
        made.append(h)
        return h

    yield run
    for h in made:
        h.close()


# ------------------------------------------------------------------------------------ SPIFFE

@pytest.mark.parametrize("uri, expected", [
    ("spiffe://cluster.local/ns/default/sa/sleep", ("cluster.local", "default", "sleep")),
    ("spiffe://example.org/ns/bookinfo/sa/bookinfo-reviews", ("example.org", "bookinfo", "bookinfo-reviews")),
    # ztunnel checks only the shape: empty segments pass its parser too.
    ("spiffe:///ns//sa/", ("", "", "")),
])
def test_spiffe_parse_accepts(uri, expected):
    identity = Identity.parse(uri)
    assert (identity.trust_domain, identity.namespace, identity.service_account) == expected
    assert str(identity) == uri


@pytest.mark.parametrize("uri, why", [
    ("", "must start with"),
    ("cluster.local/ns/default/sa/sleep", "must start with"),
    ("https://cluster.local/ns/default/sa/sleep", "must start with"),
    ("SPIFFE://cluster.local/ns/default/sa/sleep", "must start with"),
    ("spiffe:/cluster.local/ns/default/sa/sleep", "must start with"),
    ("spiffe://cluster.local/ns/default/sa/sleep/extra", "5 path parts"),
    ("spiffe://cluster.local/ns/default/sa/sleep/", "5 path parts"),
    ("spiffe://cluster.local/ns/default", "5 path parts"),
    ("spiffe://cluster.local", "5 path parts"),
    ("spiffe://cluster.local/sa/default/ns/sleep", "'ns' and 'sa'"),
    ("spiffe://cluster.local/namespace/default/sa/sleep", "'ns' and 'sa'"),
    ("spiffe://cluster.local/ns/default/serviceaccount/sleep", "'ns' and 'sa'"),
])
def test_spiffe_parse_rejects(uri, why):
    with pytest.raises(ValueError, match=why):
        Identity.parse(uri)


def test_identity_forms():
    assert SLEEP.trust_domain == DEFAULT_TRUST_DOMAIN == "cluster.local"
    assert str(SLEEP) == "spiffe://cluster.local/ns/default/sa/sleep"
    assert SLEEP.principal == "cluster.local/ns/default/sa/sleep"
    assert Identity.parse(str(SLEEP)) == SLEEP
    assert len({SLEEP, Identity("cluster.local", "default", "sleep")}) == 1
    with pytest.raises(ValueError):
        Identity("cluster.local", "default/evil", "sleep")


# ------------------------------------------------------------------------------------ CSR

def test_csr_has_one_uri_san_and_no_cn():
    key = generate_key()
    assert isinstance(key.curve, ec.SECP256R1)
    pem = build_csr(key, SLEEP)
    csr = x509.load_pem_x509_csr(pem)
    assert len(csr.subject) == 0
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(str(SLEEP))]
    assert csr_identity(pem) == SLEEP


@pytest.mark.parametrize("names, why", [
    (None, "no subject alternative name"),
    ([], "exactly one SAN"),
    ([x509.UniformResourceIdentifier(str(SLEEP)), x509.UniformResourceIdentifier(str(HTTPBIN))],
     "exactly one SAN"),
    ([x509.UniformResourceIdentifier(str(SLEEP)), x509.DNSName("sleep.default.svc")], "exactly one SAN"),
    ([x509.DNSName("sleep.default.svc")], "must be a URI"),
    ([x509.UniformResourceIdentifier("https://sleep.default/")], "not a SPIFFE"),
    ([x509.UniformResourceIdentifier("spiffe://cluster.local/sleep")], "not a SPIFFE"),
])
def test_csr_identity_refuses(names, why):
    with pytest.raises(InvalidCSR, match=why):
        csr_identity(csr_with_sans(names))


def test_csr_identity_refuses_garbage():
    with pytest.raises(InvalidCSR, match="cannot parse"):
        csr_identity(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n")


# ------------------------------------------------------------------------------------ CA

def test_root_is_persisted_and_reloaded(tmp_path):
    directory = tmp_path / "istio-ca"
    first = CertificateAuthority.load_or_create(directory)
    key_mode = stat.S_IMODE(os.stat(directory / CA_KEY_FILE).st_mode)
    assert key_mode == 0o600
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    second = CertificateAuthority.load_or_create(directory)
    assert second.root_pem == first.root_pem == (directory / CA_CERT_FILE).read_bytes()
    # the reloaded key signs leaves that chain to the first root
    cert = issue(second, SLEEP)
    first.root_cert.public_key().verify(
        cert.leaf.signature, cert.leaf.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(ValueError, match="trust domain"):
        CertificateAuthority.load_or_create(directory, trust_domain="example.org")


def test_root_certificate_shape(ca):
    root = ca.root_cert
    assert root.subject == root.issuer
    assert root.subject.rfc4514_string() == "O=cluster.local"
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    assert root.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)


def test_chain_order_and_leaf_shape(ca):
    key = generate_key()
    before = datetime.now(timezone.utc).replace(microsecond=0)
    chain = ca.sign(build_csr(key, SLEEP), SLEEP, None, NODE, PODS)
    after = datetime.now(timezone.utc)
    assert len(chain) == 2
    leaf = x509.load_pem_x509_certificate(chain[0])
    root = x509.load_pem_x509_certificate(chain[-1])
    assert chain[-1] == ca.root_pem and root.subject == root.issuer      # root last
    assert leaf.issuer == root.subject                                   # leaf first
    root.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))

    assert len(leaf.subject) == 0
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [x509.UniformResourceIdentifier(str(SLEEP))]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    assert leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value == \
        x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    # default TTL 24h, NotBefore backdated by istiod's 2-minute clock-skew grace
    assert before - CLOCK_SKEW_GRACE_PERIOD - timedelta(seconds=1) <= leaf.not_valid_before_utc
    assert leaf.not_valid_before_utc <= after - CLOCK_SKEW_GRACE_PERIOD
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert abs(lifetime - (timedelta(hours=24) + CLOCK_SKEW_GRACE_PERIOD)) <= timedelta(seconds=2)
    # serials are random
    other = x509.load_pem_x509_certificate(ca.sign(build_csr(key, SLEEP), SLEEP, None, NODE, PODS)[0])
    assert other.serial_number != leaf.serial_number


def test_ca_refuses_identity_not_on_callers_node(ca):
    key = generate_key()
    reviews = Identity.of("bookinfo", "reviews")
    with pytest.raises(CertificateRefused) as info:
        ca.sign(build_csr(key, reviews), reviews, None, NODE, PODS)
    assert info.value.istio_message == IMPERSONATION_FAILURE
    assert str(info.value).startswith("request impersonation authentication failure")
    assert "bookinfo/reviews" in info.value.reason and NODE in info.value.reason

    # pods_on_node may be a view of the cluster: node name -> (namespace, service account)
    cluster = {"worker": PODS, "worker2": [("bookinfo", "reviews")]}
    chain = ca.sign(build_csr(key, reviews), reviews, None, "worker2", lambda n: cluster.get(n, []))
    assert WorkloadCertificate.from_ca_response(reviews, chain, private_key_pem(key)).identity == reviews
    with pytest.raises(CertificateRefused):
        ca.sign(build_csr(key, reviews), reviews, None, "worker", lambda n: cluster.get(n, []))


def test_node_authorization_is_a_pure_decision():
    assert node_authorization_failure(SLEEP, NODE, PODS) is None
    assert node_authorization_failure(Identity.of("other", "sleep"), NODE, PODS) is not None
    assert node_authorization_failure(SLEEP, NODE, []) is not None


def test_ca_refuses_csr_not_matching_requested_identity(ca):
    key = generate_key()
    with pytest.raises(CertificateRefused, match="CSR asks for .*sleep.* impersonates .*httpbin"):
        ca.sign(build_csr(key, SLEEP), HTTPBIN, None, NODE, PODS)


def test_ca_refuses_bad_csr(ca):
    pem = csr_with_sans([x509.UniformResourceIdentifier(str(SLEEP)), x509.DNSName("sleep")])
    with pytest.raises(CertificateRefused, match="CSR signing error.*exactly one SAN"):
        ca.sign(pem, SLEEP, None, NODE, PODS)


def test_ca_ttl_rules(ca):
    key = generate_key()
    csr = build_csr(key, SLEEP)

    def lifetime(ttl):
        leaf = x509.load_pem_x509_certificate(ca.sign(csr, SLEEP, ttl, NODE, PODS)[0])
        return leaf.not_valid_after_utc - leaf.not_valid_before_utc - CLOCK_SKEW_GRACE_PERIOD

    assert abs(lifetime(timedelta(0)) - timedelta(hours=24)) <= timedelta(seconds=2)
    assert abs(lifetime(timedelta(hours=1)) - timedelta(hours=1)) <= timedelta(seconds=2)
    assert abs(lifetime(timedelta(days=90)) - timedelta(days=90)) <= timedelta(seconds=2)
    with pytest.raises(CertificateRefused, match="greater than the max allowed TTL"):
        ca.sign(csr, SLEEP, timedelta(days=90, seconds=1), NODE, PODS)


def test_ztunnel_refuses_a_response_for_another_identity(ca):
    key = generate_key()
    chain = ca.sign(build_csr(key, SLEEP), SLEEP, None, NODE, PODS)
    with pytest.raises(ValueError, match="was requested"):
        WorkloadCertificate.from_ca_response(HTTPBIN, chain, private_key_pem(key))
    with pytest.raises(ValueError, match="different public key"):
        WorkloadCertificate.from_ca_response(SLEEP, chain, private_key_pem(generate_key()))


# ------------------------------------------------------------------------------------ strict verification

def test_leaf_passes_strict_verification(ca, handshakes):
    cert = issue(ca, SLEEP)
    server = server_context(issue(ca, HTTPBIN), ca.root_pem)
    client = client_context(cert, ca.root_pem)
    for ctx in (server, client):
        assert ctx.verify_flags & ssl.VERIFY_X509_STRICT
    h = handshakes(server, client)
    assert h.server_error is None and h.client.recv(100) == b"hello from server"

    # the same chain also passes a webpki-style verifier (what rustls in ztunnel uses)
    verifier = (PolicyBuilder().store(Store([ca.root_cert]))
                .time(datetime.now(timezone.utc)).build_client_verifier())
    verified = verifier.verify(cert.leaf, [])
    assert [str(u.value) for u in verified.subjects] == [str(SLEEP)]


def test_strict_mode_has_teeth(ca, handshakes):
    """Control: a leaf with an empty subject but a NON-critical SAN breaks RFC 5280; the strict
    contexts must refuse it, which shows the check above can fail."""
    key = generate_key()
    good = issue_leaf(key.public_key(), str(SLEEP), ca.root_cert, ca.root_key, timedelta(hours=1))
    builder = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(good.issuer)
               .public_key(key.public_key()).serial_number(good.serial_number)
               .not_valid_before(good.not_valid_before_utc).not_valid_after(good.not_valid_after_utc))
    for ext in good.extensions:
        critical = False if isinstance(ext.value, x509.SubjectAlternativeName) else ext.critical
        builder = builder.add_extension(ext.value, critical)
    bad_leaf = builder.sign(ca.root_key, hashes.SHA256())
    bad = WorkloadCertificate(SLEEP, [bad_leaf.public_bytes(serialization.Encoding.PEM), ca.root_pem],
                              private_key_pem(key))
    h = handshakes(server_context(bad, ca.root_pem), client_context(issue(ca, HTTPBIN), ca.root_pem))
    # the client refused the server's certificate inside the handshake
    assert isinstance(h.client_error, ssl.SSLCertVerificationError)
    assert not h.server_sent.is_set()


# ------------------------------------------------------------------------------------ handshakes

def test_mtls_handshake_tls13_h2_and_identities(ca, handshakes, tmp_path):
    keylog = tmp_path / "keys.log"
    server = server_context(issue(ca, HTTPBIN), ca.root_pem, keylog_filename=keylog)
    client = client_context(issue(ca, SLEEP), ca.root_pem)
    h = handshakes(server, client)
    assert h.server_error is None
    assert h.client.version() == h.server.version() == "TLSv1.3"
    assert h.client.selected_alpn_protocol() == h.server.selected_alpn_protocol() == "h2"
    assert h.client.cipher()[0] in {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"}
    # each side reads the other's workload identity from the URI SAN
    assert peer_identity(h.server) == SLEEP
    assert peer_identity(h.client) == HTTPBIN
    assert verify_server_identity(h.client, [Identity.of("default", "other"), HTTPBIN]) == HTTPBIN
    assert verify_client_trust_domain(h.server, "cluster.local") == SLEEP
    assert h.client.recv(100) == b"hello from server"
    assert "CLIENT_HANDSHAKE_TRAFFIC_SECRET" in keylog.read_text()


def test_client_cert_from_another_ca_is_rejected(ca, handshakes):
    foreign_ca = CertificateAuthority.create()
    server = server_context(issue(ca, HTTPBIN), ca.root_pem)
    # the client trusts our root, but presents a cert from a foreign CA
    client = client_context(issue(foreign_ca, SLEEP), ca.root_pem)
    h = handshakes(server, client)
    # TLS 1.3: the client's handshake "completes" before the server has judged its certificate
    assert h.client.version() == "TLSv1.3"
    assert isinstance(h.server_error, ssl.SSLError)
    assert "certificate verify failed" in str(h.server_error)
    assert not h.server_sent.is_set()
    # ... the rejection shows on the first read: an alert or EOF, never data
    try:
        data = h.client.recv(100)
    except ssl.SSLError:
        data = None
    assert not data


def test_server_san_mismatch_raises_identity_mismatch(ca, handshakes):
    h = handshakes(server_context(issue(ca, HTTPBIN), ca.root_pem),
                   client_context(issue(ca, SLEEP), ca.root_pem))
    assert h.server_error is None
    with pytest.raises(IdentityMismatch, match="^peer did not present the expected SAN$") as info:
        verify_server_identity(h.client, [Identity.of("default", "productpage")])
    assert info.value.presented == [HTTPBIN]
    # exact equality: same namespace/sa in another trust domain does not match
    with pytest.raises(IdentityMismatch):
        verify_server_identity(h.client, [Identity("example.org", "default", "httpbin")])


def test_non_spiffe_san_cert_is_rejected(ca, handshakes):
    rogue = raw_cert(ca, "https://evil.example/ns/default/sa/httpbin")
    # chained to the right root, so TLS itself accepts it ...
    h = handshakes(server_context(rogue, ca.root_pem), client_context(rogue, ca.root_pem))
    assert h.server_error is None
    # ... but neither side finds a workload identity in it
    with pytest.raises(IdentityMismatch):
        verify_server_identity(h.client, [HTTPBIN])
    with pytest.raises(TrustDomainMismatch):
        verify_client_trust_domain(h.server, "cluster.local")
    with pytest.raises(NoPeerIdentity):
        peer_identity(h.server)
    with pytest.raises(ValueError):
        WorkloadCertificate.from_ca_response(HTTPBIN, rogue.chain_pem, rogue.key_pem)


def test_client_from_another_trust_domain_is_rejected(ca, handshakes):
    stranger = Identity("example.org", "default", "sleep")
    h = handshakes(server_context(issue(ca, HTTPBIN), ca.root_pem),
                   client_context(issue(ca, stranger), ca.root_pem))
    assert h.server_error is None
    assert peer_identity(h.server) == stranger
    with pytest.raises(TrustDomainMismatch, match="example.org"):
        verify_client_trust_domain(h.server, "cluster.local")


# ------------------------------------------------------------------------------------ files

def test_write_files_private_and_named_after_identity(ca, tmp_path):
    cert = issue(ca, SLEEP)
    cert_path, key_path = cert.write_files(tmp_path / "certs")
    for p in (cert_path, key_path):
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
        assert "default" in p.name and "sleep" in p.name
    assert key_path.read_bytes() == cert.key_pem
    assert cert_path.read_bytes() == cert.leaf_pem  # the root is not sent on the wire
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path, key_path)
    assert not [p for p in Path(tmp_path / "certs").iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------ rotation

def test_rotation_half_life_and_store():
    ca = CertificateAuthority.create(clock_skew_grace=timedelta(seconds=0))
    first = issue(ca, SLEEP, ttl=timedelta(seconds=4))
    assert first.not_after - first.not_before == timedelta(seconds=4)
    assert first.refresh_at() == first.not_before + timedelta(seconds=2)
    assert first.is_valid(first.not_before) and first.is_valid(first.refresh_at())
    assert not first.is_valid(first.not_after + timedelta(seconds=1))
    assert len(first.serial) > 0 and int(first.serial, 16) == first.leaf.serial_number

    store = CertificateStore()
    assert store.put(first) is None
    assert store.due_for_rotation(first.refresh_at() - timedelta(seconds=1)) == []
    assert store.due_for_rotation(first.refresh_at()) == [SLEEP]
    assert store.next_refresh() == first.refresh_at()

    second = issue(ca, SLEEP, ttl=timedelta(seconds=4))
    assert store.put(second) is first                      # rotation
    during = first.not_after - timedelta(seconds=1)
    assert store.get(SLEEP, during) is second
    assert store.previous(SLEEP, during) is first          # old cert kept until it expires
    assert store.prune(during) == []

    later = first.not_after + timedelta(seconds=1)
    assert store.previous(SLEEP, later) is None
    assert store.prune(later) == [first]
    assert store.get(SLEEP, second.not_after + timedelta(seconds=1)) is None  # all expired

    assert SLEEP in store and len(store) == 1
    assert store.forget(SLEEP) and SLEEP not in store and store.identities() == []
    assert store.due_for_rotation(later) == []


def leaf_at(ca: CertificateAuthority, identity: Identity, now: datetime,
            ttl: timedelta) -> WorkloadCertificate:
    """A certificate issued at a chosen moment, to place validity windows exactly."""
    key = generate_key()
    leaf = issue_leaf(key.public_key(), str(identity), ca.root_cert, ca.root_key, ttl,
                      now=now, clock_skew_grace=timedelta(0))
    return WorkloadCertificate.from_ca_response(
        identity, [leaf.public_bytes(serialization.Encoding.PEM), ca.root_pem], private_key_pem(key))


def test_store_falls_back_to_previous_when_current_is_not_valid_yet(ca):
    t0 = datetime.now(timezone.utc).replace(microsecond=0)
    old = leaf_at(ca, SLEEP, t0, timedelta(hours=1))
    new = leaf_at(ca, SLEEP, t0 + timedelta(minutes=30), timedelta(hours=1))  # e.g. CA clock ahead
    store = CertificateStore()
    store.put(old)
    store.put(new)
    assert store.get(SLEEP, t0 + timedelta(minutes=10)) is old
    assert store.get(SLEEP, t0 + timedelta(minutes=40)) is new
    assert store.current(SLEEP) is new
