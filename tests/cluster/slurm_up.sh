#!/usr/bin/env bash
# Start a real single-node Slurm (with slurmdbd accounting) for the cluster tests.
#
# Debian 12, run as root, no systemd needed: every daemon is started by hand, its pid is
# recorded under $STATE/pids/, and tests/cluster/slurm_down.sh stops exactly those.
# Idempotent: a second call finds the daemons alive and only waits for the node.
#
# The node is this machine with two partitions, `cpu` (default) and `gpu`, and one fake
# GPU (gres gpu:fake:1 on /dev/null), so the GPU mapping of the slurm/ profile
# (--gpus=<model>:<n>, GPU partition) is exercised for real on a machine without a GPU.
# Accounting (slurmdbd on MariaDB) makes plain `sacct` work, which the Snakemake executor
# plugin polls, and records account "brainuad" for user root.
#
# Environment:
#   BRAINUAD_SLURM_STATE  state directory (default /tmp/brainuad-slurm)
#   BRAINUAD_SLURM_DB     1 (default) to run slurmdbd + MariaDB; 0 for none (then sacct
#                         does not work: use `slurm-status-command: squeue`)
# Prints, at the end, the line to source so that clients find the configuration.
set -euo pipefail

STATE=${BRAINUAD_SLURM_STATE:-/tmp/brainuad-slurm}
WITH_DB=${BRAINUAD_SLURM_DB:-1}
CLUSTER=brainuad
ACCOUNT=brainuad
DB_PORT=${BRAINUAD_SLURM_DB_PORT:-13306}
START=$(date +%s)

