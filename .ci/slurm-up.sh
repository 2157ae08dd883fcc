#!/usr/bin/env bash
# A one-node SLURM cluster on localhost, for the tests marked `slurm` (tests/cluster/).
#
#   .ci/slurm-up.sh                 # as root; prints the line to export
#   export SLURM_CONF=/tmp/lung_cls-slurm/slurm.conf
#   .ci/slurm-down.sh               # stops every daemon by its pid file
#
# Debian's slurm-wlm (22.05) + munge for authentication + slurmdbd over MariaDB for accounting
# (without accounting, sacct knows no job and a job that SLURM kills is seen only as UNKNOWN; see
# docs/cluster.md). No systemd: every daemon is started here, writes its pid file, log and state
# under $LUNG_CLS_SLURM_DIR (default /tmp/lung_cls-slurm), and slurm-down.sh stops it by that pid.
# The node is called `localhost` (slurmd -N localhost), whatever the machine's hostname is.
# Installs the packages with apt-get when they are missing (about 75 s).
# LUNG_CLS_SLURM_ACCOUNTING=0: no MariaDB and no slurmdbd (to try what a cluster without
# accounting does: sacct then knows no job).
set -euo pipefail

STATE=${LUNG_CLS_SLURM_DIR:-/tmp/lung_cls-slurm}
DB_PORT=${LUNG_CLS_SLURM_DB_PORT:-33061}
CLUSTER=lungcls
ACCOUNTING=${LUNG_CLS_SLURM_ACCOUNTING:-1}

say() { echo "slurm-up: $*" >&2; }
die() { say "error: $*"; exit 1; }
# wait_for SECONDS WHAT COMMAND...: run COMMAND every 0.5 s until it succeeds.
wait_for() {
    local secs=$1 what=$2
    shift 2
    local end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || die "$what did not come up within ${secs}s (logs in $STATE)"
        sleep 0.5
    done
}
running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

[[ $(id -u) == 0 ]] || die "run as root (the daemons need it)"
if [[ -f $STATE/slurmd.pid ]] && running "$STATE/slurmd.pid"; then
    say "already running; export SLURM_CONF=$STATE/slurm.conf"
    echo "export SLURM_CONF=$STATE/slurm.conf"
    exit 0
fi

need=()
for bin in slurmctld slurmd slurmdbd munged mariadbd sinfo; do
    command -v "$bin" >/dev/null || need+=("$bin")
done
if ((${#need[@]})); then
    say "installing slurm-wlm munge slurmdbd mariadb-server (missing: ${need[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge slurmdbd mariadb-server >/dev/null
fi

mkdir -p "$STATE"/{ctld,d,munge,log}
chmod 755 "$STATE"
cores=$(nproc)
# RealMemory must be set (the default, 1 MB, refuses every --mem) and not above what slurmd
# finds, or the node is drained: 90 % of the machine's memory.
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)

# ---------------------------------------------------------------- munge (authentication)
# The package creates the key; /run/munge (the socket's folder) must be made by hand.
if [[ ! -s /etc/munge/munge.key ]]; then
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
        || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge
chown munge:munge /run/munge "$STATE/munge"
chmod 755 /run/munge
chmod 700 "$STATE/munge"
if ! running "$STATE/munge/munged.pid"; then
    runuser -u munge -- munged --force --pid-file="$STATE/munge/munged.pid" \
        --log-file="$STATE/munge/munged.log" --seed-file="$STATE/munge/munged.seed"
fi
wait_for 10 munged bash -c "munge -n | unmunge"

# ---------------------------------------------------------------- MariaDB (accounting store)
start_db() {
    if [[ ! -d $STATE/mysql/mysql ]]; then
        mariadb-install-db --no-defaults --user=root --datadir="$STATE/mysql" --skip-test-db \
            --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1 \
            || die "mariadb-install-db failed: see $STATE/log/mariadb-install.log"
    fi
    if ! running "$STATE/mariadb.pid"; then
        nohup mariadbd --no-defaults --user=root --datadir="$STATE/mysql" \
            --socket="$STATE/mysql.sock" --pid-file="$STATE/mariadb.pid" \
            --bind-address=127.0.0.1 --port="$DB_PORT" --innodb-buffer-pool-size=128M \
            --innodb-lock-wait-timeout=900 --log-error="$STATE/log/mariadb.log" \
            >/dev/null 2>&1 &
    fi
    wait_for 60 MariaDB mariadb --no-defaults -S "$STATE/mysql.sock" -u root -e "SELECT 1"
    mariadb --no-defaults -S "$STATE/mysql.sock" -u root <<'SQL'
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL
}
if [[ $ACCOUNTING == 1 ]]; then
    start_db
    storage=accounting_storage/slurmdbd
else
    storage=accounting_storage/none
fi

# ---------------------------------------------------------------- configuration
cat >"$STATE/slurm.conf" <<EOF
# Written by .ci/slurm-up.sh: one node (localhost), one partition (debug), accounting by slurmdbd.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
# No cgroups here: processes are tracked by their parent pid, tasks are not bound to cores.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# A job that gives no --mem gets its CPUs' share of the node, not the whole node.
DefMemPerCPU=$((mem_mb / cores))
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
AccountingStorageType=$storage
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Quick to notice a lost node; quick to clean up after a job.
SlurmdTimeout=30
KillWait=5
MinJobAge=60
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cores RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
cat >"$STATE/slurmdbd.conf" <<EOF
# Written by .ci/slurm-up.sh
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
chmod 600 "$STATE/slurmdbd.conf"  # slurmdbd refuses a readable one (it holds the password)
export SLURM_CONF=$STATE/slurm.conf  # slurmdbd finds slurmdbd.conf next to it

# ---------------------------------------------------------------- daemons
if [[ $ACCOUNTING == 1 ]]; then
    running "$STATE/slurmdbd.pid" || slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
    sacctmgr -i add cluster "$CLUSTER" >/dev/null 2>&1 || true
fi
running "$STATE/slurmctld.pid" || slurmctld -f "$SLURM_CONF"
wait_for 30 slurmctld scontrol ping
running "$STATE/slurmd.pid" || slurmd -f "$SLURM_CONF" -N localhost
wait_for 30 "the node" bash -c "sinfo -h -N -o %T | grep -Eq '^(idle|mixed|allocated)'"
say "up: $(sinfo -h -o '%P %D node(s) %c cpus %m MB %T') (state, logs: $STATE)"
echo "export SLURM_CONF=$SLURM_CONF"
