#!/usr/bin/env bash
# Stop the cluster that .ci/slurm-up.sh started: cancel its jobs, then stop every daemon by its pid
# file (never by name: other SLURMs or databases on the machine are left alone).
#   .ci/slurm-down.sh            # keep $LUNG_CLS_SLURM_DIR (logs, database) for a look
#   .ci/slurm-down.sh --purge    # and delete it
set -uo pipefail

STATE=${LUNG_CLS_SLURM_DIR:-/tmp/lung_cls-slurm}
say() { echo "slurm-down: $*" >&2; }

[[ -d $STATE ]] || { say "nothing to stop ($STATE does not exist)"; exit 0; }
if [[ -f $STATE/slurm.conf ]] && [[ -f $STATE/slurmctld.pid ]]; then
    SLURM_CONF=$STATE/slurm.conf timeout 10 scancel --full --quiet --user="$(id -un)" 2>/dev/null
fi

# stop NAME PIDFILE: SIGTERM, wait up to 20 s, then SIGKILL.
stop() {
    local name=$1 pidfile=$2 pid
    [[ -f $pidfile ]] || return 0
    pid=$(cat "$pidfile" 2>/dev/null)
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 40); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "$name ($pid) did not stop on SIGTERM; SIGKILL"
            kill -KILL "$pid" 2>/dev/null
        fi
        say "stopped $name ($pid)"
    fi
    rm -f "$pidfile"
}

stop slurmd "$STATE/slurmd.pid"
stop slurmctld "$STATE/slurmctld.pid"
stop slurmdbd "$STATE/slurmdbd.pid"
stop mariadbd "$STATE/mariadb.pid"
stop munged "$STATE/munge/munged.pid"

if [[ ${1:-} == --purge ]]; then
    rm -rf "$STATE"
    say "removed $STATE"
fi
exit 0
