#!/usr/bin/env bash
# vm-run.sh — boots the throwaway test VM built by vm-build.sh, runs one guest script in it as root
# under bash, streams the serial console to stdout, and exits with the script's exit code.
#
# Usage: scripts/vm-run.sh GUEST_SCRIPT [options]
#   --fwd GUEST_PORT=HOST_SPEC  the guest reaches HOST_SPEC at 10.0.2.100:GUEST_PORT. HOST_SPEC is
#                               PORT, 127.0.0.1:PORT, tcp:127.0.0.1:PORT or unix:/path/to.sock; it
#                               must be on this machine. Repeatable. Nothing else is reachable: the
#                               guest network is qemu user mode with restrict=on.
#   --file GUEST_PATH=HOST_PATH copy a host file into the guest (relative paths are under /guest).
#                               Repeatable. E.g. --file /usr/local/bin/fcnbd=bin/fcnbd
#   --env NAME=VALUE            exported to the guest script. Repeatable.
#   --connect-wait SECS         a guest connection to a --fwd endpoint that is not accepting (e.g. a
#                               daemon being restarted) waits up to SECS for it instead of being
#                               closed at once (default 0). With qemu user networking the guest's
#                               connect() always succeeds; only the host-side relay can wait.
#   --timeout SECS              kill the VM after SECS seconds (default 300)
#   --log FILE                  also write the console to FILE (default: a temp file)
#   --result-file FILE          write the verdict: "guest N", "timeout", "no-verdict" or "error"
#   --mem MB (default 512)  --cpus N (default 1)  --quiet (console not copied to stdout)
#
# The guest has /guest/script.sh, bash, busybox, nbd-client, e2fsprogs, modules nbd (nbds_max=4),
# ext4 and crc32c loaded, eth0 = 10.0.2.15/24, /tmp on tmpfs. Its /init prints
# "VMRESULT-<nonce>: <rc>" with a nonce this runner draws for each run and passes on the kernel
# command line; only that exact line is taken as the verdict.
#
# Exit codes: the guest script's exit code (scripts should use 0..123), or
#   124 timeout, 125 no verdict (boot failure, kernel panic, guest died), 126 harness error
#   (usage, qemu missing, build failure), 127 the VM could not be built because its packages
#   could not be downloaded (vm-build.sh exit 3). --result-file tells them apart unambiguously.
# Environment: FCNBD_VM_CACHE (see vm-build.sh), FCNBD_VM_ACCEL=kvm|tcg to force an accelerator.
set -euo pipefail

EXIT_TIMEOUT=124
EXIT_NOVERDICT=125
EXIT_HARNESS=126
EXIT_NOPACKAGES=127

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
result_file=""
verdict() { [ -z "$result_file" ] || echo "$1" >"$result_file"; }
fail() { local code=$1; shift; echo "vm-run: $*" >&2; verdict error; exit "$code"; }
usage() { sed -n '2,28p' "$0" >&2; exit $EXIT_HARNESS; }

script=""
fwds=()
files=()
envs=()
timeout=300
connect_wait=0
logfile=""
mem=512
cpus=1
quiet=0
while (($#)); do
  case "$1" in
    --fwd) fwds+=("${2:?--fwd needs GUEST_PORT=HOST_SPEC}"); shift 2 ;;
    --file) files+=("${2:?--file needs GUEST_PATH=HOST_PATH}"); shift 2 ;;
    --env) envs+=("${2:?--env needs NAME=VALUE}"); shift 2 ;;
    --timeout) timeout=${2:?}; shift 2 ;;
    --connect-wait) connect_wait=${2:?}; shift 2 ;;
    --log) logfile=${2:?}; shift 2 ;;
    --result-file) result_file=${2:?}; shift 2 ;;
    --mem) mem=${2:?}; shift 2 ;;
    --cpus) cpus=${2:?}; shift 2 ;;
    --quiet) quiet=1; shift ;;
    -h|--help) usage ;;
    -*) echo "vm-run: unknown option $1" >&2; usage ;;
    *) [ -z "$script" ] || usage; script=$1; shift ;;
  esac
