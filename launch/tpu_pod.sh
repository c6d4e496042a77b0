#!/usr/bin/env bash
# Usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG [--config.a.b=value ...]
#
# Runs the same training command on every worker of a Cloud TPU VM slice (v4/v5p/v5e/v6e
# pods included). Each worker runs one process; searchr1_jax.parallel.initialize() finds the
# other workers through the TPU runtime (jax.distributed.initialize() with no arguments),
# and the mesh spans the chips of all workers. Only process 0 logs and writes shared files.
#
# Arguments after CONFIG are passed through unchanged to every worker, e.g.
#   launch/tpu_pod.sh my-v5p-32 us-east5-a configs/qwen7b_ppo.py \
#       --config.mesh.preset=fsdp --config.trainer.output_dir=gs://bucket/run1
#
# Environment (optional):
#   PROJECT   gcloud project (default: gcloud's configured project)
#   REPO_DIR  checkout of this repository on the workers (default: ~/searchr1_jax); it must
#             be the same code on every worker, installed with `pip install -e .`
#   PYTHON    interpreter on the workers (default: python3)
# Start the retrievers first (see launch/retriever_per_node.sh) when the config uses HTTP.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,18p' "$0" >&2
  exit 2
fi
TPU_NAME=$1
ZONE=$2
CONFIG=$3
shift 3

REPO_DIR=${REPO_DIR:-'~/searchr1_jax'}
PYTHON=${PYTHON:-python3}

# Quote every argument for the remote shell so values with spaces survive the ssh hop.
remote_args=$(printf '%q ' "--config=${CONFIG}" "$@")

gcloud compute tpus tpu-vm ssh "${TPU_NAME}" \
  --zone="${ZONE}" ${PROJECT:+--project="${PROJECT}"} \
  --worker=all \
  --command="cd ${REPO_DIR} && ${PYTHON} -m searchr1_jax.train ${remote_args}"
