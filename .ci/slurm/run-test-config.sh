#!/usr/bin/env bash
# CI against a real SLURM cluster. Starts a one-machine cluster (start.sh), then, from the
# repository root and through the repository's slurm profile (`snakemake --profile slurm`), runs
# two checks side by side:
#
#  1. every target of config/test.yaml, built through sbatch. GPU rules (gpu=1) go to the `gpu`
#     partition and get a fake GPU. The first `saeflow.sae_eval summarize` process fails on
#     purpose, so the profile's `retries` must resubmit that job.
#  2. one job past its time limit (convert_model with runtime=1 minute, made to sleep, in its own
#     working directory); Snakemake must report SLURM's TIMEOUT.
#
# Then it stops the cluster, also when something failed (trap). Snakemake runs under
# `timeout -s INT`: a Snakemake that lost track of its jobs waits forever and ignores SIGTERM.
#
#   .ci/slurm/run-test-config.sh OUT_DIR [extra snakemake arguments for check 1]
#
# OUT_DIR receives results/ (check 1's working directory), snakemake.log, timelimit.log,
# probe.jsonl (one line per stage process: SLURM job id, partition, CUDA_VISIBLE_DEVICES; see
# probe/sitecustomize.py), jobs.txt (`scontrol -o show job` for every job), slurmctld.log,
# slurmd.log and wall_seconds. Needs root and apt (Debian 12).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
[[ $# -ge 1 ]] || { echo "usage: $0 OUT_DIR [snakemake args...]" >&2; exit 2; }
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
shift
RUN_DIR=$OUT/cluster
LIMIT=${SAEFLOW_SLURM_TIMEOUT:-1800}
START=$(date +%s)
TIMELIMIT_PID=

finish() {
    local rc=$?
    if [[ -n $TIMELIMIT_PID ]] && kill -0 "$TIMELIMIT_PID" 2>/dev/null; then
        kill -INT "$TIMELIMIT_PID" # timeout passes it on; Snakemake then cancels its jobs
        wait "$TIMELIMIT_PID" || true
    fi
    scontrol -o show job >"$OUT/jobs.txt" 2>/dev/null || true
    cp -f "$RUN_DIR/slurmctld.log" "$RUN_DIR/slurmd.log" "$OUT/" 2>/dev/null || true
    "$REPO/.ci/slurm/stop.sh" "$RUN_DIR"
    echo $(($(date +%s) - START)) >"$OUT/wall_seconds"
    echo "run-test-config.sh: exit $rc after $(<"$OUT/wall_seconds") s; evidence in $OUT" >&2
    exit "$rc"
}
trap finish EXIT

rm -f "$OUT/probe.jsonl" "$OUT/fail-once.marker" "$OUT/jobs.txt" "$OUT/wall_seconds"
"$REPO/.ci/slurm/start.sh" "$RUN_DIR"
cd "$REPO"
export PYTHONPATH=$REPO/.ci/slurm/probe${PYTHONPATH:+:$PYTHONPATH}
export SAEFLOW_CI_PROBE=$OUT/probe.jsonl
# CI-only settings: the fake cluster's partitions, quick status checks, and every job's SLURM log.
CLUSTER_ARGS=(--slurm-partition-config "$REPO/.ci/slurm/partitions.yaml"
    --slurm-init-seconds-before-status-checks 2 --slurm-keep-successful-logs)

echo "== 2. (in the background) a job past its time limit" >&2
SAEFLOW_CI_SLEEP="models convert=600" \
    timeout -s INT -k 60 600 snakemake --profile slurm --configfile config/test.yaml \
    --config workdir="$OUT/timelimit" "${CLUSTER_ARGS[@]}" --retries 0 \
    --set-resources convert_model:runtime=1 --until convert_model \
    >"$OUT/timelimit.log" 2>&1 &
TIMELIMIT_PID=$!

echo "== 1. config/test.yaml through SLURM" >&2
SAEFLOW_CI_FAIL_ONCE="sae_eval summarize=$OUT/fail-once.marker" \
    timeout -s INT -k 60 "$LIMIT" snakemake --profile slurm --configfile config/test.yaml \
    --config workdir="$OUT/results" "${CLUSTER_ARGS[@]}" "$@" 2>&1 | tee "$OUT/snakemake.log" >&2

echo "== 2. waiting for the time-limit check" >&2
rc=0
wait "$TIMELIMIT_PID" || rc=$?
TIMELIMIT_PID=
if ((rc == 0)) || ! grep -q "SLURM status is: 'TIMEOUT'" "$OUT/timelimit.log"; then
    tail -n 40 "$OUT/timelimit.log" >&2
    echo "run-test-config.sh: check 2 should have failed with SLURM status TIMEOUT (rc $rc)" >&2
    exit 1
fi
grep "TIMEOUT\|TIME LIMIT" "$OUT/timelimit.log" >&2
