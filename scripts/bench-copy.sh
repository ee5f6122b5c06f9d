#!/usr/bin/env bash
# make bench, part 4: background copy and cleaning against the disk's speed (issue 17).
#
#   full     background copy at rate 150 of a fully written volume, against dd of its backing
#            file (bs=1M conv=fsync: through the page cache with one sync at the end, as the engine
#            copies through the page cache and syncs once per batch)
#   clean    cleaning at rate 150 of the same amount (a stopped-copying target's grains into the
#            older target that reads through it), against dd of the cleaned target's file
#            full and clean each run BENCH_COPY_ROUNDS rounds (default 5), the engine and dd one
#            after the other in each, caches dropped before each; the row is the median of each
#            side: one 1 GiB dd on this machine's disk varies by up to 2x from run to run
#   sparse   background copy at rate 150 of a 16x larger volume with the same amount written, in
#            64 MiB extents, against the full copy's time
#   rate     background copy at rate 81 (32 MiB/s), measured over 8 s from the mapping's
#            bytes_copied: the rate table is honoured to +-10 %
#   hostio   4 KiB random writes (fio, iodepth 32) on a source while its rate-150 background copy
#            runs, against the same writes with no mapping
#
# An engine time runs from the command that starts the work to its end as `fcnbd wait -interval
# 10ms` sees it: wait's default 200 ms poll would add up to 0.2 s to a copy of about one second.
#
# Env: FCNBD_BIN (default bin/fcnbd), BENCH_DIR (default .cache/bench-copy), BENCH_SIZE (default
# 1G: the full and clean volumes; sparse is 16 times larger), BENCH_HOSTIO_SIZE (default 4G),
# BENCH_RUNTIME (seconds of fio per hostio measurement, default 4), BENCH_COPY_ROUNDS (5).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${FCNBD_BIN:-$PWD/bin/fcnbd}
dir=${BENCH_DIR:-$PWD/.cache/bench-copy}
size=${BENCH_SIZE:-1G}
hsize=${BENCH_HOSTIO_SIZE:-4G}
runtime=${BENCH_RUNTIME:-4}
rounds=${BENCH_COPY_ROUNDS:-5}
bytes=$(numfmt --from=iec "$size")
big=$((bytes * 16))

