"""Kubernetes, as the lab plays it: the cluster that ambient mode runs on.

Nothing here knows Istio: like a real cluster, it only stores objects and runs pods. The mesh's
components (lab/cni, lab/ztunnel, lab/istiod, lab/waypoint) watch it and write through it.

| module | real counterpart |
|---|---|
| `model` | the Kubernetes API types the lab acts on (k8s.io/api) |
| `manifests` | `kubectl apply -f`: multi-document YAML into objects |
| `apiserver` | kube-apiserver with the Deployment, EndpointSlice and IPAM controllers |
| `scheduler` | kube-scheduler, and the pod names the ReplicaSet controller gives |
| `printers` | kube-apiserver's server-side table printing (the columns of `kubectl get`) |
| `addressing` | the network plan: kind's node network, pod CIDRs, the service CIDR |
| `cluster` | kind: the node "machines" and the network joining them |
| `kubelet` | the kubelet and the primary CNI plugin (kindnet's ptp): pod sandboxes, app processes |
| `kubeproxy` | kube-proxy in iptables mode |
| `dns` | CoreDNS behind the `kube-dns` Service (a process per node: `kube-dns`) |
"""
