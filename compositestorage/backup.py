"""Backing up and restoring a composite at one tid, with ZODB's ``repozo``.

``repozo`` backs up one FileStorage file.  Run on each child of a composite
separately, it catches the children at different moments: restored, the
composite may hold half of a transaction over several partitions, or a
reference into a partition state older than the referrer.

:func:`backup` first reads T, the last transaction that has finished in
every child it touches (the ``lastTransaction()`` of a read-only
composite, which stays below a transaction the journal names as still
being finished), then runs ``repozo -B`` on each child into
``REPOSITORY/<partition name>/`` and records T in
``REPOSITORY/composite-backup.json``.  ``repozo`` copies a prefix of each
append-only file, taken after T was read, so each child's backup holds
every transaction up to T, and perhaps some later ones.

:func:`restore` runs ``repozo -R`` for each partition beside its
configured path, cuts every copy back to T with :func:`cut_back`, which
leaves each child exactly as it was at T, and then puts them all in place.  Without ``composite-backup.json``
(plain ``repozo`` backups taken separately) it cuts back to the oldest
common point, the smallest of the children's last tids.

See ``docs/backup.rst``.
"""
import bisect
import contextlib
import datetime
import gzip
import io
import json
import os
import time
import types

from ZODB.FileStorage import FileStorage
from ZODB.TimeStamp import TimeStamp
from ZODB.utils import z64

from compositestorage.errors import CompositeStorageError
from compositestorage.interrupts import interrupts_held_back
from compositestorage.children.filestorage import cut_filestorage
from compositestorage.children.filestorage import last_tid_before
from compositestorage.children.filestorage import transactions_after

#: The file in a repository that records the tid of a composite backup.
MANIFEST = 'composite-backup.json'
FORMAT = 1
#: The magics a FileStorage file begins with.
MAGICS = (b'FS21', b'FS30')


class BackupError(CompositeStorageError):
    """A backup or a restore that cannot be done, and why."""


# --- small helpers ------------------------------------------------------------

def as_tid(tid):
    """An 8-byte tid from bytes or a hex string."""
    if isinstance(tid, str):
        try:
            tid = bytes.fromhex(tid)
        except ValueError:
            raise BackupError('%r is not a tid in hex' % tid)
    if not isinstance(tid, bytes) or len(tid) != 8:
        raise BackupError('%r is not a tid (8 bytes, or 16 hex digits)'
                          % (tid,))
    return tid


def describe_tid(tid):
    """``'03e8... (2024-05-01 12:00:00.000000 UTC)'``, or ``'none'``."""
    if tid is None or tid == z64:
        return 'none (%s)' % z64.hex()
    return '%s (%s UTC)' % (tid.hex(), TimeStamp(tid))


def _utc_now():
    return datetime.datetime.now(datetime.timezone.utc).strftime(
        '%Y-%m-%dT%H:%M:%S.%fZ')


# --- cutting a FileStorage back -------------------------------------------------

def cut_back(target, tid, blob_dir=None):
    """Cut a FileStorage back so that it holds only the transactions whose
    tid is at most ``tid`` (8 bytes or hex); returns the tids removed,
    oldest first.

    ``target`` is the path of a FileStorage file that no process has open,
    or an open, writable ``FileStorage``.  The transaction headers are
    walked back from the end to the first transaction with a greater tid;
    the file is truncated there (and fsynced); the file's ``.index``, stale
    now, is replaced by one rebuilt from the file; and the blob files of
    the removed transactions are removed from ``blob_dir`` (for a path;
    an open FileStorage uses its own blob directory).  Cutting back to a
    tid the file has not reached changes nothing.

    This is the code that rolls back an unfinished transaction on recovery
    (:func:`compositestorage.children.filestorage.cut_filestorage`).
    """
    tid = as_tid(tid)
    if isinstance(target, FileStorage):
        if target.isReadOnly():
            raise BackupError('%s is open read-only: cannot cut it back'
                              % target.getName())
        return cut_filestorage(target, tid)
    path = os.fspath(target)
    if not os.path.isfile(path):
        raise BackupError('no such file: %s (nothing to cut back)' % path)
    with open(path, 'rb') as f:
        if f.read(4) not in MAGICS:
            raise BackupError('%s is not a FileStorage file' % path)
    if blob_dir is not None and not os.path.isdir(blob_dir):
        raise BackupError('no such blob directory: %s' % blob_dir)
    fs = FileStorage(path, blob_dir=blob_dir)
    try:
        return cut_filestorage(fs, tid)
    finally:
        fs.close()


