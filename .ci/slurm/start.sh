#!/usr/bin/env bash
# Start a one-machine SLURM cluster for CI: munged, slurmctld and slurmd from Debian 12 packages,
# started by hand (no systemd), with two partitions (debug, the default, and gpu) on this host and
# two fake GPUs (gres backed by character devices). Each core may hold two jobs (OverSubscribe), so
# that two jobs overlap the start-up of Snakemake inside each job: a CI speed-up, nothing more.
# Background: shared/reference/slurm-on-one-machine.md (in the project's shared notes).
#
#   .ci/slurm/start.sh [RUN_DIR]     RUN_DIR (default /tmp/saeflow-slurm) gets pid files, logs,
#                                    the controller state and the fake device
#   .ci/slurm/stop.sh  [RUN_DIR]     stops what this script started, by pid file
#
# Needs root and apt. Writes /etc/slurm/slurm.conf and gres.conf, but refuses to replace ones it
# did not write. A previous cluster in RUN_DIR is stopped first, and the state is cleared, so job
# ids start again at 1.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
RUN_DIR=$(mkdir -p "${1:-/tmp/saeflow-slurm}" && cd "${1:-/tmp/saeflow-slurm}" && pwd)
NODE=$(hostname -s)
MARK="# written by saeflow .ci/slurm/start.sh"

die() { echo "start.sh: $*" >&2; exit 1; }
# running NAME: is a process called NAME alive? (/proc directly: slim images lack procps)
running() {
    local comm
    for comm in /proc/[0-9]*/comm; do
        [[ $(cat "$comm" 2>/dev/null) == "$1" ]] && return 0
    done
    return 1
}
[[ $(id -u) == 0 ]] || die "needs root"

install_packages() {
    if command -v slurmctld && command -v slurmd && command -v munged && command -v sbatch; then
        return
    fi >/dev/null
    command -v apt-get >/dev/null || die "slurm-wlm is not installed and apt-get is unavailable"
    # Debian's maintainer scripts would start the daemons through invoke-rc.d; policy-rc.d
    # exit 101 forbids that (there is no init system to start them with).
    local own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    if ! apt-cache policy slurm-wlm 2>/dev/null | grep 'Candidate: [0-9]' >/dev/null; then
        apt-get update -q
    fi
    local rc=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        munge slurm-wlm || rc=$?
    if ((own_policy)); then rm -f /usr/sbin/policy-rc.d; fi
    ((rc == 0)) || die "apt-get install munge slurm-wlm failed ($rc)"
}

start_munge() {
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
        touch "$RUN_DIR/munged.ours"  # stop.sh stops munged only if this script started it
    fi
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged does not answer (munge -n | unmunge)"
}

write_config() {
    local conf
    for conf in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
        if [[ -e $conf ]] && ! grep -qF "$MARK" "$conf"; then
            die "$conf exists and was not written by this script; not replacing it"
        fi
    done
    mkdir -p /etc/slurm "$RUN_DIR/state" "$RUN_DIR/spool"
    rm -f "$RUN_DIR"/fakegpu[01]
    # Same major/minor as /dev/null: slurmd only needs a character device to hand out.
    mknod -m 0666 "$RUN_DIR/fakegpu0" c 1 3
    mknod -m 0666 "$RUN_DIR/fakegpu1" c 1 3
    local mem_mb
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
    cat >/etc/slurm/slurm.conf <<CONF
$MARK (run dir $RUN_DIR)
ClusterName=ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
StateSaveLocation=$RUN_DIR/state
SlurmdSpoolDir=$RUN_DIR/spool
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$RUN_DIR/slurmctld.log
SlurmdLogFile=$RUN_DIR/slurmd.log
# No cgroups without systemd: track processes through /proc, bind CPUs by affinity.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
# No slurmdbd: squeue is the only status source, so finished jobs stay visible for an hour
# (Snakemake's status checks need minutes; run-test-config.sh reads every job at the end).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=3600
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$mem_mb Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE OverSubscribe=FORCE:2 State=UP
PartitionName=gpu Nodes=$NODE Default=NO MaxTime=INFINITE OverSubscribe=FORCE:2 State=UP
CONF
    cat >/etc/slurm/gres.conf <<CONF
$MARK (run dir $RUN_DIR)
AutoDetect=off
NodeName=$NODE Name=gpu File=$RUN_DIR/fakegpu[0-1]
CONF
}

wait_for_node() {
    local state=""
    for _ in $(seq 100); do
        if scontrol ping 2>/dev/null | grep -q UP; then
            state=$(sinfo -h -N -n "$NODE" -p debug -o %T 2>/dev/null || true)
            case $state in
                idle | mixed | allocated) return ;;
                *inval* | *drain* | *down*)
                    [[ $state == *down* ]] || break ;;
            esac
        fi
        sleep 0.2
    done
    sinfo -R >&2 || true
    tail -n 20 "$RUN_DIR/slurmctld.log" "$RUN_DIR/slurmd.log" >&2 || true
    die "node $NODE did not become idle (state '${state:-unknown}')"
}

install_packages
"$HERE/stop.sh" "$RUN_DIR"
if running slurmctld || running slurmd; then
    die "another slurmctld or slurmd is running (started from another run dir?); stop it first"
fi
rm -rf "$RUN_DIR/state" "$RUN_DIR/spool"
start_munge
write_config
slurmctld
slurmd
wait_for_node
echo "start.sh: SLURM up on $NODE ($(nproc) CPUs, 2 fake GPUs); run dir $RUN_DIR"
