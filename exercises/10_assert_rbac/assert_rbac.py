"""Exercise 10: ztunnel's L4 authorization (istio/ztunnel src/state.rs, assert_rbac).

`policies` are the Authorizations that apply to the destination pod; each has `.action`
("ALLOW" or "DENY"), `.key` ("namespace/name") and `.dry_run`. `matches(policy, conn)` tells
whether one of the policy's rules matches the connection. Return a Decision:
`Decision(allowed, reason, policy_key_or_None)`.
"""

from lab.ztunnel.rbac import EXPLICITLY_DENIED, NOT_ALLOWED, Decision, matches  # noqa: F401


def assert_rbac(policies, conn):
    # TODO: decide in Istio's order. Today everything is allowed, whatever the policies say.
    return Decision(True, "allowed by the learner's stub", None)
