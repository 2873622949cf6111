#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the tests of `--executor slurm` and for
# trying it out: Debian's slurmctld + slurmd + munge (Slurm 22.05), no accounting daemon
# (so no sacct: driveline does not need it).
#   scripts/slurm-dev.sh start    install the packages if missing, write the configuration, start
#   scripts/slurm-dev.sh stop     stop the daemons
#   scripts/slurm-dev.sh status   sinfo, or why it is not up
# Needs root (apt-get, /etc/slurm, the daemons). The node's CPUs and memory come from
# `slurmd -C`; NodeName is `hostname -s`.
set -euo pipefail

conf=/etc/slurm/slurm.conf

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "slurm-dev.sh: must run as root (it installs packages and starts daemons)" >&2
        exit 1
    fi
}

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return
    fi
    echo "slurm-dev.sh: installing slurmctld slurmd slurm-client munge (Debian packages)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
    local host cpus mem
    host=$(hostname -s)
    # `slurmd -C` prints e.g. "NodeName=x CPUs=2 Boards=1 ... RealMemory=23000".
    cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -n 1)
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n 1)
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    cat >"$conf" <<EOF
# Written by driveline's scripts/slurm-dev.sh: a single-node cluster for tests.
ClusterName=dev
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MinJobAge=300
# Fast turnaround for tests: the scheduler and the time-limit check wake often.
SchedulerParameters=sched_interval=2
InactiveLimit=0
KillWait=5
OverTimeLimit=0
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=${cpus:-2} RealMemory=${mem:-4000} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # These machines mount cgroup v1; slurmd 22.05 initialises a cgroup plugin even with
    # proctrack/linuxproc.
    echo "CgroupPlugin=cgroup/v1" >/etc/slurm/cgroup.conf
}

up() {
    sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'
}

start() {
    need_root
    install
    if up; then
        echo "slurm-dev.sh: already up"
        sinfo
        return
    fi
    write_conf
    service munge start >/dev/null 2>&1 || munged
    pkill -x slurmctld 2>/dev/null || true
    pkill -x slurmd 2>/dev/null || true
    sleep 1
    slurmctld
    slurmd
    for _ in $(seq 1 60); do
        if up; then
            sinfo
            return
        fi
        # A node left DOWN by an earlier unclean stop comes back with `resume`.
        scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    echo "slurm-dev.sh: the node did not come up; see /var/log/slurm/" >&2
    sinfo >&2 || true
    exit 1
}

stop() {
    need_root
    scontrol shutdown >/dev/null 2>&1 || true
    service munge stop >/dev/null 2>&1 || true
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status)
        if up; then sinfo; else
            echo "slurm is not up: run scripts/slurm-dev.sh start (as root)"
            exit 1
        fi
        ;;
    *)
        echo "usage: scripts/slurm-dev.sh start|stop|status" >&2
        exit 2
        ;;
esac
