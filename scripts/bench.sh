#!/usr/bin/env bash
# make bench: fio (nbd ioengine) against fcnbd, nbdkit (file plugin) and qemu-nbd
# (cache=writeback, -e 8), each serving a file in the same directory over a Unix socket, the
# servers alternating row by row in one run. Prints IOPS, MiB/s and p99 latency per server and
# row, and fcnbd's ratio to each peer.
#
# Env: FCNBD_BIN (default bin/fcnbd), BENCH_DIR (default .cache/bench), BENCH_SIZE (default
# 1G), BENCH_RUNTIME seconds per measurement (default 10), BENCH_ROUNDS (default 2: each
# server measured this many times per row, alternating; the median is reported).
# BENCH_ROWS: comma-separated sections to run (default all): peers (the fio rows), sparse (the
# sparse nbdcopy row), tls (seqread-1m over TLS, see bench_tls), flashcopy.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${FCNBD_BIN:-$PWD/bin/fcnbd}
dir=${BENCH_DIR:-$PWD/.cache/bench}
size=${BENCH_SIZE:-1G}
runtime=${BENCH_RUNTIME:-10}
rounds=${BENCH_ROUNDS:-2}
want() { [ -z "${BENCH_ROWS:-}" ] || [[ ",$BENCH_ROWS," == *",$1,"* ]]; }

rm -rf "$dir"; mkdir -p "$dir/fcnbd" "$dir/results"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

. scripts/fio-rows.sh
wait_sock() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "bench: $1 did not appear" >&2; exit 1; }

# Peers' files, filled with incompressible data so no server reads holes.
bytes=$(numfmt --from=iec "$size")
# The same random image goes into every server through its own NBD socket, by nbdcopy: how a
# file was written shapes its page cache (large folios after large writes make each later
# 4 KiB pwrite into them several times dearer), so the peers' files must not be written
# differently from fcnbd's volume.
if want peers || want flashcopy || want tls; then
head -c "$bytes" /dev/urandom > "$dir/src.img"
fi
truncate -s "$bytes" "$dir/nbdkit.img" "$dir/qemu.img"

