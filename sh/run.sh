#!/bin/sh
# Evaluate members vs ensembles and train/evaluate the Deep Language Networks of a config.
# Usage: sh sh/run.sh [config] [options]   (default conf/default.json; extra args go to `dln-ens run`)
set -e
cd "$(dirname "$0")/.."
conf=conf/default.json
case "${1:-}" in -*|"") ;; *) conf="$1"; shift ;; esac
exec python -m dln_ens run --conf "$conf" "$@"
