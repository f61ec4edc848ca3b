#!/usr/bin/env bash
# A throwaway single-node SLURM cluster on loopback, for tests/test_slurm.py (Debian's packages).
#
#   cluster.sh install     install slurmctld, slurmd, slurm-client and munge with apt-get if missing
#   cluster.sh start DIR   write DIR/etc/slurm.conf, start munged, slurmctld and slurmd with all their
#                          state, logs and sockets under DIR; return once the node accepts jobs
#   cluster.sh stop DIR    cancel the cluster's jobs and stop the daemons that `start DIR` started
#
# Clients need SLURM_CONF=DIR/etc/slurm.conf, or DIR/bin first in PATH: wrappers of the client
# commands that set it (srun inside a job needs them: the jobstep executor drops SLURM_CONF).
# Nothing outside DIR is written: its own munge key and socket, free TCP ports, no system service.
# The node advertises 4 fake GPUs (device files that are /dev/null), so jobs that ask for GPUs
# (`--gpus=1`) are scheduled exactly as on a GPU cluster; the programs themselves run on CPU.
# Needs root (the daemons and the jobs run as root).
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)
FAKE_GPUS=4

die() { echo "cluster.sh: $*" >&2; exit 1; }

installed() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null
}

cmd_install() {
    installed && return 0
    [ "$(id -u)" = 0 ] || die "not root: cannot install ${PACKAGES[*]}"
    command -v apt-get >/dev/null || die "apt-get not found: install ${PACKAGES[*]} by hand"
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d-style refusals to start services are fine: we start the daemons ourselves.
    if ! apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"; then
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
    fi
    installed || die "installed ${PACKAGES[*]} but the daemons are still missing"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() {  # wait_for SECONDS COMMAND...: retry COMMAND every 0.5 s
    local tries=$(($1 * 2)); shift
    for _ in $(seq "$tries"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    return 1
}

node_idle() {
    [ "$(sinfo -h -N -o %t 2>/dev/null | head -1)" = idle ]
}

show_logs() {
    local dir=$1
    for f in "$dir"/log/*.log; do
        [ -f "$f" ] && { echo "== $f"; tail -n 30 "$f"; }
    done >&2
}

cmd_start() {
    local dir
    dir=$(realpath -m "$1")
    [ "$(id -u)" = 0 ] || die "not root: the test cluster runs its daemons and jobs as root"
    installed || die "SLURM is not installed (run: cluster.sh install)"
    mkdir -p "$dir"/{bin,etc,munge,state,spool,run,log,dev}
    chmod 700 "$dir/munge"
    local host conf node_line ctld_port slurmd_port
    host=$(hostname -s)
    conf=$dir/etc/slurm.conf
    ctld_port=$(free_port)
    slurmd_port=$(free_port)
    while [ "$slurmd_port" = "$ctld_port" ]; do slurmd_port=$(free_port); done
    # The node as slurmd sees it (NodeName=<host> RealMemory=...), with twice its cores as job
    # slots: the test's jobs spend much of their time starting Python and waiting to be polled.
    local cpus memory
    cpus=$(( $(nproc) * 2 ))
    memory=$(slurmd -C | head -1 | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    node_line="NodeName=$host CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$memory"

    cat >"$conf" <<EOF
# Written by tests/slurm/cluster.sh: one node on loopback, no accounting database.
ClusterName=d2loratest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.sock
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
# Without accounting, squeue is the only status source: keep finished jobs visible for an hour.
MinJobAge=3600
SlurmdParameters=config_overrides
GresTypes=gpu
$node_line NodeAddr=127.0.0.1 Gres=gpu:$FAKE_GPUS State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # slurmd drops GPUs without device files, so each fake GPU is a character device with
    # /dev/null's numbers (a regular file where mknod is not allowed: slurmd then logs an error
    # but still counts it).
    local i
    for i in $(seq 0 $((FAKE_GPUS - 1))); do
        mknod "$dir/dev/gpu$i" c 1 3 2>/dev/null || touch "$dir/dev/gpu$i"
    done
    cat >"$dir/etc/gres.conf" <<EOF
# Fake GPUs: scheduled like real ones; the programs that get one run on CPU.
AutoDetect=off
NodeName=$host Name=gpu File=$dir/dev/gpu[0-$((FAKE_GPUS - 1))]
EOF
    export SLURM_CONF=$conf
    # Client commands that find this cluster's config even where SLURM_CONF is dropped: the
    # slurm-jobstep executor removes SLURM_* variables (SLURM_CONF too) before it calls srun.
    local tool
    for tool in sbatch srun squeue scontrol sinfo scancel sacct; do
        printf '#!/bin/sh\nSLURM_CONF=%s exec %s "$@"\n' "$conf" "$(command -v "$tool")" >"$dir/bin/$tool"
        chmod +x "$dir/bin/$tool"
    done

    head -c 1024 /dev/urandom >"$dir/munge/munge.key"
    chmod 400 "$dir/munge/munge.key"
    munged --force --socket="$dir/munge/munge.sock" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/munged.seed" \
        || { show_logs "$dir"; die "munged did not start"; }
    wait_for 10 sh -c "munge -n --socket='$dir/munge/munge.sock' | unmunge --socket='$dir/munge/munge.sock'" \
        || { show_logs "$dir"; die "munge does not answer"; }

    slurmctld -f "$conf" || { show_logs "$dir"; die "slurmctld did not start"; }
    wait_for 30 scontrol ping || { show_logs "$dir"; die "slurmctld does not answer"; }
    slurmd -f "$conf" || { show_logs "$dir"; die "slurmd did not start"; }
    if ! wait_for 60 node_idle; then
        sinfo -N -l >&2 || true
        show_logs "$dir"
        die "the node did not become idle"
    fi
    echo "SLURM_CONF=$conf PATH=$dir/bin:\$PATH"
}

kill_pidfile() {  # kill_pidfile FILE: stop the process named in FILE (if it still runs), wait for it
    local file=$1 pid
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 40); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.25
    done
    kill -KILL "$pid" 2>/dev/null || true
}

cmd_stop() {
    local dir
    dir=$(realpath -m "$1")
    [ -f "$dir/etc/slurm.conf" ] || die "no cluster in $dir"
    export SLURM_CONF=$dir/etc/slurm.conf
    scancel --user="$(id -un)" 2>/dev/null || true
    # slurmd first, so that it does not wait for a controller that is gone.
    kill_pidfile "$dir/run/slurmd.pid"
    kill_pidfile "$dir/run/slurmctld.pid"
    kill_pidfile "$dir/run/munged.pid"
}

case "${1:-}" in
    install) cmd_install ;;
    start) [ $# = 2 ] || die "usage: cluster.sh start DIR"; cmd_start "$2" ;;
    stop) [ $# = 2 ] || die "usage: cluster.sh stop DIR"; cmd_stop "$2" ;;
    *) die "usage: cluster.sh install | start DIR | stop DIR" ;;
esac
