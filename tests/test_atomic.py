"""Crash-atomic commits across partitions (DESIGN.md, invariant 6).

A writer process (``crash_writer.py``) adds 1 to a counter in each of three
FileStorage partitions per transaction and reports each tid once its
``tpc_finish`` has returned.  It is killed with SIGKILL at every named point
of the commit protocol and of recovery, and at random instants.  After each
kill the composite is reopened (which recovers) and must hold every
transaction in all three partitions or in none, with equal counters, and
every acknowledged transaction.
"""
import logging
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import transaction
import ZODB
from ZODB.FileStorage import FileStorage
from ZODB.MappingStorage import MappingStorage

from atomic_checks import check_outcome
from compositestorage import CompositeStorage
from compositestorage.errors import WriterLockedError
from compositestorage.journal import Intent
from compositestorage.recovery import has_transaction
from compositestorage.journal import Journal
from conftest import blob_paths
from conftest import config_file
from crash_writer import PARTS
from crash_writer import RaisingInFinish

WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'crash_writer.py')
NAMES = [name for name, _ in PARTS]
#: Kills at random instants in the test suite (tests/soak.py does more).
RANDOM_KILLS = 50
#: Every point of the protocol a three-partition commit passes, in order.
COMMIT_POINTS = (
    [p % name for name in NAMES for p in ('vote:%s', 'voted:%s')]
    + ['intent-written']
    + ['finished:%s' % name for name in NAMES]
    + ['journal-cleared'])


def run_writer(directory, count, env=None, kill_after=None):
    """Run the writer; returns ``(exit code, [(tid, n) acknowledged])``.

    ``kill_after`` seconds after it is ready, it is killed with SIGKILL.
    """
    code, done = run_writer_lines(directory, count, env, kill_after)
    return code, [(tid, n) for tid, n, _ in done]


def run_writer_lines(directory, count, env=None, kill_after=None):
    """Run the writer; returns ``(exit code, [(tid, n, names)])`` for each
    transaction it acknowledged (``names``: the partitions it touched)."""
    proc = subprocess.Popen(
        [sys.executable, WRITER, str(directory), str(count)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, **(env or {})))
    acknowledged = []
    if kill_after is not None:
        line = proc.stdout.readline()
        if line.strip() == 'ready':
            time.sleep(kill_after)
            proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    for line in out.splitlines():
        if line.startswith('done '):
            _, tid, n, names = line.split()
            acknowledged.append((bytes.fromhex(tid), int(n),
                                 tuple(names.split(','))))
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError('writer failed (%s): %s' % (proc.returncode,
                                                         err))
    return proc.returncode, acknowledged


def child_tids(directory, name):
    fs = FileStorage(os.path.join(str(directory), name + '.fs'),
                     read_only=True)
    try:
        return [t.tid for t in fs.iterator()]
    finally:
        fs.close()


def check_invariant(directory, acknowledged):
    """Reopen (and so recover), then check all-or-nothing and durability.

    Returns what recovery did (``None`` when it found nothing to do).
    """
    from crash_writer import open_composite
    storage = open_composite(str(directory))
    try:
        outcome = storage.recovered
        db = ZODB.DB(storage)
        conn = db.open()
        counters = conn.root()['counters']
        values = {name: counters[name]['n'] for name in NAMES}
        db.close()
    finally:
        storage.close()
    assert len(set(values.values())) == 1, values
    if acknowledged:
        assert values['main'] >= acknowledged[-1][1]
    tids = {name: child_tids(directory, name) for name in NAMES}
    assert tids['main'] == tids['b'] == tids['c']
    for tid, _ in acknowledged:
        assert tid in tids['main']
    assert Journal(os.path.join(str(directory), 'main.fs.journal')
                   ).read() is None
    return outcome


@pytest.fixture
def seeded(tmp_path):
    """A directory whose composite holds the three counters."""
    code, acked = run_writer(tmp_path, 2)
    assert code == 0 and [n for _, n in acked] == [1, 2]
    return tmp_path


@pytest.mark.parametrize('point', COMMIT_POINTS)
def test_kill_at_every_point_of_the_protocol(seeded, point):
    code, acked = run_writer(seeded, 10, {'CRASH_AT': point + ':3'})
    assert code == -signal.SIGKILL
    assert len(acked) == 2                  # the third commit was cut
    outcome = check_invariant(seeded, acked)
    check_outcome(point, outcome)
    # a second open finds nothing to do
    assert check_invariant(seeded, acked) is None


