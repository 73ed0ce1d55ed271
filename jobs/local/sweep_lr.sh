#!/usr/bin/env bash
# A learning-rate sweep of the demo's fine-tuning stage, from the pretraining that `make demo` left in
# outputs/demo; one MLflow run per job, side by side in <sweep dir>/mlflow.db.
#   jobs/local/sweep_lr.sh            # Hydra's basic launcher: one job after the other
#   jobs/local/sweep_lr.sh ray        # hydra-ray-launcher: the jobs as Ray tasks on a local Ray
#                                     # (RAY_ADDRESS=auto with a running cluster: on that cluster)
set -euo pipefail
cd "$(dirname "$0")/../.."
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
DEMO=$PWD/outputs/demo
LAUNCHER=()
if [[ "${1:-}" == ray ]]; then LAUNCHER=(hydra/launcher=ray_sweep); fi
.venv/bin/python -m pipeline finetune --multirun experiment=demo_finetune launcher=single init="${DEMO}/pretrain" \
  data="${DEMO}/shards/demo_finetune/train/manifest.json" val_data="${DEMO}/shards/demo_finetune/val/manifest.json" \
  train.lr=1e-4,2e-4,4e-4 hydra.sweep.dir="${PWD}/multirun/finetune_lr" "${LAUNCHER[@]}"
echo "compare: .venv/bin/mlflow ui --backend-store-uri sqlite:///${PWD}/multirun/finetune_lr/mlflow.db"
