#!/usr/bin/env bash
# The waypoint takes pod-addressed traffic too once it is for workloads as well.
set -euo pipefail
ambient-lab label gateway waypoint istio.io/waypoint-for=all --overwrite
ambient-lab ztunnel-config workloads
