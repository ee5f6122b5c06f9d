#!/usr/bin/python3
"""Drive fcnbd with OpenStack Cinder's Storwize/SVC driver code, unchanged.

It imports cinder.volume.drivers.ibm.storwize_svc.storwize_svc_common and runs, through
StorwizeHelpers and StorwizeSSH, what the driver does: the do_setup reads, create_vdisk of a
new volume, a snapshot (create_copy, full_copy=False), a volume from the snapshot and a clone
(create_copy, full_copy=True), waits for the copies as the driver would, and delete_vdisk of
everything. Over NBD (qemu-io) it writes a pattern before the snapshot, rewrites part of the
source after it, and checks every volume holds the image it should.

The command transport is either
  --ssh HOST PORT USER KEYFILE   built as the driver's _run_ssh builds it (SSHPool +
                                 processutils.ssh_execute), or
  --local FCNBD SOCKET           runs `FCNBD --socket SOCKET svcinfo|svctask …`, the local
                                 front-end of the same command line (for trying it without sshd).
Exit status 0 and "CINDER OK" on the last line mean every step passed.
"""

import argparse
import atexit
import os
import shlex
import subprocess
import sys
import tempfile
import time
import types

from oslo_concurrency import processutils

from cinder import utils as cinder_utils
from cinder.volume.drivers.ibm.storwize_svc import storwize_svc_common as sc

MB = 1 << 20

# every command the driver code sent, to check the deletions went the driver's way
SENT = []


def logged(run):
    def wrapped(cmd_list, check_exit_code=True, attempts=1):
        SENT.append(' '.join(cmd_list))
        return run(cmd_list, check_exit_code=check_exit_code, attempts=attempts)
    return wrapped


def local_transport(fcnbd, socket):
    def run(cmd_list, check_exit_code=True, attempts=1):
        cinder_utils.check_ssh_injection(cmd_list)
        command = ' '.join(cmd_list)
        argv = shlex.split(command)
        p = subprocess.run([fcnbd, '--socket', socket] + argv,
                           capture_output=True, text=True, timeout=120)
        if check_exit_code and p.returncode != 0:
            raise processutils.ProcessExecutionError(
                exit_code=p.returncode, stdout=p.stdout, stderr=p.stderr,
                cmd=command)
        return p.stdout, p.stderr
    return run


def ssh_transport(host, port, user, keyfile):
    # As StorwizeSVCCommonDriver._run_ssh / _set_up_sshpool / _ssh_execute do.
    from cinder import ssh_utils
    from oslo_config import cfg
    conf = cfg.CONF
    if not conf._args:
        conf([], project='cinder')
    # A known_hosts file of our own, empty: accept the test server's key on first use (the
    # driver's default policy is strict, against a file the operator populates).
    known = tempfile.NamedTemporaryFile(prefix='cinder-known-hosts-', delete=False)
    known.close()
    atexit.register(os.unlink, known.name)
    conf.set_override('strict_ssh_host_key_policy', False)
    conf.set_override('ssh_hosts_key_file', known.name)
    pool = ssh_utils.SSHPool(host, int(port), 30, user, password=None,
                             privatekey=keyfile, min_size=1, max_size=2)

    def run(cmd_list, check_exit_code=True, attempts=1):
        cinder_utils.check_ssh_injection(cmd_list)
        command = ' '.join(cmd_list)
        with pool.item() as ssh:
            return processutils.ssh_execute(ssh, command,
                                            check_exit_code=check_exit_code,
                                            sanitize_stdout=False)
    return run


def config():
    # The driver's defaults (storwize_svc_opts), with a high copy rate so copies take seconds.
    return types.SimpleNamespace(
        storwize_svc_stretched_cluster_partner=None,
        storwize_svc_vol_rsize=2, storwize_svc_vol_warning=0,
        storwize_svc_vol_autoexpand=True, storwize_svc_vol_grainsize=256,
        storwize_svc_vol_compression=False, storwize_svc_vol_easytier=True,
        storwize_svc_vol_iogrp='0', storwize_svc_vol_nofmtdisk=False,
        storwize_svc_flashcopy_rate=150, storwize_svc_clean_rate=50,
        storwize_svc_mirror_pool=None, storwize_peer_pool=None,
        storwize_portset=None, storwize_svc_src_child_pool=None,
        storwize_svc_target_child_pool=None, cycle_period_seconds=300,
        storwize_svc_flashcopy_timeout=60)


class NBD(object):
    def __init__(self, sock):
        self.sock = sock

    def io(self, vol, *cmds):
        argv = ['qemu-io', '-f', 'raw']
        for c in cmds:
            argv += ['-c', c]
        argv.append('nbd+unix:///%s?socket=%s' % (vol, self.sock))
        p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        out = p.stdout + p.stderr
        if p.returncode != 0 or any(w in out for w in ('failed', 'error', 'Error', 'Pattern verification')):
            raise AssertionError('qemu-io %s %s:\n%s' % (vol, cmds, out))

    def expect(self, vol, image):
        """image: list of (offset, length, pattern byte)."""
        self.io(vol, *['read -P 0x%02x %d %d' % (p, o, n) for o, n, p in image])


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print('ok:', what, flush=True)