# ---- TLS row: seqread-1m over loopback TCP and TLS, fcnbd --tls require against nbdkit
# --tls=require with the same CA-signed server certificate. fio's nbd engine does not let a URI
# name a certificate directory (libnbd refuses tls-certificates unless the program allows local
# files, which fio does not), so fio connects through nbds://...?tls-verify-peer=false without
# a client certificate, and neither server verifies clients (no ca-cert.pem in fcnbd's
# directory; nbdkit, which needs one, without --tls-verify-peer): the handshake differs, the data path does not.
# Run after the peer rows; BENCH_ROWS=tls runs only this row.
bench_tls() {
  local t=$dir/tls certs=$dir/tls/certs fport nport
  mkdir -p "$t/fcnbd" "$certs" "$t/results"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=bench-ca \
    -addext keyUsage=critical,keyCertSign,cRLSign -keyout "$t/ca-key.pem" -out "$t/ca-cert.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
    -keyout "$certs/server-key.pem" -out "$t/server.csr" 2>/dev/null
  openssl x509 -req -in "$t/server.csr" -CA "$t/ca-cert.pem" -CAkey "$t/ca-key.pem" -days 1 \
    -extfile <(printf '%s\n' subjectAltName=IP:127.0.0.1,DNS:localhost extendedKeyUsage=serverAuth \
      keyUsage=critical,digitalSignature,keyEncipherment) -out "$certs/server-cert.pem" 2>/dev/null
  # nbdkit wants ca-cert.pem even when it does not verify clients; fcnbd would verify with it.
  mkdir -p "$t/nbdkit-certs"; cp "$certs"/server-*.pem "$t/ca-cert.pem" "$t/nbdkit-certs/"
  free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
  fport=$(free_port); nport=$(free_port)
  truncate -s "$bytes" "$t/nbdkit.img"

  local tpids=()
  "$bin" serve --data-dir "$t/fcnbd" --socket "$t/c.sock" --nbd-unix "" --nbd-tcp "127.0.0.1:$fport" \
    --tls require --tls-certs "$certs" --log-level warn &
  tpids+=($!); pids+=($!)
  wait_sock "$t/c.sock"
  "$bin" --socket "$t/c.sock" mkvolume -name bench -size "$size" >/dev/null
  nbdkit -f -i 127.0.0.1 -p "$nport" --tls=require --tls-certificates="$t/nbdkit-certs" file "$t/nbdkit.img" &
  tpids+=($!); pids+=($!)
  declare -A turi=(
    [fcnbd]="nbds://127.0.0.1:$fport/bench?tls-verify-peer=false"
    [nbdkit]="nbds://127.0.0.1:$nport/?tls-verify-peer=false"
  )
  local s r
  for s in fcnbd nbdkit; do
    for _ in $(seq 100); do nbdinfo --size "${turi[$s]}" >/dev/null 2>&1 && break; sleep 0.1; done
    nbdcopy "$dir/src.img" "${turi[$s]}"
  done
  sync
  for r in $(seq "$rounds"); do
    for s in fcnbd nbdkit; do
      echo "bench: tls seqread-1m $s round $r" >&2
      sync
      fio --name=tls-seqread-1m --ioengine=nbd --uri="${turi[$s]}" --rw=read --bs=1m --iodepth=8 \
        --size="$size" --time_based --runtime="$runtime" --ramp_time=2 \
        --output-format=json --output="$t/results/$s.$r.json" >/dev/null
    done
  done
  kill "${tpids[@]}" 2>/dev/null || true; wait "${tpids[@]}" 2>/dev/null || true
  python3 - "$t/results" "$rounds" <<'PY'
import json, os, statistics, sys
res, rounds = sys.argv[1], int(sys.argv[2])
m = {}
for s in ["fcnbd", "nbdkit"]:
    runs = [json.load(open(os.path.join(res, f"{s}.{r}.json")))["jobs"][0]["read"] for r in range(1, rounds + 1)]
    m[s] = (statistics.median(j["bw_bytes"] / 2**20 for j in runs),
            statistics.median(j["clat_ns"]["percentile"].get("99.000000", 0) / 1000.0 for j in runs))
print()
print("TLS (TCP loopback, server certificate only): sequential 1 MiB reads, iodepth 8")
print(f"{'row':<18}{'server':<10}{'MiB/s':>10}{'p99 µs':>10}{'fcnbd/peer':>12}")
for s in ["fcnbd", "nbdkit"]:
    ratio = "" if s == "fcnbd" else f"{m['fcnbd'][0] / m[s][0]:.2f}x"
    print(f"{'tls-seqread-1m':<18}{s:<10}{m[s][0]:>10.1f}{m[s][1]:>10.0f}{ratio:>12}")
PY
}

"$bin" serve --data-dir "$dir/fcnbd" --socket "$dir/c.sock" --nbd-unix "$dir/fcnbd.sock" --nbd-tcp "" --log-level warn &
pids+=($!)
wait_sock "$dir/c.sock"
"$bin" --socket "$dir/c.sock" mkvolume -name bench -size "$size" >/dev/null

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
if want peers; then
for s in "${servers[@]}"; do
  nbdcopy "$dir/src.img" "${uri[$s]}"
done
sync # no writeback of the images during the first rows
fio_rows "$dir/results" "${servers[@]}"

# The peer comparison is printed before the FlashCopy section, so that it survives a failure there.
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
print(f"{'row':<14}{'server':<10}{'IOPS':>10}{'MiB/s':>10}{'p99 µs':>10}{'fcnbd/peer':>12}  IOPS per round")
for row in rows:
    m, samples = {}, {}
    for s in servers:
        samples[s] = [one(row, s, r) for r in range(1, rounds + 1)]
        m[s] = tuple(statistics.median(x[i] for x in samples[s]) for i in range(3))
    for s in servers:
        iops, mib, p99 = m[s]
        ratio = "" if s == "fcnbd" else f"{m['fcnbd'][0] / iops:.2f}x"
        per = " ".join(f"{x[0]:.0f}" for x in samples[s])
        print(f"{row:<14}{s:<10}{iops:>10.0f}{mib:>10.1f}{p99:>10.0f}{ratio:>12}  {per}")
