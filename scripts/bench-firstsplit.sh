#!/usr/bin/env bash
# make bench, part 3: 4 KiB random writes on a source with an active copy-rate-0 mapping while
# its grains are split for the first time, with the write-back cache (copy-on-write paid at
# destage) and with every cache write-through (--cache-size 0: the engine alone, copy-on-write
# paid by the host), each as IOPS and as a ratio to the same workload with no mapping.
#
# The writes are reported twice: as acknowledged (what the host waits for) and until a flush
# has made them durable.
#
# Env: FCNBD_BIN (default bin/fcnbd), BENCH_DIR (default .cache/bench-firstsplit),
# BENCH_SIZE (default 1G).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${FCNBD_BIN:-$PWD/bin/fcnbd}
dir=${BENCH_DIR:-$PWD/.cache/bench-firstsplit}
size=${BENCH_SIZE:-1G}
bytes=$(numfmt --from=iec "$size")
grains=$((bytes / 65536))

rm -rf "$dir"; mkdir -p "$dir"
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

run() { # label cache-size → prints "label none first"
  local label=$1 cache=$2 d="$dir/$1"
  mkdir -p "$d"
  "$bin" serve --data-dir "$d/data" --socket "$d/c.sock" --nbd-unix "$d/n.sock" --nbd-tcp "" \
    --log-level warn --cache-size "$cache" &
  pid=$!
  for _ in $(seq 100); do [ -S "$d/c.sock" ] && break; sleep 0.1; done
  local fc=("$bin" --socket "$d/c.sock")
  "${fc[@]}" mkvolume -name src -size "$size" >/dev/null
  "${fc[@]}" mkvolume -name tgt -size "$size" >/dev/null
  "${fc[@]}" mkvolume -name none -size "$size" >/dev/null
  local uri="nbd+unix:///%s?socket=$d/n.sock"
  for v in src none; do
    fio --name=fill --ioengine=nbd --uri="$(printf "$uri" "$v")" --rw=write --bs=1m --iodepth=8 \
      --size="$size" --output=/dev/null >/dev/null
  done
  "${fc[@]}" mkfcmap -source src -target tgt -copyrate 0 -grainsize 64 >/dev/null
  "${fc[@]}" startfcmap -prep 0
  # As many writes as there are grains (about 63 % of them split one). The writes are timed as
  # the host sees them (acknowledged), then the flush that makes them durable is timed on its
  # own: with the write-back cache, copy-on-write is paid there.
  local io=(--ioengine=nbd --rw=randwrite --bs=4k --iodepth=32 --size="$size" --number_ios="$grains"
    --norandommap --randrepeat=0 --output-format=json)
  local name
  for name in none first; do
    local vol=$name; [ "$name" = first ] && vol=src
    fio --name="$name" "${io[@]}" --uri="$(printf "$uri" "$vol")" --output="$d/$name.json" >/dev/null
    # nbdsh (Debian's python3, not whatever python3 comes first in PATH) times the flush alone.
    /usr/bin/python3 -m nbd -u "$(printf "$uri" "$vol")" \
      -c 'import time; t = time.monotonic(); h.flush(); print(time.monotonic() - t)' > "$d/$name.flush"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  python3 - "$label" "$d" <<'PY'
import json, sys
label, d = sys.argv[1], sys.argv[2]
def rates(name):
    j = json.load(open(f"{d}/{name}.json"))["jobs"][0]
    ios, secs = j["write"]["total_ios"], j["job_runtime"] / 1000.0
    flush = float(open(f"{d}/{name}.flush").read())
    return ios / secs, ios / (secs + flush)
(none, nonef), (first, firstf) = rates("none"), rates("first")
print(f"{label:<30}{none:>10.0f}{first:>10.0f}{first / none:>8.2f}x{nonef:>12.0f}{firstf:>10.0f}{firstf / nonef:>8.2f}x")
PY
}
printf '%-30s%28s%30s\n' "4 KiB randwrite, first split" "acknowledged (host view)" "until flushed (durable)"
printf '%-30s%10s%10s%9s%12s%10s%9s\n' "" "no map" "mapping" "ratio" "no map" "mapping" "ratio"
run write-back 256M
run write-through-engine-only 0
