#!/usr/bin/env bash
# A plausible mistake: relax default's mTLS to PERMISSIVE (legacy works, and so does everyone else).
set -euo pipefail
cat <<'YAML' | ambient-lab apply -f -
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec:
  mtls: {mode: PERMISSIVE}
YAML
