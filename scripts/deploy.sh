#!/usr/bin/env bash
# Deploy a new build of handoff with zero downtime, and report the verdict.
#
#   scripts/deploy.sh NEW_BUILD LIVE_BINARY PIDFILE
#
# Copies NEW_BUILD beside LIVE_BINARY, checks that it runs, renames it over the live binary
# (atomic: the running process keeps its old inode), and runs `handoff upgrade`, which waits
# until the new process is ready or says why it is not. Exit 0 when the new process serves;
# otherwise handoff upgrade's exit code (1: upgrade failed, the old process keeps serving;
# 5: nothing answers on the control socket; 6: no verdict in time) and its reason on stderr.
set -euo pipefail

new=${1:?usage: deploy.sh NEW_BUILD LIVE_BINARY PIDFILE}
live=${2:?usage: deploy.sh NEW_BUILD LIVE_BINARY PIDFILE}
pidfile=${3:?usage: deploy.sh NEW_BUILD LIVE_BINARY PIDFILE}

die() { echo "deploy: $*" >&2; exit 1; }

[ -f "$new" ] || die "no build at $new"
tmp="$live.new.$$"
cp "$new" "$tmp"
chmod 0755 "$tmp"
if ! version=$("$tmp" version); then
  rm -f "$tmp"
  die "$new does not run; nothing deployed"
fi
mv -f "$tmp" "$live"
echo "deploy: $live is now version $version; upgrading"
exec "$live" upgrade --pidfile "$pidfile" --wait --timeout "${DEPLOY_TIMEOUT:-120s}"
