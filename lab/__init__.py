"""ambient-lab: learn Istio ambient mode on real network namespaces.

The packages, each beside the real thing it plays (read them side by side):

| package | real counterpart |
|---|---|
| `kube/` | Kubernetes: kind, kube-apiserver and its controllers, kube-scheduler, kubelet, kube-proxy, CoreDNS |
| `cni/` | istio-cni: the CNI plugin and the node agent (istio/istio `cni/`) |
| `ztunnel/` | ztunnel, the node proxy (istio/ztunnel `src/`) |
| `istiod/` | istiod: registry, xDS push, CA, the waypoint deployment controller (istio/istio `pilot/`, `security/`) |
| `waypoint/` | the waypoint: Envoy with istiod's waypoint configuration |
| `hbone/` | HBONE: HTTP/2 CONNECT over mutual TLS (ztunnel `src/proxy/h2`) |
| `tls/` | SPIFFE identities, certificates, TLS contexts (ztunnel `src/tls`, `src/identity.rs`) |
| `proto/` | the messages between components: xDS and ZDS (ztunnel `proto/`) |
| `apps/` | the sample images: bookinfo, httpbin, tcp-echo, curl, sleep |
| `supervisor/` | what runs a lab: starts every component as its own process, keeps the record, collects events |
| `common/` | shared plumbing: errors, events, the state record, netns, admin sockets, process names, seams |
| `course/` | the graded exercises: manifest, checks and live hints, answers, progress, runner |
| `cli/` | the `ambient-lab` command (kubectl-, istioctl-shaped): a client |
| `tui/` | the terminal UI (k9s-shaped): a client |
"""