# --- the configured partitions --------------------------------------------------

class Configured:
    """One partition of a config, as written (nothing is opened)."""

    def __init__(self, name, prefix, path, blob_dir):
        self.name = name
        self.prefix = prefix
        self.path = path
        self.blob_dir = blob_dir


def configured_partitions(target, database=None):
    """``(partitions, journal path)`` of the composite ``target`` names (a
    config file, ``zconfig://`` or a ``composite:`` URI, by the rule of
    :mod:`compositestorage.opening`); refuses a child that is not a
    FileStorage, naming the partition, before anything is opened."""
    from compositestorage.opening import uri_scheme
    if uri_scheme(target) == 'composite':
        return _uri_partitions(target)
    import ZODB.config

    from compositestorage.config import check_sections
    from compositestorage.config import journal_path
    from compositestorage.opening import storage_opener
    from compositestorage.opening import zconfig_target
    path = target
    if uri_scheme(target) == 'zconfig':
        path, database = zconfig_target(target)
    elif uri_scheme(target) is not None:
        raise BackupError(
            'backup and restore copy the partitions\' files: give the '
            'config file of the composite, zconfig://PATH or a composite: '
            'URI, not %s' % target)
    opener = storage_opener(path, database)
    c = opener.config
    sections = list(c.partitions)
    check_sections(sections, c.default_partition)
    parts = []
    for s in sorted(sections, key=lambda s: s.prefix):
        if not isinstance(s.storage, ZODB.config.FileStorage):
            from compositestorage.children.relstorage import configured_db
            raise _not_a_filestorage(s.name, s.prefix,
                                     _section_type(s.storage),
                                     configured_db(s.storage))
        child = s.storage.config
        parts.append(_configured(s.name, s.prefix, child.path,
                                 child.blob_dir or c.blob_dir))
    return parts, journal_path(c.journal, sections)


def _uri_partitions(uri):
    """:func:`configured_partitions` of a ``composite:`` URI: its
    ``file://`` children."""
    from urllib.parse import parse_qs
    from urllib.parse import urlsplit

    from compositestorage.uri import parse_uri
    parts = []
    for name, prefix, child in sorted(parse_uri(uri)[0],
                                      key=lambda part: part[1]):
        if not child.startswith('file://'):
            raise _not_a_filestorage(name, prefix, child.split(':', 1)[0]
                                     + ':')
        split = urlsplit(child)
        blob_dir = parse_qs(split.query).get('blobstorage_dir', [None])[0]
        parts.append(_configured(name, prefix, split.path, blob_dir))
    primary = [p for p in parts if p.prefix == 0]
    return parts, primary[0].path + '.journal' if primary else None


def _not_a_filestorage(name, prefix, kind, where=None):
    """The refusal, with the consistent way to back such a composite up:
    a backup of one child taken while the writer commits to the others
    would not hold the same transactions as theirs."""
    return BackupError(
        'partition %r (prefix %d) is a %s child%s, not a FileStorage: '
        'repozo backs up FileStorage files only, so this composite '
        'cannot be backed up or restored this way.  To back it up '
        'consistently, stop its writer (the server or application) and '
        'copy every child while it is stopped: pg_dump for a PostgreSQL '
        'child, a copy of the data directory for an SQLite one, a copy '
        'of each FileStorage file; restore them all together (see '
        '"Backups" in docs/operations.rst)'
        % (name, prefix, kind, ' (%s)' % where if where else ''))


