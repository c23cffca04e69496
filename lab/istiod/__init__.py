"""istiod, ambient mode's control plane (istio/istio pilot/pkg/serviceregistry/ambient, security/pkg/server/ca).

- `registry`, `waypoints`, `authorization`: the cluster turned into ztunnel's resources
  (Workload, Service, Authorization), as pure functions.
- `xds_server`: delta xDS pushes with nonces and ACK/NACK; `server`: the process.
- `ca`, `ca_server`: the certificate authority and its node authorization.
- `deployment_controller`: a waypoint Gateway becomes a ServiceAccount, Deployment and Service.
"""
