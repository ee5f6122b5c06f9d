#!/bin/bash
# Kernel NBD smoke: attach an export with the kernel driver, make ext4, write files, flush, detach,
# reattach, check the filesystem and the files. Settings: see lib.sh; FILES (4), FILE_KIB (2048),
# DEVSHA=1 to print the sha256 of the whole device at the end (GUEST-DEVSHA256 line).
. /guest/lib.sh
: "${FILES:=4}" "${FILE_KIB:=2048}"

step "attach $NBD_HOST:$NBD_PORT export '$NBD_EXPORT'"
nbd_attach
echo "size $(blockdev --getsize64 "$NBD_DEV")"
step "mkfs.ext4"
mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 "$NBD_DEV"
mkdir -p "$MNT"
mount -t ext4 "$NBD_DEV" "$MNT"
step "write $FILES files of $FILE_KIB KiB"
write_files "$MNT" "$FILES" "$FILE_KIB" a
flush_all
umount "$MNT"
nbd_detach
step "reattach"
nbd_attach
fsck_clean
mount -t ext4 -o ro "$NBD_DEV" "$MNT"
check_files "$MNT" a
umount "$MNT"
[ "${DEVSHA:-0}" = 1 ] && device_sha256
nbd_detach
step "ok"
