#!/usr/bin/env bash
set -euo pipefail
ambient-lab apply -f "$(dirname "$0")/policy.yaml"
ambient-lab ztunnel-config policies
