#!/usr/bin/env bash
# Stop the cluster that start.sh started in RUN_DIR (default /tmp/saeflow-slurm): cancel its jobs,
# then stop slurmd, slurmctld and (if start.sh started it) munged, each found only through its pid
# file. Safe to run when nothing is running.
set -uo pipefail
RUN_DIR=${1:-/tmp/saeflow-slurm}

# stop_daemon NAME PIDFILE: SIGTERM the process in PIDFILE if it is alive and really NAME
# (guards against a reused pid), wait up to 10 s, then SIGKILL.
stop_daemon() {
    local name=$1 pidfile=$2 pid
    [[ -s $pidfile ]] || return 0
    pid=$(<"$pidfile")
    if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null \
        && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]; then
        kill -TERM "$pid"
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "stop.sh: $name ($pid) ignored SIGTERM; sending SIGKILL" >&2
            kill -KILL "$pid"
        fi
    fi
    rm -f "$pidfile"
}

# Cancel leftover jobs first, so that no slurmstepd outlives slurmd.
if [[ -s $RUN_DIR/slurmctld.pid ]] && command -v squeue >/dev/null \
    && timeout 10 scontrol ping 2>/dev/null | grep -q UP; then
    jobs=$(squeue -h -t PD,R,CG,S -o %i 2>/dev/null)
    if [[ -n $jobs ]]; then
        # shellcheck disable=SC2086
        scancel --full $jobs
        for _ in $(seq 150); do
            [[ -z $(squeue -h -t PD,R,CG,S -o %i 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
fi
stop_daemon slurmd "$RUN_DIR/slurmd.pid"
stop_daemon slurmctld "$RUN_DIR/slurmctld.pid"
if [[ -e $RUN_DIR/munged.ours ]]; then
    stop_daemon munged /run/munge/munged.pid
    rm -f "$RUN_DIR/munged.ours"
fi
exit 0
