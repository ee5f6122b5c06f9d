#!/bin/bash
# `fcnbd attach` with the kernel NBD driver (TestVMFcnbdAttach): the static fcnbd binary
# (/usr/local/bin/fcnbd) runs the daemon in the guest and is the CLI. With the default method
# (nbd: fcnbd's own helper process holds the device, no nbd-client) a volume is attached (the
# device printed must be a /dev/nbdN, held by an attach-helper, with the export's FLUSH and TRIM
# passed to the kernel), ext4 made and mounted, files written; detach is refused while mounted;
# unmount, detach (the device is released, the helper gone); attach again, e2fsck -fn clean, the
# files' checksums equal; detach; the same through --nbd-tcp and through --method nbd-client,
# with several connections;
# an unreachable daemon is a clear error that leaves nothing behind; three concurrent attaches
# get three different devices; an attach interrupted with SIGINT completes or leaves nothing;
# the daemon exits 0 on SIGTERM; last, a helper that gets no
# commit from fcnbd attach (gone before writing the record) disconnects its device, a helper
# killed with SIGKILL still detaches cleanly, and so does a device whose daemon stopped.
# Prints "GUEST-ATTACHED <method> <device>" for each attach.
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

# helper_pids — the pids of running `fcnbd attach-helper` processes.
helper_pids() {
  local p
  for p in /proc/[0-9]*; do
    if tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -q 'attach-helper[ ]--device'; then
      echo "${p#/proc/}"
    fi
  done
}

# nbd_conns — the daemon's established NBD connections (server side: Unix and TCP port 10809).
nbd_conns() {
  local u t
  u=$(awk -v s=$NBD_SOCK '$NF == s && $6 == "03"' /proc/net/unix | wc -l)
  t=$(awk '$2 ~ /:2A39$/ && $4 == "01"' /proc/net/tcp | wc -l)
  echo $((u + t))
}

