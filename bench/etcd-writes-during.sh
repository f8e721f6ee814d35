#!/bin/sh
# Waits for the etcd that process $1 (a bench) starts and records its writes into $2
# (see etcd-writes.py) until that etcd exits.
parent=$1 out=$2
while :; do
  pid=$(pgrep -x -P "$parent" etcd) && break
  sleep 1
done
url=$(tr '\0' '\n' < /proc/$pid/cmdline | grep -A1 -- '--listen-client-urls' | tail -1)
sleep 2
exec python3 "$(dirname "$0")/etcd-writes.py" watch "$url" "$out"
