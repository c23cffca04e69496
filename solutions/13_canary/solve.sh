#!/usr/bin/env bash
set -euo pipefail
ambient-lab apply -f "$(dirname "$0")/route.yaml"