rm -rf "$dir"; mkdir -p "$dir/data"
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
now() { date +%s.%N; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

"$bin" serve --data-dir "$dir/data" --socket "$dir/c.sock" --nbd-unix "$dir/n.sock" --nbd-tcp "" --log-level warn &
pid=$!
for _ in $(seq 100); do [ -S "$dir/c.sock" ] && break; sleep 0.1; done
fc() { "$bin" --socket "$dir/c.sock" "$@"; }
uri() { echo "nbd+unix:///$1?socket=$dir/n.sock"; }
volfile() { echo "$dir/data/vol-$(fc lsvolume -delim : "$1" | sed -n 's/^id://p').img"; }
progress() { fc lsfcmap -delim : "$1" | sed -n 's/^progress://p'; }
fill() { # volume bytes offset: incompressible data through NBD
  fio --name=fill --ioengine=nbd --uri="$(uri "$1")" --rw=write --bs=1m --iodepth=8 --offset="$3" \
    --size="$2" --refill_buffers --output=/dev/null >/dev/null
}

echo "bench-copy: preparing volumes" >&2
fc mkvolume -name src -size "$size" >/dev/null
fc mkvolume -name big -size "$big" >/dev/null
fc mkvolume -name bigt -size "$big" >/dev/null
fill src "$bytes" 0
for ((i = 0; i < 16; i++)); do fill big $((64 << 20)) $((i * big / 16)); done

# dd of volume $1's backing file, caches dropped first: "t0 t1" on stdout.
ddtimes() {
  local t0 t1
  drop; t0=$(now)
  dd if="$(volfile "$1")" of="$dir/dd.img" bs=1M conv=fsync status=none
  t1=$(now); rm -f "$dir/dd.img"
  echo "$t0 $t1"
}

# A rate-150 background copy by a new mapping $1 from $2 to $3, caches dropped first, from its
# start to its end as wait sees it: "t0 t1" on stdout.
copytimes() {
  local t0 t1
  fc mkfcmap -source "$2" -target "$3" -name "$1" -copyrate 150 -grainsize 64 >/dev/null
  drop; t0=$(now)
  fc startfcmap -prep "$1"
  fc wait -interval 10ms -timeout 10m "$1" >&2
  t1=$(now)
  echo "$t0 $t1"
}

for ((r = 1; r <= rounds; r++)); do
  echo "bench-copy: full, round $r" >&2
  fc mkvolume -name full -size "$size" >/dev/null
  echo "full $(copytimes cfull src full) $(ddtimes src)" >> "$dir/times"
  fc rmfcmap cfull >/dev/null
  fc rmvolume full >/dev/null

  echo "bench-copy: clean, round $r" >&2
  # t1 reads through t2 (the newer mapping from the same source sits upstream): once t2 holds
  # every grain, raising its clean rate from 0 cleans them all into t1.
  fc mkvolume -name t1 -size "$size" >/dev/null
  fc mkvolume -name t2 -size "$size" >/dev/null
  fc mkfcmap -source src -target t1 -name ct1 -copyrate 0 -grainsize 64 >/dev/null
  fc startfcmap -prep ct1
  fc mkfcmap -source src -target t2 -name ct2 -copyrate 150 -cleanrate 0 -grainsize 64 >/dev/null
  fc startfcmap -prep ct2
  for _ in $(seq 600); do [ "$(progress ct2)" = 100 ] && break; sleep 0.2; done
  [ "$(progress ct2)" = 100 ] || { echo "bench-copy: ct2 did not reach 100 %" >&2; exit 1; }
  drop; t0=$(now)
  fc chfcmap -cleanrate 150 ct2
  fc wait -interval 10ms -timeout 10m ct2
  t1=$(now)
  echo "clean $t0 $t1 $(ddtimes t2)" >> "$dir/times"
  for m in ct2 ct1; do fc stopfcmap -force "$m" >/dev/null 2>&1 || true; fc rmfcmap -force "$m" >/dev/null; done
  fc rmvolume t1 >/dev/null
  fc rmvolume t2 >/dev/null
done

echo "bench-copy: sparse" >&2
echo "sparse $(copytimes cbig big bigt) 0 0" >> "$dir/times"

echo "bench-copy: rate" >&2
fc mkvolume -name rtgt -size "$size" >/dev/null
fc mkfcmap -source src -target rtgt -name crate -copyrate 81 -grainsize 64 >/dev/null
fc startfcmap -prep crate
copied() { fc lsfcmap -delim : crate | sed -n 's/^bytes_copied://p'; }
sleep 1
b0=$(copied); t0=$(now)
sleep 8
b1=$(copied); t1=$(now)
echo "rate $b0 $b1 $t0 $t1" >> "$dir/times"
fc stopfcmap -force crate >/dev/null

echo "bench-copy: hostio" >&2
hbytes=$(numfmt --from=iec "$hsize")
fc mkvolume -name hsrc -size "$hsize" >/dev/null
fc mkvolume -name htgt -size "$hsize" >/dev/null
fill hsrc "$hbytes" 0
fio4k() {
  sync
  fio --name="$1" --ioengine=nbd --uri="$(uri hsrc)" --rw=randwrite --bs=4k --iodepth=32 --size="$hsize" \
    --time_based --runtime="$runtime" --norandommap --randrepeat=0 --output-format=json --output="$dir/$1.json" >/dev/null
}
fio4k nocopy
fc mkfcmap -source hsrc -target htgt -name chost -copyrate 150 -grainsize 64 >/dev/null
fc startfcmap -prep chost
fio4k copy
echo "hostio $(progress chost)" >> "$dir/times"

python3 - "$dir" "$bytes" <<'PY'
import json, os, statistics, sys
d, n = sys.argv[1], int(sys.argv[2])
t, rounds = {}, {}
for line in open(os.path.join(d, "times")):
    k, *v = line.split()
    t[k] = v
    rounds.setdefault(k, []).append(list(map(float, v)))
def row(k):
    """The medians, over the rounds, of the engine's and dd's MiB/s, and of the engine's time."""
    eng = [n / (r[1] - r[0]) / 2**20 for r in rounds[k]]
    dd = [n / (r[3] - r[2]) / 2**20 for r in rounds[k] if r[3] > r[2]]
    secs = [r[1] - r[0] for r in rounds[k]]
    per = "  ".join(f"{e:.0f}/{x:.0f}" for e, x in zip(eng, dd))
    return statistics.median(eng), statistics.median(dd) if dd else 0, statistics.median(secs), per
print()
print("Background copy and cleaning (rate 150, 64 KiB grains; medians of "
      f"{len(rounds['full'])} rounds, engine/dd MiB/s per round after the ratio)")
full, dd, tfull, per = row("full")
print(f"{'background copy, full volume':<40}{full:>8.0f} MiB/s   dd {dd:>5.0f} MiB/s   ratio {full / dd:.2f}x   {per}")
clean, dd2, _, per = row("clean")
print(f"{'cleaning, full volume':<40}{clean:>8.0f} MiB/s   dd {dd2:>5.0f} MiB/s   ratio {clean / dd2:.2f}x   {per}")
_, _, tsparse, _ = row("sparse")
print(f"{'background copy, 16x volume, same data':<40}{tsparse:>8.2f} s       full {tfull:>5.2f} s       ratio {tsparse / tfull:.2f}x")
b0, b1, r0, r1 = map(float, t["rate"])
got = (b1 - b0) / (r1 - r0) / 2**20
print(f"{'background copy at rate 81 (32 MiB/s)':<40}{got:>8.1f} MiB/s   off by {100 * (got / 32 - 1):+.1f} %")
def iops(name):
    return json.load(open(os.path.join(d, f"{name}.json")))["jobs"][0]["write"]["iops"]
a, b = iops("nocopy"), iops("copy")
print(f"{'4 KiB random writes during the copy':<40}{b:>8.0f} IOPS    alone {a:>5.0f} IOPS  ratio {b / a:.2f}x   (copy at {t['hostio'][0]} % when fio ended)")
PY
