"""The lab supervisor: one process per lab that owns its namespaces and processes, plays the
Kubernetes parts (kind, kubelets, kube-proxy, the API server the CLI and TUI talk to), and
collects every component's events (`server`, `components`, `stepping`, `client`)."""