def _configured(name, prefix, path, blob_dir):
    if not name or os.sep in name or name in ('.', '..'):
        raise BackupError('partition name %r cannot name a folder of '
                          'the repository' % name)
    return Configured(name, prefix, os.path.abspath(path), blob_dir)


def _section_type(opener):
    config = getattr(opener, 'config', None)
    section = getattr(config, 'getSectionType', None)
    if section is not None:
        return '<%s>' % section()
    return type(opener).__name__


# --- repozo -------------------------------------------------------------------

def run_repozo(argv, what):
    """Run ``repozo.main(argv)``; its errors become a :class:`BackupError`
    that says ``what`` failed."""
    from ZODB.scripts import repozo
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            repozo.main(argv)
    except SystemExit as e:
        if e.code in (None, 0):
            return
        if isinstance(e.code, str):
            text = e.code
        else:
            said = err.getvalue().strip().splitlines()
            text = said[-1] if said else 'exit status %s' % e.code
        raise BackupError('repozo %s: %s' % (what, ' '.join(text.split())))


def _data_files(directory):
    """The repozo data files in ``directory``, oldest first."""
    from ZODB.scripts.repozo import is_data_file
    return sorted(f for f in os.listdir(directory) if is_data_file(f))


def _wait_for_a_new_second(directory):
    """repozo names its files by the UTC second, and refuses to write a
    second file in the same second: wait for the next one if need be."""
    while True:
        now = time.strftime('%Y-%m-%d-%H-%M-%S', time.gmtime())
        if not any(f.startswith(now) for f in os.listdir(directory)):
            return
        time.sleep(0.05)


def backup_files(directory, date=None):
    """The repozo files ``repozo -R -D date`` would concatenate, oldest
    first (the last full backup at or before ``date``, then the
    incrementals after it)."""
    from ZODB.scripts.repozo import find_files
    options = types.SimpleNamespace(repository=directory, date=date,
                                    full=False, gzip=False)
    return find_files(options)


class Chain:
    """The repozo files of one backup read as one file (``seek`` and
    ``read``), the way ``repozo -R`` concatenates them."""

    def __init__(self, files):
        self.files = list(files)
        sizes = _sizes_from_dat(self.files)
        self._starts = []
        self._segments = []
        pos = 0
        for path in self.files:
            size = sizes.get(os.path.basename(path))
            if size is None:
                size = _uncompressed_size(path)
            self._starts.append(pos)
            self._segments.append((pos, pos + size, path))
            pos += size
        self.size = pos
        self._pos = 0
        self._open = {}
        self.name = 'the repozo backup %s' % (
            self.files[-1] if self.files else '(no files)')

    def seek(self, pos):
        self._pos = pos

    def read(self, n):
        out = []
        while n > 0 and self._pos < self.size:
            i = bisect.bisect_right(self._starts, self._pos) - 1
            start, end, path = self._segments[i]
            f = self._file(path)
            f.seek(self._pos - start)
            chunk = f.read(min(n, end - self._pos))
            if not chunk:
                break
            out.append(chunk)
            self._pos += len(chunk)
            n -= len(chunk)
        return b''.join(out)

    def _file(self, path):
        f = self._open.get(path)
        if f is None:
            f = gzip.open(path, 'rb') if path.endswith('fsz') else \
                open(path, 'rb')
            self._open[path] = f
        return f

    def close(self):
        for f in self._open.values():
            f.close()
        self._open.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _sizes_from_dat(files):
    """``{file name: size}`` from the ``.dat`` file of the full backup."""
    if not files:
        return {}
    dat = os.path.splitext(files[0])[0] + '.dat'
    sizes = {}
    try:
        with open(dat) as f:
            for line in f:
                fields = line.split()
                if len(fields) == 4:
                    sizes[os.path.basename(fields[0])] = \
                        int(fields[2]) - int(fields[1])
    except (OSError, ValueError):
        return {}
    return sizes


