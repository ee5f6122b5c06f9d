#!/usr/bin/env bash
# vm-build.sh — builds the throwaway test VM used by test/integration's kernel-NBD tests: an
# uncompressed Debian kernel (vmlinux, booted directly by qemu through PVH) and a base initramfs
# holding busybox, bash, nbd-client, e2fsprogs, their shared libraries and the kernel modules nbd,
# ext4 and virtio-net need. Everything comes from Debian packages fetched with `apt-get download`
# for the release this machine runs, so the guest's tools match the host's distribution.
#
# Usage: scripts/vm-build.sh [--force] [--print-dir]
#   --force      rebuild even when the inputs did not change
#   --print-dir  print the output directory (vmlinux, initramfs.cpio.gz, kernel-release) on stdout
#
# The cache (default /var/cache/fcnbd-vm, or $FCNBD_VM_CACHE) keeps the downloaded .debs and the
# outputs between runs. Outputs go to $CACHE/out-<stamp>/ and $CACHE/current points at the newest;
# the stamp hashes this script and the exact package versions, so a second run with the same
# inputs returns in about a second and a changed kernel/package version rebuilds by itself.
#
# Exit codes: 0 ok; 2 usage; 3 packages could not be downloaded (no mirror reachable, or apt
# knows no candidate); 4 build failure (a tool missing, an unexpected package layout).
set -euo pipefail

EXIT_DOWNLOAD=3
EXIT_BUILD=4

force=0
print_dir=0
for a in "$@"; do
  case "$a" in
    --force) force=1 ;;
    --print-dir) print_dir=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "vm-build: unknown argument $a" >&2; exit 2 ;;
  esac
done

log() { echo "vm-build: [${SECONDS}s] $*" >&2; }
die() { local code=$1; shift; echo "vm-build: $*" >&2; exit "$code"; }

CACHE=${FCNBD_VM_CACHE:-/var/cache/fcnbd-vm}
if ! mkdir -p "$CACHE" 2>/dev/null || [ ! -w "$CACHE" ]; then
  if [ -z "${FCNBD_VM_CACHE:-}" ]; then
    CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/fcnbd-vm
    mkdir -p "$CACHE" || die $EXIT_BUILD "cannot create a cache directory (tried /var/cache/fcnbd-vm and $CACHE)"
  else
    die $EXIT_BUILD "cache directory $CACHE is not writable"
  fi
fi
CACHE=$(cd "$CACHE" && pwd)

for tool in apt-get apt-cache dpkg-deb cpio gzip xz sha256sum tar; do
  command -v "$tool" >/dev/null || die $EXIT_BUILD "missing host tool: $tool (run scripts/install-deps.sh)"
done

# One build at a time per cache; concurrent callers wait and then find the result up to date.
exec 9>"$CACHE/.lock"
flock 9

SELF_HASH=$(sha256sum "$0" | cut -d' ' -f1)
ARCH=$(dpkg --print-architecture)
[ "$ARCH" = amd64 ] || die $EXIT_BUILD "only amd64 hosts are supported (this is $ARCH)"

# Fast path: the package versions apt would pick only change when its package lists (or its
# sources/preferences) change, so a hash of those files' names, sizes and times plus this script
# identifies the inputs without asking apt-cache (which takes seconds per call here).
apt_inputs_key() {
  { echo "$SELF_HASH"
    stat -c '%n %s %Y' /var/lib/apt/lists/*Packages* /etc/apt/sources.list \
      /etc/apt/sources.list.d/* /etc/apt/preferences /etc/apt/preferences.d/* 2>/dev/null || true
  } | sha256sum | cut -c1-16
}
QUICK="$CACHE/inputs-$(apt_inputs_key)"
if [ $force = 0 ] && [ -f "$QUICK" ] && [ -f "$CACHE/$(cat "$QUICK")/done" ]; then
  OUT="$CACHE/$(cat "$QUICK")"
  ln -sfn "${OUT##*/}" "$CACHE/current.tmp" && mv -T "$CACHE/current.tmp" "$CACHE/current"
  log "up to date ($OUT)"
  [ $print_dir = 1 ] && echo "$OUT"
  exit 0
fi

updated=0
apt_update() {
  [ $updated = 0 ] || return 1
  updated=1
  [ "$(id -u)" = 0 ] || return 1
  log "running apt-get update"
  apt-get update -qq >/dev/null 2>&1 || return 1
}

candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}'; }

# The kernel package that linux-image-amd64 depends on, e.g. linux-image-6.1.0-56-amd64.
kernel_pkg() {
  apt-cache depends --no-recommends --no-suggests "linux-image-$ARCH" 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}

KPKG=$(kernel_pkg || true)
if [ -z "$KPKG" ] || [ -z "$(candidate "$KPKG")" ] || [ "$(candidate "$KPKG")" = "(none)" ]; then
  apt_update || true
  KPKG=$(kernel_pkg || true)
