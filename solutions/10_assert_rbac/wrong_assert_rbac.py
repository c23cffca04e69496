"""A plausible wrong answer to exercise 10: ALLOW policies looked at before DENY ones."""

from lab.ztunnel.rbac import EXPLICITLY_DENIED, NOT_ALLOWED, Decision, matches


def assert_rbac(policies, conn):
    enforced = [p for p in policies if not p.dry_run]
    for p in enforced:
        if p.action == "ALLOW" and matches(p, conn):
            return Decision(True, f"allowed by: {p.key}", p.key)
    for p in enforced:
        if p.action == "DENY" and matches(p, conn):
            return Decision(False, EXPLICITLY_DENIED.format(key=p.key), p.key)
    if any(p.action == "ALLOW" for p in enforced):
        return Decision(False, NOT_ALLOWED, None)
    return Decision(True, "no ALLOW policy applies", None)