def _uncompressed_size(path):
    if not path.endswith('fsz'):
        return os.path.getsize(path)
    from ZODB.scripts.repozo import file_size
    with gzip.open(path, 'rb') as f:
        return file_size(f)


def cut_point(f, end, tid, name):
    """``(last tid at or before tid, [tids after it])`` of FileStorage
    data ``f`` that ends at ``end``."""
    start, after = transactions_after(f, end, tid, name)
    return last_tid_before(f, start, name), after


# --- backup ---------------------------------------------------------------------

class PartitionBackup:
    """What :func:`backup` did for one partition."""

    def __init__(self, name, prefix, path, directory, action, file,
                 last_tid, repozo_date):
        self.name = name
        self.prefix = prefix
        self.path = path
        self.directory = directory
        self.action = action            # 'full', 'incremental', 'unchanged'
        self.file = file                # the file repozo wrote, or None
        self.last_tid = last_tid        # its last tid at or before T
        self.repozo_date = repozo_date  # what repozo -D restores it from

    def as_dict(self):
        return {'name': self.name, 'prefix': self.prefix, 'path': self.path,
                'directory': os.path.basename(self.directory),
                'action': self.action, 'file': self.file,
                'last_tid': self.last_tid.hex(),
                'repozo_date': self.repozo_date}

    def __str__(self):
        if self.action == 'unchanged':
            what = 'unchanged since the last backup (%s)' % self.repozo_date
        else:
            what = '%s backup %s' % (self.action, os.path.join(
                self.directory, self.file))
        return '%s: %s: %s; last transaction at or before the backup: %s' % (
            self.name, self.path, what, describe_tid(self.last_tid))


class BackupReport:
    def __init__(self, tid, started, repository, partitions, manifest,
                 blob_dirs):
        self.tid = tid
        self.started = started
        self.repository = repository
        self.partitions = partitions
        self.manifest = manifest
        self.blob_dirs = blob_dirs

    def as_dict(self):
        return {'format': FORMAT, 'tid': self.tid.hex(),
                'tid_time': str(TimeStamp(self.tid)) + ' UTC'
                if self.tid != z64 else None,
                'time': self.started,
                'partitions': [p.as_dict() for p in self.partitions]}

    def lines(self):
        out = ['backup of the composite at transaction %s into %s' % (
            describe_tid(self.tid), self.repository)]
        out.extend(str(p) for p in self.partitions)
        out.append('recorded the tid in %s' % self.manifest)
        for blob_dir in self.blob_dirs:
            out.append('note: repozo does not back up blobs: copy the blob '
                       'directory %s separately, after this backup'
                       % blob_dir)
        return out


