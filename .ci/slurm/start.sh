#!/usr/bin/env bash
# A one-node SLURM cluster on this machine for the SLURM tests (tests/run/test_slurm.py):
# Debian's slurm-wlm + munge, slurmctld and slurmd as root, one partition "debug",
# select/cons_tres, no accounting (sacct unavailable, as on many small clusters), no cgroups
# (proctrack/linuxproc: works inside containers). Needs root; installs the packages once
# (apt-get). Idempotent: does nothing when `sinfo` already shows an idle node.
# Usage: .ci/slurm/start.sh   (then: sinfo; squeue; .ci/slurm/stop.sh)
set -euo pipefail
if [ "$(id -u)" != 0 ]; then echo "slurm/start.sh: needs root" >&2; exit 1; fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi
if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "slurm: already running"; sinfo; exit 0
fi

# munge (authentication between the daemons and the client commands)
[ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
for _ in $(seq 50); do [ -S /run/munge/munge.socket.2 ] && break; sleep 0.1; done

# slurm.conf from this machine's hardware (slurmd -C: CPUs, RealMemory)
HOST=$(hostname -s)
NODE=$(slurmd -C | head -1 | sed "s/^NodeName=[^ ]*/NodeName=$HOST/")
MEM=$(echo "$NODE" | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
NODE=$(echo "$NODE" | sed "s/RealMemory=[0-9]*/RealMemory=$((MEM * 9 / 10))/")
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=featcal-ci
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=600
$NODE State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF

pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
for _ in $(seq 100); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then sinfo; exit 0; fi
    sleep 0.2
done
echo "slurm/start.sh: the node did not come up; logs: /var/log/slurm/" >&2
tail -5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
exit 1
