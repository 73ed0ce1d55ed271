#!/usr/bin/env bash
# Drive an existing Ray cluster the way a cluster operator does, on one machine: start a Ray head, run the
# demo pipeline against it (ray.address=auto: the run joins the cluster instead of starting its own Ray),
# then stop the head. The dashboard at http://127.0.0.1:8265 shows the stages' tasks and the training runs.
#   jobs/local/ray_cluster.sh [out=outputs/demo_cluster] ...
set -euo pipefail
cd "$(dirname "$0")/../.."
# RAY_AUTH_MODE=token: the head uses token authentication (~/.ray/auth_token) and the run joins with it.
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1 RAY_AUTH_MODE=token
.venv/bin/ray start --head --port=6379 --dashboard-host=127.0.0.1 --include-dashboard=true
trap '.venv/bin/ray stop' EXIT
.venv/bin/python -m pipeline run ray.address=auto out=outputs/demo_cluster "$@"