def backup(target, repository, full=False, between=None, database=None):
    """Back up every partition of the composite ``target`` names
    into ``repository`` (an existing folder), at one tid.

    The composite is opened read-only (beside a writer, if one runs) and
    its ``lastTransaction()``, the last transaction finished everywhere,
    is read first; then ``repozo -B`` (``-F``
    with ``full``) backs up each child into ``repository/<name>/``; then
    ``repository/composite-backup.json`` records T (the last transaction
    at or before that tid), the time and the partitions.
    ``between(partition name)`` is called after each child's copy (tests
    commit there).  Returns a :class:`BackupReport`.
    """
    repository = os.path.abspath(os.fspath(repository))
    configured, journal = configured_partitions(os.fspath(target), database)
    if not os.path.isdir(repository):
        raise BackupError('no such repository folder: %s (create it first)'
                          % repository)
    _refuse_missing(configured, 'backup', target)
    started = _utc_now()
    copies = []
    storage = open_read_only(configured, journal)
    with contextlib.closing(storage):
        # what a read-only composite shows: the last transaction finished
        # in every child, kept below one the journal says is finishing
        visible = storage.lastTransaction()
        opened = {p.name: p.child.opened_file_stat()
                  for p in storage.partitions}
        for part in storage.partitions:
            path = os.path.abspath(part.child.file_name)
            directory = os.path.join(repository, part.name)
            os.makedirs(directory, exist_ok=True)
            _wait_for_a_new_second(directory)
            before = set(_data_files(directory))
            argv = ['-B', '-r', directory, '-f', path]
            if full:
                argv.append('-F')
            run_repozo(argv, 'could not back up partition %r (%s)'
                       % (part.name, path))
            now, then = os.stat(path), opened[part.name]
            if (now.st_dev, now.st_ino) != (then.st_dev, then.st_ino):
                raise BackupError(
                    'partition %r: %s was replaced (packed?) during the '
                    'backup, so its copy may lack records current at %s; '
                    'run the backup again, not while packing'
                    % (part.name, path, visible.hex()))
            files = _data_files(directory)
            if not files:
                raise BackupError('repozo wrote no backup of partition %r '
                                  'into %s' % (part.name, directory))
            new = sorted(set(files) - before)
            written = new[-1] if new else None
            action = 'unchanged' if written is None else (
                'incremental' if '.delta' in written else 'full')
            date = os.path.splitext(files[-1])[0]
            # What the copy holds at or before the tid read first: it holds
            # every transaction up to it, and perhaps later ones.
            with Chain(backup_files(directory, date)) as chain:
                last, _ = cut_point(chain, chain.size, visible, chain.name)
            copies.append(PartitionBackup(
                part.name, part.prefix, path, directory, action, written,
                last, date))
            if between is not None:
                between(part.name)
    # The composite stops just below a transaction the journal says is
    # unfinished: T is the last real transaction at or before that.
    tid = max([p.last_tid for p in copies] + [z64])
    manifest = os.path.join(repository, MANIFEST)
    blob_dirs = sorted({p.blob_dir for p in configured if p.blob_dir})
    report = BackupReport(tid, started, repository, copies, manifest,
                          blob_dirs)
    _write_json(manifest, report.as_dict())
    return report


def open_read_only(configured, journal):
    """A read-only composite over the configured FileStorage children,
    opened here one after the other.

    (A composite opened from a config insists that its children show one
    state, and opens them again while the writer commits across
    partitions; a backup needs no such state, as it copies the children
    afterwards, and would wait in vain beside a busy writer.  Its
    ``lastTransaction()`` is what a backup needs: the journal is read
    after the children opened, so a transaction finished meanwhile counts
    as finished, and the copies, taken later, hold it.)
    """
    from compositestorage.partition import Partition
    from compositestorage.storage import CompositeStorage
    from compositestorage.opening import stale_index_is_news
    children = []
    try:
        with stale_index_is_news():
            for part in configured:
                children.append(Partition(
                    part.name, part.prefix,
                    FileStorage(part.path, read_only=True)))
        return CompositeStorage(children, read_only=True, journal=journal)
    except BaseException:
        for child in children:
            child.storage.close()
        raise


def _write_json(path, data):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write('\n')
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or '.', os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(repository):
    """The composite backup recorded in ``repository``, or ``None``."""
    path = os.path.join(repository, MANIFEST)
    try:
        with open(path) as f:
            data = json.load(f)
        tid = as_tid(data['tid'])
        parts = {}
        for p in data['partitions']:
            parts[p['name']] = dict(p, prefix=int(p['prefix']),
                                    last_tid=as_tid(p['last_tid']),
                                    repozo_date=str(p['repozo_date']))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, BackupError) as e:
        raise BackupError('%s is not a composite backup record (%s: %s)'
                          % (path, type(e).__name__, e))
    return tid, parts, data


# --- restore --------------------------------------------------------------------

