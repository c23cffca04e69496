"""In-pod mode (ztunnel src/inpod/): ZDS from istio-cni (`workload_manager`), entering a pod's
network namespace to open sockets there (`netns`), and the per-pod proxies (`statemanager`)."""
