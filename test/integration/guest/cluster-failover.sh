#!/bin/bash
# Cluster failover under the kernel's NBD driver (TestVMClusterFailover). The guest attaches
# $NBD_EXPORT with nbd-client through `fcnbd follow` on the host, makes ext4 and writes files. In
# each of ROUNDS rounds it writes and syncs some files, asks the host over the control port to
# kill the I/O group's owner (the host answers at once and kills it a moment later), and keeps
# writing, synced or not, while the partner takes over. Then: every file intact, unmount, detach,
# reattach, e2fsck -fn clean, every file intact again.
# Settings: see lib.sh; CTL_PORT (10810): the host's control endpoint; ROUNDS (4).
. /guest/lib.sh
: "${CTL_PORT:=10810}" "${ROUNDS:=4}"

# ctl LINE — send LINE to the host's control port and wait for its "OK".
ctl() {
  local reply
  exec 3<>"/dev/tcp/$NBD_HOST/$CTL_PORT" || die "cannot reach the host's control port"
  echo "$1" >&3
  read -r -t 120 reply <&3 || die "no reply from the host's control port"
  exec 3>&-
  [ "$reply" = OK ] || die "host replied '$reply' to $1"
}

step "attach $NBD_EXPORT (through fcnbd follow on the host)"
nbd_attach
mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 "$NBD_DEV"
mkdir -p "$MNT"
mount -t ext4 "$NBD_DEV" "$MNT"
prefixes=()
for r in $(seq 1 "$ROUNDS"); do
  step "round $r: write, then kill the owner while writing"
  write_files "$MNT" 4 256 "r$r-before"
  prefixes+=("r$r-before")
  sync
  ctl "KILL $r"
  for i in $(seq 1 8); do
    write_files "$MNT" 2 128 "r$r-during-$i"
    prefixes+=("r$r-during-$i")
    [ $((i % 2)) = 0 ] && sync
  done
  sync
  ctl "WAIT $r"   # the host has a new owner and has restarted the old one as a standby
done
for p in "${prefixes[@]}"; do check_files "$MNT" "$p"; done
umount "$MNT"
nbd_detach

step "reattach and check"
nbd_attach
fsck_clean
mount -t ext4 -o ro "$NBD_DEV" "$MNT"
for p in "${prefixes[@]}"; do check_files "$MNT" "$p"; done
umount "$MNT"
nbd_detach
dmesg | grep -E 'nbd|EXT4' || true
step "ok"
