#!/usr/bin/env bash
# make bench, part 4: background copy and cleaning against the disk's speed (issue 17).
#
#   full     background copy at rate 150 of a fully written volume, against dd of its backing
#            file (bs=1M conv=fsync: through the page cache with one sync at the end, as the engine
#            copies through the page cache and syncs once per batch)
#   clean    cleaning at rate 150 of the same amount (a stopped-copying target's grains into the
#            older target that reads through it), against dd of the cleaned target's file
#   sparse   background copy at rate 150 of a 16x larger volume with the same amount written, in
#            64 MiB extents, against the full copy's time
#   rate     background copy at rate 81 (32 MiB/s), measured over 8 s from the mapping's
#            bytes_copied: the rate table is honoured to +-10 %
#   hostio   4 KiB random writes (fio, iodepth 32) on a source while its rate-150 background copy
#            runs, against the same writes with no mapping
#
# Env: FCNBD_BIN (default bin/fcnbd), BENCH_DIR (default .cache/bench-copy), BENCH_SIZE (default
# 1G: the full and clean volumes; sparse is 16 times larger), BENCH_HOSTIO_SIZE (default 4G),
# BENCH_RUNTIME (seconds of fio per hostio measurement, default 4).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${FCNBD_BIN:-$PWD/bin/fcnbd}
dir=${BENCH_DIR:-$PWD/.cache/bench-copy}
size=${BENCH_SIZE:-1G}
hsize=${BENCH_HOSTIO_SIZE:-4G}
runtime=${BENCH_RUNTIME:-4}
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
for v in src full t1 t2; do fc mkvolume -name "$v" -size "$size" >/dev/null; done
fc mkvolume -name big -size "$big" >/dev/null
fc mkvolume -name bigt -size "$big" >/dev/null
fill src "$bytes" 0
for ((i = 0; i < 16; i++)); do fill big $((64 << 20)) $((i * big / 16)); done

echo "bench-copy: full" >&2
fc mkfcmap -source src -target full -name cfull -copyrate 150 -grainsize 64 >/dev/null
drop; t0=$(now)
fc startfcmap -prep cfull
fc wait -timeout 10m cfull
t1=$(now)
drop; t2=$(now)
dd if="$(volfile src)" of="$dir/dd.img" bs=1M conv=fsync status=none
t3=$(now); rm -f "$dir/dd.img"
echo "full $t0 $t1 $t2 $t3" > "$dir/times"

echo "bench-copy: clean" >&2
# t1 reads through t2 (the newer mapping from the same source sits upstream): once t2 holds
# every grain, raising its clean rate from 0 cleans them all into t1.
fc mkfcmap -source src -target t1 -name ct1 -copyrate 0 -grainsize 64 >/dev/null
fc startfcmap -prep ct1
fc mkfcmap -source src -target t2 -name ct2 -copyrate 150 -cleanrate 0 -grainsize 64 >/dev/null
fc startfcmap -prep ct2
for _ in $(seq 600); do [ "$(progress ct2)" = 100 ] && break; sleep 0.2; done
[ "$(progress ct2)" = 100 ] || { echo "bench-copy: ct2 did not reach 100 %" >&2; exit 1; }
drop; t0=$(now)
fc chfcmap -cleanrate 150 ct2
fc wait -timeout 10m ct2
t1=$(now)
drop; t2=$(now)
dd if="$(volfile t2)" of="$dir/dd.img" bs=1M conv=fsync status=none
t3=$(now); rm -f "$dir/dd.img"
echo "clean $t0 $t1 $t2 $t3" >> "$dir/times"

echo "bench-copy: sparse" >&2
fc mkfcmap -source big -target bigt -name cbig -copyrate 150 -grainsize 64 >/dev/null
drop; t0=$(now)
fc startfcmap -prep cbig
fc wait -timeout 10m cbig
t1=$(now)
echo "sparse $t0 $t1 0 0" >> "$dir/times"

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
import json, os, sys
d, n = sys.argv[1], int(sys.argv[2])
t = {}
for line in open(os.path.join(d, "times")):
    k, *v = line.split()
    t[k] = v
def row(k):
    t0, t1, t2, t3 = map(float, t[k])
    return n / (t1 - t0) / 2**20, (n / (t3 - t2) / 2**20) if t3 > t2 else 0, t1 - t0
print()
print("Background copy and cleaning (rate 150, 64 KiB grains)")
full, dd, tfull = row("full")
print(f"{'background copy, full volume':<40}{full:>8.0f} MiB/s   dd {dd:>5.0f} MiB/s   ratio {full / dd:.2f}x")
clean, dd2, _ = row("clean")
print(f"{'cleaning, full volume':<40}{clean:>8.0f} MiB/s   dd {dd2:>5.0f} MiB/s   ratio {clean / dd2:.2f}x")
_, _, tsparse = row("sparse")
print(f"{'background copy, 16x volume, same data':<40}{tsparse:>8.2f} s       full {tfull:>5.2f} s       ratio {tsparse / tfull:.2f}x")
b0, b1, r0, r1 = map(float, t["rate"])
got = (b1 - b0) / (r1 - r0) / 2**20
print(f"{'background copy at rate 81 (32 MiB/s)':<40}{got:>8.1f} MiB/s   off by {100 * (got / 32 - 1):+.1f} %")
def iops(name):
    return json.load(open(os.path.join(d, f"{name}.json")))["jobs"][0]["write"]["iops"]
a, b = iops("nocopy"), iops("copy")
print(f"{'4 KiB random writes during the copy':<40}{b:>8.0f} IOPS    alone {a:>5.0f} IOPS  ratio {b / a:.2f}x   (copy at {t['hostio'][0]} % when fio ended)")
PY
