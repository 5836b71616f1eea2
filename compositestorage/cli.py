"""The ``compositestorage`` command-line tool.

``compositestorage serve`` serves a composite over ZEO, with ZEO's own
``runzeo`` machinery in this process; ``compositestorage info`` opens a
composite read-only and shows what each partition holds;
``compositestorage demo`` commits a cross-partition reference into the
embedded default and shows it.  ``python -m compositestorage`` runs the
same tool.

Errors are reported as one line on stderr, ``compositestorage: error:
...``, with exit status 1 (2 for command-line usage errors, as argparse
does); ``--traceback`` shows the full traceback instead.
"""
import argparse
import datetime
import json
import logging
import os
import signal
import sys
import tempfile
import time

import ZConfig
import ZConfig.datatypes
import zc.lockfile
from ZODB.TimeStamp import TimeStamp
from ZODB.utils import z64

from compositestorage.children import file_name
from compositestorage.opening import config_kind
from compositestorage.opening import KIND_NAMES
from compositestorage.opening import open_read_only
from compositestorage.opening import open_writer
from compositestorage.opening import opened_composite
from compositestorage.opening import read_config
from compositestorage.opening import served_client
from compositestorage.opening import uri_scheme

PROG = 'compositestorage'

#: Where ``serve`` listens when neither ``--address`` nor a config says.
DEFAULT_ADDRESS = '127.0.0.1:8100'

#: The embedded default's partitions: (name, prefix, file under ``var``).
DEFAULT_PARTITIONS = (('main', 0, 'main.fs'), ('catalog', 1, 'catalog.fs'))

DEFAULT_ZEO_CONF = """\
%%import compositestorage

<zeo>
  address %(address)s
</zeo>

<compositestorage 1>
  name default
  blob-dir %(var)s/blobs
%(partitions)s
</compositestorage>
"""

PARTITION_CONF = """\
  <partition %(name)s>
    prefix %(prefix)d
    <filestorage>
      path %(var)s/%(file)s
    </filestorage>
  </partition>"""


class CLIError(Exception):
    """An error to report as one line, without a traceback."""


# --- the embedded default ----------------------------------------------------

def default_zeo_conf(address=DEFAULT_ADDRESS, var='var'):
    """zeo.conf text for the embedded default served at ``address``.

    Storage ``1`` is a composite of FileStorage partitions ``main``
    (prefix 0) and ``catalog`` (prefix 1) under ``var``, sharing the blob
    directory ``var/blobs``.
    """
    parts = '\n'.join(PARTITION_CONF % dict(name=name, prefix=prefix,
                                            var=var, file=fname)
                      for name, prefix, fname in DEFAULT_PARTITIONS)
    return DEFAULT_ZEO_CONF % dict(address=address, var=var,
                                   partitions=parts)


def default_storage(var='var'):
    """The embedded default, opened in this process."""
    from ZODB.FileStorage import FileStorage

    from compositestorage import CompositeStorage
    os.makedirs(var, exist_ok=True)
    children = []
    try:
        for name, prefix, fname in DEFAULT_PARTITIONS:
            children.append((name, prefix,
                             FileStorage(os.path.join(var, fname))))
        return CompositeStorage(children, name='default')
    except BaseException:
        for _, _, fs in children:
            fs.close()
        raise


# --- describing storages -------------------------------------------------------

def storage_path(storage):
    """A FileStorage's path (relative to the cwd when below it), or name."""
    path = file_name(storage)
    if not path:
        return storage.getName()
    rel = os.path.relpath(path)
    return path if rel.startswith(os.pardir) else rel


