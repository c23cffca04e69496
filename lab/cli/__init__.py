"""`ambient-lab`, the command-line client: kubectl- and istioctl-shaped.

`main` (the commands), `ztunnel_config` (istioctl's `ztunnel-config` tables), `doctor` (can this
machine run the lab?). Like kubectl, it only talks to the lab (its supervisor's socket, the
components' admin sockets, the kernel); the core never imports it.
"""
