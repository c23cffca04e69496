#!/usr/bin/env bash
# The Service (or the whole namespace) must name the waypoint it uses.
set -euo pipefail
ambient-lab label service productpage istio.io/use-waypoint=waypoint
ambient-lab ztunnel-config services
