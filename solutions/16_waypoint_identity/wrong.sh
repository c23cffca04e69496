#!/usr/bin/env bash
# A plausible mistake: admit the waypoint at L4 and stop there (sleep now gets in through it).
set -euo pipefail
awk '/^---/{exit} {print}' "$(dirname "$0")/policies.yaml" | ambient-lab apply -f -
