#!/bin/bash
# Daemon restart under a mounted filesystem: attach with nbdpersist (kernel netlink interface with a
# dead-connection timeout; it reconfigures the device with new sockets when the kernel reports the
# connections dead), make ext4, write files, then ask the host over the control port to restart
# the NBD server and wait for its reply. After the restart: write more files, sync, check all of
# them, unmount, detach, reattach with nbd-client, e2fsck -fn clean, all checksums equal.
# Settings: see lib.sh; CTL_PORT (10810): the host's control endpoint.
. /guest/lib.sh
: "${CTL_PORT:=10810}"

step "attach $NBD_EXPORT with nbdpersist ($NBD_CONNS connections)"
nbdpersist "$NBD_HOST" "$NBD_PORT" "$NBD_DEV" "$NBD_EXPORT" "$NBD_CONNS" &
persist=$!
for i in $(seq 1 50); do
  [ "$(blockdev --getsize64 "$NBD_DEV")" != 0 ] && break
  kill -0 $persist 2>/dev/null || die "nbdpersist exited"
  sleep 0.2
done
mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 "$NBD_DEV"
mkdir -p "$MNT"
mount -t ext4 "$NBD_DEV" "$MNT"
write_files "$MNT" 3 1024 a
flush_all

step "READY-FOR-RESTART"
exec 3<>"/dev/tcp/$NBD_HOST/$CTL_PORT" || die "cannot reach the host's control port"
echo READY-FOR-RESTART >&3
read -r -t 180 reply <&3 || die "no reply from the host's control port"
exec 3>&-
[ "$reply" = RESTARTED ] || die "host replied '$reply'"
step "wait until the kernel has all $NBD_CONNS connections back"
status=/run/nbdpersist-nbd${NBD_DEV#/dev/nbd}.reconnects
for i in $(seq 1 300); do
  [ "$(cat "$status" 2>/dev/null || echo 0)" -ge "$NBD_CONNS" ] && break
  [ $i = 300 ] && die "nbdpersist reconnected $(cat "$status" 2>/dev/null || echo 0) of $NBD_CONNS connections in 60s"
  sleep 0.2
done

step "write after the restart"
write_files "$MNT" 3 1024 b
flush_all
check_files "$MNT" a
check_files "$MNT" b
umount "$MNT"
kill $persist
wait $persist || true
nbd_detach

step "reattach and check"
nbd_attach
fsck_clean
mount -t ext4 -o ro "$NBD_DEV" "$MNT"
check_files "$MNT" a
check_files "$MNT" b
umount "$MNT"
nbd_detach
dmesg | grep -E 'nbd|EXT4' || true
step "ok"
