#!/usr/bin/env bash
# Creates bench/.venv-peers: the peers' own environment (PgQueuer, Procrastinate, matplotlib).
# None of these are dependencies of dms-worker; run the peer benchmarks and bench/plots.py with
#     bench/.venv-peers/bin/python ...
# Versions are pinned (requirements.txt, constraints.txt: what the comparison was written against);
# PEERS_UNPINNED=1 takes the latest instead, PEERS_VENV=DIR puts the environment elsewhere, --force
# installs again into an existing one.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${PEERS_VENV:-$here/.venv-peers}"
if [[ -x "$venv/bin/python" && "${1:-}" != "--force" ]]; then
    echo "peers venv present: $venv"
    exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
if [[ "${PEERS_UNPINNED:-}" == 1 ]]; then
    "$venv/bin/pip" install pgqueuer procrastinate "psycopg[binary]" asyncpg matplotlib
else
    "$venv/bin/pip" install -r "$here/peers/requirements.txt" -c "$here/peers/constraints.txt"
fi
"$venv/bin/pip" freeze | grep -iE '^(pgqueuer|procrastinate|psycopg|asyncpg|matplotlib)' || true
