#!/usr/bin/env bash
# Exercise 01, as a learner would solve it (AMBIENT_LAB names the exercise's lab).
set -euo pipefail
ambient-lab label namespace default istio.io/dataplane-mode=ambient
ambient-lab get pods -o wide
ambient-lab exec deploy/curl -- curl -s -o /dev/null -w '%{http_code}\n' http://productpage:9080/productpage
ambient-lab ztunnel-config workloads
