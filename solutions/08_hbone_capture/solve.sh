#!/usr/bin/env bash
# Capture at productpage's pod with decryption while curl calls it, then read the CONNECT's :authority.
set -euo pipefail
out=$(mktemp)
trap 'rm -f "$out"' EXIT
ambient-lab capture deploy/productpage-v1 --decrypt -c 12 > "$out" 2>/dev/null &
sleep 1.5
ambient-lab exec deploy/curl -- curl -s -o /dev/null http://productpage:9080/productpage
wait
authority=$(grep -m1 'Header: :authority:' "$out" | awk '{print $NF}')
echo "CONNECT :authority = $authority"
ambient-lab ex answer 08 "$authority"
