#!/usr/bin/env bash
# make bench, part 2: how long a consistency-group start holds the sources' I/O. Four source
# volumes under fio load (4 KiB random writes through NBD), a group of four mappings, ten starts;
# prints each hold (lsfcconsistgrp's last_hold_ms) and the median.
#
# Env: FCNBD_BIN (default bin/fcnbd), BENCH_DIR (default .cache/bench-fence), BENCH_STARTS (10).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${FCNBD_BIN:-$PWD/bin/fcnbd}
dir=${BENCH_DIR:-$PWD/.cache/bench-fence}
starts=${BENCH_STARTS:-10}

rm -rf "$dir"; mkdir -p "$dir"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

"$bin" serve --data-dir "$dir/data" --socket "$dir/c.sock" --nbd-unix "$dir/n.sock" --nbd-tcp "" --log-level warn &
pids+=($!)
for _ in $(seq 100); do [ -S "$dir/c.sock" ] && break; sleep 0.1; done
fc() { "$bin" --socket "$dir/c.sock" "$@"; }
fc mkfcconsistgrp -name fence >/dev/null
for i in 1 2 3 4; do
  fc mkvolume -name "s$i" -size 256M >/dev/null
  fc mkvolume -name "t$i" -size 256M >/dev/null
  fc mkfcmap -source "s$i" -target "t$i" -consistgrp fence -copyrate 0 >/dev/null
done
for i in 1 2 3 4; do
  fio --name="load$i" --ioengine=nbd --uri="nbd+unix:///s$i?socket=$dir/n.sock" --rw=randwrite --bs=4k \
    --iodepth=16 --size=256M --time_based --runtime=3600 --norandommap --randrepeat=0 \
    --output=/dev/null >/dev/null 2>&1 &
  pids+=($!)
done
sleep 3
holds=()
for n in $(seq "$starts"); do
  fc startfcconsistgrp -prep fence
  ms=$(fc lsfcconsistgrp -delim : fence | sed -n 's/^last_hold_ms://p')
  holds+=("$ms")
  echo "bench-fence: start $n held the sources for $ms ms" >&2
  fc stopfcconsistgrp -force fence
  sleep 1
done
printf '%s\n' "${holds[@]}" | sort -g | awk '{a[NR]=$1} END {m = (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2;
  printf "group start of 4 volumes under fio load: hold median %.2f ms (min %.2f, max %.2f, n=%d)\n", m, a[1], a[NR], NR}'
