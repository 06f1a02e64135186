#!/usr/bin/env bash
# Start a real single-machine SLURM cluster (munged, MariaDB, slurmdbd, slurmctld, K emulated slurmd nodes).
#
#   start.sh [--nodes K] [--cpus-per-node C] [--state-dir DIR] [--base-port P] [--timeout S] [--fresh] [--check]
#
#   --fresh  wipe the controller state (job ids still continue); --check  exit 0 if up with these settings, else 3
# Everything (configs, logs, spool, pids, database) lives under the state dir (default /tmp/kdscale-slurm).
# Clients: `. <state-dir>/env.sh` (exports SLURM_CONF), then sinfo / sbatch / srun / sacct as usual.
# Re-running with the same settings while the cluster is up is a no-op; different settings restart it.
#
# Exit codes: 0 up; 1 failed to start (logs tailed on stderr); 2 cannot provide SLURM on this machine
# (not root, no apt-get, package install failed, /etc/hosts not writable) -- tests skip on 2;
# 3 (--check only) not running with these settings.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NODES=4
CPUS=2
STATE="${KDSCALE_SLURM_STATE_DIR:-/tmp/kdscale-slurm}"
BASE_PORT="${KDSCALE_SLURM_BASE_PORT:-16800}"
TIMEOUT=60
CHECK_ONLY=0
FRESH=0
CLUSTER=kdscale
PKGS=(munge mariadb-server slurmdbd slurmctld slurmd slurm-client)

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'; }
die() { echo "start.sh: error: $*" >&2; exit 1; }
unavailable() { echo "start.sh: cannot provide SLURM here: $*" >&2; exit 2; }
log() { echo "start.sh: $*" >&2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --nodes=*) NODES="${1#*=}"; shift ;;
    --cpus-per-node) CPUS="$2"; shift 2 ;;
    --cpus-per-node=*) CPUS="${1#*=}"; shift ;;
    --state-dir) STATE="$2"; shift 2 ;;
    --state-dir=*) STATE="${1#*=}"; shift ;;
    --base-port) BASE_PORT="$2"; shift 2 ;;
    --base-port=*) BASE_PORT="${1#*=}"; shift ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --timeout=*) TIMEOUT="${1#*=}"; shift ;;
    --check) CHECK_ONLY=1; shift ;;
    --fresh) FRESH=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "start.sh: unknown argument: $1" >&2; usage >&2; exit 1 ;;
  esac
done

