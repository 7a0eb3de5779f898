#!/usr/bin/env bash
# The whole comparison in one run, in order, on the local PostgreSQL (127.0.0.1:5432, or
# DMS_BENCH_PG_URL), each step on a fresh dms_bench_* database:
#
#   1. peers' environment (bench/peers/setup.sh; skipped when bench/.venv-peers exists)
#   2. the database's commit rate        bench/commit_rate.py          (pgbench -N, 4 clients, 20 s)
#   3. our burn-down                     bench/burndown.py             (20,000 noop, 4 replicas x 4, then x 16 slots)
#   4. the peers' burn-down              bench/peers/pgqueuer_bench.py, bench/peers/procrastinate_bench.py
#   5. our pickup latency                bench/pickup_latency.py       (NOTIFY, then polling every 1 s)
#   6. the peers' pickup latency         (LISTEN/NOTIFY, their default)
#   7. claim latency by queue size       bench/claim_scale.py          (1,000 and 1,000,000 NEW rows)
#   8. one no-overlap job's queue        bench/no_overlap.py           (100 requests, 2 replicas)
#   9. start-up, 16 slots                bench/startup.py
#  10. failover and rescue               bench/failover.py, bench/rescue.py
#  11. plots                             bench/plots.py -> docs/img/*.png
#
#     bash bench/run_all.sh            # the real run: about 12 minutes on a quiet 2-core machine
#     QUICK=1 bash bench/run_all.sh    # small sizes, to check that everything works; plots go to
#                                      # bench/results/img instead of docs/img
#
# Results: bench/results/*.json, the full output in bench/results/run_all.log.
# Numbers are only worth publishing from a QUIET machine: nothing else running (no test suite,
# no other benchmark, no build), since every step shares the same 2 cores and the same disk.
# A failing step is reported and the run goes on; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
PEERS=bench/.venv-peers/bin/python
RESULTS=bench/results
mkdir -p "$RESULTS"
LOG="$RESULTS/run_all.log"
: >"$LOG"

if [[ "${QUICK:-}" == 1 ]]; then
    JOBS=2000 SAMPLES=50 SECONDS_PGBENCH=5 SIZES=1000,20000 CLAIMS=50 TRIALS=1 IMG="$RESULTS/img"
else
    JOBS=20000 SAMPLES=200 SECONDS_PGBENCH=20 SIZES=1000,1000000 CLAIMS=300 TRIALS=5 IMG=docs/img
fi

failed=()
say() { echo -e "$*" | tee -a "$LOG"; }
step() {
    local name="$1"; shift
    say "\n=== $name  ($(date -u +%H:%M:%S), load average: $(cut -d' ' -f1-3 /proc/loadavg))"
    say "\$ $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    if ((rc == 0)); then
        say "--- $name: ok in $((SECONDS - t0)) s"
    else
        say "--- $name: FAILED (exit $rc) after $((SECONDS - t0)) s"
        failed+=("$name")
    fi
}

[[ -x $PY ]] || { echo "no $PY: create dms-worker's venv first" >&2; exit 2; }
say "dms-worker benchmark run, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(nproc) cores, $(uname -sr)"
load1=$(cut -d' ' -f1 /proc/loadavg)
if awk "BEGIN{exit !($load1 > 1.0)}"; then
    say "WARNING: load average $load1 at start: the machine is not quiet, numbers will be low and noisy."
fi

step "peers venv"              bash bench/peers/setup.sh
step "commit rate (pgbench)"   $PY bench/commit_rate.py --clients 4 --threads 2 --seconds "$SECONDS_PGBENCH"
step "burn-down: dms-worker"   $PY bench/burndown.py --jobs "$JOBS" --replicas 4 --slots 4
step "burn-down: dms-worker 16" $PY bench/burndown.py --jobs "$JOBS" --replicas 4 --slots 16
step "burn-down: PgQueuer"     $PEERS bench/peers/pgqueuer_bench.py --scenario burndown --jobs "$JOBS" --consumers 4
step "burn-down: Procrastinate" $PEERS bench/peers/procrastinate_bench.py --scenario burndown --jobs "$JOBS" --consumers 4 --concurrency 4
step "pickup: dms-worker"      $PY bench/pickup_latency.py --samples "$SAMPLES" --poll-interval 1
step "pickup: PgQueuer"        $PEERS bench/peers/pgqueuer_bench.py --scenario pickup --samples "$SAMPLES"
step "pickup: Procrastinate"   $PEERS bench/peers/procrastinate_bench.py --scenario pickup --samples "$SAMPLES"
step "claim scale"             $PY bench/claim_scale.py --sizes "$SIZES" --claims "$CLAIMS"
step "no-overlap queue"        $PY bench/no_overlap.py --requests 100 --replicas 2
step "start-up"                $PY bench/startup.py --slots 16 --trials "$TRIALS"
step "failover"                $PY bench/failover.py --trials "$TRIALS"
step "rescue"                  $PY bench/rescue.py --trials "$TRIALS"
step "plots"                   $PEERS bench/plots.py --out "$IMG"

if ((${#failed[@]})); then
    say "\nFAILED steps: ${failed[*]}  (full output: $LOG)"
    exit 1
fi
say "\nall steps done; results in $RESULTS/, plots in $IMG/, full output in $LOG"