def describe_tid(tid):
    """``{'tid': hex, 'time': 'YYYY-MM-DD HH:MM:SS.ffffff UTC'}``."""
    if not tid or tid == z64:
        return {'tid': (tid or z64).hex(), 'time': None}
    return {'tid': tid.hex(), 'time': '%s UTC' % TimeStamp(tid)}


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_safe(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def describe(storage):
    """What ``info`` shows about ``storage``, as a JSON-ready dict."""
    from compositestorage import CompositeStorage
    if isinstance(storage, CompositeStorage):
        return describe_composite(storage)
    return describe_plain(storage)


def describe_composite(storage):
    parts = []
    for part in storage.partitions:
        child = part.storage
        parts.append({
            'name': part.name,
            'prefix': part.prefix,
            'type': part.child.type_name(),
            'path': part.child.location or storage_path(child),
            'read_only': part.read_only,
            'objects': part.count_own(),
            'stubs': part.count_stubs(),
            'size': child.getSize(),
            'last_transaction': describe_tid(child.lastTransaction()),
            'map': _json_safe(part.read_map()),
        })
    return {
        'name': storage.getName(),
        'type': type(storage).__name__,
        'composite': True,
        # A composite whose children record no map yet has no identity:
        # a read-only open makes up a new one each time.
        'identity': (storage.identity
                     if any(p['map'] for p in parts) else None),
        'read_only': storage.isReadOnly(),
        'last_transaction': describe_tid(storage.lastTransaction()),
        'objects': len(storage),
        'size': storage.getSize(),
        'partitions': parts,
    }


def describe_plain(storage):
    """A storage that is not a composite here (a ZEO client, say)."""
    out = {
        'name': storage.getName(),
        'type': type(storage).__name__,
        'composite': False,
        'read_only': storage.isReadOnly(),
        'last_transaction': describe_tid(storage.lastTransaction()),
        'objects': len(storage),
        'size': storage.getSize(),
    }
    server = getattr(storage, '_addr', None)
    if server is not None:
        if isinstance(server, (list, tuple)) and server and \
                isinstance(server[0], (list, tuple, str, bytes)):
            out['server'] = ', '.join(format_address(a) for a in server)
        else:
            out['server'] = format_address(server)
        out['note'] = (
            'this is a ZEO client, not a composite: per-partition detail '
            'needs the server\'s config; run "compositestorage info '
            'ZEO.CONF" where the server runs')
    else:
        out['path'] = storage_path(storage)
    return out


def format_map(recorded):
    if not recorded:
        return 'none recorded yet'
    others = ', '.join('%s=%s' % item for item in sorted(
        (recorded.get('partitions') or {}).items(), key=lambda i: i[1]))
    return 'partition %s (prefix %s) of composite %s; partitions %s' % (
        recorded.get('partition'), recorded.get('prefix'),
        recorded.get('composite'), others)


def format_tid(described):
    if described['time'] is None:
        return 'none (0x%s)' % described['tid']
    return '%s (0x%s)' % (described['time'], described['tid'])


def format_info(info):
    """The text ``info`` prints: one ``key value`` line per fact."""
    lines = []
    kind = 'composite' if info['composite'] else 'storage'
    lines.append('%s %s' % (kind, info['name']))
    row = '  %-17s %s'
    lines.append(row % ('type', info['type'] + (
        ' (read-only)' if info['read_only'] else '')))
    if info['composite']:
        lines.append(row % ('identity',
                            info['identity'] or 'none recorded yet'))
    if info.get('server'):
        lines.append(row % ('server', info['server']))
    if info.get('path'):
        lines.append(row % ('path', info['path']))
    lines.append(row % ('last transaction',
                        format_tid(info['last_transaction'])))
    lines.append(row % ('objects', info['objects']))
    lines.append(row % ('size', '%d bytes' % info['size']))
    if info.get('note'):
        lines.append(row % ('note', info['note']))
    for part in info.get('partitions', ()):
        lines.append('partition %s' % part['name'])
        lines.append(row % ('prefix', part['prefix']))
        lines.append(row % ('type', part['type'] + (
            ' (read-only)' if part['read_only'] else '')))
        lines.append(row % ('path', part['path']))
        lines.append(row % ('objects', part['objects']))
        lines.append(row % ('stubs', 'unknown' if part['stubs'] is None
                            else part['stubs']))
        lines.append(row % ('size', '%d bytes' % part['size']))
        lines.append(row % ('last transaction',
                            format_tid(part['last_transaction'])))
        lines.append(row % ('map', format_map(part['map'])))
    return '\n'.join(lines)


# --- opening: the one rule, in compositestorage.opening ------------------------

def _database(args):
    return getattr(args, 'database', None)


# --- serving ------------------------------------------------------------------

def _runzeo_classes():
    from ZEO.runzeo import ZEOOptions
    from ZEO.runzeo import ZEOServer

    class Options(ZEOOptions):
        """runzeo's options, with errors raised rather than printed."""

        def usage(self, msg):
            raise CLIError(' '.join(str(msg).split()))

    class Server(ZEOServer):
        """runzeo's server: announces itself, then closes what it opened.

        The storages are opened before the default logging is set up, so
        an error while opening them is reported as one line.
        """

        storages = None
        out = sys.stdout

        def main(self):
            self.check_socket()
            self.clear_socket()
            self.make_pidfile()
            try:
                self.open_storages()
                self.setup_default_logging()
                self.setup_signals()
                self.create_server()
                self.announce()
                self.loop_forever()
            finally:
                self.close_server()
                self.clear_socket()
                self.remove_pidfile()

        def open_storages(self):
            self.storages = {}
            handler = warnings_to_stderr()
            try:
                for opener in self.options.storages:
                    self.storages[opener.name] = opener.open()
            finally:
                if handler is not None:
                    logging.getLogger().removeHandler(handler)

        def announce(self):
            addr = self.server.acceptor.addr
            lines = ['serving compositestorage on %s' % format_address(addr)]
            for name, storage in sorted(self.storages.items()):
                parts = getattr(storage, 'partitions', None)
                if len(self.storages) > 1 or parts is None:
                    lines.append('  storage %s %s %s' % (
                        name, type(storage).__name__, storage_path(storage)))
                for part in parts or ():
                    lines.append('  partition %s prefix %d %s %s' % (
                        part.name, part.prefix, part.child.type_name(),
                        storage_path(part.storage)))
            print('\n'.join(lines), file=self.out, flush=True)

        def close_server(self):
            # A second signal must not interrupt the clean-up.
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    signal.signal(sig, signal.SIG_IGN)
                except (ValueError, OSError):  # not the main thread
                    pass
            server = self.server
            if server is None:
                for storage in (self.storages or {}).values():
                    storage.close()
                return
            loop = getattr(server.acceptor, 'event_loop', None)
            server.close()      # closes the storages, schedules the rest
            if loop is not None and not loop.is_closed() \
                    and not loop.is_running():
                try:
                    # Let the loop close the listener and the connections.
                    loop.run_forever()
                finally:
                    loop.close()

    return Options, Server


def format_address(addr):
    if isinstance(addr, bytes):
        addr = addr.decode()
    if isinstance(addr, str):
        return addr
    host, port = addr[:2]
    return ('[%s]:%s' if ':' in host else '%s:%s') % (host, port)


def address_arg(value):
    """argparse type for ``--address``: HOST:PORT, PORT or a socket path."""
    try:
        ZConfig.datatypes.SocketBindingAddress(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            'invalid address %r (%s); use HOST:PORT, PORT or a unix socket '
            'path' % (value, e))
    return value


def cmd_serve(args, out=None):
    out = out or sys.stdout
    Options, Server = _runzeo_classes()
    tmp = None
    if args.config:
        kind = config_kind(read_config(args.config))
        if kind != 'zeo':
            raise CLIError(
                'serve --config takes a zeo.conf, and %s is %s: write a '
                'zeo.conf with a <zeo> section (address HOST:PORT) and the '
                'same <compositestorage> section, after "%%import '
                'compositestorage"' % (args.config, KIND_NAMES[kind]))
        config = args.config
    else:
        os.makedirs('var', exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix='compositestorage-', suffix='.conf')
        with os.fdopen(fd, 'w') as f:
            f.write(default_zeo_conf(args.address or DEFAULT_ADDRESS))
        config = tmp
    argv = ['-C', config]
    if args.address:
        argv += ['-a', args.address]
    try:
        options = Options()
        try:
            options.realize(argv, progname=PROG + ' serve')
        except CLIError as e:
            if "section type 'zeo'" in str(e):
                raise CLIError(
                    '%s: %s has no <zeo> section; serve --config takes a '
                    'zeo.conf: a <zeo> section (with an address) and a '
                    '<compositestorage> section' % (e, args.config))
            raise
    finally:
        if tmp:
            os.remove(tmp)
    server = Server(options)
    server.out = out
    try:
        server.main()
    except SystemExit as e:     # runzeo's SIGTERM and SIGINT handlers
        return e.code if isinstance(e.code, int) else (0 if e.code is None
                                                       else 1)
    return 0


# --- info -------------------------------------------------------------------

def cmd_info(args, out=None):
    out = out or sys.stdout
    storage = open_read_only(args.target, _database(args))
    try:
        info = describe(storage)
    finally:
        storage.close()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True), file=out)
    else:
        print(format_info(info), file=out)
    return 0


