"""A plausible wrong answer to exercise 07: a prefix match on the URI."""

from lab.tls.identity import Identity  # noqa: F401


def match_server_identity(presented, expected):
    for identity in presented:
        if any(identity.uri.startswith(e.uri) for e in expected):
            return identity
    return None
