"""The waypoint: ambient mode's L7 proxy (in Istio, an Envoy configured by istiod).

A Service labelled `istio.io/use-waypoint` gets its traffic through the waypoint: the source
ztunnel tunnels to it (HBONE, authority = the Service VIP:port), the waypoint parses HTTP,
applies L7 AuthorizationPolicy and HTTPRoute, and opens a new HBONE tunnel, with its own
identity, to the chosen backend pod (reference/istio-ambient.md §2.5, §6).

The decisions are pure modules, one concept each, so they can be read (and replaced in
exercises) one at a time:

- `config`    which Services the waypoint serves, their routes, backends, policies (istiod's side);
- `authz`     L7 AuthorizationPolicy (Envoy's RBAC filter): 403 `RBAC: access denied`;
- `routes`    HTTPRoute matching and precedence, weighted backends, timeouts, retries, load balancing;
- `filters`   header modifiers, URL rewrite, mirror, redirect;
- `breaker`   DestinationRule connection pool limits (503 UO) and outlier detection;
- `telemetry` Envoy's access log line, istio_requests_total and its duration histogram, traceparent;
- `flows`     every request saved as a mitmproxy flow (`mitmdump -nr FILE` reads it).

The order a request goes through them (the waypoint process does the I/O around it):
`config.service_at(vip, port)` -> `authz.evaluate(config.policies_for(svc), attrs)` ->
`routes.route_request(svc.routes_for(port, client_ns), request, svc.backend_ref(port), rng)` ->
`filters.apply_request_filters(...)` -> `breaker` (`OutlierDetector.available`, then
`routes.pick_endpoint`, then `CircuitBreaker.acquire`) -> upstream, retried per
`decision.retry` -> `filters.apply_response_filters` -> `telemetry` and `flows`.
"""
