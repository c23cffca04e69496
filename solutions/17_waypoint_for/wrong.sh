#!/usr/bin/env bash
# A plausible mistake: label the pod with the waypoint, though the waypoint still takes services only.
set -euo pipefail
pod=$(ambient-lab get pods -o name | grep '^pod/productpage-' | head -1)
ambient-lab label "$pod" istio.io/use-waypoint=waypoint
