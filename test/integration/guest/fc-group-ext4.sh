#!/bin/bash
# FlashCopy consistency group of two mounted ext4 filesystems, taken from the host while the guest
# writes (TestVMFCGroupExt4Consistency). Sources SRC_A, SRC_B on /dev/nbd0, /dev/nbd1; after the
# start their targets TGT_A, TGT_B on /dev/nbd2, /dev/nbd3 (nbds_max=4).
# The workload, for n = 1, 2, …: file n on A (random, up to MAX_KIB KiB) written and fsynced, then
# "n sha256" appended to A's log and fsynced; then the same on B. So B's record n exists only after
# A's record n is durable, and A's n+1 only after B's n is.
# Control port (CTL_PORT, default 10810): guest "READY" → host "ABOUT-TO-START" → guest notes the
# records fsynced so far (pre) and answers "GO" → host runs startfcconsistgrp -prep and answers
# "STARTED" → guest notes the records begun so far (post).
# Checks on the targets, mounted read-write (journal replay): each is the copy of a mounted
# filesystem (needs_recovery); its log is a gap-free prefix of the source's, every record names a
# file with the recorded sha256; pre <= records <= post on each; lastB <= lastA <= lastB+1;
# e2fsck -fn clean on targets and sources after unmounting. Prints
# "GUEST-FCRESULT pre=A,B post=A,B targets=A,B sources=A,B".
. /guest/lib.sh
: "${CTL_PORT:=10810}" "${MAX_KIB:=64}" "${SRC_A:?}" "${SRC_B:?}" "${TGT_A:?}" "${TGT_B:?}"

# readnum FILE — the number in FILE, which the workload rewrites (it may be seen empty meanwhile).
readnum() {
  local x= i
  for i in $(seq 1 10000); do
    read -r x <"$1" || true
    [[ $x =~ ^[0-9]+$ ]] && { echo "$x"; return 0; }
  done
  die "$1 holds no number"
}

# workload — the dependent-write loop, until /tmp/wl.stop exists.
workload() {
  local n=0 v size s
  while [ ! -e /tmp/wl.stop ]; do
    n=$((n + 1))
    for v in a b; do
      echo $n >/tmp/wl.started-$v
      size=$((RANDOM % (MAX_KIB * 1024) + 1))
      dd if=/dev/urandom of=/mnt/$v/f$n bs=$size count=1 conv=fsync 2>/dev/null
      s=$(sha256sum /mnt/$v/f$n)
      echo "$n ${s%% *}" >>/mnt/$v/log
      sync /mnt/$v/log
      echo $n >/tmp/wl.done-$v
    done
  done
}

# check_log DIR SRCLOG — DIR/log's complete records are numbered 1, 2, … without a gap, are the
# first records of SRCLOG byte for byte, and every file they name has the recorded sha256. Sets
# checked to the number of records. (A last line without newline is an append that was never
# fsynced: it claims nothing.)
check_log() {
  local dir=$1 src=$2 i=0 line re
  checked=
  while IFS= read -r line; do
    i=$((i + 1))
    re="^$i [0-9a-f]{64}\$"
    [[ $line =~ $re ]] || die "$dir/log: record $i is '$line'"
  done <"$dir/log"
  [ "$(head -n $i "$dir/log" | sha256sum)" = "$(head -n $i "$src" | sha256sum)" ] ||
    die "$dir/log: its $i records are not the first $i of $src"
  head -n $i "$dir/log" | awk '{print $2 "  f" $1}' >/tmp/check.sums
  (cd "$dir" && sha256sum -c /tmp/check.sums >/tmp/check.out 2>&1) ||
    die "$dir: files differ from their log records: $(grep -v ': OK$' /tmp/check.out | head -n 5 | tr '\n' ' ')"
  checked=$i
}

step "attach $SRC_A and $SRC_B as /dev/nbd0, /dev/nbd1; mkfs.ext4; mount"
NBD_DEV=/dev/nbd0 NBD_EXPORT=$SRC_A nbd_attach
NBD_DEV=/dev/nbd1 NBD_EXPORT=$SRC_B nbd_attach
for v in a b; do
  dev=/dev/nbd0
  [ $v = b ] && dev=/dev/nbd1
  mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 $dev
  mkdir -p /mnt/$v
  mount -t ext4 $dev /mnt/$v
  : >/mnt/$v/log
  sync /mnt/$v/log /mnt/$v
  echo 0 >/tmp/wl.started-$v
  echo 0 >/tmp/wl.done-$v
