#!/bin/bash
# Kernel NBD over TLS: a plain-text attach is refused by the server (--tls require), then the
# smoke test (kernel-nbd-smoke.sh) runs with nbd-client's TLS options (NBD_TLS).
. /guest/lib.sh
step "plain-text attach of $NBD_HOST:$NBD_PORT refused"
if (NBD_TLS= nbd-client "$NBD_HOST" "$NBD_PORT" "$NBD_DEV" -N "$NBD_EXPORT" -b 4096); then
  nbd-client -d "$NBD_DEV" || true
  die "a plain-text attach succeeded against --tls require"
fi
[ -n "${NBD_TLS:-}" ] || die "NBD_TLS is not set"
. /guest/kernel-nbd-smoke.sh
