#!/usr/bin/env bash
# A plausible mistake: the PID of the app that listens in the pod (port 9080), not of 15001's owner.
set -euo pipefail
pod=$(ambient-lab get pods -o name | grep '^pod/productpage-' | head -1)
netns="$AMBIENT_LAB-default-${pod#pod/}"
pid=$(ip netns exec "$netns" ss -tlnpH 'sport = :9080' | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)
ambient-lab ex answer 02 "$pid"