# --- commands on a composite ----------------------------------------------------

# --- verify -------------------------------------------------------------------

def _progress(args):
    from compositestorage.progress import reporter
    return reporter(quiet=getattr(args, 'quiet', False))


def _interrupted(what):
    print('%s: interrupted; %s' % (PROG, what), file=sys.stderr)
    return 130


def cmd_verify(args, out=None):
    out = out or sys.stdout
    from compositestorage.verify import verify
    from compositestorage.verify import verify_served
    try:
        client = served_client(args.target)
        if client is not None:
            try:
                problems, counts = verify_served(client, _progress(args))
            finally:
                client.close()
        else:
            with opened_composite(args.target, _database(args)) as storage:
                problems, counts = verify(storage, _progress(args))
    except KeyboardInterrupt:
        return _interrupted('verify only reads: nothing was changed')
    errors = [p for p in problems if args.strict or not p.garbage]
    if args.json:
        print(json.dumps({'ok': not errors, 'partitions': counts,
                          'problems': [p.as_dict() for p in problems]},
                         indent=2, sort_keys=True), file=out)
    else:
        for name, count in counts.items():
            print('%s: %d objects, %s stubs%s' % (
                name, count['objects'],
                'unknown' if count['stubs'] is None else count['stubs'],
                ', %d overlay records' % count['overlays']
                if 'overlays' in count else ''), file=out)
        for problem in problems:
            if problem in errors or args.list_garbage:
                print(problem, file=out)
        garbage = len(problems) - len(errors)
        if errors:
            print('%d problem(s)' % len(errors), file=out)
        elif garbage:
            print('ok, with %d garbage record(s) that the next pack (or '
                  'repair) removes%s' % (garbage, '' if args.list_garbage
                                         else ' (--list-garbage lists '
                                         'them)'), file=out)
        else:
            print('ok', file=out)
    return 1 if errors else 0


