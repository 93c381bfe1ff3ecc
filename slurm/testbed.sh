#!/usr/bin/env bash
# A real Slurm cluster (two nodes on this one host by default) for tests and CI, started from a clean
# Debian/Ubuntu machine.
#
#   bash slurm/testbed.sh start  DIR   # install (if missing), configure, start, wait until the nodes are idle
#   bash slurm/testbed.sh status DIR   # daemons, sinfo, squeue (exit 3 when the bed is not up)
#   bash slurm/testbed.sh stop   DIR   # cancel jobs, stop the daemons this script started (idempotent)
#
# After `start`, point the Slurm commands at the bed with   . DIR/env.sh   (it sets SLURM_CONF).
# Nothing is exported globally and /etc/slurm is not touched: configuration, state, spool, logs, the
# accounting database and the daemons' PID files all live under DIR (logs in DIR/log/).
#
# What `start` does:
#   * apt-get installs munge, slurmctld, slurmd, slurm-client (Debian 12: Slurm 22.05) and, for
#     accounting, slurmdbd + mariadb-server, when missing (non-interactive, quiet, no recommends;
#     `apt-get update` only when the package lists lack them). ~10-15 s each group on a fresh machine;
#   * creates /etc/munge/munge.key when there is none and starts munged unless one already answers
#     (a munged that this script started is stopped again by `stop`);
#   * with accounting (the default): a private MariaDB (datadir DIR/mysql, 127.0.0.1 only) and
#     `slurmdbd -D`, so `sacct` works as on a real cluster;
#   * writes DIR/slurm.conf (cluster "pbptest", PBP_TESTBED_NODES nodes at 127.0.0.1, one partition
#     "debug") and starts `slurmctld -D` and one `slurmd -D -N NODE` per node in the background;
#   * waits (bounded: PBP_TESTBED_TIMEOUT s, default 60) until `sinfo` shows every node idle; prints
#     the logs and fails otherwise. Running `start` on a bed that is up just checks it again;
#   * job IDs go on from where the last bed in DIR stopped (FirstJobId), so that a restarted bed does
#     not hand out IDs whose log files (%j in --output) already exist; a new bed starts at a random ID.
#
# Several nodes on one host: each node is its own slurmd (`slurmd -N NAME`) with its own NodeName and
# Port, and its own spool directory, log and PID file (%n in slurm.conf); they share NodeHostname and
# NodeAddr 127.0.0.1. Debian's 22.05 runs them (a `--nodes=2` job gets both, SLURM_NODEID 0 and 1:
# tests/test_slurm.py::test_train_sh_runs_on_two_nodes). What Slurm's --enable-multiple-slurmd adds
# beyond that -- per-node cgroup paths, and accepting a munge credential that the one munged has already
# decoded (message forwarding, past TreeWidth=50 nodes) -- this bed does not need: no cgroups
# (proctrack/linuxproc, task/none) and far fewer than 50 nodes.
#
# On purpose, so that job scripts are tested honestly:
#   * MpiDefault=none: every srun must say --mpi=pmi2 (MPICH) or --mpi=pmix (Open MPI). With a wrong
#     plugin srun -n P silently starts P separate 1-rank MPI jobs -- always check the world size.
#     (Debian's pmix plugin also needs libpmix2, not installed here; pmi2 needs nothing.)
#   * Test-friendly timings that real clusters do not have: a requeued job may start again after
#     ~10 s (AuthInfo=cred_expire=10; default 120 s), the scheduler looks at pending jobs every 2 s,
#     finished jobs stay in `scontrol show job` for an hour (MinJobAge).
#   * Job history is also written by JobCompType=jobcomp/filetxt to DIR/jobcomp.log; without slurmdbd
#     `sacct --completion` (-c) reads that (Slurm 22.05 only; the option is gone in 23.02+).
#
# Environment knobs:
#   PBP_TESTBED_ACCOUNTING  slurmdbd (default): MariaDB + slurmdbd, `sacct` works;
#                           none: no database (faster, fewer packages); `sacct -c` only.
#   PBP_TESTBED_NODES       nodes (default 2), named <hostname -s>-1, -2, ...
#   PBP_TESTBED_CPUS        CPUs of each node (default: nproc, at least 8, so that the shipped sweeps,
#                           up to 4 ranks x 2 threads, fit one node). May exceed the real count
#                           (SlurmdParameters=config_overrides), to run several ranks on a small box.
#   PBP_TESTBED_PORT        base TCP port (default 6817): slurmctld PORT, first slurmd PORT+1, slurmdbd
#                           PORT+2, MariaDB PORT+3, slurmd of node k >= 2 PORT+2+k; all on 127.0.0.1.
#   PBP_TESTBED_TIMEOUT     seconds to wait for the nodes to become idle (default 60).
#   PBP_TESTBED_NO_INSTALL=1  never run apt-get (exit 77 when something is missing).
#
# Exit codes: 0 ok; 77 this machine cannot host the bed (not root, or packages missing and no apt-get)
# -- tests skip on 77; 2 usage; anything else is a real failure.
set -uo pipefail

