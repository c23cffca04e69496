#!/usr/bin/env bash
# A plausible mistake: the service account's name where Istio expects a whole identity.
set -euo pipefail
sed 's#cluster.local/ns/default/sa/curl#curl#' "$(dirname "$0")/policy.yaml" | ambient-lab apply -f -
