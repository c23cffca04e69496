#!/usr/bin/env bash
# A plausible mistake: the Service's ClusterIP and port, the address curl dialled.
set -euo pipefail
ip=$(ambient-lab get svc productpage | awk 'NR == 2 {print $3}')
ambient-lab ex answer 08 "$ip:9080"
