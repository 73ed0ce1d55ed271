#!/usr/bin/env bash
# Shard and train on a running Ray cluster: submits `python -m pipeline run` as a Ray job. The job ships this
# checkout as its working directory; on the cluster the run shards every split as Ray tasks, trains with Ray
# Train (one worker per GPU) and evaluates as a Ray task, each stage skipped when already complete in OUT.
#
#   RAY_ADDRESS=http://head:8265 OUT=/shared/dino/swinl_o365_coco jobs/ray/submit.sh
#   RAY_ADDRESS=http://head:8265 OUT=/shared/dino/r50_coco EXPERIMENT=r50_coco jobs/ray/submit.sh
#
# RAY_ADDRESS: the cluster's dashboard (jobs API); OUT: the run directory on storage every node sees.
# Extra arguments are overrides of the run (e.g. 'stages.pretrain.extra=["train.checkpoint_every=500"]').
# The datasets come from paths.* (DINO_O365_ROOT, DINO_COCO_ROOT, DINO_WEIGHTS_DIR: passed to the job when
# set here, else as set on the cluster) and the runs go to the MLflow server at MLFLOW_TRACKING_URI.
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard address of the cluster, e.g. http://head:8265}"
: "${OUT:?set OUT to the run directory on shared storage}"
: "${MLFLOW_TRACKING_URI:?set MLFLOW_TRACKING_URI to the MLflow server the cluster reaches}"
EXPERIMENT=${EXPERIMENT:-swinl_o365_coco}
cd "$(dirname "$0")/../.."
COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)
ENV_VARS="\"DINO_GIT_COMMIT\": \"${COMMIT}\", \"MLFLOW_TRACKING_URI\": \"${MLFLOW_TRACKING_URI}\", \"RAY_USAGE_STATS_ENABLED\": \"0\""
for name in DINO_O365_ROOT DINO_COCO_ROOT DINO_WEIGHTS_DIR; do
  if [[ -n "${!name:-}" ]]; then ENV_VARS+=", \"${name}\": \"${!name}\""; fi
done
RUNTIME_ENV=$(printf '{"excludes": [".venv", "outputs", "multirun", ".git", "kernels/_build"], "env_vars": {%s}}' \
  "${ENV_VARS}")
exec .venv/bin/ray job submit --address "${RAY_ADDRESS}" --working-dir . --runtime-env-json "${RUNTIME_ENV}" -- \
  python -m pipeline run experiment="${EXPERIMENT}" ray.address=auto tracking=mlflow_server out="${OUT}" "$@"