@pytest.mark.parametrize('point', ['rolled-back:main', 'rolled-back:b',
                                   'recovered'])
def test_kill_during_recovery(seeded, point):
    code, acked = run_writer(seeded, 10,
                             {'CRASH_AT': 'finished:b:3'})
    assert code == -signal.SIGKILL
    # recovery itself is killed (the writer recovers when it opens)
    code, _ = run_writer(seeded, 1, {'CRASH_AT': point + ':1'})
    assert code == -signal.SIGKILL
    outcome = check_invariant(seeded, acked)
    if point == 'recovered':
        assert outcome is None      # the journal was cleared before
    else:
        assert outcome.action in ('rolled back', 'absent')


def test_random_kills(seeded):
    """Kills at random instants, bounded in count and time."""
    rng = random.Random(int(os.environ.get('CRASH_SEED', '4321')))
    acked_all = []
    deadline = time.time() + 180
    kills = 0
    while kills < RANDOM_KILLS and time.time() < deadline:
        code, acked = run_writer(seeded, 10 ** 6,
                                 kill_after=rng.uniform(0.0, 0.25))
        assert code == -signal.SIGKILL
        kills += 1
        acked_all.extend(acked)
        check_invariant(seeded, acked_all)
    assert kills >= 10


def _durable_state(directory):
    """``{path: (size, content)}`` of the files a power loss may cut."""
    state = {}
    for name in os.listdir(str(directory)):
        path = os.path.realpath(os.path.join(str(directory), name))
        if name.endswith('.fs'):
            state[path] = (os.path.getsize(path), None)
        elif name.endswith('.journal'):
            with open(path, 'rb') as f:
                state[path] = (os.path.getsize(path), f.read())
    return state


def _power_loss(directory, log_path, baseline):
    """Put every file back to what its last fsync made durable, as a power
    loss would: the operating system's cache is gone."""
    durable = dict(baseline)
    if os.path.exists(log_path):
        with open(log_path) as f:
            for line in f:
                path, size, content = line.rstrip('\n').split('\t')
                durable[path] = (int(size), bytes.fromhex(content)
                                 if content else None)
        os.remove(log_path)
    for name in os.listdir(str(directory)):
        path = os.path.join(str(directory), name)
        if name.endswith(('.fs', '.journal')):
            size, content = durable.get(os.path.realpath(path), (0, b''))
            with open(path, 'r+b') as f:
                if content is not None:
                    f.write(content)
                f.truncate(size)
        elif name.endswith(('.index', '.tmp')):
            os.remove(path)     # never fsynced: lost, and rebuilt


def test_lost_unsynced_writes(seeded):
    """``kill -9`` keeps the page cache; this drops what was not fsynced."""
    log_path = str(seeded / 'fsync.log')
    rng = random.Random(99)
    acked_all = []
    crash_points = ['intent-written:2', 'finished:main:2',
                    'finished:c:2', 'journal-cleared:2']
    for i in range(8):
        baseline = _durable_state(seeded)
        env = {'FSYNC_LOG': log_path}
        if i < len(crash_points):
            env['CRASH_AT'] = crash_points[i]
            code, acked = run_writer(seeded, 10, env)
        else:
            code, acked = run_writer(seeded, 10 ** 6, env,
                                     kill_after=rng.uniform(0.05, 0.2))
        assert code == -signal.SIGKILL
        _power_loss(seeded, log_path, baseline)
        acked_all.extend(acked)
        check_invariant(seeded, acked_all)


# --- in one process ------------------------------------------------------------

def _open(directory, raise_in=None, times=1):
    from crash_writer import open_composite
    storage = open_composite(str(directory))
    if raise_in:
        part = storage.partition_named(raise_in.rstrip('+'))
        part.storage = RaisingInFinish(part.storage, raise_in.endswith('+'),
                                       times)
    return storage


