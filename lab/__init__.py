"""ambient-lab: learn Istio ambient mode on real network namespaces."""
