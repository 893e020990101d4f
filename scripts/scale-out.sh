#!/usr/bin/env bash
# The scale-out proof with a longer load: a 3-node NATS cluster, two of every service, two
# gateways; kill -9 of a NATS node, a replica of each service and a gateway under load. Prints
# the figures (calls answered, metered once, lost, doubled, quota overshoot). Usage:
#   scripts/scale-out.sh [calls per phase, default 200]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${VENV:-.venv}/bin
scripts/test-services.sh
STEWARD_SCALE_OUT_CALLS=${1:-200} "$BIN/pytest" tests/e2e/test_scale_out.py \
  -p no:randomly --no-cov -q -s -o addopts="" | grep --line-buffered -E "scale-out chaos|passed|failed|Error"