# --- stats --------------------------------------------------------------------

def cmd_stats(args, out=None):
    out = out or sys.stdout
    from compositestorage.stats import format_stats
    from compositestorage.stats import stats
    from compositestorage.stats import stats_served
    try:
        client = served_client(args.target)
        if client is not None:
            try:
                report = stats_served(client, args.top, _progress(args))
            finally:
                client.close()
        else:
            with opened_composite(args.target, _database(args)) as storage:
                report = stats(storage, args.top, _progress(args))
    except KeyboardInterrupt:
        return _interrupted('stats only reads: nothing was changed')
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True), file=out)
    else:
        print(format_stats(report), file=out)
    return 0


# --- pack -----------------------------------------------------------------------

def cmd_pack(args, out=None):
    out = out or sys.stdout
    from ZODB.serialize import referencesf
    from compositestorage.storage import CompositeStorage
    pack_time = time.time() - args.days * 86400
    if uri_scheme(args.target) == 'zeo':
        from compositestorage.opening import resolve
        storage = resolve(args.target)()     # the server packs
    else:
        storage = open_writer(args.target, _database(args), 'pack')
    try:
        composite = isinstance(storage, CompositeStorage)
        started = time.time()
        print('packing %s to %s ...' % (
            storage.getName(), time.strftime(
                '%Y-%m-%d %H:%M:%S UTC', time.gmtime(pack_time))),
            file=out, flush=True)
        try:
            if composite:
                storage.pack(pack_time, referencesf, progress=_progress(args))
                removed = storage.last_pack
            else:
                storage.pack(pack_time, referencesf)
        except KeyboardInterrupt as e:
            return _interrupted(
                e.args[0] if e.args else
                'the server goes on packing' if not composite else
                'during the mark, before anything was removed')
    finally:
        storage.close()
    print('packed in %.1f s' % (time.time() - started), file=out)
    if composite:
        from compositestorage.gc import UNTOUCHED
        for name, lost in removed.items():
            if lost.get('read_only'):
                print('%s: %s' % (name, UNTOUCHED), file=out)
                continue
            print('%s: removed %s objects, %s stubs, %s bytes' % (
                name, *['?' if lost[key] is None else lost[key]
                        for key in ('objects', 'stubs', 'bytes')]),
                file=out)
    else:
        print('the server packed; its log says what each partition lost',
              file=out)
    return 0


