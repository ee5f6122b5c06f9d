# Sourced by bench.sh and bench-cluster.sh: the four fio rows every comparison uses, run against
# each server in turn, BENCH_ROUNDS times, alternating server by server within a row.
#
# fio_rows RESULTS_DIR SERVER...: the caller's associative array uri maps each SERVER to its NBD
# URI, and size, runtime and rounds are the caller's settings. Each measurement goes to
# RESULTS_DIR/ROW.SERVER.ROUND.json (fio's JSON output).
fio_rows() {
  local results=$1 name rw bs depth row r s
  shift
  for row in "randwrite-4k:randwrite:4k:32" "randread-4k:randread:4k:32" "seqwrite-1m:write:1m:8" "seqread-1m:read:1m:8"; do
    IFS=: read -r name rw bs depth <<<"$row"
    for r in $(seq "$rounds"); do
      for s in "$@"; do
        echo "bench: $name $s round $r" >&2
        # Dirty page cache left by the measurement before (any server's) is written back now,
        # not during this one.
        sync
        fio --name="$name" --ioengine=nbd --uri="${uri[$s]}" --rw="$rw" --bs="$bs" --iodepth="$depth" \
          --size="$size" --time_based --runtime="$runtime" --ramp_time=2 --norandommap --randrepeat=0 \
          --output-format=json --output="$results/$name.$s.$r.json" >/dev/null
      done
    done
  done
}
