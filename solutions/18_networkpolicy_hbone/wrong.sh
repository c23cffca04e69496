#!/usr/bin/env bash
# A plausible mistake: admit 15001, ztunnel's outbound port, rather than 15008, its inbound HBONE port.
set -euo pipefail
sed 's/port: 15008/port: 15001/' "$(dirname "$0")/policy.yaml" | ambient-lab apply -f -
