#!/usr/bin/env bash
# Stop the private test cluster that .ci/slurm-up.sh started: cancel its jobs, stop
# its slurmd's, slurmctld and munged (by the pids in their pid files, checked to be
# this cluster's), and remove its network namespaces and bridge. `--purge` also
# deletes its directory (configuration, state: job ids restart at 1, logs, munge key).
set -uo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

BASE="${VAEFLOW_SLURM_DIR:-/run/vaeflow-slurm}"
CONF="$BASE/etc/slurm.conf"
BRIDGE=vfslurm0
NS_PREFIX=vfslurm-
log() { echo "slurm-down: $*" >&2; }

stop() {  # pidfile name-in-comm [cmdline-needle]
    local pid
    if [ -s "$1" ] && pid="$(cat "$1")" && grep -q "$2" "/proc/$pid/comm" 2>/dev/null \
        && { [ -z "${3:-}" ] || tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$3"; }; then
        log "stopping $(cat "/proc/$pid/comm") (pid $pid)"
        kill "$pid" 2>/dev/null
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid did not stop in 10 s, killing it"
            kill -9 "$pid" 2>/dev/null
        fi
    fi
    rm -f "$1"
}

if [ -f "$CONF" ] && command -v scancel >/dev/null 2>&1; then
    export SLURM_CONF="$CONF"
    if timeout 10 scontrol ping 2>/dev/null | grep -q "is UP"; then
        ids="$(squeue --noheader --format=%i 2>/dev/null | tr '\n' ' ')"
        if [ -n "${ids// /}" ]; then
            log "cancelling jobs: $ids"
            # shellcheck disable=SC2086
            scancel $ids 2>/dev/null || true
            sleep 2
        fi
    fi
fi
for f in "$BASE"/slurmd-*.pid; do [ -e "$f" ] && stop "$f" slurmd "-f $CONF"; done
stop "$BASE/slurmctld.pid" slurmctld "-f $CONF"
stop "$BASE/munge/munged.pid" munged

for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NS_PREFIX"); do
    log "removing network namespace $ns"
    ip netns del "$ns"
done
if ip link show "$BRIDGE" >/dev/null 2>&1; then
    log "removing bridge $BRIDGE"
    ip link del "$BRIDGE"
fi

if [ "${1:-}" = "--purge" ] && [ -d "$BASE" ]; then
    log "removing $BASE"
    rm -rf "$BASE"
fi
exit 0
