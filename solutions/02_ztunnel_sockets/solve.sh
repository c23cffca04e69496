#!/usr/bin/env bash
# Exercise 02: read the owner of 15001 inside productpage's pod, as a learner would.
set -euo pipefail
pod=$(ambient-lab get pods -o name | grep '^pod/productpage-' | head -1)
netns="$AMBIENT_LAB-default-${pod#pod/}"
ip netns exec "$netns" ss -tlnp 'sport = :15001'
pid=$(ip netns exec "$netns" ss -tlnpH 'sport = :15001' | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)
ps -o pid,comm,args -p "$pid"
ambient-lab ex answer 02 "$pid"
