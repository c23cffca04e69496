#!/usr/bin/env bash
# A plausible mistake: opt the pod out of the mesh, so that it starts (outside the mesh).
set -euo pipefail
pod=$(ambient-lab get pods -o name | grep '^pod/late-' | head -1)
ambient-lab label "$pod" istio.io/dataplane-mode=none
