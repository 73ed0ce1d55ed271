#!/usr/bin/env bash
# A local MLflow tracking server (what a cluster would have), then the demo logging to it:
#   jobs/local/mlflow_server.sh            # server on http://127.0.0.1:5000, store in outputs/mlflow_server
# Stop it with Ctrl-C (the server runs in its own process group and is stopped with it).
set -euo pipefail
cd "$(dirname "$0")/../.."
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
STORE=$PWD/outputs/mlflow_server
mkdir -p "${STORE}"
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid .venv/bin/mlflow server --host 127.0.0.1 --port 5000 \
  --workers 1 --backend-store-uri "sqlite:///${STORE}/mlflow.db" --artifacts-destination "${STORE}/artifacts" &
SERVER=$!
trap 'kill -- -${SERVER} 2>/dev/null || true' EXIT
until curl -sf http://127.0.0.1:5000/health >/dev/null; do sleep 1; done
.venv/bin/python -m pipeline run tracking.uri=http://127.0.0.1:5000 out=outputs/demo_server "$@"
echo "MLflow UI: http://127.0.0.1:5000 (Ctrl-C stops the server)"
wait "${SERVER}"