# attach_vol [fcnbd attach options...] — fcnbd attach vol; sets dev and checks the kernel sees
# a connected device. Without --method, the device must be held by an attach helper.
attach_vol() {
  local method=nbd conns=1 a prev=
  for a in "$@"; do
    case $a in nbd-client) method=nbd-client ;; esac
    [ "$prev" = --connections ] && conns=$a
    prev=$a
  done
  dev=$(fcnbd attach --nbd-unix $NBD_SOCK "$@" vol) || { cat /run/fcnbd/attach/*.log 2>/dev/null; die "fcnbd attach $* vol failed"; }
  echo "GUEST-ATTACHED $method $dev"
  [[ $dev =~ ^/dev/nbd[0-9]+$ ]] || die "fcnbd attach printed '$dev', want /dev/nbdN"
  local name=${dev#/dev/}
  [ -e "/sys/block/$name/pid" ] || die "$dev: the kernel shows no connection"
  [ "$(blockdev --getsize64 "$dev")" = $((32 << 20)) ] || die "$dev has size $(blockdev --getsize64 "$dev")"
  # The export's transmission flags reached the kernel: FLUSH (write-back cache) and TRIM.
  grep -q 'write back' "/sys/block/$name/queue/write_cache" || die "$dev: write_cache '$(cat /sys/block/$name/queue/write_cache)', want write back (FLUSH)"
  [ "$(cat /sys/block/$name/queue/discard_max_bytes)" != 0 ] || die "$dev: no discard (TRIM)"
  # The daemon has as many connections as asked for (the only device attached).
  [ "$(nbd_conns)" = "$conns" ] || die "$dev: the daemon has $(nbd_conns) NBD connections, want $conns"
  if [ $method = nbd ]; then
    [ "$(helper_pids | wc -l)" = 1 ] || die "want one fcnbd attach-helper, have pids: $(helper_pids)"
    grep -q '"helper_pid"' /run/fcnbd/attach/vol-*.json || die "the attachment record has no helper_pid"
  fi
}

# detach_dev — fcnbd detach $dev; the device is released and no helper is left.
detach_dev() {
  fcnbd detach "$dev"
  [ ! -e "/sys/block/${dev#/dev/}/pid" ] || die "$dev still connected after fcnbd detach"
  [ "$(blockdev --getsize64 "$dev")" = 0 ] || die "$dev still has a size after fcnbd detach"
  [ -z "$(helper_pids)" ] || die "attach helpers left after detach: $(helper_pids)"
  ! ls /run/fcnbd/attach/*.json 2>/dev/null || die "attachment records left after detach"
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
detach_dev

step "attach again, check, write more"
attach_vol
NBD_DEV=$dev fsck_clean
mount -t ext4 "$dev" "$MNT"
check_files "$MNT" a
write_files "$MNT" 2 256 b
umount "$MNT"
detach_dev

step "attach over TCP with 2 connections, check"
attach_vol --nbd-tcp 127.0.0.1:10809 --connections 2
NBD_DEV=$dev fsck_clean
mount -t ext4 -o ro "$dev" "$MNT"
check_files "$MNT" a
check_files "$MNT" b
umount "$MNT"
detach_dev

step "attach with --method nbd-client (2 connections), check, write"
attach_vol --method nbd-client --connections 2
NBD_DEV=$dev fsck_clean
mount -t ext4 "$dev" "$MNT"
check_files "$MNT" a
write_files "$MNT" 2 256 c
umount "$MNT"
detach_dev

step "attach (nbd, 3 connections) again after nbd-client, check"
attach_vol --connections 3
NBD_DEV=$dev fsck_clean
mount -t ext4 -o ro "$dev" "$MNT"
check_files "$MNT" a
check_files "$MNT" b
check_files "$MNT" c
umount "$MNT"
detach_dev

step "an unreachable daemon is a clear error and leaves nothing"
if fcnbd attach --nbd-unix /run/fcnbd/nothing.sock vol >/tmp/attach.out 2>/tmp/attach.err; then
  die "fcnbd attach to a missing NBD socket succeeded: $(cat /tmp/attach.out)"
fi
grep -q 'not reachable' /tmp/attach.err || die "attach to a missing NBD socket: '$(cat /tmp/attach.err)', want 'not reachable'"
! ls /run/fcnbd/attach/*.json 2>/dev/null || die "attachment records left after a failed attach"
[ -z "$(ls /run/fcnbd/attach/)" ] || die "left in /run/fcnbd/attach after a failed attach: $(ls /run/fcnbd/attach/)"
[ -z "$(helper_pids)" ] || die "attach helpers left after a failed attach: $(helper_pids)"
for n in /sys/block/nbd*; do
  [ ! -e "$n/pid" ] || die "${n##*/} connected after a failed attach"
done

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

step "an interrupted attach completes (recorded) or leaves nothing"
for delay in 0.01 0.03 0.05 0.07 0.09 0.12 0.15 0.2; do
  fcnbd attach --nbd-unix $NBD_SOCK vol >/tmp/int.out 2>&1 &
  p=$!
  sleep $delay
  kill -INT $p 2>/dev/null || true
  rc=0
  wait $p || rc=$?
  if [ $rc = 0 ]; then
    dev=$(cat /tmp/int.out)
    echo "GUEST-INTERRUPT $delay completed $dev"
    detach_dev
  else
    echo "GUEST-INTERRUPT $delay rc=$rc $(tr '\n' ' ' </tmp/int.out)"
    for i in $(seq 1 50); do [ -z "$(helper_pids)" ] && break; sleep 0.1; done
    [ -z "$(helper_pids)" ] || die "interrupted after ${delay}s: attach helpers left: $(helper_pids)"
    [ -z "$(ls /run/fcnbd/attach/)" ] || die "interrupted after ${delay}s: left in /run/fcnbd/attach: $(ls /run/fcnbd/attach/)"
    for n in /sys/block/nbd*; do
      [ ! -e "$n/pid" ] || die "interrupted after ${delay}s: ${n##*/} still connected"
    done
  fi
