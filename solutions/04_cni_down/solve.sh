#!/usr/bin/env bash
# Exercise 04: the pod waits because istio-cni is down on the nodes; bring it back.
set -euo pipefail
ambient-lab get pods
ambient-lab status
ambient-lab restart istio-cni worker
ambient-lab restart istio-cni worker2
for _ in $(seq 50); do
  ambient-lab get pods | grep -q '^late-.*Running' && break
  sleep 0.2
done
ambient-lab get pods -o wide