[[ "$NODES" =~ ^[1-9][0-9]*$ ]] && [ "$NODES" -le 64 ] || die "--nodes must be 1..64 (got '$NODES')"
[[ "$CPUS" =~ ^[1-9][0-9]*$ ]] || die "--cpus-per-node must be a positive integer (got '$CPUS')"
[[ "$BASE_PORT" =~ ^[0-9]+$ ]] && [ "$BASE_PORT" -ge 1024 ] && [ "$BASE_PORT" -le 65000 ] || die "bad --base-port '$BASE_PORT'"
[[ "$TIMEOUT" =~ ^[0-9]+$ ]] || die "bad --timeout '$TIMEOUT'"
case "$STATE" in /*) ;; *) STATE="$(pwd)/$STATE" ;; esac
STATE="${STATE%/}"

# Ports: MariaDB base+6, slurmctld base+17, slurmdbd base+19, slurmd base+101 .. base+100+K.
DB_PORT=$((BASE_PORT + 6))
CTLD_PORT=$((BASE_PORT + 17))
DBD_PORT=$((BASE_PORT + 19))
SLURMD_PORT0=$((BASE_PORT + 101))
SLURMD_PORTN=$((BASE_PORT + 100 + NODES))
HOST="$(hostname -s)"
HOSTS_TAG="# kdscale-local-slurm[${STATE}]"
SLURM_CONF="$STATE/etc/slurm.conf"
export SLURM_CONF
MYCNF="$STATE/etc/mariadb.cnf"
MUNGE_SOCKET="$STATE/munge/munge.socket"

# ---------------------------------------------------------------- preconditions (exit 2)
[ "$(uname -s)" = Linux ] || unavailable "not Linux"
[ "$(id -u)" -eq 0 ] || unavailable "must run as root (daemons, /etc/hosts, apt-get); running as $(id -un)"
[ -w /etc/hosts ] || unavailable "/etc/hosts is not writable (node names n1..nK must resolve)"

# ---------------------------------------------------------------- params (what defines "same cluster")
TEMPLATES_SUM="$(cat "$HERE/slurm.conf.in" "$HERE/slurmdbd.conf.in" "$HERE/mariadb.cnf.in" | md5sum | cut -d' ' -f1)"
PARAMS="nodes=$NODES cpus=$CPUS base_port=$BASE_PORT host=$HOST templates=$TEMPLATES_SUM"

pid_alive() {  # pid_alive PIDFILE COMM -> 0 when the pid file names a live process with that comm
  local f="$1" comm="$2" pid
  [ -s "$f" ] || return 1
  pid="$(tr -dc '0-9' < "$f")"
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ]
}

all_idle() {  # all K nodes idle (or mixed/alloc: responding) according to sinfo
  local out n
  out="$(timeout 10 sinfo -h -N -p debug -o '%N %t' 2>/dev/null)" || return 1
  n="$(printf '%s\n' "$out" | awk '$2 ~ /^(idle|mix|alloc)$/' | wc -l)"
  [ "$n" -eq "$NODES" ] && [ "$(printf '%s\n' "$out" | wc -l)" -eq "$NODES" ]
}

cluster_up() {
  [ -f "$STATE/params" ] && [ "$(cat "$STATE/params")" = "$PARAMS" ] || return 1
  [ -x "$(command -v slurmctld)" ] || return 1
  pid_alive "$STATE/munge/munged.pid" munged || return 1
  pid_alive "$STATE/mariadb/mariadbd.pid" mariadbd || return 1
  pid_alive "$STATE/run/slurmdbd.pid" slurmdbd || return 1
  pid_alive "$STATE/run/slurmctld.pid" slurmctld || return 1
  local i
  for i in $(seq 1 "$NODES"); do pid_alive "$STATE/run/slurmd.n$i.pid" slurmd || return 1; done
  for i in $(seq 1 "$NODES"); do grep -qF "n$i $HOSTS_TAG" /etc/hosts || return 1; done
  all_idle
}

if [ "$CHECK_ONLY" = 1 ]; then
  if cluster_up; then echo "start.sh: cluster up ($PARAMS, state $STATE)"; exit 0; fi
  echo "start.sh: cluster not running with these settings (state $STATE)"; exit 3
fi

mkdir -p "$STATE"
exec 9>"$STATE/.lock"
flock -w 300 9 || die "another start.sh/stop.sh holds $STATE/.lock"

if [ "$FRESH" = 0 ] && cluster_up; then
  log "cluster already up with the same settings (state $STATE); nothing to do"
  exit 0
fi

# ---------------------------------------------------------------- packages
have_all() {
  local p
  for p in "${PKGS[@]}"; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || return 1
  done
  command -v slurmctld >/dev/null && command -v mariadbd >/dev/null && command -v munged >/dev/null
}

T0=$(date +%s.%N)
if ! have_all; then
  command -v apt-get >/dev/null || unavailable "SLURM packages missing and apt-get is unavailable"
  command -v dpkg-query >/dev/null || unavailable "dpkg-query is unavailable"
  missing=()
  for p in "${PKGS[@]}"; do
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
  done
  log "installing ${missing[*]} (apt-get)"
  # Do not let package scripts start system-wide services (we run our own daemons).
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" \
                    > "$STATE/apt.log" 2>&1; }
  rc=0
  apt_install || { log "apt-get install failed; running apt-get update and retrying"
                   { DEBIAN_FRONTEND=noninteractive apt-get update >> "$STATE/apt.log" 2>&1 && apt_install; } || rc=$?; }
  if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
  if [ "$rc" -ne 0 ] || ! have_all; then
    tail -n 15 "$STATE/apt.log" >&2 || true
    unavailable "apt-get could not install ${missing[*]} (see $STATE/apt.log)"
  fi
  log "packages installed in $(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
fi
id munge >/dev/null 2>&1 || unavailable "user munge is missing after installing munge"
id mysql >/dev/null 2>&1 || unavailable "user mysql is missing after installing mariadb-server"

# ---------------------------------------------------------------- stop whatever is left of an older start
if compgen -G "$STATE/run/*.pid" >/dev/null || [ -e "$STATE/munge/munged.pid" ] || [ -e "$STATE/mariadb/mariadbd.pid" ] \
   || grep -qF "$HOSTS_TAG" /etc/hosts; then
  log "stopping the previous cluster in $STATE (settings changed or a daemon is down)"
  KDSCALE_SLURM_LOCKED=1 "$HERE/stop.sh" --state-dir "$STATE" >&2 || die "stop.sh failed"
fi

tail_logs() {
  local f
  for f in "$STATE"/log/*.log "$STATE/munge/munged.log"; do
    [ -s "$f" ] || continue
    echo "----- tail $f" >&2
    tail -n 15 "$f" >&2
  done
}
fail() { echo "start.sh: error: $*" >&2; tail_logs; exit 1; }

wait_for() {  # wait_for SECONDS DESCRIPTION CMD... : poll CMD every 0.2 s
  local secs="$1" what="$2"; shift 2
  local end=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$end" ] || fail "timed out after ${secs}s waiting for $what"
    sleep 0.2
  done
}

render() {  # render TEMPLATE OUT
  sed -e "s|@STATE@|$STATE|g" -e "s|@CLUSTER@|$CLUSTER|g" -e "s|@HOST@|$HOST|g" -e "s|@NODES@|$NODES|g" \
      -e "s|@CPUS@|$CPUS|g" -e "s|@MEM_MB@|$MEM_MB|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@DBD_PORT@|$DBD_PORT|g" \
      -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@SLURMD_PORT0@|$SLURMD_PORT0|g" -e "s|@SLURMD_PORTN@|$SLURMD_PORTN|g" \
      -e "s|@MUNGE_SOCKET@|$MUNGE_SOCKET|g" -e "s|@DB_PASS@|$DB_PASS|g" -e "s|@FIRST_JOB_ID@|$FIRST_JOB_ID|g" \
      "$1" > "$2.tmp"
  grep -q '@[A-Z_0-9]*@' "$2.tmp" && { rm -f "$2.tmp"; die "unsubstituted placeholder in $1"; }
  mv -f "$2.tmp" "$2"
}

T1=$(date +%s.%N)
mkdir -p "$STATE"/{etc,log,run,spool/ctld,munge,mariadb}
chmod 755 "$STATE" "$STATE/etc" "$STATE/log" "$STATE/run"
chown -R munge:munge "$STATE/munge"; chmod 755 "$STATE/munge"   # -R: uids change if the packages were reinstalled
chown -R mysql:mysql "$STATE/mariadb"; chmod 750 "$STATE/mariadb"
MEM_MB=$(( $(awk '/^MemTotal:/{print $2}' /proc/meminfo) / 1024 / NODES ))
[ "$MEM_MB" -ge 1 ] || MEM_MB=1
if [ ! -s "$STATE/etc/db.pass" ]; then
  (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' > "$STATE/etc/db.pass")
fi
DB_PASS="$(cat "$STATE/etc/db.pass")"
FIRST_JOB_ID=1

# ---------------------------------------------------------------- /etc/hosts: n1..nK -> 127.0.0.1
# Our own tagged lines are replaced; an untagged line mapping nK elsewhere is a conflict (exit 2).
hosts_tmp="$(mktemp)"
grep -vF "$HOSTS_TAG" /etc/hosts > "$hosts_tmp" || true
for i in $(seq 1 "$NODES"); do
  if awk -v n="n$i" '$1 !~ /^#/ { for (j = 2; j <= NF && $j !~ /^#/; j++) if ($j == n && $1 != "127.0.0.1") found=1 } END { exit !found }' "$hosts_tmp"; then
    rm -f "$hosts_tmp"; unavailable "/etc/hosts already maps n$i to another address"
  fi
  printf '127.0.0.1 n%s %s\n' "$i" "$HOSTS_TAG" >> "$hosts_tmp"
done
cat "$hosts_tmp" > /etc/hosts   # in place: /etc/hosts is often a bind mount (no rename)
rm -f "$hosts_tmp"

# ---------------------------------------------------------------- munged (as user munge, private socket)
if [ ! -s "$STATE/munge/munge.key" ]; then
  runuser -u munge -- mungekey --create --keyfile="$STATE/munge/munge.key" >/dev/null 2>&1 \
    || { cp /etc/munge/munge.key "$STATE/munge/munge.key" && chown munge:munge "$STATE/munge/munge.key"; } \
    || fail "cannot create a munge key"
  chmod 600 "$STATE/munge/munge.key"
fi
rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
runuser -u munge -- munged --socket="$MUNGE_SOCKET" --key-file="$STATE/munge/munge.key" \
  --log-file="$STATE/munge/munged.log" --pid-file="$STATE/munge/munged.pid" \
  --seed-file="$STATE/munge/munged.seed" </dev/null >>"$STATE/log/start-daemons.log" 2>&1 9>&- \
  || fail "munged did not start"
munge_ok() { munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET"; }
wait_for 20 "munged" munge_ok

# ---------------------------------------------------------------- MariaDB (own datadir, 127.0.0.1 only)
render "$HERE/mariadb.cnf.in" "$MYCNF"
chmod 644 "$MYCNF"
touch "$STATE/log/mariadb.log"; chown mysql:mysql "$STATE/log/mariadb.log"
if [ ! -d "$STATE/mariadb/data/mysql" ]; then
  log "initialising MariaDB datadir $STATE/mariadb/data"
  rm -rf "$STATE/mariadb/data"
  mariadb-install-db --defaults-file="$MYCNF" --skip-test-db --auth-root-authentication-method=socket \
    >"$STATE/log/mariadb-install-db.log" 2>&1 || fail "mariadb-install-db failed (see $STATE/log/mariadb-install-db.log)"
fi
setsid mariadbd --defaults-file="$MYCNF" </dev/null >>"$STATE/log/start-daemons.log" 2>&1 9>&- &
db_ok() { mariadb-admin --defaults-file="$MYCNF" --connect-timeout=2 ping; }
wait_for 60 "mariadbd" db_ok
mariadb --defaults-file="$MYCNF" -e "
  CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
  ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
  FLUSH PRIVILEGES;" || fail "cannot create the slurm database user"

# Job ids stay monotonic across restarts: the controller state is fresh on each start, so continue
# after the largest id the accounting database (or the last stop.sh) has seen.
db_max="$(mariadb --defaults-file="$MYCNF" -N -B -e "SELECT COALESCE(MAX(id_job),0) FROM slurm_acct_db.${CLUSTER}_job_table" 2>/dev/null || echo 0)"
[[ "$db_max" =~ ^[0-9]+$ ]] || db_max=0
saved_next="$(cat "$STATE/next_job_id" 2>/dev/null || echo 1)"
[[ "$saved_next" =~ ^[0-9]+$ ]] || saved_next=1
FIRST_JOB_ID=$(( db_max + 1 > saved_next ? db_max + 1 : saved_next ))

# ---------------------------------------------------------------- Slurm configs
render "$HERE/slurm.conf.in" "$SLURM_CONF"
chmod 644 "$SLURM_CONF"
render "$HERE/slurmdbd.conf.in" "$STATE/etc/slurmdbd.conf"
chmod 600 "$STATE/etc/slurmdbd.conf"
cat > "$STATE/env.sh" <<EOF
# Source this file to talk to the local SLURM cluster in $STATE (written by start.sh).
export SLURM_CONF=$SLURM_CONF
export KDSCALE_SLURM_STATE_DIR=$STATE
export KDSCALE_SLURM_NODES=$NODES
export KDSCALE_SLURM_CPUS_PER_NODE=$CPUS
export KDSCALE_SLURM_PARTITION=debug
export KDSCALE_SLURM_CLUSTER=$CLUSTER
EOF

# ---------------------------------------------------------------- slurmdbd + cluster registration
slurmdbd </dev/null >>"$STATE/log/start-daemons.log" 2>&1 9>&- || fail "slurmdbd did not start"
wait_for 60 "slurmdbd" sacctmgr -n -P list cluster
if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
  sacctmgr -i add cluster "$CLUSTER" >/dev/null || fail "sacctmgr add cluster $CLUSTER failed"
fi
# Adding a cluster creates account root + user root; make sure they exist (needed for sacct -a rows).
if ! sacctmgr -n -P list assoc cluster="$CLUSTER" user=root format=user | grep -qx root; then
  sacctmgr -i add account root cluster="$CLUSTER" >/dev/null 2>&1 || true
  sacctmgr -i add user root account=root cluster="$CLUSTER" >/dev/null 2>&1 || true
fi

# ---------------------------------------------------------------- slurmctld (fresh state) + slurmd per node
# The controller state (StateSaveLocation) is kept across restarts: job ids continue, and accounting
# records slurmctld had not yet handed to slurmdbd (dbd.messages, jobs without a db index) are sent after
# the restart. stop.sh cancels all jobs first, so nothing stale is left running. --fresh wipes it
# (job ids still continue through FirstJobId), except dbd.messages.
mkdir -p "$STATE/spool/ctld"
if [ "$FRESH" = 1 ]; then
  log "--fresh: wiping the controller state in $STATE/spool/ctld"
  find "$STATE/spool/ctld" -mindepth 1 -maxdepth 1 ! -name dbd.messages -exec rm -rf {} +
fi
rm -rf "$STATE"/spool/slurmd.n*
for i in $(seq 1 "$NODES"); do mkdir -p "$STATE/spool/slurmd.n$i"; done
slurmctld </dev/null >>"$STATE/log/start-daemons.log" 2>&1 9>&- || fail "slurmctld did not start"
wait_for 30 "slurmctld" scontrol ping
for i in $(seq 1 "$NODES"); do
  slurmd -N "n$i" </dev/null >>"$STATE/log/start-daemons.log" 2>&1 9>&- || fail "slurmd -N n$i did not start"
done
wait_for "$TIMEOUT" "all $NODES nodes idle in sinfo" all_idle
echo "$PARAMS" > "$STATE/params"

NEXT_ID="$(scontrol show config 2>/dev/null | awk -F'= *' '/^NEXT_JOB_ID/ {print $2}')"
log "cluster up: $NODES nodes x $CPUS cpus, partition debug, next job id ${NEXT_ID:-?}, daemons started in $(awk -v a="$T1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s (total $(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s)"
log "clients: . $STATE/env.sh"