class PartitionRestore:
    """What :func:`restore` did (or would do) for one partition."""

    def __init__(self, name, prefix, path, files, backup_last, cut_to,
                 last_tid, removed):
        self.name = name
        self.prefix = prefix
        self.path = path
        self.files = files              # the repozo files, oldest first
        self.backup_last = backup_last  # the backup's last tid
        self.cut_to = cut_to            # the tid it is cut back to
        self.last_tid = last_tid        # the last tid once cut back
        self.removed = removed          # the tids cut off, oldest first

    def as_dict(self):
        return {'name': self.name, 'prefix': self.prefix, 'path': self.path,
                'files': self.files, 'backup_last_tid':
                self.backup_last.hex(), 'cut_to': self.cut_to.hex(),
                'last_tid': self.last_tid.hex(),
                'removed': [t.hex() for t in self.removed]}

    def line(self, dry_run):
        if dry_run:
            verb, cut = 'would restore', 'would remove'
        else:
            verb, cut = 'restored', 'removed'
        return ('%s: %s %s from %d repozo file(s) (the last %s); cut back '
                'to %s: %s %d transaction(s); last transaction %s' % (
                    self.name, verb, self.path, len(self.files),
                    os.path.basename(self.files[-1]), self.cut_to.hex(), cut,
                    len(self.removed), describe_tid(self.last_tid)))


class RestoreReport:
    def __init__(self, repository, tid, recorded, partitions, dry_run,
                 removed_files, blob_dirs):
        self.repository = repository
        self.tid = tid                  # the tid every child is cut to
        self.recorded = recorded        # True: from composite-backup.json
        self.partitions = partitions
        self.dry_run = dry_run
        self.removed_files = removed_files
        self.blob_dirs = blob_dirs
        self.problems = []
        self.last_transaction = None
        #: blob directory -> the blob files later than the tid, removed
        self.blobs_removed = {}

    def as_dict(self):
        return {'tid': self.tid.hex(), 'recorded': self.recorded,
                'dry_run': self.dry_run,
                'partitions': [p.as_dict() for p in self.partitions],
                'removed_files': self.removed_files,
                'problems': [p.as_dict() for p in self.problems]}

    def lines(self):
        if self.recorded:
            why = 'the tid recorded in %s' % os.path.join(self.repository,
                                                          MANIFEST)
        else:
            why = ('no %s: the oldest common point of the partitions\' '
                   'backups (the smallest of their last tids)' % MANIFEST)
        out = ['restoring from %s to transaction %s (%s)' % (
            self.repository, describe_tid(self.tid), why)]
        # the old files go first, then the restored ones take their place
        for path in self.removed_files:
            out.append('%s the old %s' % ('would remove' if self.dry_run
                                          else 'removed', path))
        out.extend(p.line(self.dry_run) for p in self.partitions)
        for blob_dir in self.blob_dirs:
            out.append('note: repozo backups hold no blobs: restore the '
                       'blob directory %s separately' % blob_dir)
        for blob_dir, paths in sorted(self.blobs_removed.items()):
            out.append('%s %d blob file(s) later than %s from %s' % (
                'would remove' if self.dry_run else 'removed', len(paths),
                self.tid.hex(), blob_dir))
        if self.dry_run:
            out.append('dry run: nothing changed')
        elif self.problems:
            out.extend(str(p) for p in self.problems)
            out.append('verify: %d problem(s)' % len(self.problems))
        else:
            out.append('verify: ok; last transaction %s'
                       % describe_tid(self.last_transaction))
        return out