# --- repair -------------------------------------------------------------------

def cmd_repair(args, out=None):
    out = out or sys.stdout
    from compositestorage.repair import repair
    with opened_composite(args.target, _database(args), args.dry_run,
                          'repair') as storage:
        actions, untouched = repair(storage, dry_run=args.dry_run)
    if args.json:
        print(json.dumps({
            'dry_run': args.dry_run,
            'actions': [a.as_dict() for a in actions],
            'untouched': [p.as_dict() for p in untouched]},
            indent=2, sort_keys=True), file=out)
    else:
        for action in actions:
            print(action.describe(done=not args.dry_run), file=out)
        for problem in untouched:
            print('left for you: %s' % problem, file=out)
        if not actions and not untouched:
            print('nothing to repair', file=out)
    return 1 if untouched else 0


# --- recover ------------------------------------------------------------------

def cmd_recover(args, out=None):
    out = out or sys.stdout
    from compositestorage.recovery import partial_transactions
    from compositestorage.recovery import recover
    with opened_composite(args.target, _database(args), args.dry_run,
                          'recover') as storage:
        journal = storage.journal
        if journal is None:
            raise CLIError('%s has no journal (its primary is not a '
                           'FileStorage and no journal path is configured)'
                           % args.target)
        if args.dry_run:
            outcome = recover(storage._by_prefix, journal, dry_run=True)
            # what the open would then take back by the spans
            partial = [p for p in partial_transactions(
                storage._by_prefix, packed_to=storage.packed_to())
                if outcome is None or p.tid != outcome.intent.tid]
        else:
            outcome = storage.recovered     # opening recovered
            partial = storage.partial
    if args.json:
        report = {'journal': journal.path, 'dry_run': args.dry_run,
                  'outcome': outcome.as_dict() if outcome else None,
                  'partial': [p.as_dict() for p in partial]}
        print(json.dumps(report, indent=2, sort_keys=True), file=out)
        return 0
    dry = ' (dry run: nothing changed)' if args.dry_run else ''
    if outcome is None and not partial:
        print('%s: nothing to recover' % journal.path, file=out)
    if outcome is not None:
        print('%s: %s%s' % (journal.path, outcome, dry), file=out)
    for entry in partial:
        print('%s, %s %s%s' % (
            entry, 'to be taken back from' if args.dry_run
            else 'taken back from',
            ', '.join(p.name for p in entry.holders), dry), file=out)
    return 0


# --- backup and restore ---------------------------------------------------------

def cmd_backup(args, out=None):
    out = out or sys.stdout
    from compositestorage.backup import backup
    report = backup(args.target, args.repository, full=args.full,
                    database=_database(args))
    print('\n'.join(report.lines()), file=out)
    return 0


def cmd_restore(args, out=None):
    out = out or sys.stdout
    from compositestorage.backup import restore
    report = restore(args.target, args.repository, force=args.force,
                     dry_run=args.dry_run, database=_database(args))
    print('\n'.join(report.lines()), file=out)
    return 1 if report.problems else 0


# --- demo -------------------------------------------------------------------

def cmd_demo(args, out=None):
    out = out or sys.stdout
    import ZODB
    from persistent.mapping import PersistentMapping

    from compositestorage import placement
    storage = default_storage(args.var)
    db = ZODB.DB(storage)
    try:
        with db.transaction('compositestorage demo') as conn:
            root = conn.root()
            with placement(conn, 'catalog'):
                entry = PersistentMapping(
                    when=datetime.datetime.now().isoformat())
                conn.add(entry)
            root.setdefault('runs', PersistentMapping())
            root['runs'][str(len(root['runs']))] = entry
        print(format_info(describe(storage)), file=out)
    finally:
        db.close()
    return 0