done
[ -n "$script" ] || usage
[ -f "$script" ] || fail $EXIT_HARNESS "no such guest script: $script"
[[ "$timeout" =~ ^[0-9]+$ ]] || fail $EXIT_HARNESS "--timeout needs whole seconds"
[[ "$connect_wait" =~ ^[0-9]+$ ]] || fail $EXIT_HARNESS "--connect-wait needs whole seconds"
command -v qemu-system-x86_64 >/dev/null || fail $EXIT_HARNESS "qemu-system-x86_64 missing (run scripts/install-deps.sh)"
command -v cpio >/dev/null || fail $EXIT_HARNESS "cpio missing (run scripts/install-deps.sh)"
((${#fwds[@]} == 0)) || command -v socat >/dev/null || fail $EXIT_HARNESS "socat missing (run scripts/install-deps.sh)"

# ---- the VM image ---------------------------------------------------------------------------
set +e
out=$("$here/vm-build.sh" --print-dir)
rc=$?
set -e
case $rc in
  0) ;;
  3) fail $EXIT_NOPACKAGES "the VM could not be built: its packages could not be downloaded" ;;
  *) fail $EXIT_HARNESS "vm-build.sh failed (exit $rc)" ;;
esac
out=$(cd "$out" && pwd -P) # pin this build even if another one replaces "current" meanwhile
[ -f "$out/vmlinux" ] && [ -f "$out/initramfs.cpio.gz" ] || fail $EXIT_HARNESS "incomplete VM build in $out"

# ---- per-run state and cleanup ----------------------------------------------------------------
tmp=$(mktemp -d "${TMPDIR:-/tmp}/fcnbd-vm.XXXXXX")
qpid=""
spid=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM HUP
  if [ -n "$spid" ]; then kill "$spid" 2>/dev/null || true; fi
  if [ -n "$qpid" ] && kill -0 "$qpid" 2>/dev/null; then
    # the socat processes qemu spawned for guestfwd are its children
    local kids
    kids=$(ps -o pid= --ppid "$qpid" 2>/dev/null || true)
    kill -TERM "$qpid" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$qpid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$qpid" 2>/dev/null || true
    # shellcheck disable=SC2086
    [ -z "$kids" ] || kill -TERM $kids 2>/dev/null || true
    wait "$qpid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "vm-run: interrupted" >&2; verdict error; exit 130' INT
trap 'echo "vm-run: terminated" >&2; verdict error; exit 143' TERM HUP

# ---- the per-run archive: the guest script, its environment and extra files --------------------
extra="$tmp/extra"
mkdir -p "$extra/guest"
cp "$script" "$extra/guest/script.sh"
chmod 755 "$extra/guest/script.sh"
: >"$extra/guest/env"
for e in "${envs[@]}"; do
  name=${e%%=*}
  [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] && [ "$name" != "$e" ] || fail $EXIT_HARNESS "bad --env $e"
  printf '%s=%q\n' "$name" "${e#*=}" >>"$extra/guest/env"
