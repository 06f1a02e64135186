#!/usr/bin/env bash
# Stop the single-machine SLURM cluster started by start.sh.
#
#   stop.sh [--state-dir DIR]
#
# Cancels remaining jobs, stops every daemon by the PID in its pid file (slurmd per node, slurmctld,
# slurmdbd, mariadbd, munged), waits for each to exit, and removes the /etc/hosts lines start.sh added.
# Keeps the state dir (database, logs, job-id counter) so the next start.sh continues job ids.
# Idempotent: stopping a stopped cluster succeeds.
set -uo pipefail

STATE="${KDSCALE_SLURM_STATE_DIR:-/tmp/kdscale-slurm}"
while [ $# -gt 0 ]; do
  case "$1" in
    --state-dir) STATE="$2"; shift 2 ;;
    --state-dir=*) STATE="${1#*=}"; shift ;;
    -h|--help) sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "stop.sh: unknown argument: $1" >&2; exit 1 ;;
  esac
done
case "$STATE" in /*) ;; *) STATE="$(pwd)/$STATE" ;; esac
STATE="${STATE%/}"
HOSTS_TAG="# kdscale-local-slurm[${STATE}]"
export SLURM_CONF="$STATE/etc/slurm.conf"
log() { echo "stop.sh: $*" >&2; }

if [ ! -d "$STATE" ]; then
  log "no state dir $STATE; nothing to stop"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "stop.sh: must run as root (the daemons run as root)" >&2
  exit 2
fi
if [ "${KDSCALE_SLURM_LOCKED:-0}" != 1 ]; then
  exec 9>"$STATE/.lock"
  flock -w 300 9 || { log "another start.sh/stop.sh holds $STATE/.lock"; exit 1; }
fi

pid_of() {  # pid_of PIDFILE COMM -> prints the pid when the file names a live process with that comm
  local f="$1" comm="$2" pid
  [ -s "$f" ] || return 1
  pid="$(tr -dc '0-9' < "$f")"
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ] || return 1
  echo "$pid"
}

stop_pid() {  # stop_pid PID NAME TIMEOUT_S : SIGTERM, wait, SIGKILL after the timeout
  local pid="$1" name="$2" secs="$3" end
  kill -TERM "$pid" 2>/dev/null || return 0
  end=$(( $(date +%s) + secs ))
  while [ -d "/proc/$pid" ] && [ "$(cat "/proc/$pid/stat" 2>/dev/null | awk '{print $3}')" != Z ]; do
    if [ "$(date +%s)" -ge "$end" ]; then
      log "$name (pid $pid) ignored SIGTERM for ${secs}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null
      sleep 0.2
      break
    fi
    sleep 0.1
  done
}

stop_daemon() {  # stop_daemon PIDFILE COMM TIMEOUT_S
  local pid
  if pid="$(pid_of "$1" "$2")"; then
    stop_pid "$pid" "$2" "$3"
    log "stopped $2 (pid $pid)"
  fi
  rm -f "$1"
}

# 1. Remember the next job id, then cancel what is still queued or running (jobs die within KillWait).
if ctld="$(pid_of "$STATE/run/slurmctld.pid" slurmctld)"; then
  next="$(timeout 10 scontrol show config 2>/dev/null | awk -F'= *' '/^NEXT_JOB_ID/ {print $2}' | tr -dc '0-9')"
  [ -n "$next" ] && echo "$next" > "$STATE/next_job_id"
  jobs="$(timeout 10 squeue -h -o %A 2>/dev/null | tr '\n' ' ')"
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    timeout 10 scancel $jobs 2>/dev/null
    end=$(( $(date +%s) + 20 ))
    while [ -n "$(timeout 10 squeue -h -o %A 2>/dev/null)" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 0.5; done
  fi
  # Let slurmctld hand its pending accounting records to slurmdbd (else they wait in dbd.messages).
  end=$(( $(date +%s) + 10 ))
  while [ "$(date +%s)" -lt "$end" ]; do
    q="$(timeout 10 sdiag 2>/dev/null | awk -F: '/DBD Agent queue size/ {gsub(/ /, "", $2); print $2}')"
    [ -z "$q" ] || [ "$q" = 0 ] && break
    sleep 0.3
  done
fi

# 2. Daemons, from the leaves to the root.
for f in "$STATE"/run/slurmd.*.pid; do
  [ -e "$f" ] && stop_daemon "$f" slurmd 20
done
# Safety net: a slurmstepd of this cluster that outlived its slurmd (it carries our SLURM_CONF).
for d in /proc/[0-9]*; do
  [ "$(cat "$d/comm" 2>/dev/null)" = slurmstepd ] || continue
  if tr '\0' '\n' < "$d/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$SLURM_CONF"; then
    stop_pid "${d#/proc/}" slurmstepd 5
    log "stopped leftover slurmstepd (pid ${d#/proc/})"
  fi
done
stop_daemon "$STATE/run/slurmctld.pid" slurmctld 20
stop_daemon "$STATE/run/slurmdbd.pid" slurmdbd 20
stop_daemon "$STATE/mariadb/mariadbd.pid" mariadbd 60
stop_daemon "$STATE/munge/munged.pid" munged 10
rm -f "$STATE/munge/munge.socket" "$STATE/munge/munge.socket.lock" "$STATE/params"

# 3. /etc/hosts: remove exactly the lines start.sh added for this state dir (in place: may be a bind mount).
if grep -qF "$HOSTS_TAG" /etc/hosts 2>/dev/null; then
  tmp="$(mktemp)"
  grep -vF "$HOSTS_TAG" /etc/hosts > "$tmp"
  cat "$tmp" > /etc/hosts
  rm -f "$tmp"
  log "removed the n1..nK lines from /etc/hosts"
fi
log "cluster in $STATE stopped"
exit 0
