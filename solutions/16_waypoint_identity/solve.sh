#!/usr/bin/env bash
# ztunnel at productpage now sees the waypoint: admit it at L4, and let the waypoint (which still
# knows the client) keep sleep out at L7.
set -euo pipefail
ambient-lab apply -f "$(dirname "$0")/policies.yaml"
