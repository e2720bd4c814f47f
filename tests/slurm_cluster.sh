#!/usr/bin/env bash
# A real one-node Slurm (Debian's slurmctld/slurmd/munge, 22.05) for the tests, run as root.
#
#   tests/slurm_cluster.sh start DIR   write DIR/slurm.conf + cgroup.conf, start munged,
#                                      slurmctld, slurmd; wait until the node is idle
#   tests/slurm_cluster.sh stop DIR    stop the daemons started from DIR
#
# Clients find the cluster through SLURM_CONF=DIR/slurm.conf. State, spool and logs stay in DIR;
# nothing under /etc/slurm is touched. munged uses the package's /etc/munge/munge.key (made
# with mungekey if absent).
set -euo pipefail
action=${1:?start|stop}
dir=$(realpath -m "${2:?state directory}")
host=$(hostname -s)
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS; the node has them all

stop() {
    for d in slurmd slurmctld; do
        if [[ -f $dir/$d.pid ]]; then
            kill "$(cat "$dir/$d.pid")" 2>/dev/null || true
        fi
    done
    sleep 1
    # a daemon that ignored TERM goes now; munged stays for other users of this machine
    for d in slurmd slurmctld; do
        if [[ -f $dir/$d.pid ]]; then
            kill -9 "$(cat "$dir/$d.pid")" 2>/dev/null || true
            rm -f "$dir/$d.pid"
        fi
    done
}

start() {
    for b in munged slurmctld slurmd sbatch; do
        command -v "$b" >/dev/null || { echo "slurm_cluster: $b not installed (apt-get install slurmctld slurmd munge slurm-client)" >&2; exit 3; }
    done
    mkdir -p "$dir"/{state,spool,log}
    cat >"$dir/slurm.conf" <<EOF
ClusterName=xdrec-test
SlurmctldHost=$host
SlurmUser=root
SlurmctldPort=$((6817 + ${XDREC_SLURM_PORT_OFFSET:-0}))
SlurmdPort=$((6818 + ${XDREC_SLURM_PORT_OFFSET:-0}))
AuthType=auth/munge
# a requeued job may start again after the credential lifetime (default 120 s)
AuthInfo=cred_expire=10
SchedulerParameters=sched_interval=2,bf_interval=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MinJobAge=3600
JobRequeue=1
KillWait=30
InactiveLimit=0
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
    cat >"$dir/cgroup.conf" <<EOF
CgroupPlugin=cgroup/v1
CgroupAutomount=no
EOF
    if [[ ! -f /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge && mungekey --create --keyfile /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    # a munged without its socket (e.g. left over from a removed package) cannot serve: replace it
    if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        pkill -x munged 2>/dev/null && sleep 1 || true
        if id munge >/dev/null 2>&1; then runuser -u munge -- munged; else munged --force; fi
        for _ in $(seq 1 20); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
    fi
    stop
    slurmctld -f "$dir/slurm.conf"
    slurmd -f "$dir/slurm.conf"
    export SLURM_CONF=$dir/slurm.conf
    for _ in $(seq 1 60); do
        if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
            echo "slurm up: SLURM_CONF=$SLURM_CONF node $host ($cpus CPUs)"
            return 0
        fi
        sleep 1
    done
    echo "slurm_cluster: the node did not come up idle in 60 s; logs in $dir/log" >&2
    sinfo >&2 || true
    tail -20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
    exit 4
}

case $action in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
