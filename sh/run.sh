#!/bin/sh
# Evaluate members vs ensembles and train/evaluate the Deep Language Networks of a config.
# Usage: sh sh/run.sh [config]   (default conf/default.json; extra args go to `dln-ens run`)
set -e
cd "$(dirname "$0")/.."
conf="${1:-conf/default.json}"
[ $# -gt 0 ] && shift
exec python -m dln_ens run --conf "$conf" "$@"
