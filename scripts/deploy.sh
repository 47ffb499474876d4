#!/usr/bin/env bash
# Deploy a new build of handoff with zero downtime.
#
#   scripts/deploy.sh BINARY PIDFILE [HEALTH_URL]
#
# Builds nothing: BINARY is the live path (e.g. /srv/app/handoff) and a new build
# must be waiting at BINARY.new. The script renames it over the live binary, sends
# SIGHUP to the PID in PIDFILE, and waits until the PID file names a new process
# and HEALTH_URL (default http://127.0.0.1:8080/healthz) answers from that PID.
# Exit 0 when the new process serves; non-zero with the reason otherwise (the old
# process keeps serving: look at its log for "upgrade failed").
set -euo pipefail

binary=${1:?usage: deploy.sh BINARY PIDFILE [HEALTH_URL]}
pidfile=${2:?usage: deploy.sh BINARY PIDFILE [HEALTH_URL]}
health=${3:-http://127.0.0.1:8080/healthz}
timeout=${DEPLOY_TIMEOUT:-90}

die() { echo "deploy: $*" >&2; exit 1; }

[ -f "$binary.new" ] || die "no new build at $binary.new"
[ -x "$binary.new" ] || die "$binary.new is not executable"
"$binary.new" version >/dev/null || die "$binary.new does not run"
old=$(cat "$pidfile" 2>/dev/null) || die "cannot read $pidfile: is handoff running?"
kill -0 "$old" 2>/dev/null || die "process $old from $pidfile is not running"

mv -f "$binary.new" "$binary"
kill -HUP "$old"
echo "deploy: sent SIGHUP to $old"

deadline=$((SECONDS + timeout))
while [ "$SECONDS" -lt "$deadline" ]; do
  new=$(cat "$pidfile" 2>/dev/null || true)
  if [ -n "$new" ] && [ "$new" != "$old" ]; then
    if curl -fsS -D - -o /dev/null "$health" 2>/dev/null | tr -d '\r' | grep -qi "^handoff-pid: $new\$"; then
      version=$(curl -fsS -D - -o /dev/null "$health" | tr -d '\r' | sed -n 's/^[Hh]andoff-[Vv]ersion: //p')
      echo "deploy: process $new (version $version) serves; $old drains and exits"
      exit 0
    fi
  fi
  if ! kill -0 "$old" 2>/dev/null && [ "$new" = "$old" ]; then
    die "process $old exited and no new process took over"
  fi
  sleep 0.2
done
die "no new process became ready within ${timeout}s; $old keeps serving (see its log for \"upgrade failed\")"
