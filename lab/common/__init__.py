"""The plumbing every component shares, and nothing that plays a real component.

`errors` (messages for a person: what went wrong, where, what to do), `events` (one record per
step of every flow, the spine of the TUI and `ambient-lab trace`), `state` (the lab's record of
everything it created, so that `down` removes exactly that), `netns` (entering a network
namespace, per thread), `admin_socket` (the proxies' admin endpoint, as ztunnel's and Envoy's
localhost:15000), `procname` (each process named after what it plays).
"""
