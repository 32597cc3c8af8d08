#!/bin/bash
# Runs one lab host: systemd-nspawn (given as the arguments) in a loop that starts it again when the
# container reboots (nspawn exits with 133). `lab down` sends SIGTERM to this process group: nspawn then
# shuts the container down cleanly (systemd gets SIGRTMIN+3) and the loop ends.
set -u
child=""
stop=0
trap 'stop=1; [ -n "$child" ] && kill -TERM "$child" 2>/dev/null' TERM INT HUP
while :; do
  "$@" &
  child=$!
  # `wait` returns early when a trap runs: keep waiting until nspawn itself has exited
  while :; do
    wait "$child"
    rc=$?
    kill -0 "$child" 2>/dev/null || break
  done
  [ "$stop" = 1 ] && exit 0
  [ "$rc" -eq 133 ] || exit "$rc"
  echo "hostloop: the container rebooted; starting it again"
done
