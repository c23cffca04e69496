"""ztunnel, ambient mode's node proxy (istio/ztunnel), laid out like the real source so that both
can be read side by side: `inpod/` (ZDS and sockets inside pods), `proxy/` (outbound, inbound,
inbound_passthrough, pool, connection_manager), `state` and `rbac`, `xds/`, `identity_manager`,
`metrics`, `access_log`, `admin`, `stepper` (the lab's step mode), `main` (the process)."""