@pytest.mark.parametrize('raise_in', ['main', 'b', 'c', 'b+', 'c+'])
def test_a_child_raising_in_tpc_finish(seeded, raise_in):
    storage = _open(seeded, raise_in)
    db = ZODB.DB(storage)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        counters = conn.root()['counters']
        before = storage.lastTransaction()
        for name in NAMES:
            counters[name]['n'] += 1
        with pytest.raises(OSError, match='injected'):
            tm.commit()
        tm.abort()
        # nothing of it is visible, and nothing of it stayed in a child
        assert storage.lastTransaction() == before
        for part in storage.partitions:
            assert max(t.tid for t in part.base.iterator()) <= before
        tm2 = transaction.TransactionManager()
        conn2 = db.open(tm2)
        assert {conn2.root()['counters'][n]['n'] for n in NAMES} == {2}
        # and the next commit works
        for name in NAMES:
            conn2.root()['counters'][name]['n'] += 1
        tm2.commit()
        assert storage.lastTransaction() > before
    finally:
        db.close()
    assert check_invariant(seeded, []) is None


def test_a_second_writer_is_refused(tmp_path):
    journal = str(tmp_path / 'shared.journal')
    first = CompositeStorage([('main', 0, MappingStorage()),
                              ('b', 1, MappingStorage())], journal=journal)
    try:
        with pytest.raises(WriterLockedError) as exc:
            CompositeStorage([('main', 0, MappingStorage()),
                              ('b', 1, MappingStorage())], journal=journal)
        assert journal + '.lock' in str(exc.value)
        assert 'read-only' in str(exc.value)
    finally:
        first.close()
    # the lock goes with the writer
    CompositeStorage([('main', 0, MappingStorage()),
                      ('b', 1, MappingStorage())], journal=journal).close()


def test_a_read_only_composite_beside_the_writer(seeded):
    writer = _open(seeded)
    try:
        children = [(name, prefix,
                     FileStorage(str(seeded / (name + '.fs')),
                                 read_only=True))
                    for name, prefix in PARTS]
        reader = CompositeStorage(children, read_only=True)
        try:
            db = ZODB.DB(reader)
            counters = db.open().root()['counters']
            assert {counters[n]['n'] for n in NAMES} == {2}
            db.close()
        finally:
            reader.close()
    finally:
        writer.close()


def test_a_read_only_composite_hides_an_unfinished_transaction(seeded):
    code, acked = run_writer(seeded, 10,
                             {'CRASH_AT': 'finished:main:3'})
    assert code == -signal.SIGKILL
    journal = Journal(str(seeded / 'main.fs.journal'))
    intent = journal.read()
    assert isinstance(intent, Intent) and intent.prefixes == (0, 1, 2)
    children = [(name, prefix, FileStorage(str(seeded / (name + '.fs')),
                                           read_only=True))
                for name, prefix in PARTS]
    reader = CompositeStorage(children, read_only=True)
    try:
        assert reader.lastTransaction() < intent.tid
        db = ZODB.DB(reader)
        counters = db.open().root()['counters']
        # main holds the unfinished transaction; the reader does not see it
        assert {counters[n]['n'] for n in NAMES} == {acked[-1][1]}
        db.close()
    finally:
        reader.close()
    assert journal.read() == intent         # a reader recovers nothing
    assert check_invariant(seeded, acked).action == 'rolled back'


def test_recovery_logs_what_it_did(seeded, caplog):
    code, acked = run_writer(seeded, 10, {'CRASH_AT': 'finished:b:3'})
    assert code == -signal.SIGKILL
    intent = Journal(str(seeded / 'main.fs.journal')).read()
    with caplog.at_level(logging.INFO, logger='compositestorage'):
        storage = _open(seeded)
        storage.close()
    text = caplog.text
    assert intent.tid.hex() in text and 'over main, b, c' in text
    assert 'rolled back in main, b' in text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='compositestorage'):
        assert _open(seeded).recovered is None
    assert 'recovered' not in caplog.text