log() { printf '[slurm_up %3ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
die() { log "ERROR: $*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (starts slurmctld, slurmd, munged)"

# --- packages ---------------------------------------------------------------------------
packages=(munge slurmctld slurmd slurm-client)
[[ $WITH_DB == 1 ]] && packages+=(slurmdbd mariadb-server)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Keep package scripts from starting daemons: we start our own below.
    policy_created=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        policy_created=1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    ((policy_created)) && rm -f /usr/sbin/policy-rc.d
fi

mkdir -p "$STATE"/{etc,pids,log,run,spool/ctld,spool/d,munge}
chmod 0755 "$STATE"
PIDS=$STATE/pids
ETC=$STATE/etc

alive() { [[ -s $PIDS/$1 ]] && kill -0 "$(cat "$PIDS/$1")" 2>/dev/null; }

# Waits until a pid file written by a daemon appears, then records the pid as ours.
record_pid() {
    local name=$1 pidfile=$2
    for _ in $(seq 100); do
        if [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            cp "$pidfile" "$PIDS/$name"
            return 0
        fi
        sleep 0.1
    done
    die "$name did not start; see $STATE/log/$name.log"
}

# --- munge ------------------------------------------------------------------------------
# Slurm's clients reach munged only on its default socket (sacctmgr ignores AuthInfo), so
# ours listens there, with its own key under $STATE. A munged already serving that socket
# (a real installation) is used as it is and left alone.
MUNGE_SOCKET=/run/munge/munge.socket.2
if ! alive munged && ! munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; then
    log "starting munged"
    chown munge:munge "$STATE/munge"
    chmod 0755 "$STATE/munge"
    if [[ ! -s $STATE/munge/munge.key ]]; then
        dd if=/dev/urandom bs=1 count=1024 of="$STATE/munge/munge.key" status=none
        chown munge:munge "$STATE/munge/munge.key"
        chmod 0400 "$STATE/munge/munge.key"
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    rm -f "$STATE/munge/munged.pid"
    runuser -u munge -- /usr/sbin/munged \
        --key-file="$STATE/munge/munge.key" \
        --socket="$MUNGE_SOCKET" \
        --pid-file="$STATE/munge/munged.pid" \
        --log-file="$STATE/munge/munged.log" \
        --seed-file="$STATE/munge/munged.seed"
    record_pid munged "$STATE/munge/munged.pid"
fi

# --- configuration ----------------------------------------------------------------------
HOST=$(hostname -s)
# `slurmd -C` prints this machine's real layout; keep 512 MB back for the daemons.
read -r CPUS SOCKETS CORES THREADS MEM < <(slurmd -C | head -1 | awk '{
    for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    print v["CPUs"], v["SocketsPerBoard"], v["CoresPerSocket"], v["ThreadsPerCore"], v["RealMemory"]
}')
MEM=$((MEM > 1024 ? MEM - 512 : MEM))

if [[ $WITH_DB == 1 ]]; then
    accounting="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoreFlags=job_comment
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux"
else
    accounting="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi

cat >"$ETC/slurm.conf.new" <<EOF
# Written by tests/cluster/slurm_up.sh; single node, for tests only.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
ReturnToService=2
SchedulerType=sched/backfill
# Finished jobs stay visible to squeue/scontrol for 5 minutes.
MinJobAge=300
$accounting
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS SocketsPerBoard=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$MEM Gres=gpu:fake:1 State=UNKNOWN
PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=ALL Default=NO MaxTime=INFINITE State=UP
EOF
if [[ -e $ETC/slurm.conf ]] && ! cmp -s "$ETC/slurm.conf.new" "$ETC/slurm.conf" &&
    { alive slurmctld || alive slurmd; }; then
    rm -f "$ETC/slurm.conf.new"
    die "slurm.conf would change under running daemons; run slurm_down.sh, then this again"
fi
mv "$ETC/slurm.conf.new" "$ETC/slurm.conf"

# A fake GPU: slurm only needs a device file to hand out; nothing uses it.
echo "NodeName=$HOST Name=gpu Type=fake File=/dev/null" >"$ETC/gres.conf"

export SLURM_CONF=$ETC/slurm.conf

# Clients (sinfo, sbatch, sacct, the Snakemake plugin) look in /etc/slurm/slurm.conf unless
# SLURM_CONF is set: point it at ours, unless a real configuration is there already.
if [[ ! -e /etc/slurm/slurm.conf ]]; then
    mkdir -p /etc/slurm
    ln -s "$ETC/slurm.conf" /etc/slurm/slurm.conf
    echo /etc/slurm/slurm.conf >"$STATE/created_links"
elif [[ $(readlink -f /etc/slurm/slurm.conf) != "$ETC/slurm.conf" ]]; then
    log "note: /etc/slurm/slurm.conf is someone else's; export SLURM_CONF=$ETC/slurm.conf"
fi

# --- accounting database ----------------------------------------------------------------
if [[ $WITH_DB == 1 ]]; then
    DATADIR=$STATE/mysql
    DB_SOCKET=$STATE/run/mysqld.sock
    if [[ ! -d $DATADIR/mysql ]]; then
        log "initialising MariaDB in $DATADIR"
        mkdir -p "$DATADIR"
        chown mysql:mysql "$DATADIR"
        mariadb-install-db --user=mysql --datadir="$DATADIR" \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$STATE/log/mariadb-install.log" 2>&1
    fi
    chown mysql:mysql "$STATE/run"
    if ! alive mariadbd; then
        log "starting MariaDB on 127.0.0.1:$DB_PORT"
        rm -f "$DB_SOCKET"
        # Detached (own session, no inherited stdout) so callers' pipes and process-group
        # kills do not reach it; slurm_down.sh stops it by pid.
        setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DATADIR" \
            --socket="$DB_SOCKET" --bind-address=127.0.0.1 --port="$DB_PORT" \
            --skip-name-resolve --pid-file="$STATE/run/mariadbd.pid" \
            --log-error="$STATE/log/mariadbd.log" \
            --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
            </dev/null >>"$STATE/log/mariadbd.out" 2>&1 &
        record_pid mariadbd "$STATE/run/mariadbd.pid"
        for _ in $(seq 100); do
            mariadb --socket="$DB_SOCKET" -e 'SELECT 1' >/dev/null 2>&1 && break
            sleep 0.2
        done
        mariadb --socket="$DB_SOCKET" -e "
            CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" \
            || die "MariaDB did not come up; see $STATE/log/mariadbd.log"
    fi

    cat >"$ETC/slurmdbd.conf" <<EOF
# Written by tests/cluster/slurm_up.sh; for tests only.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 0600 "$ETC/slurmdbd.conf"

    if ! alive slurmdbd; then
        log "starting slurmdbd"
        rm -f "$STATE/run/slurmdbd.pid"
        /usr/sbin/slurmdbd
        record_pid slurmdbd "$STATE/run/slurmdbd.pid"
    fi
    for _ in $(seq 50); do
        timeout 5 sacctmgr -n list cluster >/dev/null 2>&1 && break
        sleep 0.2
    done
    timeout 5 sacctmgr -n list cluster >/dev/null || die "slurmdbd unreachable; see $STATE/log/slurmdbd.log"
    if ! timeout 30 sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        timeout 30 sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
    if ! timeout 30 sacctmgr -n -P list account format=account | grep -qx "$ACCOUNT"; then
        timeout 30 sacctmgr -i add account "$ACCOUNT" cluster="$CLUSTER" \
            description="brainuad tests" organization=brainuad >/dev/null
    fi
    if ! timeout 30 sacctmgr -n -P list user root format=defaultaccount | grep -qx "$ACCOUNT"; then
        timeout 30 sacctmgr -i add user root account="$ACCOUNT" defaultaccount="$ACCOUNT" \
            cluster="$CLUSTER" >/dev/null
    fi
fi

# --- controller and node ----------------------------------------------------------------
if ! alive slurmctld; then
    log "starting slurmctld"
    # slurmctld leaves its pid file behind when it exits; a stale one must not fool us.
    rm -f "$STATE/run/slurmctld.pid"
    /usr/sbin/slurmctld -f "$ETC/slurm.conf"
    record_pid slurmctld "$STATE/run/slurmctld.pid"
fi
if ! alive slurmd; then
    log "starting slurmd"
    rm -f "$STATE/run/slurmd.pid"
    /usr/sbin/slurmd -f "$ETC/slurm.conf"
    record_pid slurmd "$STATE/run/slurmd.pid"
fi

log "waiting for node $HOST to be idle"
for _ in $(seq 120); do
    state=$(sinfo -h -N -n "$HOST" -o '%t' 2>/dev/null | head -1 || true)
    [[ $state == idle ]] && break
    # A node left down or drained by an earlier run comes back with this.
    if [[ $state == down* || $state == drain* ]]; then
        scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
    fi
    sleep 0.5
done
[[ $state == idle ]] || die "node $HOST is '$state', not idle; see $STATE/log/"

log "ready: $(sinfo -h -o '%P %a %D %t %G' | tr '\n' ';')"
echo "export SLURM_CONF=$ETC/slurm.conf"