# --- the parser and main ------------------------------------------------------

TARGET_HELP = (
    'a ZConfig file (a zeo.conf, a zope.conf, a file with <zodb> sections '
    'or a bare <compositestorage> section), zconfig://PATH[#NAME] or a '
    'composite: URI%s; in a file with several databases the composite is '
    'taken, or the one --database names')


def add_target(parser):
    """The CONFIG_OR_URI every command on a composite takes, by the one
    rule of :mod:`compositestorage.opening`."""
    through_zeo = {
        'info': ', zeo://HOST:PORT or any zodburi URI (file://...)',
        'verify': ' or zeo://HOST:PORT (read through the server)',
        'stats': ' or zeo://HOST:PORT (read through the server)',
        'pack': ' or zeo://HOST:PORT (the server packs)'}
    parser.add_argument('target', metavar='CONFIG_OR_URI',
                        help=TARGET_HELP % through_zeo.get(
                            parser.prog.split()[-1], ''))
    parser.add_argument(
        '--database', '-d', metavar='NAME',
        help='the database to take from a config with several: the name '
             'of its <zodb_db NAME> (zope.conf), <zodb NAME> or, in a '
             'zeo.conf, <compositestorage NAME> section')


def days_arg(value):
    """argparse type for ``pack --days``: a number of days, 0 or more."""
    try:
        days = float(value)
    except ValueError:
        days = -1.0
    if not days >= 0 or days == float('inf'):
        raise argparse.ArgumentTypeError(
            'invalid --days %r: give the days of history to keep, 0 or more '
            '(0 packs to now; a pack time in the future is refused)' % value)
    return days


def add_quiet(parser):
    parser.add_argument('-q', '--quiet', action='store_true',
                        help='show no progress (progress goes to stderr: a '
                             'bar on a terminal, a line every few seconds '
                             'elsewhere)')


