#!/usr/bin/env bash
# Usage: launch/retriever_per_node.sh INDEX [PORT] [extra server flags ...]
#
# Starts one retriever HTTP server on this node, bound to 127.0.0.1:PORT (default 8000),
# waits until it accepts connections, then stays in the foreground until the server exits.
# Run it once per node; every training process then talks to the server of its own node
# (retriever URL http://127.0.0.1:PORT), so no retrieval traffic crosses the network.
#
#   SLURM (inside an allocation; launch/slurm_gpu.sbatch does this when RETRIEVER_INDEX is set):
#     srun --overlap --ntasks-per-node=1 launch/retriever_per_node.sh /data/wiki18_bm25 8000 &
#   TPU pod (every worker, in the background):
#     gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command=\
#       "cd ~/searchr1_jax && nohup launch/retriever_per_node.sh /data/wiki18_bm25 > retriever.log 2>&1 &"
#
# Environment (optional):
#   PYTHON               interpreter (default: python3)
#   READY_TIMEOUT        seconds to wait for the server to listen (default: 1800; loading
#                        a large index takes minutes)
#   RETRIEVER_READY_DIR  when set, an empty file named after this host is created there once
#                        the server listens (a shared directory lets a launcher wait for all nodes)
set -euo pipefail

if [[ $# -lt 1 ]]; then
  sed -n '2,20p' "$0" >&2
  exit 2
fi
INDEX=$1
PORT=${2:-8000}
shift $(( $# >= 2 ? 2 : 1 ))
PYTHON=${PYTHON:-python3}
READY_TIMEOUT=${READY_TIMEOUT:-1800}

"${PYTHON}" -m searchr1_jax.retrieval.server --index "${INDEX}" --host 127.0.0.1 --port "${PORT}" "$@" &
server_pid=$!
trap 'kill "${server_pid}" 2>/dev/null || true' INT TERM

waited=0
until (exec 3<>"/dev/tcp/127.0.0.1/${PORT}") 2>/dev/null; do
  if ! kill -0 "${server_pid}" 2>/dev/null; then
    echo "retriever on $(hostname) exited before listening on port ${PORT}" >&2
    wait "${server_pid}"
    exit 1
  fi
  if (( waited >= READY_TIMEOUT )); then
    echo "retriever on $(hostname) not listening on port ${PORT} after ${READY_TIMEOUT}s" >&2
    kill "${server_pid}"
    exit 1
  fi
  sleep 2
  waited=$(( waited + 2 ))
done
echo "retriever on $(hostname) listening on 127.0.0.1:${PORT}"
if [[ -n "${RETRIEVER_READY_DIR:-}" ]]; then
  touch "${RETRIEVER_READY_DIR}/$(hostname)"
fi
wait "${server_pid}"
