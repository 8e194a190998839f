#!/usr/bin/env bash
# Load test raymoe: start `raymoe serve` (tiny model, free port) or target --host URL, run locust headless,
# stop what was started, print p50/p90/p99 TTFT/TPOT/ITL/E2EL, output tok/s and goodput.
# Same behaviour and flags as `raymoe loadtest` (see loadtest/README.md), e.g.:
#   loadtest/run.sh -u 8 -t 30s
#   loadtest/run.sh -u 1,8,32,64 -t 30s --out /tmp/sweep
#   loadtest/run.sh --scenario loadtest/scenarios/chat_stream.yaml --host http://127.0.0.1:8000
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's raymoe, installed or not
exec "${PYTHON:-python}" -m raymoe.loadtest "$@"
