#!/bin/sh
# Build the zoo (if missing) and the relative-representation matrices of every ensemble.
# Usage: sh sh/mat.sh [config]   (default conf/default.json; extra args go to `dln-ens mat`)
set -e
cd "$(dirname "$0")/.."
conf="${1:-conf/default.json}"
[ $# -gt 0 ] && shift
exec python -m dln_ens mat --conf "$conf" "$@"
