#!/bin/bash
# `fcnbd attach` with the kernel NBD driver (TestVMFcnbdAttach): the static fcnbd binary
# (/usr/local/bin/fcnbd) runs the daemon in the guest and is the CLI. A volume is attached (the
# device printed must be a /dev/nbdN), ext4 made and mounted, files written; detach is refused
# while mounted; unmount, detach (the device is released); attach again, e2fsck -fn clean, the
# files' checksums equal; detach; three concurrent attaches get three different devices; the
# daemon exits 0 on SIGTERM.
# Prints "GUEST-ATTACHED <device>" for each attach.
. /guest/lib.sh
export PATH=/usr/local/bin:$PATH FCNBD_SOCKET=/run/fcnbd/fcnbd.sock
NBD_SOCK=/run/fcnbd/nbd.sock

step "fcnbd serve in the guest"
mkdir -p /run/fcnbd /tmp/fcnbd
fcnbd serve --data-dir /tmp/fcnbd --nbd-unix $NBD_SOCK --nbd-tcp 127.0.0.1:10809 \
  --no-mlock --cache-size 16M >/tmp/fcnbd.log 2>&1 &
daemon=$!
for i in $(seq 1 150); do
  [ -S $NBD_SOCK ] && fcnbd lsvolume >/dev/null 2>&1 && break
  kill -0 $daemon 2>/dev/null || { cat /tmp/fcnbd.log; die "fcnbd serve exited"; }
  [ $i = 150 ] && { cat /tmp/fcnbd.log; die "fcnbd serve not ready after 30s"; }
  sleep 0.2
done
fcnbd mkvolume -name vol -size 32M

# attach_vol — fcnbd attach vol; sets dev and checks the kernel sees a connected device.
attach_vol() {
  dev=$(fcnbd attach --nbd-unix $NBD_SOCK vol) || die "fcnbd attach vol failed"
  echo "GUEST-ATTACHED $dev"
  [[ $dev =~ ^/dev/nbd[0-9]+$ ]] || die "fcnbd attach printed '$dev', want /dev/nbdN"
  [ -e "/sys/block/${dev#/dev/}/pid" ] || die "$dev: the kernel shows no connection"
  [ "$(blockdev --getsize64 "$dev")" = $((32 << 20)) ] || die "$dev has size $(blockdev --getsize64 "$dev")"
}

step "attach, mkfs.ext4, write"
attach_vol
mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 "$dev"
mkdir -p "$MNT"
mount -t ext4 "$dev" "$MNT"
write_files "$MNT" 4 512 a
if fcnbd detach "$dev" 2>/tmp/detach.err; then die "fcnbd detach of a mounted $dev succeeded"; fi
grep -q CMMVC5903E /tmp/detach.err || die "detach while mounted: '$(cat /tmp/detach.err)', want CMMVC5903E"
umount "$MNT"

step "detach $dev"
fcnbd detach "$dev"
[ ! -e "/sys/block/${dev#/dev/}/pid" ] || die "$dev still connected after fcnbd detach"
[ "$(blockdev --getsize64 "$dev")" = 0 ] || die "$dev still has a size after fcnbd detach"

step "attach again, check"
attach_vol
NBD_DEV=$dev fsck_clean
mount -t ext4 -o ro "$dev" "$MNT"
check_files "$MNT" a
umount "$MNT"
fcnbd detach "$dev"

step "three concurrent attaches get three devices"
pids=()
for v in c1 c2 c3; do
  fcnbd mkvolume -name $v -size 8M >/dev/null
done
for v in c1 c2 c3; do
  fcnbd attach --nbd-unix $NBD_SOCK $v >/tmp/attach-$v 2>&1 &
  pids+=($!)
done
for i in 0 1 2; do
  wait ${pids[$i]} || die "concurrent fcnbd attach c$((i + 1)): $(cat /tmp/attach-c$((i + 1)))"
done
devs=$(cat /tmp/attach-c1 /tmp/attach-c2 /tmp/attach-c3 | sort -u)
[ "$(echo "$devs" | grep -c '^/dev/nbd[0-9]*$')" = 3 ] || die "concurrent attaches printed: $devs"
for d in $devs; do
  fcnbd detach "$d"
done

step "stop the daemon"
kill -TERM $daemon
rc=0
wait $daemon || rc=$?
[ $rc = 0 ] || { cat /tmp/fcnbd.log; die "fcnbd serve exited $rc after SIGTERM"; }
if dmesg | grep -E 'EXT4-fs (error|warning)|I/O error|blk_update_request|nbd.*(timed out|[Ee]rror)'; then
  die "the kernel logged errors (above)"
fi
step "ok"
