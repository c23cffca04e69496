"""One screen per view, k9s-style: the cluster, each resource, flows, a flow's timeline, a pod,
istiod, the event log, the wire; plus help and the `:` prompt."""
