#!/usr/bin/env bash
# Bind the HTTP policy to the waypoint's view of the Service (targetRefs) instead of the pods.
set -euo pipefail
ambient-lab apply -f "$(dirname "$0")/policy.yaml"
