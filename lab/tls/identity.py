"""Workload identity: the SPIFFE ID carried in every mesh certificate.

Istio names a workload by its Kubernetes service account, written as a SPIFFE ID:

    spiffe://<trust domain>/ns/<namespace>/sa/<service account>

ztunnel parses it in `src/identity/manager.rs` (`impl FromStr for Identity`), istiod in
`pkg/spiffe`. The certificate of a workload carries this URI as its only subject alternative
name; the peer's identity on an mTLS connection is read back from it, and L4
AuthorizationPolicy compares `principals` against it with the `spiffe://` prefix removed.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Istio's default trust domain (meshConfig.trustDomain), also ztunnel's default.
DEFAULT_TRUST_DOMAIN = "cluster.local"

SPIFFE_PREFIX = "spiffe://"


@dataclass(frozen=True, order=True)
class Identity:
    """A SPIFFE workload identity: trust domain, namespace and service account.

    Certificates are issued per identity (service account), not per pod: every pod running
    as `default/bookinfo-reviews` shares one identity and, on a node, one certificate.
    """

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        # A "/" inside a component could never round-trip through parse(); refuse it early.
        for field_name in ("trust_domain", "namespace", "service_account"):
            value = getattr(self, field_name)
            if not isinstance(value, str):
                raise TypeError(f"Identity.{field_name} must be a str, got {type(value).__name__}")
            if "/" in value:
                raise ValueError(f"Identity.{field_name} must not contain '/': {value!r}")

    @classmethod
    def of(cls, namespace: str, service_account: str,
           trust_domain: str = DEFAULT_TRUST_DOMAIN) -> Identity:
        """Identity of a service account in the (default) trust domain."""
        return cls(trust_domain, namespace, service_account)

    @classmethod
    def parse(cls, uri: str) -> Identity:
        """Parse `spiffe://td/ns/<ns>/sa/<sa>` exactly as ztunnel does.

        ztunnel's rules (src/identity/manager.rs): the string must start with `spiffe://`
        (case-sensitive); the rest, split on "/", must have exactly 5 parts; part 1 must be
        `ns` and part 3 `sa`. Nothing else is checked (ztunnel accepts empty segments too).
        Raises ValueError with the reason otherwise.
        """
        if not isinstance(uri, str):
            raise ValueError(f"SPIFFE identity must be a string, got {type(uri).__name__}")
        if not uri.startswith(SPIFFE_PREFIX):
            raise ValueError(f"invalid SPIFFE identity {uri!r}: must start with {SPIFFE_PREFIX!r}")
        parts = uri[len(SPIFFE_PREFIX):].split("/")
        if len(parts) != 5:
            raise ValueError(
                f"invalid SPIFFE identity {uri!r}: expected 5 path parts "
                f"<trust domain>/ns/<namespace>/sa/<service account>, got {len(parts)}")
        if parts[1] != "ns" or parts[3] != "sa":
            raise ValueError(
                f"invalid SPIFFE identity {uri!r}: expected 'ns' and 'sa' in parts 2 and 4, "
                f"got {parts[1]!r} and {parts[3]!r}")
        return cls(trust_domain=parts[0], namespace=parts[2], service_account=parts[4])

    @property
    def uri(self) -> str:
        """The SPIFFE URI, as written in the certificate's URI SAN."""
        return f"{SPIFFE_PREFIX}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """The identity without `spiffe://`: what AuthorizationPolicy `principals` match against
        (e.g. `cluster.local/ns/default/sa/sleep`, zt:src/rbac.rs)."""
        return self.uri[len(SPIFFE_PREFIX):]

    def __str__(self) -> str:
        return self.uri
