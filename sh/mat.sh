#!/bin/sh
# Build the zoo (if missing) and the relative-representation matrices of every ensemble.
# Usage: sh sh/mat.sh [config] [options]   (default conf/default.json; extra args go to `dln-ens mat`)
set -e
cd "$(dirname "$0")/.."
conf=conf/default.json
case "${1:-}" in -*|"") ;; *) conf="$1"; shift ;; esac
exec python -m dln_ens mat --conf "$conf" "$@"
