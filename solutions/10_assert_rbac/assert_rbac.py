"""Solution of exercise 10: ztunnel's L4 authorization, in Istio's order."""

from lab.ztunnel.rbac import EXPLICITLY_DENIED, NOT_ALLOWED, Decision, matches


def assert_rbac(policies, conn):
    enforced = [p for p in policies if not p.dry_run]  # dry-run policies are reported, never enforced
    for p in enforced:
        if p.action == "DENY" and matches(p, conn):
            return Decision(False, EXPLICITLY_DENIED.format(key=p.key), p.key)
    allow = [p for p in enforced if p.action == "ALLOW"]
    if not allow:
        return Decision(True, "no ALLOW policy applies", None)
    for p in allow:
        if matches(p, conn):
            return Decision(True, f"allowed by: {p.key}", p.key)
    return Decision(False, NOT_ALLOWED, None)