log() { printf '[testbed.sh] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
skip() { log "SKIP: $*"; exit 77; }

usage() {
    echo "usage: $0 {start|stop|status} DIR" >&2
    exit 2
}

[ $# -eq 2 ] || usage
CMD=$1
case $CMD in start | stop | status) ;; *) usage ;; esac
DIR=$2
if [ "$CMD" = start ]; then
    mkdir -p "$DIR" || die "cannot create $DIR"
fi
[ -d "$DIR" ] || { log "$DIR does not exist; nothing to do"; [ "$CMD" = status ] && exit 3; exit 0; }
DIR=$(cd "$DIR" && pwd -P) || die "cannot enter $DIR"
CONF=$DIR/slurm.conf
PIDS=$DIR/pids
LOGS=$DIR/log
ACCOUNTING=${PBP_TESTBED_ACCOUNTING:-slurmdbd}
case $ACCOUNTING in slurmdbd | none) ;; *) die "PBP_TESTBED_ACCOUNTING must be slurmdbd or none, not '$ACCOUNTING'" ;; esac
PORT=${PBP_TESTBED_PORT:-6817}
[[ $PORT =~ ^[0-9]+$ ]] || die "PBP_TESTBED_PORT must be a number, not '$PORT'"
[[ ${PBP_TESTBED_CPUS:-1} =~ ^[1-9][0-9]*$ ]] || die "PBP_TESTBED_CPUS must be a positive number, not '$PBP_TESTBED_CPUS'"
NODES=${PBP_TESTBED_NODES:-2}
[[ $NODES =~ ^[1-9][0-9]?$ ]] || die "PBP_TESTBED_NODES must be a number from 1 to 99, not '$NODES'"
export SLURM_CONF=$CONF # for this script and the daemons it starts only

# ------------------------------------------------------------------------------------------- helpers

pid_alive() { # pid_alive FILE: the PID in FILE names a live process that is not a zombie
    local f=$1 pid state
    [ -s "$f" ] || return 1
    pid=$(cat "$f" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    state=$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null)
    [ "$state" != Z ]
}

stop_pidfile() { # stop_pidfile FILE NAME: SIGTERM, wait up to 15 s, then SIGKILL
    local f=$1 name=$2 pid
    if pid_alive "$f"; then
        pid=$(cat "$f")
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 1 150); do
            pid_alive "$f" || break
            sleep 0.1
        done
        if pid_alive "$f"; then
            log "$name did not stop on SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null
            sleep 0.2
        fi
    fi
    rm -f "$f"
}

wait_until() { # wait_until TENTHS CMD...: poll CMD every 0.1 s, at most TENTHS times
    local n=$1
    shift
    for _ in $(seq 1 "$n"); do
        "$@" && return 0
        sleep 0.1
    done
    return 1
}

