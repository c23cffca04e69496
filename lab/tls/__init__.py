"""Workload identity on the wire (ztunnel src/tls/): SPIFFE certificates and their keys
(`certificate`), certificate signing requests (`csr`), and TLS 1.3 contexts with ALPN h2 and the
identity checks ztunnel makes after the handshake (`contexts`)."""
