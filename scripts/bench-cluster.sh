#!/usr/bin/env bash
# make bench: the cost of cluster mode and its failover time (issue 16).
#
# Starts a 3-member etcd on loopback ports, two fcnbd nodes of I/O group 0 sharing a directory
# (the owner serves), and a single-node fcnbd, all on this disk; fills one volume on each with
# the same random image; runs bench.sh's four fio rows against both, alternating, and prints
# cluster/single per row (goal >= 0.9x). Then kills the owner with kill -9 BENCH_KILLS times and
# reports how long the partner took to serve (median and max).
#
# Env: FCNBD_BIN, BENCH_DIR (default .cache/bench-cluster), BENCH_SIZE (1G), BENCH_RUNTIME (10),
# BENCH_ROUNDS (2), BENCH_KILLS (5), BENCH_LEASE (2s).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${FCNBD_BIN:-$PWD/bin/fcnbd}
dir=${BENCH_DIR:-$PWD/.cache/bench-cluster}
size=${BENCH_SIZE:-1G}
runtime=${BENCH_RUNTIME:-10}
rounds=${BENCH_ROUNDS:-2}
kills=${BENCH_KILLS:-5}
lease=${BENCH_LEASE:-2s}

rm -rf "$dir"; mkdir -p "$dir/results" "$dir/single" "$dir/shared"
pids=()
cleanup() {
  for p in "${pids[@]}" $(cat "$dir"/a.pid "$dir"/b.pid 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
. scripts/fio-rows.sh
wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "bench-cluster: $1 did not appear" >&2; exit 1; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# etcd: three members on loopback.
declare -a cl pe
for i in 0 1 2; do cl[$i]=http://127.0.0.1:$(port); pe[$i]=http://127.0.0.1:$(port); done
initial="m0=${pe[0]},m1=${pe[1]},m2=${pe[2]}"
for i in 0 1 2; do
  etcd --name m$i --data-dir "$dir/etcd$i" --listen-client-urls "${cl[$i]}" --advertise-client-urls "${cl[$i]}" \
    --listen-peer-urls "${pe[$i]}" --initial-advertise-peer-urls "${pe[$i]}" --initial-cluster "$initial" \
    --initial-cluster-state new --initial-cluster-token bench >"$dir/etcd$i.log" 2>&1 &
  pids+=($!)
done
endpoints="${cl[0]},${cl[1]},${cl[2]}"
for _ in $(seq 100); do ETCDCTL_API=3 etcdctl --endpoints "$endpoints" --command-timeout=1s put /bench 1 >/dev/null 2>&1 && break; sleep 0.2; done

node() { # name: start a cluster node (as a standby; the first one becomes the owner)
  "$bin" serve --cluster "$endpoints" --node "$1" --iogrp 0 --shared-dir "$dir/shared" --lease "$lease" \
    --socket "$dir/$1.ctl" --nbd-unix "$dir/$1.sock" --nbd-tcp "" --log-level warn >>"$dir/$1.log" 2>&1 &
  echo $! >"$dir/$1.pid"
}
node a; wait_sock "$dir/a.ctl"; node b
"$bin" --socket "$dir/a.ctl" mkvolume -name bench -size "$size" >/dev/null
"$bin" serve --data-dir "$dir/single" --socket "$dir/s.ctl" --nbd-unix "$dir/s.sock" --nbd-tcp "" --log-level warn &
pids+=($!)
wait_sock "$dir/s.ctl"
"$bin" --socket "$dir/s.ctl" mkvolume -name bench -size "$size" >/dev/null

declare -A uri=([single]="nbd+unix:///bench?socket=$dir/s.sock" [cluster]="nbd+unix:///bench?socket=$dir/a.sock")
head -c "$(numfmt --from=iec "$size")" /dev/urandom >"$dir/src.img"
for s in single cluster; do nbdcopy "$dir/src.img" "${uri[$s]}"; done
rm -f "$dir/src.img"; sync

fio_rows "$dir/results" single cluster

# Failover: kill -9 the owner; time until the partner serves the volume (nbdinfo answers).
owner=a; other=b
: >"$dir/failover.txt"
for k in $(seq "$kills"); do
  sleep 1
  t0=$(date +%s.%N)
  kill -9 "$(cat "$dir/$owner.pid")"
  until nbdinfo --size "nbd+unix:///bench?socket=$dir/$other.sock" >/dev/null 2>&1; do sleep 0.01; done
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc >>"$dir/failover.txt"
  rm -f "$dir/$owner.sock"
  node "$owner" # back as a standby
  tmp=$owner; owner=$other; other=$tmp
done

python3 - "$dir/results" "$rounds" "$dir/failover.txt" "$lease" <<'PY'
import json, os, statistics, sys
res, rounds, fo, lease = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def one(row, s, r):
    j = json.load(open(os.path.join(res, f"{row}.{s}.{r}.json")))["jobs"][0]
    side = j["write"] if j["write"]["io_bytes"] else j["read"]
    return side["iops"], side["bw_bytes"] / 2**20
print()
print("cluster mode (owner of a 2-node I/O group, etcd x3) against single-node fcnbd, same run:")
print(f"{'row':<14}{'mode':<10}{'IOPS':>10}{'MiB/s':>10}{'cluster/single':>16}  IOPS per round")
for row in ["randwrite-4k", "randread-4k", "seqwrite-1m", "seqread-1m"]:
    m, samples = {}, {}
    for s in ["single", "cluster"]:
        samples[s] = [one(row, s, r) for r in range(1, rounds + 1)]
        m[s] = tuple(statistics.median(x[i] for x in samples[s]) for i in range(2))
    for s in ["single", "cluster"]:
        ratio = f"{m['cluster'][0] / m['single'][0]:.2f}x" if s == "cluster" else ""
        per = " ".join(f"{x[0]:.0f}" for x in samples[s])
        print(f"{row:<14}{s:<10}{m[s][0]:>10.0f}{m[s][1]:>10.1f}{ratio:>16}  {per}")
t = [float(x) for x in open(fo).read().split()]
if t:
    print(f"failover (kill -9 of the owner until the partner serves, lease {lease}): "
          f"median {statistics.median(t):.2f} s, max {max(t):.2f} s over {len(t)} kills")
PY
