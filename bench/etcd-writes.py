#!/usr/bin/env python3
"""Counts what etcd writes, by key prefix, through etcd's own watch (its v3 JSON
gateway): every put and delete under `/`, with the bytes of key and value.

  bench/etcd-writes.py watch URL OUT.jsonl   # until killed: one line per write
  bench/etcd-writes.py sum OUT.jsonl FROM TO  # bytes/s by prefix between two unix times

URL is the etcd client URL (the test control plane's, e.g. read from etcd's
`--listen-client-urls`). The prefix is the key's first three path parts
(`/registry/leases/<namespace>`), with Lease names grouped by what they are."""
import base64, collections, json, sys, time, urllib.request


def watch(url, out):
    body = json.dumps({"create_request": {
        "key": base64.b64encode(b"/").decode(),
        "range_end": base64.b64encode(b"0").decode()}}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/v3/watch", data=body)
    with urllib.request.urlopen(req) as resp, open(out, "a") as f:
        for line in resp:
            msg = json.loads(line).get("result", {})
            now = time.time()
            for ev in msg.get("events", []):
                kv = ev.get("kv", {})
                key = base64.b64decode(kv.get("key", "")).decode(errors="replace")
                size = len(base64.b64decode(kv.get("value", ""))) + len(key)
                f.write(json.dumps({"t": now, "type": ev.get("type", "PUT"),
                                    "key": key, "bytes": size}) + "\n")
            f.flush()


def group(key):
    parts = key.split("/")
    prefix = "/".join(parts[:4])
    if len(parts) > 3 and parts[2] in ("minions", "events"):
        return prefix if parts[2] == "events" else "/".join(parts[:3]) + "/*"
    if len(parts) > 4 and parts[2] == "leases":
        name = parts[4]
        for kind in ("localnfs-usage-", "localnfs-node-", "localnfs-controller"):
            if name.startswith(kind):
                return prefix + "/" + kind + "*"
        if parts[3] == "kube-node-lease":
            return prefix + "/<node>"
        return prefix + "/" + name
    return prefix


def summary(path, start, end):
    total = collections.Counter()
    count = collections.Counter()
    for line in open(path):
        e = json.loads(line)
        if start <= e["t"] < end:
            g = group(e["key"])
            total[g] += e["bytes"]
            count[g] += 1
    secs = end - start
    print(f"{'prefix':60} {'writes/s':>9} {'KB/s':>8}")
    for g, b in total.most_common():
        print(f"{g:60} {count[g] / secs:9.2f} {b / secs / 1e3:8.2f}")
    print(f"{'all':60} {sum(count.values()) / secs:9.2f} {sum(total.values()) / secs / 1e3:8.2f}")


if __name__ == "__main__":
    if sys.argv[1] == "watch":
        watch(sys.argv[2], sys.argv[3])
    else:
        summary(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