def make_parser():
    parser = argparse.ArgumentParser(
        prog=PROG,
        description='Serve and inspect compositestorage databases: one ZODB '
                    'storage made of several child storages (partitions).',
        epilog='Errors are reported on one line, with exit status 1 (2 for '
               'usage errors).')
    parser.add_argument('--traceback', action='store_true',
                        help='show the full traceback of an error')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')

    serve = sub.add_parser(
        'serve', help='serve a composite over ZEO',
        description='Serve a composite over ZEO with ZEO\'s runzeo, in this '
                    'process.  Without --config, serve the embedded default: '
                    'FileStorage partitions main (prefix 0, var/main.fs) and '
                    'catalog (prefix 1, var/catalog.fs) under ./var, sharing '
                    'the blob directory var/blobs, as ZEO storage "1" on '
                    '%s.  Prints the address it listens on and one line per '
                    'partition, then serves until SIGINT or SIGTERM, which '
                    'close the storage and exit 0.' % DEFAULT_ADDRESS)
    serve.add_argument(
        '--config', '-C', metavar='FILE',
        help='a zeo.conf (what "runzeo -C FILE" accepts) whose storage '
             'section is a <compositestorage>, after "%%import '
             'compositestorage"')
    serve.add_argument(
        '--address', '-a', metavar='HOST:PORT', type=address_arg,
        help='listen here instead of the <zeo> address (default for the '
             'embedded default: %s); port 0 picks a free port, and the '
             'address printed is the one bound' % DEFAULT_ADDRESS)
    serve.set_defaults(func=cmd_serve)

    info = sub.add_parser(
        'info', help='show the partitions of a composite, read-only',
        description='Open a storage read-only and show it: for a composite, '
                    'its name, identity and last transaction (UTC time and '
                    'hex), then for each partition its name, prefix, child '
                    'storage type and path, object count, stub count, size '
                    'on disk, last transaction and the partition map the '
                    'child records.  For a zeo:// URI, what a ZEO client '
                    'can know: name, size, object count, last transaction.')
    add_target(info)
    info.add_argument('--json', action='store_true',
                      help='print the same facts as one JSON object')
    info.set_defaults(func=cmd_info)

    verify = sub.add_parser(
        'verify', help='check every record of every partition, read-only',
        description='Open a composite read-only and check every current '
                    'record of every partition: every reference resolves, '
                    'every stub stands for an existing object, no stub is '
                    'orphaned, no object lives outside its home partition, '
                    'every child is self-contained and the partition maps '
                    'agree.  Each problem names its kind, the partition, '
                    'the oid, the class and, for references, the referrer '
                    'and its partition.  Exit status 1 when anything is '
                    'wrong.  Orphan stubs (left when a cross-partition '
                    'reference is dropped, until the next pack) are garbage, '
                    'not errors: counted (listed with --list-garbage), and '
                    'exit status 0 unless --strict.  A composite opened but '
                    'never written to is healthy.  '
                    'For a zeo:// URI it reads through the server what any '
                    'client reads: every reference must resolve.')
    add_target(verify)
    verify.add_argument('--json', action='store_true',
                        help='print the report as one JSON object')
    verify.add_argument('--list-garbage', '-v', action='store_true',
                        help='list every garbage record (orphan stubs, and '
                             'the missing targets of orphan stubs); by '
                             'default they are counted (--json lists them '
                             'always)')
    verify.add_argument('--strict', action='store_true',
                        help='count garbage (orphan stubs, and the missing '
                             'targets of orphan stubs) as problems too: by '
                             'default it is listed but exits 0')
    add_quiet(verify)
    verify.set_defaults(func=cmd_verify)

    stats = sub.add_parser(
        'stats', help='counts, sizes, classes and cross-partition edges',
        description='Open a composite read-only and show, for each '
                    'partition, its object count, bytes and stub count and '
                    'its top classes by count and by bytes, then the '
                    'cross-partition references as a matrix (row: from, '
                    'column: to).')
    add_target(stats)
    stats.add_argument('--top', type=int, default=10, metavar='N',
                       help='how many classes to show (default 10)')
    stats.add_argument('--json', action='store_true',
                       help='print the same as one JSON object')
    add_quiet(stats)
    stats.set_defaults(func=cmd_stats)

    pack = sub.add_parser(
        'pack', help='pack every partition, collecting garbage globally',
        description='Pack a composite to DAYS days ago: one mark from the '
                    'root across all partitions and their stubs, then each '
                    'child packs with that mark, so no child collects '
                    'garbage on its own.  For a ZConfig file the composite '
                    'is opened here (it must not be open elsewhere); for a '
                    'zeo:// URI the server is asked to pack.  Reports what '
                    'was removed in each partition.')
    add_target(pack)
    pack.add_argument('--days', type=days_arg, default=0.0,
                      help='keep the history of the last DAYS days '
                           '(default 0: pack to now)')
    add_quiet(pack)
    pack.set_defaults(func=cmd_pack)

    repair = sub.add_parser(
        'repair', help='recreate missing stubs and remove orphaned ones, '
                       'offline',
        description='Open a composite as its one writer (it must not be '
                    'open elsewhere: stop a server that serves it), run '
                    'verify, store every missing stub and delete every '
                    'orphaned one, in one transaction of internal records.  '
                    'Problems that need a person (dangling references, '
                    'corrupt stubs, objects outside their home) are listed '
                    'and left alone; the exit status is then 1.')
    add_target(repair)
    repair.add_argument('--dry-run', action='store_true',
                        help='open read-only and only show what repair '
                             'would do')
    repair.add_argument('--json', action='store_true',
                        help='print the report as one JSON object')
    repair.set_defaults(func=cmd_repair)

    recover = sub.add_parser(
        'recover', help='complete or remove a transaction a crash left '
                        'half-finished',
        description='Open a composite as its one writer, which recovers: a '
                    'transaction over several partitions that the journal '
                    'says had begun to finish is kept if every partition '
                    'has it, and otherwise removed from the ones that have '
                    'it.  Prints what was found and done (the tid, the '
                    'partitions and the action).  The storage must not be '
                    'open elsewhere: stop a server that serves it first.')
    add_target(recover)
    recover.add_argument('--dry-run', action='store_true',
                         help='open read-only and only report what '
                              'recovery would do')
    recover.add_argument('--json', action='store_true',
                         help='print the report as one JSON object')
    recover.set_defaults(func=cmd_recover)

    backup = sub.add_parser(
        'backup', help='back up every partition with repozo, at one tid',
        description='Open a composite read-only (beside its writer, if one '
                    'runs), read T, its last transaction finished in every '
                    'partition (the journal names one being finished), then '
                    'back up each '
                    'FileStorage child with repozo into REPOSITORY/<partition '
                    'name>/ (incrementally when repozo can) and record T in '
                    'REPOSITORY/composite-backup.json.  Every backup holds '
                    'every transaction up to T, so "restore" can put all the '
                    'partitions back at T.  Blobs are not backed up: copy the '
                    'blob directory separately.')
    add_target(backup)
    backup.add_argument('repository', metavar='REPOSITORY',
                        help='an existing folder for the backups')
    backup.add_argument('--full', action='store_true',
                        help='make full backups (repozo -F), not '
                             'incremental ones')
    backup.set_defaults(func=cmd_backup)

    restore = sub.add_parser(
        'restore', help='restore every partition from repozo backups, at '
                        'one tid',
        description='Restore each partition with repozo from '
                    'REPOSITORY/<partition name>/ into the path CONFIG gives '
                    'it, cut every child back to the tid in '
                    'REPOSITORY/composite-backup.json (or, for plain repozo '
                    'backups without it, to the oldest common point: the '
                    'smallest of the partitions\' last tids), then verify '
                    'the composite.  Prints, per partition, the tid cut to '
                    'and the transactions removed.  Exit status 1 when '
                    'verify finds a problem.  Stop any writer first.')
    add_target(restore)
    restore.add_argument('repository', metavar='REPOSITORY',
                         help='the folder "backup" (or repozo, one folder '
                              'per partition) wrote')
    restore.add_argument('--force', action='store_true',
                         help='overwrite existing partition files (and '
                              'remove their journal)')
    restore.add_argument('--dry-run', action='store_true',
                         help='only read the repository and show what '
                              'would be done')
    restore.set_defaults(func=cmd_restore)

    demo = sub.add_parser(
        'demo', help='commit a cross-partition reference into the embedded '
                     'default and show it',
        description='Open the embedded default (main and catalog FileStorage '
                    'partitions under VAR) in this process, commit one '
                    'object into each, the main one referring to the catalog '
                    'one, and show each partition.')
    demo.add_argument('--var', default='var',
                      help='folder for the partition files (default: var)')
    demo.set_defaults(func=cmd_demo)
    return parser