done

step "workload running"
workload &
wl=$!
for i in $(seq 1 300); do
  [ "$(readnum /tmp/wl.done-b)" -ge 3 ] && break
  kill -0 $wl 2>/dev/null || die "the workload died"
  sleep 0.1
done

exec 3<>"/dev/tcp/$NBD_HOST/$CTL_PORT" || die "cannot reach the host's control port"
echo READY >&3
read -r -t 120 msg <&3 || die "no ABOUT-TO-START from the host"
[ "$msg" = ABOUT-TO-START ] || die "host said '$msg', want ABOUT-TO-START"
preA=$(readnum /tmp/wl.done-a)
preB=$(readnum /tmp/wl.done-b)
echo GO >&3
read -r -t 120 msg <&3 || die "no reply to GO from the host"
postA=$(readnum /tmp/wl.started-a)
postB=$(readnum /tmp/wl.started-b)
exec 3>&-
[ "$msg" = STARTED ] || die "host said '$msg', want STARTED"
step "started: fsynced before $preA,$preB; begun by the end $postA,$postB"
sleep 0.$((RANDOM % 5))
touch /tmp/wl.stop
wait $wl || die "the workload failed"
doneA=$(readnum /tmp/wl.done-a)
doneB=$(readnum /tmp/wl.done-b)
[ "$doneA" = "$doneB" ] || die "workload stopped between volumes: $doneA, $doneB"

step "attach the targets $TGT_A, $TGT_B as /dev/nbd2, /dev/nbd3; mount (journal replay)"
NBD_DEV=/dev/nbd2 NBD_EXPORT=$TGT_A nbd_attach
NBD_DEV=/dev/nbd3 NBD_EXPORT=$TGT_B nbd_attach
for dev in /dev/nbd2 /dev/nbd3; do
  # (not grep -q: dumpe2fs must not die of SIGPIPE under pipefail)
  dumpe2fs -h $dev 2>/dev/null | grep needs_recovery >/dev/null || die "$dev is not marked needs_recovery: not a copy of a mounted ext4?"
done
mkdir -p /mnt/at /mnt/bt
mount -t ext4 /dev/nbd2 /mnt/at
mount -t ext4 /dev/nbd3 /mnt/bt
check_log /mnt/at /mnt/a/log
lastA=$checked
check_log /mnt/bt /mnt/b/log
lastB=$checked
check_log /mnt/a /mnt/a/log
srcA=$checked
check_log /mnt/b /mnt/b/log
srcB=$checked
echo "GUEST-FCRESULT pre=$preA,$preB post=$postA,$postB targets=$lastA,$lastB sources=$srcA,$srcB"
[ "$srcA" = "$doneA" ] && [ "$srcB" = "$doneB" ] || die "sources hold $srcA,$srcB records, the workload wrote $doneA,$doneB"
[ "$lastA" -ge "$preA" ] || die "target A holds $lastA records, but $preA were fsynced before the start command began"
[ "$lastB" -ge "$preB" ] || die "target B holds $lastB records, but $preB were fsynced before the start command began"
[ "$lastA" -le "$postA" ] || die "target A holds $lastA records, but only $postA had been begun when the start returned"
[ "$lastB" -le "$postB" ] || die "target B holds $lastB records, but only $postB had been begun when the start returned"
[ "$lastB" -le "$lastA" ] || die "dependent-write order broken: B's copy claims $lastB records, A's only $lastA"
[ "$lastA" -le $((lastB + 1)) ] || die "dependent-write order broken: A's copy claims $lastA records, B's only $lastB"

step "unmount; e2fsck -fn on targets and sources; detach"
umount /mnt/at /mnt/bt /mnt/a /mnt/b
for dev in /dev/nbd2 /dev/nbd3 /dev/nbd0 /dev/nbd1; do
  NBD_DEV=$dev fsck_clean >/dev/null
done
for dev in /dev/nbd3 /dev/nbd2 /dev/nbd1 /dev/nbd0; do
  NBD_DEV=$dev nbd_detach
done
if dmesg | grep -E 'EXT4-fs (error|warning)|I/O error|blk_update_request|nbd.*(timed out|[Ee]rror)'; then
  die "the kernel logged errors (above)"
fi
step "ok"
