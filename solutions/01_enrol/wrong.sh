#!/usr/bin/env bash
# A plausible mistake: a label value that reads right but is not the one istio-cni selects.
set -euo pipefail
ambient-lab label namespace default istio.io/dataplane-mode=enabled