def test_recover_command(seeded):
    code, acked = run_writer(seeded, 10,
                             {'CRASH_AT': 'finished:main:3'})
    assert code == -signal.SIGKILL
    config = config_file(seeded, {name: str(seeded / (name + '.fs'))
                                  for name, _ in PARTS}, PARTS)
    intent = Journal(str(seeded / 'main.fs.journal')).read()

    def recover(*args):
        proc = subprocess.run(
            [sys.executable, '-m', 'compositestorage', 'recover',
             str(config)] + list(args),
            capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    out = recover('--dry-run')
    assert intent.tid.hex() in out and 'to be rolled back in main' in out
    assert 'dry run' in out
    assert Journal(str(seeded / 'main.fs.journal')).read() == intent
    out = recover()
    assert 'rolled back in main' in out and 'dry run' not in out
    assert 'nothing to recover' in recover()
    import json
    report = json.loads(recover('--json'))
    assert report['outcome'] is None
    check_invariant(seeded, acked)


def _open_across_commits(seeded, open_reader, spoil):
    """Open a read-only composite with ``open_reader()`` while a writer in
    this process commits across all partitions each time the reader has
    opened main, ``spoil`` times; returns the counters the reader sees."""
    from compositestorage import faults
    wdb = ZODB.DB(_open(seeded))
    tm = transaction.TransactionManager()
    counters = wdb.open(tm).root()['counters']
    commits = []

    def hook(point):
        if point == 'opened-child:main' and len(commits) < spoil:
            for name in NAMES:
                counters[name]['n'] += 1
            tm.commit()
            commits.append(point)

    faults.hook = hook
    try:
        reader = open_reader()
    finally:
        faults.hook = None
    try:
        assert len(commits) == spoil            # the openings were spoiled
        db = ZODB.DB(reader)
        seen = db.open().root()['counters']
        values = {seen[name]['n'] for name in NAMES}
        db.close()
    finally:
        reader.close()
        wdb.close()
    return values


def test_a_read_only_composite_reopens_children_across_a_commit(seeded):
    """The children of a read-only composite are opened one by one; a
    writer that commits across partitions in between would show in some of
    them and not in others.  The journal changed, so they are opened
    again."""
    import ZODB.config
    config = '%import compositestorage\n<compositestorage>\n' \
        '  read-only true\n' + ''.join(
            '  <partition %s>\n    prefix %d\n    <filestorage>\n'
            '      path %s\n      read-only true\n    </filestorage>\n'
            '  </partition>\n' % (name, prefix, seeded / (name + '.fs'))
            for name, prefix in PARTS) + '</compositestorage>\n'
    values = _open_across_commits(
        seeded, lambda: ZODB.config.storageFromString(config), 2)
    assert values == {4}


def test_a_read_only_uri_reopens_children_across_a_commit(seeded):
    """The same for a composite opened read-only from a zodburi URI."""
    from compositestorage.uri import resolve_composite
    uri = 'composite:' + '/'.join(
        '%s=%d:(file://%s?read_only=true)' % (name, prefix,
                                             seeded / (name + '.fs'))
        for name, prefix in PARTS) + '?read_only=true'
    factory, _ = resolve_composite(uri)
    assert _open_across_commits(seeded, factory, 1) == {3}


class _PausedWriter:
    """A writer in a thread of this process, committing across every
    partition, paused as it passes ``point`` until ``finish()``."""

    def __init__(self, seeded, point):
        import threading
        from compositestorage import faults
        self._faults = faults
        self.db = ZODB.DB(_open(seeded))
        self.before = self.db.storage.lastTransaction()
        tm = transaction.TransactionManager()
        counters = self.db.open(tm).root()['counters']
        paused = threading.Event()
        self._go_on = threading.Event()

        def hook(name):
            if name == point and not self._go_on.is_set():
                paused.set()
                assert self._go_on.wait(60)

        def commit():
            for name in NAMES:
                counters[name]['n'] += 1
            tm.commit()

        faults.hook = hook
        self._thread = threading.Thread(target=commit)
        self._thread.start()
        if not paused.wait(60):
            self.close()
            raise AssertionError('the writer never reached %s' % point)

    def finish(self):
        self._go_on.set()
        self._faults.hook = None
        self._thread.join(60)
        assert not self._thread.is_alive()

    def close(self):
        self.finish()
        self.db.close()


def _counters_seen(reader):
    db = ZODB.DB(reader)
    try:
        seen = db.open().root()['counters']
        return {seen[name]['n'] for name in NAMES}
    finally:
        db.close()


def test_a_read_only_composite_hides_what_the_journal_showed_as_it_opened(
        seeded, monkeypatch):
    """The children open while a transaction is being finished (main has
    it, b and c not yet); it finishes, and the journal is cleared, before
    the composite itself is built.  What the reader hides must come from
    the journal as it was while the children opened, or main would show
    the transaction and b and c would not."""
    import ZODB.config
    from compositestorage import config as config_module
    writer = _PausedWriter(seeded, 'finished:main')
    real = config_module.open_children_consistently

    def then_the_writer_finishes(*args):
        opened = real(*args)
        writer.finish()
        return opened

    try:
        monkeypatch.setattr(config_module, 'open_children_consistently',
                            then_the_writer_finishes)
        reader = ZODB.config.storageFromString(
            '%import compositestorage\n<compositestorage>\n'
            '  read-only true\n' + ''.join(
                '  <partition %s>\n    prefix %d\n    <filestorage>\n'
                '      path %s\n      read-only true\n    </filestorage>\n'
                '  </partition>\n' % (name, prefix, seeded / (name + '.fs'))
                for name, prefix in PARTS) + '</compositestorage>\n')
        try:
            assert Journal(str(seeded / 'main.fs.journal')).read() is None
            assert _counters_seen(reader) == {2}
        finally:
            reader.close()
    finally:
        writer.close()


def test_a_read_only_composite_opened_between_vote_and_finish(seeded):
    """Every child has voted (written) the transaction and none finished it;
    the journal holds no intent yet.  A FileStorage opened read-only then
    reports the unfinished tid as its lastTransaction(); the composite
    must not."""
    from compositestorage.storage import CompositeStorage
    from ZODB.FileStorage import FileStorage
    writer = _PausedWriter(seeded, 'voted:%s' % NAMES[-1])
    try:
        children = [(name, prefix,
                     FileStorage(str(seeded / (name + '.fs')),
                                 read_only=True))
                    for name, prefix in PARTS]
        # what the composite must not repeat
        assert children[0][2].lastTransaction() > writer.before
        reader = CompositeStorage(children, read_only=True)
        writer.finish()
        try:
            assert writer.db.storage.lastTransaction() > writer.before
            assert reader.lastTransaction() == writer.before
            assert _counters_seen(reader) == {2}
        finally:
            reader.close()
    finally:
        writer.close()


# --- every kind of transaction is taken back whole ------------------------------

def _two_partitions(tmp_path):
    blobs = str(tmp_path / 'blobs')
    return CompositeStorage([
        ('main', 0, FileStorage(str(tmp_path / 'main.fs'), blob_dir=blobs)),
        ('b', 1, FileStorage(str(tmp_path / 'b.fs'), blob_dir=blobs))])


@pytest.mark.parametrize('after', [False, True])
@pytest.mark.parametrize('kind', ['store', 'blob', 'undo', 'delete',
                                  'restore'])
def test_every_kind_of_transaction_is_taken_back(tmp_path, kind, after):
    """b fails in tpc_finish (before or after really finishing) while main
    has finished: the transaction leaves no trace in either."""
    from ZODB.blob import Blob
    from ZODB.Connection import TransactionMetaData
    from ZODB.utils import p64
    from ZODB.utils import u64
    from compositestorage import placement
    from persistent.mapping import PersistentMapping
    storage = _two_partitions(tmp_path)
    db = ZODB.DB(storage)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        root = conn.root()
        with placement(conn, 'b'):
            y = PersistentMapping(v=1)
            conn.add(y)
        root['x'] = x = PersistentMapping(v=1, y=y)
        tm.get().note('first')
        tm.commit()
        first = storage.lastTransaction()
        blobs_before = blob_paths(tmp_path / 'blobs')
        x_oid, y_oid = x._p_oid, y._p_oid
        part_b = storage.partition_named('b')
        part_b.storage = RaisingInFinish(part_b.storage, after, times=1)
        calls = []

        def attempt():
            if kind == 'store':
                x['v'] += 1
                y['v'] += 1
                tm.commit()
            elif kind == 'blob':
                for obj in (x, y):
                    obj['blob'] = blob = Blob()
                    with blob.open('w') as f:
                        f.write(b'data of %r' % obj._p_oid)
                tm.commit()
            elif kind == 'undo':
                db.undo(db.undoLog(0, 1)[0]['id'], tm.get())
                tm.commit()
            else:
                txn = TransactionMetaData()
                if kind == 'delete':
                    storage.tpc_begin(txn)
                    for oid in (x_oid, y_oid):
                        storage.deleteObject(oid, storage.getTid(oid), txn)
                else:
                    calls.append(kind)
                    tid = p64(u64(first) + len(calls))
                    storage.tpc_begin(txn, tid)
                    for oid in (x_oid, y_oid):
                        storage.restore(oid, tid, storage.load(oid)[0], '',
                                        None, txn)
                storage.tpc_vote(txn)
                try:
                    storage.tpc_finish(txn)
                except BaseException:
                    storage.tpc_abort(txn)
                    raise

        with pytest.raises(OSError, match='injected'):
            attempt()
        tm.abort()
        assert storage.lastTransaction() == first
        for part in storage.partitions:
            assert max(t.tid for t in part.base.iterator()) == first
        assert blob_paths(tmp_path / 'blobs') == blobs_before
        assert storage.load(x_oid)[1] == storage.load(y_oid)[1] == first
        assert storage.journal.read() is None
        # the fault was one-off: the same transaction now commits whole
        tm.begin()
        attempt()
        assert storage.lastTransaction() > first
        for part in storage.partitions:
            assert max(t.tid for t in part.base.iterator()) == \
                storage.lastTransaction()
    finally:
        db.close()


def _generic_child_composite(tmp_path, after):
    """``open_storage(wrap)``: main (FileStorage) and b, which, wrapped,
    is a child type the composite cannot cut back, raising in
    ``tpc_finish`` (``after`` it really finished, or before); and a
    database with x in main and y in b, both ``v=1``."""
    from persistent.mapping import PersistentMapping
    from compositestorage import placement

    def open_storage(wrap):
        main = FileStorage(str(tmp_path / 'main.fs'))
        b = FileStorage(str(tmp_path / 'b.fs'))
        if wrap:
            b = RaisingInFinish(b, after=after)
        return CompositeStorage([('main', 0, main), ('b', 1, b)])

    db = ZODB.DB(open_storage(False))
    with db.transaction() as conn:
        with placement(conn, 'b'):
            conn.root()['y'] = y = PersistentMapping(v=1)
            conn.add(y)
        conn.root()['x'] = PersistentMapping(v=1)
    db.close()
    return open_storage


def test_a_child_that_cannot_roll_back_finishes_last(tmp_path, caplog):
    """A child the composite cannot cut back finishes after every other
    participant: when it raises after really finishing, the transaction
    is whole, and it stands."""
    open_storage = _generic_child_composite(tmp_path, after=True)
    storage = open_storage(True)
    assert not storage.partitions[1].child.rolls_back
    db = ZODB.DB(storage)
    try:
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        root['x']['v'] = root['y']['v'] = 2
        tm.commit()
        assert 'holds it, as every other partition does' in caplog.text
        tid = storage.lastTransaction()
        assert [p.name for p in storage.partitions
                if has_transaction(p, tid)] == ['main', 'b']
    finally:
        db.close()
    storage = open_storage(False)
    try:
        assert storage.recovered is None
        db = ZODB.DB(storage)
        root = db.open().root()
        assert (root['x']['v'], root['y']['v']) == (2, 2)
        db.close()
    finally:
        storage.close()


def test_a_transaction_that_cannot_be_taken_back_refuses_writes(
        tmp_path, monkeypatch):
    """The last child raises before it finished, and main, which did
    finish, cannot be cut back (an injected fault): writes are refused,
    saying why, until a reopen recovers from the journal."""
    from compositestorage.errors import WritesRefusedError
    open_storage = _generic_child_composite(tmp_path, after=False)
    storage = open_storage(True)
    main = storage.partitions[0].child

    def roll_back(tid, name):
        raise OSError('injected failure in roll_back')
    monkeypatch.setattr(main, 'roll_back', roll_back)
    db = ZODB.DB(storage)
    try:
        before = storage.lastTransaction()
        tm = transaction.TransactionManager()
        root = db.open(tm).root()
        root['x']['v'] = root['y']['v'] = 2
        with pytest.raises(OSError, match='injected failure in tpc_finish'):
            tm.commit()
        tm.abort()
        assert storage.lastTransaction() == before
        tm.begin()
        root['x']['v'] = 3
        with pytest.raises(WritesRefusedError) as exc:
            tm.commit()
        tm.abort()
        assert "partition(s) main" in str(exc.value)
        assert 'reopen' in str(exc.value)
    finally:
        db.close()
    storage = open_storage(False)
    try:
        # b never finished; the reopen takes back main
        assert storage.recovered.action == 'rolled back'
        assert storage.recovered.rolled_back == ['main']
        db = ZODB.DB(storage)
        root = db.open().root()
        assert (root['x']['v'], root['y']['v']) == (1, 1)
        db.close()
    finally:
        storage.close()