munge_ok() { command -v munge >/dev/null && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

node_state() { # "up" when every node is idle, mix or alloc; else the states there are, e.g. "idle unk*"
    local states
    states=$(sinfo -h -N -o '%t' 2>/dev/null | sort -u)
    if [ -n "$states" ] && ! echo "$states" | grep -qvxE 'idle|mix|alloc'; then
        echo up
    else
        # shellcheck disable=SC2086  # unquoted: the states on one line
        echo $states
    fi
}

node_names() { # the bed's node names, one a line
    local host i
    host=$(hostname -s 2>/dev/null || hostname)
    for i in $(seq 1 "$NODES"); do echo "$host-$i"; done
}

node_port() { # node_port K: slurmd port of node K (1-based)
    if [ "$1" = 1 ]; then echo $((PORT + 1)); else echo $((PORT + 2 + $1)); fi
}

dump_logs() {
    local f
    for f in "$LOGS"/*.log "$LOGS"/*.out; do
        [ -s "$f" ] || continue
        # a daemon run with -D writes its log to stderr (NAME.out) too: show one of the two
        [[ $f == *.out && -s ${f%.out}.log ]] && continue
        echo "===== $f (last 40 lines) =====" >&2
        tail -n 40 "$f" >&2
    done
}

daemons() { # the daemons this bed runs, in start order (one slurmd-NODE per node)
    [ "$ACCOUNTING" = slurmdbd ] && echo mariadb slurmdbd
    echo slurmctld
    node_names | sed 's/^/slurmd-/'
}

# slurmstepd processes forked by *our* slurmd carry SLURM_CONF=$CONF in their environment (slurmd is
# started with it): find them by that exact entry rather than by process name.
our_stepds() {
    local p
    for p in /proc/[0-9]*; do
        [ "$(cat "$p/comm" 2>/dev/null)" = slurmstepd ] || continue
        if { tr '\0' '\n' <"$p/environ"; } 2>/dev/null | grep -qxF "SLURM_CONF=$CONF"; then
            echo "${p#/proc/}"
        fi
    done
}

# ---------------------------------------------------------------------------------------------- stop

do_stop() {
    local ids pid
    [ -d "$PIDS" ] || { log "nothing running in $DIR"; return 0; }
    if pid_alive "$PIDS/slurmctld.pid"; then
        ids=$(squeue -h -o '%A' 2>/dev/null | sort -u)
        if [ -n "$ids" ]; then
            log "cancelling jobs: $(echo "$ids" | tr '\n' ' ')"
            # shellcheck disable=SC2086
            scancel $ids 2>/dev/null
            for _ in $(seq 1 50); do
                [ -z "$(squeue -h -o '%A' 2>/dev/null)" ] && break
                sleep 0.2
            done
        fi
    fi
    # stop in reverse start order; try every PID file there is, whatever the accounting mode now
    local f
    for f in "$PIDS"/slurmd*.pid; do
        [[ $f == *.daemon.pid ]] || stop_pidfile "$f" "$(basename "$f" .pid)"
    done
    stop_pidfile "$PIDS/slurmctld.pid" slurmctld
    for pid in $(our_stepds); do
        log "killing leftover slurmstepd $pid"
        kill -KILL "$pid" 2>/dev/null
    done
    stop_pidfile "$PIDS/slurmdbd.pid" slurmdbd
    stop_pidfile "$PIDS/mariadb.pid" mariadb
    if [ -f "$PIDS/munged.ours" ]; then
        stop_pidfile "$PIDS/munged.pid" munged
        rm -f "$PIDS/munged.ours"
    fi
    log "stopped"
}

# -------------------------------------------------------------------------------------------- status

do_status() {
    local n rc=0
    if pid_alive "$PIDS/munged.pid"; then
        echo "munged: running (pid $(cat "$PIDS/munged.pid"), started by this bed)"
    elif munge_ok; then
        echo "munged: running (not started by this bed)"
    else
        echo "munged: not running"
        rc=3
    fi
    for n in $(daemons); do
        if pid_alive "$PIDS/$n.pid"; then
            echo "$n: running (pid $(cat "$PIDS/$n.pid"))"
        else
            echo "$n: not running"
            rc=3
        fi
    done
    if [ $rc -eq 0 ]; then
        echo "SLURM_CONF=$CONF"
        sinfo 2>&1
        squeue 2>&1
    fi
    return $rc
}

# --------------------------------------------------------------------------------------------- start

need_packages() { # the Debian packages still missing
    local missing=() f found=0
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    # the MPI plugins live in slurm-wlm-basic-plugins; a Slurm without mpi/pmi2 is of no use here
    for f in /usr/lib/*/slurm-wlm/mpi_pmi2.so /usr/lib*/slurm/mpi_pmi2.so /usr/local/lib/slurm/mpi_pmi2.so; do
        [ -e "$f" ] && found=1
    done
    [ $found = 1 ] || missing+=(slurm-wlm-basic-plugins)
    if [ "$ACCOUNTING" = slurmdbd ]; then
        command -v slurmdbd >/dev/null || missing+=(slurmdbd)
        { command -v mariadbd && command -v mariadb-install-db && command -v mariadb; } >/dev/null \
            || missing+=(mariadb-server)
    fi
    echo "${missing[@]:-}"
}

install_packages() {
    local pkgs t0
    pkgs=$(need_packages)
    [ -z "$pkgs" ] && return 0
    [ "${PBP_TESTBED_NO_INSTALL:-0}" = 1 ] && skip "missing packages ($pkgs) and PBP_TESTBED_NO_INSTALL=1"
    command -v apt-get >/dev/null || skip "missing packages ($pkgs) and there is no apt-get to install them"
    t0=$SECONDS
    log "installing with apt-get: $pkgs"
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get -y -qq -o Dpkg::Use-Pty=0 -o Dpkg::Options::=--force-confdef
        -o Dpkg::Options::=--force-confold)
    : >"$LOGS/apt.log"
    # shellcheck disable=SC2086
    if ! apt-cache show $pkgs >/dev/null 2>&1; then
        log "package lists lack them; apt-get update"
        "${apt[@]}" update >>"$LOGS/apt.log" 2>&1 || { cat "$LOGS/apt.log" >&2; die "apt-get update failed"; }
    fi
    # shellcheck disable=SC2086
    if ! "${apt[@]}" install --no-install-recommends $pkgs >>"$LOGS/apt.log" 2>&1; then
        log "install failed; apt-get update and retry"
        "${apt[@]}" update >>"$LOGS/apt.log" 2>&1
        # shellcheck disable=SC2086
        "${apt[@]}" install --no-install-recommends $pkgs >>"$LOGS/apt.log" 2>&1 \
            || { tail -n 30 "$LOGS/apt.log" >&2; die "apt-get install $pkgs failed"; }
    fi
    pkgs=$(need_packages)
    [ -z "$pkgs" ] || die "still missing after apt-get install: $pkgs"
    log "installed in $((SECONDS - t0)) s"
}