PY
fi # peers

# ---- Sparse copy row: nbdcopy of a 1 GiB volume that is 10 % written, fcnbd against nbdkit ----
# The same data, 1 MiB of random bytes at the start of every 10 MiB, is written into a sparse
# file that nbdkit's file plugin serves (cp --sparse=always keeps its holes), and into a fresh
# fcnbd volume through NBD (nbdcopy from that file, which zeroes holes by punching). Timed:
# nbdcopy from each server to a new file in the same directory, which leaves holes as holes
# (base:allocation tells nbdcopy where they are); the copies' allocation is printed to show it.
# Env: BENCH_SPARSE_SIZE (default 1G).
sparse_row() {
  local ssize sbytes step n out t0 t1 s r
  ssize=${BENCH_SPARSE_SIZE:-1G}
  sbytes=$(numfmt --from=iec "$ssize")
  step=$((10 << 20))
  truncate -s "$sbytes" "$dir/sparse-src.img"
  for ((n = 0; n * step < sbytes; n++)); do
    head -c 1M /dev/urandom | dd of="$dir/sparse-src.img" bs=1M seek=$((n * 10)) conv=notrunc status=none
  done
  cp --sparse=always "$dir/sparse-src.img" "$dir/sparse-nbdkit.img"
  "$bin" --socket "$dir/c.sock" mkvolume -name sparse -size "$ssize" >/dev/null
  # --flush: the volume's data leaves the write-back cache (and is fsynced) before the rounds,
  # as `sync` below does for nbdkit's file. Without it the 103 MiB stayed dirty in fcnbd's
  # cache and were destaged 3 s (MaxDirtyAge) after this copy, in the middle of the first
  # rounds, with the writeback to disk that follows: timed for fcnbd, never for nbdkit.
  nbdcopy --flush "$dir/sparse-src.img" "nbd+unix:///sparse?socket=$dir/fcnbd.sock"
  nbdkit -f -U "$dir/sparse-nbdkit.sock" file "$dir/sparse-nbdkit.img" &
  pids+=($!)
  wait_sock "$dir/sparse-nbdkit.sock"
  declare -A suri=(
    [fcnbd]="nbd+unix:///sparse?socket=$dir/fcnbd.sock"
    [nbdkit]="nbd+unix:///?socket=$dir/sparse-nbdkit.sock"
  )
  : > "$dir/results/sparse"
  for r in $(seq "$rounds"); do
    for s in fcnbd nbdkit; do
      echo "bench: sparse nbdcopy $s round $r" >&2
      out="$dir/sparse-out.img"
      rm -f "$out"
      truncate -s "$sbytes" "$out"
      sync
      t0=$(date +%s.%N)
      nbdcopy "${suri[$s]}" "$out"
      t1=$(date +%s.%N)
      cmp "$dir/sparse-src.img" "$out" || { echo "bench: sparse copy from $s differs" >&2; exit 1; }
      echo "$s $r $t0 $t1 $(du -B1 "$out" | cut -f1) $sbytes" >> "$dir/results/sparse"
    done
  done
  python3 - "$dir/results/sparse" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    s, r, t0, t1, alloc, n = line.split()
    runs.setdefault(s, []).append((float(t1) - float(t0), int(alloc), int(n)))
print()
print("Sparse copy: nbdcopy of a volume 10 % written, to a new sparse file on the same disk")
print(f"{'row':<16}{'server':<10}{'seconds':>10}{'MiB/s':>10}{'copy MiB':>10}{'fcnbd/peer':>12}  seconds per round")
t = {s: statistics.median(x[0] for x in v) for s, v in runs.items()}
for s in ("fcnbd", "nbdkit"):
    v = runs[s]
    n, alloc = v[0][2], max(x[1] for x in v)
    ratio = "" if s == "fcnbd" else f"{t[s] / t['fcnbd']:.2f}x"
    per = " ".join(f"{x[0]:.2f}" for x in v)
    print(f"{'nbdcopy-sparse':<16}{s:<10}{t[s]:>10.2f}{n / t[s] / 2**20:>10.0f}{alloc / 2**20:>10.0f}{ratio:>12}  {per}")
PY
}
if want sparse; then sparse_row; fi

