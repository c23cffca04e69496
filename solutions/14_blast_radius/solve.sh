#!/usr/bin/env bash
# Which meshed pods run on worker2 (their listeners belong to its ztunnel), then restart it.
set -euo pipefail
node="$AMBIENT_LAB-worker2"
pods=$(ambient-lab get pods -o wide | awk -v n="$node" '$7 == n && $NF == "enabled" {print $1}' | paste -sd, -)
ambient-lab ex answer 14 "$pods"
ambient-lab restart ztunnel worker2