start_munge() {
    if munge_ok; then
        log "munged already running; using it"
        return 0
    fi
    local key=/etc/munge/munge.key d
    if [ ! -s "$key" ]; then
        log "creating $key"
        [ -d /etc/munge ] || install -d -o munge -g munge -m 0700 /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$key" --force >/dev/null 2>&1 || true
        fi
        [ -s "$key" ] || dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
        chown munge:munge "$key"
        chmod 0400 "$key"
    fi
    for d in /var/lib/munge /var/log/munge; do
        [ -d "$d" ] || install -d -o munge -g munge -m 0700 "$d"
    done
    install -d -o munge -g munge -m 0755 /run/munge
    rm -f /run/munge/munged.pid
    log "starting munged"
    if command -v runuser >/dev/null; then
        runuser -u munge -- /usr/sbin/munged </dev/null >"$LOGS/munged.out" 2>&1
    else
        su -s /bin/sh munge -c /usr/sbin/munged </dev/null >"$LOGS/munged.out" 2>&1
    fi
    wait_until 50 munge_ok || { cat "$LOGS/munged.out" /var/log/munge/munged.log >&2 2>/dev/null; die "munged did not start"; }
    if [ -s /run/munge/munged.pid ]; then
        cp /run/munge/munged.pid "$PIDS/munged.pid"
        touch "$PIDS/munged.ours"
    fi
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; } # something listens there

mariadb_ok() { mariadb-admin --no-defaults --socket="$DIR/mysql.sock" -u root ping >/dev/null 2>&1; }
mariadb_up_or_dead() { mariadb_ok || ! pid_alive "$PIDS/mariadb.pid"; }
dbd_ok() { sacctmgr -n show cluster format=cluster >/dev/null 2>&1; }
dbd_up_or_dead() { dbd_ok || ! pid_alive "$PIDS/slurmdbd.pid"; }

