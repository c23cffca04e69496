#!/usr/bin/env bash
# A plausible mistake: label the pods, though the waypoint is for services.
set -euo pipefail
pod=$(ambient-lab get pods -o name | grep '^pod/productpage-' | head -1)
ambient-lab label "$pod" istio.io/use-waypoint=waypoint
