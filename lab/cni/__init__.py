"""istio-cni, ambient mode's node agent (istio/istio cni/pkg/nodeagent, cni/pkg/iptables).

- `iptables`, `constants`: the in-pod redirection rules as data (Istio's golden file), installed
  with python-iptables inside each pod's network namespace, and removed in Istio's order.
- `nodeagent`: the per-node process: CmdAdd/CmdDel from the chained plugin (`plugin_events`),
  enrolment (`enrolment`), the `ambient.istio.io/redirection` annotation.
- `ztunnel_server`: the ZDS server that hands each pod's network namespace to ztunnel.
"""