start_accounting() {
    log "starting MariaDB (datadir $DIR/mysql, port $((PORT + 3)))"
    rm -rf "$DIR/mysql"
    mariadb-install-db --no-defaults --datadir="$DIR/mysql" --user=root --auth-root-authentication-method=socket \
        --skip-test-db >"$LOGS/mariadb-install-db.out" 2>&1 \
        || { cat "$LOGS/mariadb-install-db.out" >&2; die "mariadb-install-db failed"; }
    setsid mariadbd --no-defaults --datadir="$DIR/mysql" --user=root --bind-address=127.0.0.1 \
        --port=$((PORT + 3)) --socket="$DIR/mysql.sock" --pid-file="$PIDS/mariadb.daemon.pid" \
        --log-error="$LOGS/mariadb.log" --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
        --skip-name-resolve </dev/null >"$LOGS/mariadb.out" 2>&1 &
    echo $! >"$PIDS/mariadb.pid"
    wait_until 600 mariadb_up_or_dead
    mariadb_ok || { dump_logs; die "MariaDB did not start"; }
    mariadb --no-defaults --socket="$DIR/mysql.sock" -u root -e "
        CREATE DATABASE slurm_acct_db;
        CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY 'pbptest';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || die "cannot create the accounting database"

    cat >"$DIR/slurmdbd.conf" <<EOF
# Written by slurm/testbed.sh; found by slurmdbd next to \$SLURM_CONF.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((PORT + 2))
SlurmUser=root
LogFile=$LOGS/slurmdbd.log
PidFile=$PIDS/slurmdbd.daemon.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((PORT + 3))
StorageUser=slurm
StoragePass=pbptest
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/slurmdbd.conf"
    log "starting slurmdbd"
    setsid slurmdbd -D </dev/null >"$LOGS/slurmdbd.out" 2>&1 &
    echo $! >"$PIDS/slurmdbd.pid"
    wait_until 600 dbd_up_or_dead
    dbd_ok || { dump_logs; die "slurmdbd did not start"; }
    sacctmgr -i add cluster pbptest >"$LOGS/sacctmgr.out" 2>&1 \
        || { cat "$LOGS/sacctmgr.out" >&2; die "sacctmgr add cluster failed"; }
}

# One above the highest job ID that the last bed in DIR recorded (jobcomp.log); a new bed starts at a
# random ID. MPICH names its shared-memory segment after the PMI key space, which srun makes of
# job and step IDs: a segment left in /dev/shm by a job killed mid-start-up made the next bed's job 1
# fail in MPI_Init ("MPIDI_POSIX_comm_bootstrap: Out of memory") when every bed began at 1.
first_job_id() {
    local last
    last=$(grep -o 'JobId=[0-9]*' "$DIR/jobcomp.log" 2>/dev/null | cut -d= -f2 | sort -n | tail -n1)
    echo $((${last:-$(( (RANDOM * 32768 + RANDOM) % 5000000 + 1000 ))} + 1))
}

write_conf() {
    local host cpus mem_total mem
    host=$(hostname -s 2>/dev/null || hostname)
    cpus=${PBP_TESTBED_CPUS:-$(nproc)}
    [ -n "${PBP_TESTBED_CPUS:-}" ] || [ "$cpus" -ge 8 ] || cpus=8
    mem_total=$(free -m | awk '/^Mem:/ {print $2}')
    mem=$((mem_total * 9 / 10))
    [ "$mem" -ge 1 ] || mem=1
    {
        cat <<EOF
# Written by slurm/testbed.sh for a test bed of $NODES node(s) on this host; \`start\` rewrites it.
ClusterName=pbptest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job must wait before it may start again (default 120 s);
# short here so that requeue tests are quick.
AuthInfo=cred_expire=10
MailProg=/bin/true

StateSaveLocation=$DIR/state
# %n: the node name -- every slurmd of this host has its own spool, PID file and log
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$PIDS/slurmctld.daemon.pid
SlurmdPidFile=$PIDS/slurmd-%n.daemon.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
# No MPI default on purpose: job scripts must pass --mpi (pmi2 for MPICH, pmix for Open MPI).
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=5
# The node's size comes from this file, not the hardware (PBP_TESTBED_CPUS may exceed nproc).
SlurmdParameters=config_overrides
# Reject at submission what the node can never run, instead of leaving it pending forever.
EnforcePartLimits=ALL

JobRequeue=1
ReturnToService=2
SlurmdTimeout=30
SlurmctldTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=3600
MessageTimeout=20

JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=10
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.log
EOF
        if [ "$ACCOUNTING" = slurmdbd ]; then
            cat <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((PORT + 2))
EOF
        else
            echo "AccountingStorageType=accounting_storage/none"
        fi
        echo "FirstJobId=$(first_job_id)"
        echo
        # one slurmd per node, all on this host: distinct names and ports, the same NodeHostname
        local k=0 name
        for name in $(node_names); do
            k=$((k + 1))
            echo "NodeName=$name NodeAddr=127.0.0.1 NodeHostname=$host Port=$(node_port $k) CPUs=$cpus RealMemory=$mem State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=$(node_names | paste -sd,) Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
    } >"$CONF"
    cat >"$DIR/env.sh" <<EOF
# Source this to use the Slurm test bed started by slurm/testbed.sh in $DIR
export SLURM_CONF=$CONF
EOF
}

