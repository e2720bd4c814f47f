#!/usr/bin/env bash
# RecBole's SASRec (the field's reference implementation) on exactly xdrec's target-only split:
# full ranking, early stopping on valid NDCG@10, xdrec's `amazon` sizes. RecBole lives in a venv of
# its own (.venv-recbole: recbole 1.2.1 needs numpy<2, pandas<2.3, setuptools<81), never an xdrec
# dependency. The prepared folder is xdrec's (`xdrec prepare <experiment>`).
#   bash bench/recbole.sh data/prepared/amazon-food-kitchen kitchen docs/results/recbole-kitchen.json
#   RECBOLE_ARGS="--epochs 2" bash bench/recbole.sh ...      a short check
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RECBOLE_VENV:-.venv-recbole}
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "torch==2.13.0"
    "$VENV/bin/pip" install -q "recbole==1.2.1" "numpy<2" "pandas<2.3" "setuptools<81"
fi
exec "$VENV/bin/python" bench/recbole_sasrec.py "$@" ${RECBOLE_ARGS:-}