def error_message(exc):
    """One line for ``exc``, naming its type where the text alone is
    unclear."""
    from compositestorage.errors import CompositeStorageError
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    else:
        text = str(exc)
    if isinstance(exc, FileNotFoundError) and exc.filename:
        text = 'no such file: %s' % exc.filename
    elif isinstance(exc, zc.lockfile.LockError):
        text = '%s: is it open in another process (a running server)?' % text
    elif not isinstance(exc, (CLIError, OSError, CompositeStorageError,
                              ZConfig.ConfigurationError)):
        text = '%s: %s' % (type(exc).__name__, text) if text else \
            type(exc).__name__
    return ' '.join(text.split())


class OneLineFormatter(logging.Formatter):
    """``compositestorage: warning: LOGGER: message``, never a traceback."""

    def format(self, record):
        return '%s: %s: %s: %s' % (PROG, record.levelname.lower(),
                                   record.name,
                                   ' '.join(record.getMessage().split()))


def warnings_to_stderr():
    """Show WARNING and worse on stderr, one line each, unless logging is
    configured already.  Returns the handler added, or ``None``."""
    root = logging.getLogger()
    if root.handlers:
        return None
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(OneLineFormatter())
    root.addHandler(handler)
    return handler


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.func is not cmd_serve:
        # runzeo sets up the server's logging; elsewhere ZODB's warnings
        # (a stale index being ignored, say) go to stderr, one line each.
        warnings_to_stderr()
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (``| head``): say nothing more.
        try:
            sys.stdout = open(os.devnull, 'w')
        except OSError:
            pass
        return 1
    except KeyboardInterrupt:
        if args.traceback:
            raise
        print('%s: interrupted' % PROG, file=sys.stderr)
        return 130
    except Exception as e:
        if args.traceback:
            raise
        print('%s: error: %s' % (PROG, error_message(e)), file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