def restore(target, repository, force=False, dry_run=False, database=None):
    """Restore every partition of the composite ``target`` names
    from ``repository``, at one tid; returns a :class:`RestoreReport`
    (whose ``problems`` are what verify found afterwards).

    ``repozo -R`` writes each partition's backup (from
    ``repository/<name>/``) beside its configured path; existing files
    are refused unless ``force``.  Then every child is cut back to the tid
    of the composite backup (``composite-backup.json``), or, for plain
    repozo backups without it, to the smallest of the children's last
    tids.  Then, with Ctrl-C held back, they all replace the configured
    files at once, and the composite is opened read-only and verified.  ``dry_run`` only
    reads the repository and reports what would be done.
    """
    from compositestorage.opening import opened_composite
    from compositestorage.verify import verify
    target = os.fspath(target)
    repository = os.path.abspath(os.fspath(repository))
    configured, journal = configured_partitions(target, database)
    if not os.path.isdir(repository):
        raise BackupError('no such repository folder: %s' % repository)
    recorded = read_manifest(repository)
    if recorded is not None:
        tid, entries, _ = recorded
        _check_manifest(repository, configured, entries)
    else:
        tid, entries = None, {}
    # What each partition's backup holds, read from the repository.
    plans = []
    for part in configured:
        directory = os.path.join(repository, part.name)
        date = entries[part.name]['repozo_date'] if entries else None
        files = backup_files(directory, date) \
            if os.path.isdir(directory) else []
        if not files:
            raise BackupError(
                'no repozo backup of partition %r in %s%s' % (
                    part.name, directory,
                    ' as of %s' % date if date else ''))
        with Chain(files) as chain:
            chain.seek(0)
            if chain.read(4) not in MAGICS:
                raise BackupError('%s is not a FileStorage backup'
                                  % files[0])
            backup_last = last_tid_before(chain, chain.size, chain.name)
        plans.append((part, directory, date, files, backup_last))
    if recorded is None:
        part, _, _, _, tid = min(plans, key=lambda plan: plan[4])
        if tid == z64:
            raise BackupError('the backup of partition %r holds no '
                              'transaction: there is no common point to '
                              'restore to' % part.name)
    results = []
    for part, directory, date, files, backup_last in plans:
        with Chain(files) as chain:
            last, removed = cut_point(chain, chain.size, tid, chain.name)
        if recorded is not None and last != entries[part.name]['last_tid']:
            raise BackupError(
                'the repozo backup of partition %r in %s does not hold the '
                'partition as it was at %s: its last transaction at or '
                'before that is %s, the composite backup recorded %s; were '
                'files of the repository removed or replaced?' % (
                    part.name, directory, tid.hex(), describe_tid(last),
                    describe_tid(entries[part.name]['last_tid'])))
        results.append(PartitionRestore(part.name, part.prefix, part.path,
                                        files, backup_last, tid, last,
                                        removed))
    existing = [p.path for p in configured if os.path.exists(p.path)]
    if journal and os.path.exists(journal):
        existing.append(journal)
    if existing and not force:
        raise BackupError('%s already exist%s: restore overwrites files '
                          'only when given --force' % (
                              ', '.join(existing),
                              's' if len(existing) == 1 else ''))
    stale = [path for p in configured
             for path in (p.path, p.path + '.index')
             if os.path.exists(path)]
    if journal and os.path.exists(journal):
        stale.append(journal)
    blob_dirs = sorted({p.blob_dir for p in configured if p.blob_dir})
    report = RestoreReport(repository, tid, recorded is not None, results,
                           dry_run, stale, blob_dirs)
    if dry_run:
        for blob_dir, prefixes in _blob_dirs(configured).items():
            report.blobs_removed[blob_dir] = remove_blobs_after(
                blob_dir, tid, prefixes, dry_run=True)
        return report

    # Each partition is restored and cut back beside its file, and only
    # then are they all put in place, with Ctrl-C held back: an interrupted
    # restore leaves the files it would replace as they were.
    lock = _lock(journal) if journal else None
    side = {part.name: part.path + '.restoring' for part in configured}
    try:
        for part, result in zip(configured, results):
            directory = os.path.join(repository, part.name)
            os.makedirs(os.path.dirname(part.path), exist_ok=True)
            _remove_side_files(side[part.name])
            argv = ['-R', '-r', directory, '-o', side[part.name]]
            date = entries[part.name]['repozo_date'] if entries else None
            if date:
                argv += ['-D', date]
            run_repozo(argv, 'could not restore partition %r into %s'
                       % (part.name, part.path))
        for part, result in zip(configured, results):
            # the blob files of what is cut off go below, with all others
            # later than the tid
            removed = cut_back(side[part.name], tid)
            if removed != result.removed:
                raise BackupError(
                    'partition %r: cutting %s back to %s removed %d '
                    'transaction(s), the backup showed %d' % (
                        part.name, part.path, tid.hex(), len(removed),
                        len(result.removed)))
        with interrupts_held_back(
                'restore: putting every restored partition in place first, '
                'so that they agree',
                'the restore put every partition in place before it '
                'stopped'):
            for path in stale:
                os.remove(path)
            for part in configured:
                os.replace(side[part.name], part.path)
                if os.path.exists(side[part.name] + '.index'):
                    os.replace(side[part.name] + '.index',
                               part.path + '.index')
            for blob_dir, prefixes in _blob_dirs(configured).items():
                report.blobs_removed[blob_dir] = remove_blobs_after(
                    blob_dir, tid, prefixes)
    finally:
        for path in side.values():
            _remove_side_files(path)
        if lock is not None:
            lock.close()

    with opened_composite(target, database) as storage:
        problems, _ = verify(storage)
        report.problems = list(problems)
        report.last_transaction = storage.lastTransaction()
    return report


