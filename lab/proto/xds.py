"""Delta xDS, the way istiod pushes config to ztunnel, in a readable encoding.

Real ztunnel opens one gRPC stream (Delta ADS) to istiod on port 15012 over TLS and subscribes
to two resource types (zt:src/xds/types.rs):

- `type.googleapis.com/istio.workload.Address`: Workloads and Services (WDS);
- `type.googleapis.com/istio.security.Authorization`: L4 authorization policies.

istiod answers with DeltaDiscoveryResponses that carry only what changed (`resources` added or
updated, `removed_resources` by name), each stamped with a `nonce`; ztunnel ACKs a response by
sending a request whose `response_nonce` is that nonce, or NACKs it by adding `error_detail`.
Certificates are asked for on the same port with `CreateCertificate`
(istio.v1.auth.IstioCertificateService).

The lab keeps those message shapes and field names but frames them as one JSON object per line
over TLS, so that learners can read them (`ambient-lab trace` and the TUI show them). Resources
are plain dicts with the field names of workload.proto / authorization.proto.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import asdict, dataclass, field
from typing import Any

ADDRESS_TYPE = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE = "type.googleapis.com/istio.security.Authorization"
TYPE_URLS = (ADDRESS_TYPE, AUTHORIZATION_TYPE)
XDS_PORT = 15012
MAX_LINE = 16 * 1024 * 1024
#: The ALPN of the lab's istiod port: JSON lines, not gRPC's "h2".
XDS_ALPN = "istio-xds-lab"


def client_tls_context(root_pem: bytes) -> ssl.SSLContext:
    """The client side of a connection to istiod (xDS and CA), for ztunnel and the waypoint: TLS 1.3,
    istiod's certificate must chain to the mesh root (`root-cert.pem`); no hostname check (istiod is
    named by the SPIFFE URI in its certificate, checked after the handshake with
    lab.tls.contexts.verify_server_identity); no client certificate (the caller presents its
    node's token instead). Connect with server_hostname="" (no SNI)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([XDS_ALPN])
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cadata=root_pem.decode("ascii"))
    return ctx


@dataclass
class DeltaDiscoveryRequest:
    """ztunnel -> istiod: subscribe (first request of a type), ACK (response_nonce) or NACK (+ error_detail)."""

    type_url: str
    node: dict[str, Any] = field(default_factory=dict)  # {"id": ..., "metadata": {"NODE_NAME": ...}}
    resource_names_subscribe: list[str] = field(default_factory=lambda: ["*"])
    initial_resource_versions: dict[str, str] = field(default_factory=dict)
    response_nonce: str = ""
    error_detail: str = ""
    token: str = ""  # the lab's stand-in for ztunnel's service-account token (first request only)
    type: str = "DeltaDiscoveryRequest"


@dataclass
class Resource:
    name: str  # Workload: uid; Service: "namespace/hostname"; Authorization: "namespace/name"
    version: str
    resource: dict[str, Any]


@dataclass
class DeltaDiscoveryResponse:
    """istiod -> ztunnel: what changed since the last response of this type."""

    type_url: str
    system_version_info: str
    nonce: str
    resources: list[Resource] = field(default_factory=list)
    removed_resources: list[str] = field(default_factory=list)
    type: str = "DeltaDiscoveryResponse"


@dataclass
class CreateCertificateRequest:
    """ztunnel -> istiod's CA: a CSR for one workload identity, authenticated by the node's credential."""

    csr: str  # PEM
    validity_duration: int  # seconds
    metadata: dict[str, str] = field(default_factory=dict)  # {"ImpersonatedIdentity": "spiffe://..."}
    token: str = ""
    type: str = "CreateCertificateRequest"


@dataclass
class CreateCertificateResponse:
    cert_chain: list[str] = field(default_factory=list)  # PEM, leaf first, root last
    error: str = ""
    type: str = "CreateCertificateResponse"


MESSAGES = {c.__name__: c for c in (DeltaDiscoveryRequest, DeltaDiscoveryResponse, CreateCertificateRequest,
                                    CreateCertificateResponse)}


class XdsProtocolError(ValueError):
    pass


def encode(msg: Any) -> bytes:
    return (json.dumps(asdict(msg), separators=(",", ":")) + "\n").encode()


def decode(line: bytes) -> Any:
    """One line -> one message object; anything else raises XdsProtocolError."""
    try:
        d = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise XdsProtocolError(f"not JSON: {e}") from None
    if not isinstance(d, dict) or d.get("type") not in MESSAGES:
        raise XdsProtocolError(f"unknown message type {d.get('type') if isinstance(d, dict) else type(d).__name__!r}")
    cls = MESSAGES[d["type"]]
    try:
        if cls is DeltaDiscoveryResponse:
            d = {**d, "resources": [Resource(**r) for r in d.get("resources", [])]}
        return cls(**d)
    except TypeError as e:
        raise XdsProtocolError(f"bad {d['type']}: {e}") from None


def message_size(msg: Any) -> int:
    return len(encode(msg))
