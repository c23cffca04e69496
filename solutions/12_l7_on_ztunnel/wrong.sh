#!/usr/bin/env bash
# A plausible mistake: keep the selector and add a second, L7-free policy for curl; the first still breaks it.
set -euo pipefail
cat <<'YAML' | ambient-lab apply -f -
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: productpage-curl, namespace: default}
spec:
  selector: {matchLabels: {app: productpage}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/curl"]}}]
YAML
