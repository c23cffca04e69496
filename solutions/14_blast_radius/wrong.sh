#!/usr/bin/env bash
# A plausible mistake: every meshed pod of the lab, not only those on worker2.
set -euo pipefail
pods=$(ambient-lab get pods -o wide | awk '$NF == "enabled" {print $1}' | paste -sd, -)
ambient-lab ex answer 14 "$pods"