if want tls; then bench_tls; fi

# ---- FlashCopy rows: the cost of copy-on-write ----
if ! want flashcopy; then exit 0; fi
# fcsrc gets a copy-rate-0 mapping to fctgt; 4 KiB random writes over the first quarter of fcsrc
# are measured without a mapping, while grains split for the first time, and once every grain of
# that quarter is split.
fc=(--socket "$dir/c.sock")
grain_kib=64
region=$((bytes / 4))
grains_in_region=$((region / (grain_kib * 1024)))
fiofc() { # name rw bs depth extra...
  local name=$1 rw=$2 bs=$3 depth=$4; shift 4
  echo "bench: flashcopy $name" >&2
  fio --name="$name" --ioengine=nbd --uri="nbd+unix:///fcsrc?socket=$dir/fcnbd.sock" --rw="$rw" --bs="$bs" \
    --iodepth="$depth" --size="$region" --norandommap --randrepeat=0 "$@" \
    --output-format=json --output="$dir/results/fc.$name.json" >/dev/null
}
"$bin" "${fc[@]}" mkvolume -name fcsrc -size "$size" >/dev/null
"$bin" "${fc[@]}" mkvolume -name fctgt -size "$size" >/dev/null
nbdcopy "$dir/src.img" "nbd+unix:///fcsrc?socket=$dir/fcnbd.sock"
fiofc nomapping randwrite 4k 32 --time_based --runtime="$runtime" --ramp_time=2
"$bin" "${fc[@]}" mkfcmap -source fcsrc -target fctgt -name bench_snap -copyrate 0 -grainsize "$grain_kib" >/dev/null
"$bin" "${fc[@]}" startfcmap -prep bench_snap
"$bin" "${fc[@]}" wait -status copying -timeout 1m bench_snap
# As many 4 KiB writes as the region has grains: about 63 % of them split a grain (no ramp: the
# first writes are the ones that split).
fiofc firstsplit randwrite 4k 32 --number_ios="$grains_in_region"
fiofc presplit write 1m 8
fiofc allsplit randwrite 4k 32 --time_based --runtime="$runtime" --ramp_time=2
"$bin" "${fc[@]}" lsfcmap -delim : bench_snap | grep -E '^(status|progress|split_on_write):' >&2

# The background copy's speed has one home: scripts/bench-copy.sh (medians of interleaved rounds
# against dd), which make bench also runs.

python3 - "$dir/results" <<'PY'
import json, os, sys
res = sys.argv[1]
def fc(name):
    j = json.load(open(os.path.join(res, f"fc.{name}.json")))["jobs"][0]["write"]
    return j["iops"], j["clat_ns"]["percentile"].get("99.000000", 0) / 1000.0
print()
print("FlashCopy: 4 KiB random writes, iodepth 32, on a source with an active copy-rate-0 mapping")
base = fc("nomapping")
print(f"{'row':<44}{'IOPS':>10}{'p99 µs':>10}{'vs none':>10}")
for name, label in [("nomapping", "no mapping"), ("firstsplit", "mapping, grains split for the first time"),
                    ("allsplit", "mapping, all written grains split")]:
    iops, p99 = fc(name)
    print(f"{label:<44}{iops:>10.0f}{p99:>10.0f}{iops / base[0]:>9.2f}x")
PY
