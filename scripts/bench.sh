#!/usr/bin/env bash
# make bench: fio (nbd ioengine) against fcnbd, nbdkit (file plugin) and qemu-nbd
# (cache=writeback, -e 8), each serving a file in the same directory over a Unix socket, the
# servers alternating row by row in one run. Prints IOPS, MiB/s and p99 latency per server and
# row, and fcnbd's ratio to each peer.
#
# Env: FCNBD_BIN (default bin/fcnbd), BENCH_DIR (default .cache/bench), BENCH_SIZE (default
# 1G), BENCH_RUNTIME seconds per measurement (default 10), BENCH_ROUNDS (default 2: each
# server measured this many times per row, alternating; the median is reported).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${FCNBD_BIN:-$PWD/bin/fcnbd}
dir=${BENCH_DIR:-$PWD/.cache/bench}
size=${BENCH_SIZE:-1G}
runtime=${BENCH_RUNTIME:-10}
rounds=${BENCH_ROUNDS:-2}

rm -rf "$dir"; mkdir -p "$dir/fcnbd" "$dir/results"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

wait_sock() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "bench: $1 did not appear" >&2; exit 1; }

# Peers' files, filled with incompressible data so no server reads holes.
bytes=$(numfmt --from=iec "$size")
head -c "$bytes" /dev/urandom > "$dir/nbdkit.img"
cp "$dir/nbdkit.img" "$dir/qemu.img"

"$bin" serve --data-dir "$dir/fcnbd" --socket "$dir/c.sock" --nbd-unix "$dir/fcnbd.sock" --nbd-tcp "" --log-level warn &
pids+=($!)
wait_sock "$dir/c.sock"
"$bin" --socket "$dir/c.sock" mkvolume -name bench -size "$size" >/dev/null
nbdcopy "$dir/nbdkit.img" "nbd+unix:///bench?socket=$dir/fcnbd.sock"

nbdkit -f -U "$dir/nbdkit.sock" file "$dir/nbdkit.img" &
pids+=($!)
qemu-nbd -k "$dir/qemu.sock" -f raw --cache=writeback -e 8 -t -x bench "$dir/qemu.img" &
pids+=($!)
wait_sock "$dir/nbdkit.sock"; wait_sock "$dir/qemu.sock"

declare -A uri=(
  [fcnbd]="nbd+unix:///bench?socket=$dir/fcnbd.sock"
  [nbdkit]="nbd+unix:///?socket=$dir/nbdkit.sock"
  [qemu-nbd]="nbd+unix:///bench?socket=$dir/qemu.sock"
)
servers=(fcnbd nbdkit qemu-nbd)
rows=(
  "randwrite-4k:randwrite:4k:32"
  "randread-4k:randread:4k:32"
  "seqwrite-1m:write:1m:8"
  "seqread-1m:read:1m:8"
)

for row in "${rows[@]}"; do
  IFS=: read -r name rw bs depth <<<"$row"
  for r in $(seq "$rounds"); do
    for s in "${servers[@]}"; do
      echo "bench: $name $s round $r" >&2
      fio --name="$name" --ioengine=nbd --uri="${uri[$s]}" --rw="$rw" --bs="$bs" --iodepth="$depth" \
        --size="$size" --time_based --runtime="$runtime" --ramp_time=2 --norandommap --randrepeat=0 \
        --output-format=json --output="$dir/results/$name.$s.$r.json" >/dev/null
    done
  done
done

python3 - "$dir/results" "$rounds" <<'PY'
import json, os, statistics, sys
res, rounds = sys.argv[1], int(sys.argv[2])
rows = ["randwrite-4k", "randread-4k", "seqwrite-1m", "seqread-1m"]
servers = ["fcnbd", "nbdkit", "qemu-nbd"]
def one(row, s, r):
    j = json.load(open(os.path.join(res, f"{row}.{s}.{r}.json")))["jobs"][0]
    side = j["write"] if j["write"]["io_bytes"] else j["read"]
    p99 = side["clat_ns"]["percentile"].get("99.000000", 0) / 1000.0
    return side["iops"], side["bw_bytes"] / 2**20, p99
print(f"{'row':<14}{'server':<10}{'IOPS':>10}{'MiB/s':>10}{'p99 µs':>10}{'fcnbd/peer':>12}")
for row in rows:
    m = {}
    for s in servers:
        samples = [one(row, s, r) for r in range(1, rounds + 1)]
        m[s] = tuple(statistics.median(x[i] for x in samples) for i in range(3))
    for s in servers:
        iops, mib, p99 = m[s]
        ratio = "" if s == "fcnbd" else f"{m['fcnbd'][0] / iops:.2f}x"
        print(f"{row:<14}{s:<10}{iops:>10.0f}{mib:>10.1f}{p99:>10.0f}{ratio:>12}")
PY