def wait_no_mappings(helpers, vdisk, timeout=60):
    # The driver leaves full copies to autodelete; it knows they are done when the volume has
    # no mapping left.
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(helpers.ssh.lsvdiskfcmappings(vdisk)) == 0:
            return
        time.sleep(0.2)
    raise AssertionError('%s still has FlashCopy mappings after %ds' % (vdisk, timeout))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--ssh', nargs=4, metavar=('HOST', 'PORT', 'USER', 'KEYFILE'))
    ap.add_argument('--local', nargs=2, metavar=('FCNBD', 'SOCKET'))
    ap.add_argument('--nbd-unix', required=True, help="the daemon's NBD Unix socket")
    ap.add_argument('--size-gb', default='1')
    a = ap.parse_args()
    if bool(a.ssh) == bool(a.local):
        ap.error('give one of --ssh and --local')
    run_ssh = logged(ssh_transport(*a.ssh) if a.ssh else local_transport(*a.local))
    nbd = NBD(a.nbd_unix)

    helpers = sc.StorwizeHelpers(run_ssh)
    helpers.check_fcmapping_interval = 0.2
    helpers.WAIT_TIME = 1  # an int: _prepare_fc_map divides the timeout by it for range()
    conf = config()

    # do_setup's reads.
    system = helpers.get_system_info()
    check(len(system['code_level']) == 4 and system['code_level'][0] >= 7,
          'get_system_info: code_level %s, topology %r' % (system['code_level'], system['topology']))
    pools = helpers.ssh.run_ssh_info(
        ['svcinfo', 'lsmdiskgrp', '-bytes', '-delim', '!'], with_header=True)
    pool = pools[0]['name']
    attrs = helpers.get_pool_attrs(pool)
    check(attrs is not None and int(attrs['capacity']) >= int(attrs['free_capacity']) > 0,
          'get_pool_attrs(%s): capacity %s free %s' % (pool, attrs['capacity'], attrs['free_capacity']))
    check(helpers.get_pool_attrs('no-such-pool') is None, 'get_pool_attrs of an unknown pool is None')
    nodes = helpers.get_node_info()
    check(len(nodes) == 1 and all(n['status'] == 'online' and n['IO_group'] == '0' and n['iscsi_name']
                                  for n in nodes.values()), 'get_node_info: %s' % list(nodes.values()))
    iogrps = helpers.get_available_io_groups()
    check(iogrps == [0], 'get_available_io_groups: %s' % iogrps)
    compression = helpers.compression_enabled()
    check(compression is False, 'compression_enabled: %s' % compression)
    check(helpers.replication_licensed() is False, 'replication_licensed: False')
    state = {'storage_nodes': nodes, 'available_iogrps': iogrps, 'compression_enabled': compression,
             'system_name': system['system_name'], 'system_id': system['system_id'],
             'code_level': system['code_level']}

    opts = sc.StorwizeHelpers.build_default_opts(conf)
    helpers.check_vdisk_opts(state, opts)

    # A new volume, as create_volume does.
    src, snap, fromsnap, clone = 'volume-src', 'snapshot-1', 'volume-fromsnap', 'volume-clone'
    opts['iogrp'] = helpers.select_io_group(state, opts, pool)
    helpers.create_vdisk(src, a.size_gb, 'gb', pool, opts)
    vattrs = helpers.get_vdisk_attributes(src)
    check(int(vattrs['capacity']) == int(a.size_gb) << 30 and vattrs['mdisk_grp_name'] == pool,
          'create_vdisk: %s capacity %s in %s' % (src, vattrs['capacity'], vattrs['mdisk_grp_name']))

    nbd.io(src, 'write -P 0x11 0 8M', 'flush')

    # A snapshot: create_copy with full_copy=False (copy rate 0, no autodelete).
    helpers.create_copy(src, snap, None, conf, dict(opts), False, state)
    maps = helpers._get_vdisk_fc_mappings(snap)
    m = helpers._get_flashcopy_mapping_attributes(maps[0])
    check(len(maps) == 1 and m['status'] == 'copying' and m['copy_rate'] == '0' and m['rc_controlled'] == 'no',
          'snapshot mapping %s: %s copy_rate %s' % (maps[0], m['status'], m['copy_rate']))

    nbd.io(src, 'write -P 0x22 0 4M', 'flush')

    # A volume from the snapshot, and a clone of the source: full copies.
    helpers.create_copy(snap, fromsnap, None, conf, dict(opts), True, state)
    helpers.create_copy(src, clone, None, conf, dict(opts), True, state)
    wait_no_mappings(helpers, fromsnap)
    wait_no_mappings(helpers, clone)
    check(True, 'full copies done: their mappings autodeleted')

    tail = (8 * MB, 8 * MB, 0)
    nbd.expect(src, [(0, 4 * MB, 0x22), (4 * MB, 4 * MB, 0x11), tail])
    nbd.expect(snap, [(0, 8 * MB, 0x11), tail])
    nbd.expect(fromsnap, [(0, 8 * MB, 0x11), tail])
    nbd.expect(clone, [(0, 4 * MB, 0x22), (4 * MB, 4 * MB, 0x11), tail])
    check(True, 'images: source, snapshot, volume from snapshot and clone hold what they should')

    # Extend the clone as extend_volume (_extend_volume_op) does: no FlashCopy mapping may be
    # left on it, then expandvdisksize -size 1 -unit gb, which must print nothing.
    check(helpers.ensure_vdisk_no_fc_mappings(clone, allow_snaps=False), 'ensure_vdisk_no_fc_mappings(%s)' % clone)
    helpers.extend_vdisk(clone, 1)
    size = int(a.size_gb) << 30
    cap = int(helpers.get_vdisk_attributes(clone)['capacity'])
    check(cap == size + (1 << 30), 'extend_vdisk(%s, 1): capacity %d' % (clone, cap))
    nbd.io(clone, 'write -P 0x33 %d %d' % (size + (1 << 30) - MB, MB), 'flush')
    nbd.expect(clone, [(0, 4 * MB, 0x22), (4 * MB, 4 * MB, 0x11), tail, (size, 8 * MB, 0),
                       (size + (1 << 30) - MB, MB, 0x33)])
    check(True, 'the extended clone keeps its image, reads zeroes in the new range and takes writes there')
    # The source is in the snapshot's mapping: expandvdisksize is refused, nothing changes.
    try:
        helpers.extend_vdisk(src, 1)
        refused = ''
    except Exception as e:  # the driver's VolumeBackendAPIException, with the CLI's stderr in it
        refused = str(e)
    cap = int(helpers.get_vdisk_attributes(src)['capacity'])
    check('CMMVC9007E' in refused and cap == size,
          'extend_vdisk of a volume in a FlashCopy mapping refused with CMMVC9007E, capacity %d' % cap)

    # Delete a snapshot as delete_snapshot does: its mapping (copy rate 0) is stopped, then removed.
    snap2 = 'snapshot-2'
    helpers.create_copy(src, snap2, None, conf, dict(opts), False, state)
    n = len(SENT)
    helpers.delete_vdisk(snap2, force_unmap=False, force_delete=True)
    check(helpers.get_vdisk_attributes(snap2) is None, 'delete_vdisk(%s)' % snap2)
    sent = SENT[n:]
    check(any(c.startswith('svctask stopfcmap') for c in sent) and any(c.startswith('svctask rmfcmap -force') for c in sent),
          'delete_vdisk of a snapshot: stopfcmap, then rmfcmap -force')
    nbd.expect(src, [(0, 4 * MB, 0x22), (4 * MB, 4 * MB, 0x11), tail])

    # Delete the source while its snapshot exists: the driver turns the snapshot into a full
    # copy (chfcmap -copyrate 50 -autodelete on) and waits for it before rmvdisk.
    helpers.delete_vdisk(src, force_unmap=False, force_delete=True)
    check(helpers.get_vdisk_attributes(src) is None, 'delete_vdisk(%s)' % src)
    check(any(c.startswith('svctask chfcmap -copyrate 50 -autodelete on') for c in SENT),
          'delete_vdisk turned the snapshot into a full copy (chfcmap -copyrate 50 -autodelete on)')
    nbd.expect(snap, [(0, 8 * MB, 0x11), tail])
    check(True, 'the snapshot keeps its image after its source is gone')

    for v in (snap, fromsnap, clone):
        helpers.delete_vdisk(v, force_unmap=False, force_delete=True)
        check(helpers.get_vdisk_attributes(v) is None, 'delete_vdisk(%s)' % v)
    check(any(c.startswith('svctask rmvdisk -force') for c in SENT), 'rmvdisk -force sent')
    left = helpers.ssh.run_ssh_info(['svcinfo', 'lsvdisk', '-delim', '!'], with_header=True)
    check(len(left) == 0, 'no volume left')
    fcmaps = helpers.ssh.run_ssh_info(['svcinfo', 'lsfcmap', '-delim', '!'], with_header=True)
    check(len(fcmaps) == 0, 'no mapping left')
    print('CINDER OK', flush=True)


if __name__ == '__main__':
    try:
        main()
    except Exception as e:  # print the failure for the Go test's log
        print('FAILED: %s: %s' % (type(e).__name__, e), file=sys.stderr, flush=True)
        raise