all_alive() {
    local n
    for n in $(daemons); do
        pid_alive "$PIDS/$n.pid" || return 1
    done
}

do_start() {
    local t0=$SECONDS node st n
    [ "$(id -u)" = 0 ] || skip "the Slurm test bed needs root (it installs packages and runs slurmd as root); uid is $(id -u)"
    mkdir -p "$PIDS" "$LOGS"

    if [ -s "$CONF" ] && all_alive; then
        log "already running in $DIR"
    else
        do_stop 2>/dev/null # leftovers of a failed or half-stopped start
        mkdir -p "$PIDS" "$LOGS"
        local p busy="" k
        for p in $PORT $((PORT + 2)) $((PORT + 3)) $(for k in $(seq 1 "$NODES"); do node_port "$k"; done); do
            port_busy "$p" && busy="$busy $p"
        done
        [ -z "$busy" ] || die "TCP port(s)$busy on 127.0.0.1 already in use (another Slurm or test bed?);" \
            "stop it or choose other ports with PBP_TESTBED_PORT=BASE (uses BASE..BASE+$((NODES + 2))))"
        install_packages
        start_munge
        rm -rf "$DIR/state" "$DIR/spool"
        mkdir -p "$DIR/state"
        for node in $(node_names); do mkdir -p "$DIR/spool/$node"; done
        write_conf # before jobcomp.log goes: it reads the last job ID there
        rm -f "$DIR/jobcomp.log"
        for n in $(daemons); do : >"$LOGS/$n.log"; done
        [ "$ACCOUNTING" = slurmdbd ] && start_accounting

        log "starting slurmctld"
        setsid slurmctld -D -f "$CONF" </dev/null >"$LOGS/slurmctld.out" 2>&1 &
        echo $! >"$PIDS/slurmctld.pid"
        ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP' || ! pid_alive "$PIDS/slurmctld.pid"; }
        wait_until 200 ctld_up
        pid_alive "$PIDS/slurmctld.pid" || { dump_logs; die "slurmctld exited at start (see the logs above)"; }
        for node in $(node_names); do
            log "starting slurmd for node $node"
            setsid slurmd -D -f "$CONF" -N "$node" </dev/null >"$LOGS/slurmd-$node.out" 2>&1 &
            echo $! >"$PIDS/slurmd-$node.pid"
        done
    fi

    local timeout=${PBP_TESTBED_TIMEOUT:-60} deadline
    deadline=$((SECONDS + timeout))
    while :; do
        st=$(node_state)
        [ "$st" = up ] && break
        for n in $(daemons); do
            pid_alive "$PIDS/$n.pid" || { dump_logs; die "$n exited during start (node state '${st:-none}')"; }
        done
        if [ $SECONDS -ge $deadline ]; then
            sinfo -N -l >&2
            dump_logs
            die "nodes not idle after ${timeout} s (state '${st:-none}')"
        fi
        sleep 0.3
    done
    log "up in $((SECONDS - t0)) s: $NODES node(s) ($(node_names | paste -sd' ')) $st, accounting $ACCOUNTING; use:  . $DIR/env.sh"
    echo "export SLURM_CONF=$CONF"
}

case $CMD in
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
esac
