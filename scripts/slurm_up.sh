#!/usr/bin/env bash
# Brings up a real single-node Slurm cluster (slurmctld + slurmd, munge auth) on this machine.
# Idempotent: does nothing when `sinfo` already shows a usable node. Needs root and apt for the
# first install. Exit status 0 means `sbatch` works now.
set -euo pipefail

ready() { sinfo -h -o '%t' 2>/dev/null | grep -Eq '^(idle|mix|alloc)'; }
if command -v sinfo >/dev/null 2>&1 && ready; then echo "slurm: already up"; exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "slurm: not root, cannot start a local cluster" >&2; exit 1; fi

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
  echo "slurm: installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# munge: a key readable only by the munge user, then the daemon.
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge:munge /run/munge /var/log/munge /var/lib/munge
pgrep -x munged >/dev/null || su -s /bin/sh munge -c "munged --force" 2>/dev/null || munged --force

host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=harness
SlurmctldHost=${host}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmUser=root
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
# Preempted or requeued jobs get SIGKILL 5 s after SIGTERM (default 30 s): the tests requeue one.
KillWait=5
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MpiDefault=none
NodeName=${host} CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

pgrep -x slurmctld >/dev/null || slurmctld -c
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 1 30); do
  if ready; then echo "slurm: up (${host}, ${cpus} CPUs)"; exit 0; fi
  scontrol update nodename="${host}" state=resume >/dev/null 2>&1 || true
  sleep 1
done
echo "slurm: daemons started but no node became ready; see /var/log/slurm/" >&2
sinfo >&2 || true
exit 1
