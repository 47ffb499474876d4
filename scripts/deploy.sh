#!/usr/bin/env bash
# Deploy a new build of handoff with zero downtime, and report the verdict.
#
#   scripts/deploy.sh NEW_BUILD LIVE_BINARY PIDFILE [HEALTH_URL]
#
# Copies NEW_BUILD beside LIVE_BINARY, checks that it runs, renames it over the live binary
# (atomic: the running process keeps its old inode), and runs `handoff upgrade`, which waits
# until the new process is ready or says why it is not. Exit 0 when the new process serves;
# otherwise handoff upgrade's exit code (1: upgrade failed, the old process keeps serving;
# 5: nothing answers on the control socket; 6: no verdict in time) and its reason on stderr.
# When the upgrade failed, the previous binary is put back at LIVE_BINARY, so that a later
# restart runs what is serving now.
# With HEALTH_URL (e.g. http://127.0.0.1:8080/healthz) it then checks that the URL answers
# from the PID now in PIDFILE (its Handoff-Pid header).
set -euo pipefail

new=${1:?usage: deploy.sh NEW_BUILD LIVE_BINARY PIDFILE}
live=${2:?usage: deploy.sh NEW_BUILD LIVE_BINARY PIDFILE}
pidfile=${3:?usage: deploy.sh NEW_BUILD LIVE_BINARY PIDFILE}
health=${4:-}

die() { echo "deploy: $*" >&2; exit 1; }

[ -f "$new" ] || die "no build at $new"
tmp="$live.new.$$"
cp "$new" "$tmp"
chmod 0755 "$tmp"
if ! version=$("$tmp" version); then
  rm -f "$tmp"
  die "$new does not run; nothing deployed"
fi
client="$live"
if [ -f "$live" ]; then
  cp -p "$live" "$live.prev"
  client="$live.prev" # the binary that serves now asks for the upgrade: it is known to work
fi
mv -f "$tmp" "$live"
echo "deploy: $live is now version $version; upgrading"
status=0
"$client" upgrade --pidfile "$pidfile" --wait --timeout "${DEPLOY_TIMEOUT:-120s}" || status=$?
if [ "$status" -eq 1 ] && [ -f "$live.prev" ]; then
  mv -f "$live.prev" "$live"
  echo "deploy: upgrade failed; the previous binary is back at $live" >&2
fi
[ "$status" -eq 0 ] || exit "$status"
[ -n "$health" ] || exit 0
pid=$(cat "$pidfile")
for _ in $(seq 50); do
  if curl -fsS -D - -o /dev/null "$health" | tr -d '\r' | grep -qi "^handoff-pid: $pid\$"; then
    echo "deploy: $health answers from pid $pid"
    exit 0
  fi
  sleep 0.1
done
die "$health does not answer from pid $pid"
