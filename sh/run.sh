#!/bin/sh
# Evaluate members vs ensembles and train/evaluate the Deep Language Networks of a config.
# Usage: sh sh/run.sh [config] [options]   (default conf/default.json; extra args go to `dln-ens run`)
#        NPROC=N sh sh/run.sh ...          N data-parallel processes through `accelerate launch`
#                                          (README, "Scaling out"); THREADS = torch threads per
#                                          process (default: CPU cores / N); MASTER_PORT (default: a free one)
set -e
cd "$(dirname "$0")/.."
conf=conf/default.json
case "${1:-}" in -*|"") ;; *) conf="$1"; shift ;; esac
procs="${NPROC:-1}"
case "$procs" in ''|*[!0-9]*|0) echo "sh/run.sh: NPROC must be a positive integer, got '$procs'" >&2; exit 2 ;; esac
if [ "$procs" -eq 1 ]; then
  exec python -m dln_ens run --conf "$conf" "$@"
fi
threads="${THREADS:-$(( $(nproc) / procs ))}"
[ "$threads" -ge 1 ] || threads=1
port="${MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
# --multi_gpu is accelerate's torchrun launcher; it starts N processes on CPU-only machines too
exec accelerate launch --multi_gpu --num_processes "$procs" --num_machines 1 --mixed_precision no \
  --dynamo_backend no --main_process_port "$port" --num_cpu_threads_per_process "$threads" \
  -m dln_ens run --conf "$conf" "$@"
