#!/usr/bin/env bash
# Put the legacy client in the mesh: its traffic then carries its own identity over HBONE.
set -euo pipefail
ambient-lab label namespace legacy istio.io/dataplane-mode=ambient
ambient-lab get pods -n legacy -o wide