fi
[ -n "$KPKG" ] || die $EXIT_DOWNLOAD "apt knows no linux-image-$ARCH package (no package lists; apt-get update failed?)"

TOP=(busybox-static bash nbd-client e2fsprogs)
# Shared libraries come from the lib* packages in the dependency closure of the tools; only the
# libraries the binaries actually load are copied into the initramfs.
mapfile -t LIBPKGS < <(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
  --no-breaks --no-replaces --no-enhances "${TOP[@]}" 2>/dev/null | grep -E '^lib' | sort -u)
((${#LIBPKGS[@]})) || die $EXIT_DOWNLOAD "apt-cache could not resolve the dependencies of ${TOP[*]}"
PKGS=("$KPKG" "${TOP[@]}" "${LIBPKGS[@]}")

declare -A VER
while read -r p v; do VER[$p]=$v; done < <(apt-cache policy "${PKGS[@]}" 2>/dev/null |
  awk '/^[^ ]/ {sub(/:$/, "", $1); sub(/:amd64$/, "", $1); p=$1} /^  Candidate:/ {print p, $2}')
manifest=""
for p in "${PKGS[@]}"; do
  v=${VER[$p]:-}
  if [ -z "$v" ] || [ "$v" = "(none)" ]; then
    die $EXIT_DOWNLOAD "apt has no installable version of $p"
  fi
  manifest+="$p=$v"$'\n'
done
STAMP=$(printf '%s\n%s' "$SELF_HASH" "$manifest" | sha256sum | cut -c1-16)
OUT="$CACHE/out-$STAMP"

if [ $force = 0 ] && [ -f "$OUT/done" ]; then
  rm -f "$CACHE"/inputs-*; echo "out-$STAMP" >"$QUICK"
  ln -sfn "out-$STAMP" "$CACHE/current.tmp" && mv -T "$CACHE/current.tmp" "$CACHE/current"
  log "up to date ($OUT)"
  [ $print_dir = 1 ] && echo "$OUT"
  exit 0
fi

# ---- download -------------------------------------------------------------------------------
DEBS="$CACHE/debs"
mkdir -p "$DEBS"
declare -A DEBFILE
download() {
  local p=$1 v=$2 f
  # apt-get names the file pkg_version_arch.deb with ':' in the version escaped as %3a.
  f=$(ls "$DEBS/${p}_${v/:/%3a}_"*.deb 2>/dev/null | head -n1 || true)
  if [ -z "$f" ]; then
    (cd "$DEBS" && apt-get download -q -o APT::Sandbox::User=root "$p=$v" >/dev/null 2>"$CACHE/download.err") || return 1
    f=$(ls "$DEBS/${p}_${v/:/%3a}_"*.deb 2>/dev/null | head -n1 || true)
    [ -n "$f" ] || return 1
  fi
  DEBFILE[$p]=$f
}
while IFS== read -r p v; do
  [ -n "$p" ] || continue
  if ! download "$p" "$v"; then
    if apt_update && download "$p" "$v"; then continue; fi
    reason=$(grep -m1 -E '^(E|Err):' "$CACHE/download.err" 2>/dev/null || true)
    die $EXIT_DOWNLOAD "cannot download $p=$v from the Debian mirror${reason:+: $reason}"
  fi
done <<<"$manifest"

# ---- unpack ---------------------------------------------------------------------------------
log "building $OUT (kernel $KPKG)"
WORK=$(mktemp -d "$CACHE/work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
ROOT="$WORK/pkgroot"   # every package but the kernel, unpacked together
KR="$WORK/kernel"      # the kernel package
INIT="$WORK/initramfs" # the tree that becomes initramfs.cpio.gz
mkdir -p "$ROOT" "$KR" "$INIT"

for p in "${TOP[@]}" "${LIBPKGS[@]}"; do
  dpkg-deb -x "${DEBFILE[$p]}" "$ROOT"
done
# Only the kernel image and the module tree; firmware and docs stay packed.
dpkg-deb --fsys-tarfile "${DEBFILE[$KPKG]}" | tar -x -C "$KR" --wildcards './boot/vmlinuz-*' './lib/modules/*'

VMLINUZ=$(ls "$KR"/boot/vmlinuz-* | head -n1)
KREL=${VMLINUZ##*/vmlinuz-}
MODDIR="$KR/lib/modules/$KREL"
[ -d "$MODDIR/kernel" ] || die $EXIT_BUILD "kernel package has no module tree for $KREL"

log "unpacked"
# ---- vmlinux: the uncompressed kernel (as the kernel's scripts/extract-vmlinux finds it) ----
is_elf() { [ "$(head -c4 "$1" | od -An -c | tr -d ' \n')" = '177ELF' ]; }
extract_vmlinux() {
  local img=$1 out=$2 magic marker cmd pos
  while read -r magic marker cmd; do
    command -v "${cmd%% *}" >/dev/null || continue
    for pos in $(tr "$magic\n$marker" "\n$marker=" <"$img" | grep -abo "^$marker"); do
      pos=${pos%%:*}
      tail -c+"$pos" "$img" | $cmd >"$out" 2>/dev/null || true
      if [ -s "$out" ] && is_elf "$out"; then return 0; fi
    done
  done <<'EOF'
\3757zXZ\000 abcde xz -dc
(\265/\375 xxx zstd -dc
\037\213\010 xy gzip -dc
EOF
  return 1
}
extract_vmlinux "$VMLINUZ" "$WORK/vmlinux" || die $EXIT_BUILD "could not extract vmlinux from $VMLINUZ"

log "vmlinux extracted"
# ---- kernel modules: the closure of what the guest needs, in load order ----------------------
WANT_MODULES=(virtio_pci virtio_net crc32c_generic nbd ext4)
declare -A MODPATH
while IFS= read -r f; do
  n=${f##*/}; n=${n%.ko*}; n=${n//-/_}
  MODPATH[$n]=$f
done < <(cd "$MODDIR" && find kernel -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst')
declare -A SEEN
ORDER=()
mod_depends() { # the depends= field of the module's .modinfo section
  local f="$MODDIR/${MODPATH[$1]}"
  case "$f" in
    *.xz) xz -dc "$f" ;;
    *.zst) zstd -dc "$f" ;;
    *) cat "$f" ;;
  esac | tr '\0' '\n' | grep -a -m1 '^depends=' | cut -d= -f2 | tr ',' ' '
}
add_module() {
  local m=${1//-/_} d
  [ -n "${SEEN[$m]:-}" ] && return 0
  SEEN[$m]=1
  [ -n "${MODPATH[$m]:-}" ] || {
    grep -q "/$m.ko" "$MODDIR/modules.builtin" 2>/dev/null && return 0
    die $EXIT_BUILD "kernel module $m not found in $KPKG"
  }
  for d in $(mod_depends "$m"); do add_module "$d"; done
  ORDER+=("$m")
}
for m in "${WANT_MODULES[@]}"; do add_module "$m"; done
mkdir -p "$INIT/lib/modules"
: >"$INIT/etc.modules"
for m in "${ORDER[@]}"; do
  src="$MODDIR/${MODPATH[$m]}"
  case "$src" in
    *.xz) xz -dc "$src" >"$INIT/lib/modules/$m.ko" ;;
    *.zst) zstd -dc "$src" >"$INIT/lib/modules/$m.ko" ;;
    *) cp "$src" "$INIT/lib/modules/$m.ko" ;;
  esac
  args=""
  [ "$m" = nbd ] && args="nbds_max=4"
  echo "$m $args" >>"$INIT/etc.modules"
done

log "modules: ${ORDER[*]}"
# ---- userland ---------------------------------------------------------------------------------
mkdir -p "$INIT"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,mnt,guest,root,lib64,lib/x86_64-linux-gnu,var/tmp}
mv "$INIT/etc.modules" "$INIT/etc/modules.order"
cp "$ROOT/bin/busybox" "$INIT/bin/busybox"
find_bin() { # first match of a program in the unpacked packages
  local n=$1 d
  for d in bin sbin usr/bin usr/sbin; do
    if [ -e "$ROOT/$d/$n" ]; then echo "$ROOT/$d/$n"; return 0; fi
  done
  return 1
}
REAL_BINS=(bash nbd-client mke2fs mkfs.ext4 mkfs.ext3 mkfs.ext2 e2fsck fsck.ext4 tune2fs dumpe2fs debugfs resize2fs e2label badblocks)
for n in "${REAL_BINS[@]}"; do
  f=$(find_bin "$n") || die $EXIT_BUILD "$n not found in the unpacked packages"
  cp -L "$f" "$INIT/usr/sbin/$n"
done
ln -s ../usr/sbin/bash "$INIT/bin/bash"
cp "$ROOT/etc/mke2fs.conf" "$INIT/etc/mke2fs.conf"
# busybox applets for every name not provided by a real program above
for n in $("$ROOT/bin/busybox" --list); do
  case " ${REAL_BINS[*]} busybox " in *" $n "*) continue ;; esac
  [ -e "$INIT/bin/$n" ] || ln -s busybox "$INIT/bin/$n"
done

# Shared libraries: ask the packaged dynamic loader what each program loads.
LDSO="$ROOT/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
[ -e "$LDSO" ] || LDSO="$ROOT/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
[ -e "$LDSO" ] || die $EXIT_BUILD "no dynamic loader in the unpacked libc6"
LIBPATH="$ROOT/lib/x86_64-linux-gnu:$ROOT/usr/lib/x86_64-linux-gnu"
declare -A LIBS
for n in "${REAL_BINS[@]}"; do
  while read -r line; do
    case "$line" in
      *"not found"*) die $EXIT_BUILD "$n: shared library missing from the packages: $line" ;;
      *" => "*) so=${line%% =>*}; so=${so##*/}; lib=${line#* => }; lib=${lib%% (*}; LIBS[$so]=$lib ;;
    esac
  done < <("$LDSO" --library-path "$LIBPATH" --list "$INIT/usr/sbin/$n")
done
for so in "${!LIBS[@]}"; do
  cp -L "${LIBS[$so]}" "$INIT/lib/x86_64-linux-gnu/$so"
done
cp -L "$LDSO" "$INIT/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
ln -s ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$INIT/lib64/ld-linux-x86-64.so.2"

cat >"$INIT/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/bash
EOF
echo 'root:x:0:' >"$INIT/etc/group"
echo 'fcnbd-vm' >"$INIT/etc/hostname"
printf '127.0.0.1 localhost\n10.0.2.100 host\n' >"$INIT/etc/hosts"
ln -s /proc/mounts "$INIT/etc/mtab"
echo "$KREL" >"$INIT/etc/kernel-release"
printf '%s' "$manifest" >"$INIT/etc/fcnbd-vm-packages"
if [ "$(id -u)" = 0 ]; then
  mknod -m 600 "$INIT/dev/console" c 5 1
  mknod -m 666 "$INIT/dev/null" c 1 3
fi

# /init: mount, load modules, configure the only network there is, run the guest script under
# bash, print the verdict with the per-run nonce, power off. The runner (vm-run.sh) appends
# /guest/script.sh, /guest/env and any extra files as a second cpio archive.
cat >"$INIT/init" <<'EOF'
#!/bin/busybox sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
hostname fcnbd-vm

nonce=
for w in $(cat /proc/cmdline); do
  case "$w" in fcnbd.nonce=*) nonce=${w#fcnbd.nonce=} ;; esac
done

finish() {
  echo "VMRESULT-$nonce: $1"
  sync
  poweroff -f
  reboot -f
  echo o >/proc/sysrq-trigger
  sleep 5
}

while read -r m args; do
  [ -n "$m" ] || continue
  if ! insmod "/lib/modules/$m.ko" $args; then
    echo "vm-init: insmod $m failed"
    finish 125
  fi
done </etc/modules.order

ip link set lo up
if ip link set eth0 up 2>/dev/null; then
  ip addr add 10.0.2.15/24 dev eth0
  ip route add default via 10.0.2.2 dev eth0
else
  echo "vm-init: no eth0; the guest has no network"
fi

if [ ! -f /guest/script.sh ]; then
  echo "vm-init: no /guest/script.sh"
  finish 125
fi
cd /guest
bash -c 'set -a; [ -f /guest/env ] && . /guest/env; set +a; exec bash /guest/script.sh'
finish $?
EOF
chmod 755 "$INIT/init"

log "userland ready"
# ---- pack ---------------------------------------------------------------------------------
mkdir -p "$WORK/out"
cp "$WORK/vmlinux" "$WORK/out/vmlinux"
(cd "$INIT" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -6 >"$WORK/out/initramfs.cpio.gz"
echo "$KREL" >"$WORK/out/kernel-release"
printf '%s' "$manifest" >"$WORK/out/packages"
echo "$STAMP" >"$WORK/out/stamp"
touch "$WORK/out/done"
rm -rf "$OUT"
mv "$WORK/out" "$OUT"
ln -sfn "out-$STAMP" "$CACHE/current.tmp" && mv -T "$CACHE/current.tmp" "$CACHE/current"
rm -f "$CACHE"/inputs-*
[ $updated = 1 ] && QUICK="$CACHE/inputs-$(apt_inputs_key)" # apt-get update changed the lists
echo "out-$STAMP" >"$QUICK"

# Keep the two newest outputs (a concurrent vm-run.sh may still be reading the previous one)
# and only the .debs of the current manifest.
ls -1dt "$CACHE"/out-* 2>/dev/null | tail -n +3 | xargs -r rm -rf
declare -A KEEP
for p in "${PKGS[@]}"; do KEEP[${DEBFILE[$p]}]=1; done
for f in "$DEBS"/*.deb; do [ -n "${KEEP[$f]:-}" ] || rm -f "$f"; done

log "done: $(du -h "$OUT/vmlinux" | cut -f1) vmlinux, $(du -h "$OUT/initramfs.cpio.gz" | cut -f1) initramfs ($KREL)"
[ $print_dir = 1 ] && echo "$OUT"
exit 0
