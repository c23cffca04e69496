#!/usr/bin/env bash
# HBONE arrives on 15008: the policy must admit it from the same peers.
set -euo pipefail
ambient-lab apply -f "$(dirname "$0")/policy.yaml"