done

step "timing: attach, 16 MiB of direct writes, detach; nbd and nbd-client"
fcnbd mkvolume -name perf -size 16M >/dev/null
ms() { echo $(( (${EPOCHREALTIME/./} - ${1/./}) / 1000 )); }
for m in nbd nbd-client nbd nbd-client; do
  t0=$EPOCHREALTIME
  d=$(fcnbd attach --nbd-unix $NBD_SOCK --method $m perf)
  t1=$EPOCHREALTIME
  dd if=/dev/urandom of=/tmp/perf.bin bs=1M count=16 2>/dev/null
  t2=$EPOCHREALTIME
  dd if=/tmp/perf.bin of="$d" bs=1M oflag=direct conv=fsync 2>/dev/null
  write_ms=$(ms $t2)
  t3=$EPOCHREALTIME
  fcnbd detach "$d"
  echo "GUEST-TIMING $m attach_ms=$(( (${t1/./} - ${t0/./}) / 1000 )) write16M_ms=$write_ms detach_ms=$(ms $t3)"
done

step "stop the daemon"
kill -TERM $daemon
rc=0
wait $daemon || rc=$?
[ $rc = 0 ] || { cat /tmp/fcnbd.log; die "fcnbd serve exited $rc after SIGTERM"; }
if dmesg | grep -E 'EXT4-fs (error|warning)|I/O error|blk_update_request|nbd.*(timed out|[Ee]rror)'; then
  die "the kernel logged errors (above)"
fi

step "restart the daemon"
fcnbd serve --data-dir /tmp/fcnbd --nbd-unix $NBD_SOCK --nbd-tcp 127.0.0.1:10809 \
  --no-mlock --cache-size 16M >>/tmp/fcnbd.log 2>&1 &
daemon=$!
for i in $(seq 1 150); do
  [ -S $NBD_SOCK ] && fcnbd lsvolume >/dev/null 2>&1 && break
  [ $i = 150 ] && { cat /tmp/fcnbd.log; die "fcnbd serve not ready after 30s (restart)"; }
  sleep 0.2
done
step "a helper whose fcnbd attach is gone before recording it disconnects the device"
rc=0
fcnbd attach-helper --device /dev/nbd3 --export vol --nbd-unix $NBD_SOCK \
  3>/tmp/helper.status 4</dev/null 2>/tmp/helper.log || rc=$?
grep -q '^ok' /tmp/helper.status || die "helper status '$(cat /tmp/helper.status)', want ok"
[ $rc = 1 ] || die "the helper exited $rc, want 1; log: $(cat /tmp/helper.log)"
grep -q 'not recorded' /tmp/helper.log || die "helper log: $(cat /tmp/helper.log)"
[ ! -e /sys/block/nbd3/pid ] || die "nbd3 still connected"
[ "$(blockdev --getsize64 /dev/nbd3)" = 0 ] || die "nbd3 still has a size"

step "a helper killed with SIGKILL: detach still cleans up"
attach_vol
kill -KILL "$(helper_pids)"
for i in $(seq 1 50); do
  [ -z "$(helper_pids)" ] && break
  sleep 0.1
done
detach_dev

step "the daemon stops while attached: the helper exits, detach cleans up"
attach_vol
kill -TERM $daemon
rc=0
wait $daemon || rc=$?
[ $rc = 0 ] || die "fcnbd serve exited $rc after SIGTERM with a device attached"
for i in $(seq 1 100); do
  [ -z "$(helper_pids)" ] && break
  [ $i = 100 ] && die "the attach helper still runs 10s after the daemon stopped"
  sleep 0.1
done
grep -q '"detached"' /run/fcnbd/attach/vol-*.log || die "helper log: $(cat /run/fcnbd/attach/vol-*.log)"
detach_dev
step "ok"