done
for f in "${files[@]}"; do
  g=${f%%=*}
  h=${f#*=}
  [ "$g" != "$f" ] && [ -n "$g" ] || fail $EXIT_HARNESS "bad --file $f"
  [ -f "$h" ] || fail $EXIT_HARNESS "--file: no such host file $h"
  case "$g" in /*) ;; *) g=/guest/$g ;; esac
  case "$g" in *..*) fail $EXIT_HARNESS "--file: guest path must not contain ..: $g" ;; esac
  mkdir -p "$extra$(dirname "$g")"
  cp -L "$h" "$extra$g"
done
# The kernel unpacks concatenated archives in order; ours comes after the base image's.
(cd "$extra" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$tmp/extra.cpio"
# An uncompressed archive must start 4-byte aligned; zeros between archives are skipped.
base_size=$(stat -c %s "$out/initramfs.cpio.gz")
{ cat "$out/initramfs.cpio.gz"; head -c $(((512 - base_size % 512) % 512)) /dev/zero; cat "$tmp/extra.cpio"; } >"$tmp/initrd"

# ---- network: qemu user mode, restricted, one guestfwd per endpoint --------------------------
netdev="user,id=n0,restrict=on,net=10.0.2.0/24,host=10.0.2.2"
for f in "${fwds[@]}"; do
  gport=${f%%=*}
  spec=${f#*=}
  [[ "$gport" =~ ^[0-9]+$ ]] && [ "$spec" != "$f" ] || fail $EXIT_HARNESS "bad --fwd $f"
  case "$spec" in
    unix:*) target="UNIX-CONNECT:${spec#unix:}" ;;
    tcp:*) spec=${spec#tcp:} ;&
    *)
      if [[ "$spec" =~ ^[0-9]+$ ]]; then spec=127.0.0.1:$spec; fi
      host=${spec%:*}
      port=${spec##*:}
      case "$host" in 127.*|localhost) ;; *) fail $EXIT_HARNESS "--fwd must point at this machine (127.0.0.1 or a unix socket): $f" ;; esac
      [[ "$port" =~ ^[0-9]+$ ]] || fail $EXIT_HARNESS "bad --fwd port in $f"
      target="TCP4:$host:$port"
      ;;
  esac
  case "$target" in *,*) fail $EXIT_HARNESS "--fwd target must not contain a comma: $f" ;; esac
  # socat retries the host-side connect every 0.2 s; ",," is a literal comma inside -netdev.
  ((connect_wait == 0)) || target+=",,retry=$((connect_wait * 5)),,interval=0.2"
  netdev+=",guestfwd=tcp:10.0.2.100:$gport-cmd:socat STDIO $target"
done

# ---- accelerator -----------------------------------------------------------------------------
accel=${FCNBD_VM_ACCEL:-}
if [ -z "$accel" ]; then
  accel=tcg
  if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -r /dev/kvm ] && [ -w /dev/kvm ] &&
    echo quit | timeout 10 qemu-system-x86_64 -accel kvm -M pc -nodefaults -no-user-config \
      -display none -S -monitor stdio >/dev/null 2>&1; then
    accel=kvm
  fi
fi
cpu=()
[ "$accel" = kvm ] && cpu=(-cpu host)

# ---- boot -------------------------------------------------------------------------------------
nonce=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
[ -n "$logfile" ] || logfile="$tmp/console.log"
: >"$logfile"
console="stdio,id=con0,signal=off,logfile=$logfile"
if [ $quiet = 1 ]; then console="file,id=con0,path=$logfile"; fi
start=$SECONDS
qemu-system-x86_64 -M pc -accel "$accel" "${cpu[@]}" -m "$mem" -smp "$cpus" \
  -nodefaults -no-user-config -display none -no-reboot \
  -kernel "$out/vmlinux" -initrd "$tmp/initrd" \
  -append "console=ttyS0 quiet panic=-1 oops=panic i8042.nokbd i8042.noaux fcnbd.nonce=$nonce" \
  -chardev "$console" -serial chardev:con0 \
  -netdev "$netdev" -device virtio-net-pci,netdev=n0 \
  </dev/null &
qpid=$!
sleep "$timeout" &
spid=$!
set +e
wait -n -p done_pid "$qpid" "$spid"
qrc=$?
set -e
if [ "${done_pid:-}" = "$spid" ]; then
  spid=""
  echo "vm-run: timeout after ${timeout}s; killing the VM" >&2
  verdict timeout
  exit $EXIT_TIMEOUT # cleanup kills qemu
fi
qpid=""
kill "$spid" 2>/dev/null || true
wait "$spid" 2>/dev/null || true
spid=""

line=$(grep -a -o "VMRESULT-$nonce: [0-9]*" "$logfile" | tail -n1 || true)
if [ -z "$line" ]; then
  echo "vm-run: no verdict from the guest (qemu exit $qrc after $((SECONDS - start))s): boot failure or guest crash" >&2
  [ $quiet = 1 ] && { echo "vm-run: last console lines:" >&2; tail -n 30 "$logfile" >&2; }
  verdict no-verdict
  exit $EXIT_NOVERDICT
fi
grc=${line##*: }
echo "vm-run: guest script exited $grc after $((SECONDS - start))s ($accel)" >&2
verdict "guest $grc"
exit "$grc"
