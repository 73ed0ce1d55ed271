#!/usr/bin/env bash
# The embedded demo on this machine (what `make demo` runs): a local Ray, the whole pipeline, outputs/demo.
#   jobs/local/demo.sh [out=DIR] [tracking=none] [ray.dashboard=false] ...
set -euo pipefail
cd "$(dirname "$0")/../.."
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
.venv/bin/python -m pipeline run "$@"
