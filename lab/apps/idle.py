"""The ``curl`` and ``sleep`` pods: ``command: ["/bin/sleep", "infinity"]``.

In Istio's samples these pods only keep a network namespace alive so that a learner can
``kubectl exec deploy/curl -- curl ...`` from inside it. Here the learner uses the host's real
curl through ``ambient-lab exec`` (``ip netns exec`` into the pod). The process opens no socket
and imports nothing heavy: it blocks until SIGTERM (or SIGINT) and exits 0.
"""

from __future__ import annotations

import signal

from lab.apps import AppOptions

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def main(options: AppOptions) -> int:
    # Block the stop signals, then wait for one synchronously: no handler, no event loop.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    print(f"{options.pod or 'idle'}: sleeping until terminated", flush=True)
    received = signal.sigwait(STOP_SIGNALS)
    print(f"received {signal.Signals(received).name}, exiting", flush=True)
    return 0
