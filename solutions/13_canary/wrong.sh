#!/usr/bin/env bash
# A plausible mistake: the canary's Service misnamed (v2 for v3).
set -euo pipefail
sed 's/reviews-v3/reviews-v2/' "$(dirname "$0")/route.yaml" | ambient-lab apply -f -
