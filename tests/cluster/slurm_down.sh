#!/usr/bin/env bash
# Stop the single-node Slurm started by tests/cluster/slurm_up.sh.
#
# Only the processes whose pids slurm_up.sh recorded under $STATE/pids/ are stopped, in
# reverse start order, and only the /etc links it created are removed. Packages stay
# installed. Pass --purge to delete the state directory (database, logs, spool) as well.
set -euo pipefail

STATE=${BRAINUAD_SLURM_STATE:-/tmp/brainuad-slurm}
PIDS=$STATE/pids
START=$(date +%s)
log() { printf '[slurm_down %3ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }

if [[ ! -d $PIDS ]]; then
    log "nothing to stop: no $PIDS"
    exit 0
fi

stop() {
    local name=$1 pid
    [[ -s $PIDS/$name ]] || return 0
    pid=$(cat "$PIDS/$name")
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid"
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name did not stop in 10 s; killing pid $pid"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$PIDS/$name"
}

for name in slurmd slurmctld slurmdbd mariadbd munged; do
    stop "$name"
done

# slurmctld and slurmd leave their pid files behind; they would look alive to nobody but
# are removed so that a later slurm_up.sh starts from a clean slate.
rm -f "$STATE"/run/*.pid

if [[ -s $STATE/created_links ]]; then
    while read -r link; do
        [[ -L $link ]] && rm -f "$link" && log "removed $link"
    done <"$STATE/created_links"
    rm -f "$STATE/created_links"
fi

if [[ ${1:-} == --purge ]]; then
    rm -rf "$STATE"
    log "removed $STATE"
fi
log "done"
