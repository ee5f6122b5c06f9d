#!/usr/bin/env bash
# Installs, idempotently and only what is missing, the Debian packages fcnbd's build, tests and
# benchmarks need, and the Go tools `make lint` uses. Safe to run on every `make` invocation.
set -euo pipefail

packages=(
  libnbd-bin      # nbdinfo, nbdcopy, nbdfuse: interop tests and `fcnbd attach` without an nbd driver
  python3-libnbd  # nbdsh: protocol error tests
  qemu-utils      # qemu-io, qemu-img, qemu-nbd (benchmark peer)
  fio             # data verification and benchmarks (nbd ioengine)
  fuse3           # nbdfuse mounts
  e2fsprogs       # mkfs.ext4, e2fsck
  nbdkit          # benchmark peer
  nbd-client      # kernel NBD attach where the driver exists
  socat           # VM test harness: guest-to-host forwarding
  qemu-system-x86 # VM test harness
  xz-utils        # VM test harness: unpacking the kernel package
  cpio            # VM test harness: building the initramfs
  openssl         # make bench: the TLS row's certificates
  openssh-server  # the SVC command line over SSH: sshd runs fcnbd svc-shell (ForceCommand); svcssh tests
  openssh-client  # svcssh tests: ssh, scp, sftp, ssh-keygen
  python3-paramiko # the Cinder Storwize driver's SSH client
  python3-cinder  # OpenStack Cinder's Storwize driver, driven against fcnbd's SVC command line
  etcd-server     # cluster mode: the etcd members the cluster tests start (and a production cluster runs)
  etcd-client     # etcdctl: cluster tests wait for an etcd leader with it
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing packages ${missing[*]}; run as root or install them" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

gobin=$(go env GOPATH)/bin
if [ ! -x "$gobin/staticcheck" ]; then
  echo "install-deps: installing staticcheck"
  go install honnef.co/go/tools/cmd/staticcheck@v0.8.2
fi
