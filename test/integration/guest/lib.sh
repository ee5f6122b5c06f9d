# lib.sh — helpers for guest scripts run by scripts/vm-run.sh (sourced; bash only).
# The runner's Go harness copies this file to /guest/lib.sh for every run.
#
# Settings (environment, from --env): NBD_HOST (default 10.0.2.100), NBD_PORT (10809),
# NBD_EXPORT (default ""), NBD_DEV (/dev/nbd0), NBD_CONNS (2), MNT (/mnt/vol), NBD_TLS (a directory
# with ca-cert.pem, client-cert.pem, client-key.pem: nbd_attach then connects over TLS, checking
# the server's certificate for "localhost").
set -euo pipefail
: "${NBD_HOST:=10.0.2.100}" "${NBD_PORT:=10809}" "${NBD_EXPORT:=}" "${NBD_DEV:=/dev/nbd0}"
: "${NBD_CONNS:=2}" "${MNT:=/mnt/vol}"

step() { echo "GUEST-STEP: $* [t=$(cut -d" " -f1 /proc/uptime)s]"; }
die() { echo "GUEST-FAIL: $*"; exit 1; }
trap 'rc=$?; [ $rc = 0 ] || echo "GUEST-FAIL: line $LINENO: $BASH_COMMAND (exit $rc)"' ERR

# nbd_attach [extra nbd-client args...] — attach $NBD_EXPORT to $NBD_DEV and wait until the
# device has its size. Retries briefly: right after a detach the device can still be busy.
nbd_attach() {
  local i
  for i in 1 2 3 4 5 6 7 8 9 10; do
    if nbd-client "$NBD_HOST" "$NBD_PORT" "$NBD_DEV" -N "$NBD_EXPORT" -b 4096 -C "$NBD_CONNS" $(nbd_tls_args) "$@"; then
      break
    fi
    [ $i = 10 ] && die "nbd-client could not attach $NBD_EXPORT"
    sleep 1
  done
  for i in $(seq 1 50); do
    [ "$(blockdev --getsize64 "$NBD_DEV" 2>/dev/null || echo 0)" != 0 ] && return 0
    sleep 0.2
  done
  die "$NBD_DEV has no size after attach"
}

# nbd_detach — disconnect $NBD_DEV and wait until the kernel shows it idle.
# nbd_tls_args prints nbd-client's TLS options when NBD_TLS names a certificate directory.
nbd_tls_args() {
  [ -n "${NBD_TLS:-}" ] || return 0
  echo "-certfile $NBD_TLS/client-cert.pem -keyfile $NBD_TLS/client-key.pem -cacertfile $NBD_TLS/ca-cert.pem -tlshostname localhost"
}

nbd_detach() {
  local i
  nbd-client -d "$NBD_DEV" || die "nbd-client -d $NBD_DEV failed"
  for i in $(seq 1 50); do
    [ "$(blockdev --getsize64 "$NBD_DEV" 2>/dev/null || echo 0)" = 0 ] && return 0
    sleep 0.2
  done
  die "$NBD_DEV still attached after nbd-client -d"
}

# write_files DIR COUNT SIZE_KIB PREFIX — COUNT files of random data; appends "sha256  name"
# lines to DIR/../PREFIX.sums (outside the filesystem, on tmpfs: /tmp/PREFIX.sums).
write_files() {
  local dir=$1 count=$2 kib=$3 prefix=$4 i
  for i in $(seq 1 "$count"); do
    dd if=/dev/urandom of="$dir/$prefix-$i.bin" bs=1024 count="$kib" 2>/dev/null
  done
  (cd "$dir" && sha256sum "$prefix"-*.bin) >>"/tmp/$prefix.sums"
}

# check_files DIR PREFIX — the files still have the checksums write_files recorded.
check_files() {
  (cd "$1" && sha256sum -c "/tmp/$2.sums") || die "checksums of $2 files differ"
}

# flush_all — what an orderly shutdown does before the device goes away.
flush_all() {
  sync
  blockdev --flushbufs "$NBD_DEV"
}

# fsck_clean — e2fsck -fn on the (unmounted) device must report no problem.
fsck_clean() {
  local out rc=0
  out=$(e2fsck -fn "$NBD_DEV" 2>&1) || rc=$?
  echo "$out"
  [ $rc = 0 ] || die "e2fsck -fn $NBD_DEV exit $rc"
}

# device_sha256 — print "GUEST-DEVSHA256 <sha256> <bytes>" of the whole device.
device_sha256() {
  local size sum
  size=$(blockdev --getsize64 "$NBD_DEV")
  sum=$(sha256sum "$NBD_DEV" | cut -d' ' -f1)
  echo "GUEST-DEVSHA256 $sum $size"
}
