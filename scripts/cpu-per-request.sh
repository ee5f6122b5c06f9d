#!/usr/bin/env bash
# CPU time per request of two fcnbd builds (A and B) and of nbdkit's file plugin, for fio's nbd
# engine over Unix sockets: the measure to compare builds by on a shared machine, where wall-clock
# throughput is noise. Each server serves a volume of SIZE filled by nbdcopy; for each row and
# round, each server gets the same fixed number of I/Os (fio --io_size), and the server's
# utime+stime (/proc/PID/stat) over the run, plus SLEEPAFTER seconds after it (so that a write-back
# cache's destage is counted), is divided by the number of requests.
#
#   scripts/cpu-per-request.sh bin/fcnbd.old bin/fcnbd
#
# Env: SIZE (default 512M), ROUNDS (default 3), SLEEPAFTER (default 4), ROWS (name:rw:bs:depth:ios
# ..., default the four rows of bench.sh), DIR (default .cache/cpu). Even so, other jobs on the
# machine move the figures by ±20 % or more: compare builds only from runs at low load, in the
# same invocation (the servers alternate), over several rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
A=${1:?usage: cpu-per-request.sh FCNBD_BIN_A FCNBD_BIN_B}
B=${2:?usage: cpu-per-request.sh FCNBD_BIN_A FCNBD_BIN_B}
size=${SIZE:-512M}
dir=${DIR:-$PWD/.cache/cpu}
rows=${ROWS:-"randwrite-4k:randwrite:4k:32:200000 randread-4k:randread:4k:32:200000 seqwrite-1m:write:1m:8:5000 seqread-1m:read:1m:8:5000"}
rm -rf "$dir"; mkdir -p "$dir/a" "$dir/b"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
wait_sock() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "$1 did not appear" >&2; exit 1; }

bytes=$(numfmt --from=iec "$size")
head -c "$bytes" /dev/urandom > "$dir/src.img"
truncate -s "$bytes" "$dir/nbdkit.img"
declare -A pid uri
for x in a b; do
  bin=$A; [ $x = b ] && bin=$B
  "$bin" serve --data-dir "$dir/$x" --socket "$dir/$x.c.sock" --nbd-unix "$dir/$x.sock" --nbd-tcp "" --log-level error 2>/dev/null &
  pids+=($!); pid[$x]=$!
  wait_sock "$dir/$x.c.sock"
  "$bin" --socket "$dir/$x.c.sock" mkvolume -name bench -size "$size" >/dev/null
  uri[$x]="nbd+unix:///bench?socket=$dir/$x.sock"
done
nbdkit -f -U "$dir/nbdkit.sock" file "$dir/nbdkit.img" &
pids+=($!); pid[nbdkit]=$!
wait_sock "$dir/nbdkit.sock"
uri[nbdkit]="nbd+unix:///?socket=$dir/nbdkit.sock"
for s in a b nbdkit; do nbdcopy "$dir/src.img" "${uri[$s]}"; done
sync

cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }
tck=$(getconf CLK_TCK)
printf '%-14s%-8s%6s%12s%10s%8s\n' row server round 'µs/request' IOPS load
for row in $rows; do
  IFS=: read -r name rw bs depth n <<<"$row"
  for r in $(seq "${ROUNDS:-3}"); do
    for s in a b nbdkit; do
      sync
      c0=$(cpu "${pid[$s]}")
      fio --name="$name" --ioengine=nbd --uri="${uri[$s]}" --rw="$rw" --bs="$bs" --iodepth="$depth" \
        --size="$size" --io_size=$((n * $(numfmt --from=iec "${bs^^}"))) --norandommap --randrepeat=0 \
        --output-format=json --output="$dir/$name.$s.json" >/dev/null
      sleep "${SLEEPAFTER:-4}"
      c1=$(cpu "${pid[$s]}")
      python3 - "$dir/$name.$s.json" "$name" "$s" "$r" "$c0" "$c1" "$tck" "$n" <<'PY'
import json, os, sys
f, name, s, r, c0, c1, tck, n = sys.argv[1:]
j = json.load(open(f))["jobs"][0]
side = j["write"] if j["write"]["io_bytes"] else j["read"]
us = (float(c1) - float(c0)) / int(tck) * 1e6 / int(n)
print(f"{name:<14}{s:<8}{r:>6}{us:>12.1f}{side['iops']:>10.0f}{os.getloadavg()[0]:>8.2f}")
PY
    done
  done
done