def _refuse_missing(configured, what, target):
    from compositestorage.opening import refuse_missing
    refuse_missing([(p.name, p.path) for p in configured
                    if not os.path.exists(p.path)], what, target)


def _remove_side_files(path):
    """A side file of a restore, and what opening it as a FileStorage left
    beside it."""
    for name in (path, path + '.index', path + '.lock', path + '.tmp'):
        if os.path.exists(name):
            os.remove(name)


def _blob_dirs(configured):
    """``{existing blob directory: prefixes of the partitions using it}``."""
    found = {}
    for part in configured:
        if part.blob_dir and os.path.isdir(part.blob_dir):
            found.setdefault(part.blob_dir, set()).add(part.prefix)
    return found


def remove_blobs_after(blob_dir, tid, prefixes, dry_run=False):
    """Remove from ``blob_dir`` the blob files, of objects whose oid has
    one of ``prefixes``, written by a transaction later than ``tid``;
    returns their paths.  A blob directory copied after a backup holds
    such blobs, of transactions the restored files do not have."""
    from ZODB.blob import FilesystemHelper
    helper = FilesystemHelper(blob_dir)
    removed = []
    for oid, oid_path in helper.listOIDs():
        if not oid or oid[0] not in prefixes:
            continue
        for name in sorted(os.listdir(oid_path)):
            path = os.path.join(oid_path, name)
            try:
                _, serial = helper.splitBlobFilename(path)
            except Exception:
                continue        # not a blob file
            if serial is not None and serial > tid:
                if not dry_run:
                    os.remove(path)
                removed.append(path)
    return removed


def _check_manifest(repository, configured, entries):
    names = {p.name: p for p in configured}
    missing = sorted(set(names) - set(entries))
    extra = sorted(set(entries) - set(names))
    if missing or extra:
        raise BackupError(
            'the composite backup in %s has partitions %s, the config has '
            '%s: restore every partition of the backup, under the same '
            'names' % (repository, ', '.join(sorted(entries)),
                       ', '.join(sorted(names))))
    for name, part in names.items():
        if entries[name]['prefix'] != part.prefix:
            raise BackupError(
                'partition %r has prefix %d in the config, %s in the '
                'composite backup in %s' % (
                    name, part.prefix, entries[name]['prefix'], repository))


def _lock(journal):
    """The composite's writer lock, so that no writer runs meanwhile."""
    from compositestorage.errors import WriterLockedError
    from compositestorage.journal import Journal
    from compositestorage.journal import lock_writer
    os.makedirs(os.path.dirname(os.path.abspath(journal)), exist_ok=True)
    try:
        return lock_writer(Journal(journal))
    except WriterLockedError:
        raise BackupError('a process has this composite open for writing '
                          '(it holds %s.lock): stop it before restoring'
                          % journal)
