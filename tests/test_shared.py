"""A shared composite (IMVCCStorage) within one process: instances,
snapshots, polls, the locks and the journal in the primary's database.

Processes are in tests/test_shared_processes.py; these tests use several
instances (each with sessions of its own, as another process has) where a
step must be placed exactly between two others.
"""
import threading
import time

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping as PM
from ZODB.interfaces import IMVCCStorage
from ZODB.POSException import Unsupported

from compositestorage import faults
from compositestorage import placement
from compositestorage.errors import CommitLockTimeout
from compositestorage.errors import ConfigurationError
from compositestorage.errors import RecoveryError
from compositestorage.shared import LOCK_CLASS

from relstorage_engines import child_section
from relstorage_engines import composite_config
from relstorage_engines import databases
from relstorage_engines import open_config
from relstorage_engines import require_postgres

NAMES = ('main', 'b', 'c')


@pytest.fixture
def config(tmp_path):
    require_postgres()
    with databases('postgresql', tmp_path, NAMES) as where:
        yield composite_config(tmp_path, [
            (name, prefix, child_section('postgresql', where[name]))
            for prefix, name in enumerate(NAMES)],
            primary_file=False, journal=False)


@pytest.fixture
def storage(config):
    storage = open_config(config)
    yield storage
    storage.close()


def fill(db):
    """A counter in every partition."""
    with db.transaction() as conn:
        for name in NAMES:
            with placement(conn, name):
                conn.root()[name] = PM(v=0)
                conn.add(conn.root()[name])


def move(storage, a, b, tm=None):
    """One transaction through a new connection: a unit from ``a`` to
    ``b``."""
    db = ZODB.DB(storage) if not hasattr(storage, 'open') else storage
    tm = tm or transaction.TransactionManager()
    conn = db.open(tm)
    root = conn.root()
    root[a]['v'] -= 1
    root[b]['v'] += 1
    tm.commit()
    conn.close()


def counters(instance):
    """The counters as ``instance`` sees them now (its own snapshot)."""
    db = ZODB.DB(instance)
    try:
        with db.transaction() as conn:
            return {name: conn.root()[name]['v'] for name in NAMES}
    finally:
        db.close()


def test_a_composite_of_postgresql_children_is_shared(storage):
    assert IMVCCStorage.providedBy(storage)
    instance = storage.new_instance()
    try:
        assert IMVCCStorage.providedBy(instance)
        assert instance.new_instance() is not None
        # every child of an instance is a RelStorage instance of its own
        for mine, root in zip(instance.partitions, storage.partitions):
            assert mine.storage is not root.storage
            assert mine.base is not root.base
            assert mine.root is root
    finally:
        instance.release()


def test_a_composite_of_file_storages_is_not(tmp_path):
    from ZODB.FileStorage import FileStorage
    from compositestorage import CompositeStorage
    storage = CompositeStorage([
        ('main', 0, FileStorage(str(tmp_path / 'main.fs'))),
        ('b', 1, FileStorage(str(tmp_path / 'b.fs')))])
    try:
        assert not IMVCCStorage.providedBy(storage)
        with pytest.raises(Unsupported, match='MVCCAdapter'):
            storage.new_instance()
    finally:
        storage.close()


def test_shared_false_keeps_one_process(config, tmp_path):
    text = config.replace('placement default\n', 'placement default\n'
                          'shared false\njournal %s\n'
                          % (tmp_path / 'c.journal'))
    storage = open_config(text)
    try:
        assert not IMVCCStorage.providedBy(storage)
        assert storage.journal.path == str(tmp_path / 'c.journal')
    finally:
        storage.close()


def test_shared_true_refuses_a_file_storage_child(tmp_path, config):
    text = config.replace('placement default\n', 'placement default\n'
                          'shared true\n')
    text = text.replace(
        text[text.index('<partition c>'):text.index('</partition>',
                                                     text.index(
                                                         '<partition c>'))],
        '<partition c>\n prefix 2\n <filestorage>\n  path %s\n'
        ' </filestorage>\n' % (tmp_path / 'c.fs'))
    with pytest.raises(ConfigurationError) as exc:
        open_config(text)
    message = str(exc.value)
    assert "partition 'c'" in message and 'shared false' in message
    assert 'RelStorage on PostgreSQL' in message


def test_shared_true_refuses_a_journal_file(tmp_path, config):
    text = config.replace('placement default\n', 'placement default\n'
                          'shared true\njournal %s\n'
                          % (tmp_path / 'c.journal'))
    with pytest.raises(ConfigurationError, match='remove the journal key'):
        open_config(text)


def test_a_snapshot_holds_until_the_next_poll(storage):
    db = ZODB.DB(storage)
    fill(db)
    reader = storage.new_instance()
    try:
        reader.poll_invalidations()
        before = {name: reader.load(db.open().root()[name]._p_oid)[1]
                  for name in NAMES}
        move(db, 'b', 'c')
        # the reader's snapshot has not moved
        after = {name: reader.load(db.open().root()[name]._p_oid)[1]
                 for name in NAMES}
        assert after == before
        changed = reader.poll_invalidations()
        conn = db.open()
        b_oid = conn.root()['b']._p_oid
        c_oid = conn.root()['c']._p_oid
        # only the objects of the partitions: no stub, no map
        assert set(changed) == {b_oid, c_oid}
        assert reader.load(b_oid)[1] > before['b']
    finally:
        reader.release()
        db.close()


def waiting_for_finish_lock(storage):
    """How many sessions wait for the finish lock (PostgreSQL's view)."""
    rows = storage._shared._run(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND "
        "NOT granted AND classid = %d AND objid = 2" % LOCK_CLASS,
        fetch=True)
    return rows[0][0]


def wait_until(condition, seconds=30):
    for _ in range(int(seconds * 20)):
        if condition():
            return True
        time.sleep(0.05)
    return False


def oids(db):
    conn = db.open()
    try:
        return {name: conn.root()[name]._p_oid for name in NAMES}
    finally:
        conn.close()


def test_a_poll_waits_for_a_finish_and_sees_all_of_it(config, storage):
    """A poll taken while a commit (in another composite, as another
    process) is between the finishes of two children waits for it, and
    then sees the transaction in both partitions."""
    db = ZODB.DB(storage)
    fill(db)
    where = oids(db)
    reader = storage.new_instance()
    reader.poll_invalidations()
    before = reader.lastTransaction()
    other = open_config(config)
    other_db = ZODB.DB(other)
    between = threading.Event()
    go_on = threading.Event()
    polled = []

    def hook(name):
        if name == 'finished:b' and threading.current_thread() is writer:
            between.set()
            assert go_on.wait(60)

    faults.hook = hook
    try:
        writer = threading.Thread(target=move, args=(other_db, 'b', 'c'))
        writer.start()
        assert between.wait(30)
        poller = threading.Thread(
            target=lambda: polled.append(reader.poll_invalidations()))
        poller.start()
        # the poll waits for the finish lock, as PostgreSQL shows
        assert wait_until(lambda: waiting_for_finish_lock(storage) == 1)
        assert not polled
        go_on.set()
        writer.join(60)
        poller.join(60)
    finally:
        faults.hook = None
        go_on.set()
    try:
        assert polled and set(polled[0]) == {where['b'], where['c']}
        b, c = reader.load(where['b']), reader.load(where['c'])
        assert b[1] == c[1] == reader.lastTransaction()
        assert b[1] > before
    finally:
        reader.release()
        other_db.close()
        db.close()


class Died(BaseException):
    """What a process that dies leaves: nothing of the rest runs."""


def test_a_writer_that_died_between_two_finishes_is_recovered_by_a_poll(
        config, storage):
    db = ZODB.DB(storage)
    fill(db)
    where = oids(db)
    reader = storage.new_instance()
    reader.poll_invalidations()
    before = {name: reader.load(where[name]) for name in NAMES}
    die_between_finishes(config, where)
    intent = storage.journal.read()
    assert intent is not None and intent.prefixes == (1, 2)
    try:
        changed = reader.poll_invalidations()
        # recovered by the poll, before its snapshot: b was taken back
        assert storage.journal.read() is None
        assert {name: reader.load(where[name]) for name in NAMES} == before
        assert not set(changed or ()) & {where['b'], where['c']}
        assert counters(storage.new_instance()) == {
            'main': 0, 'b': 0, 'c': 0}
        # the next commit goes through, above the tid taken back
        move(db, 'b', 'c')
        assert counters(storage.new_instance()) == {
            'main': 0, 'b': -1, 'c': 1}
    finally:
        reader.release()
        db.close()


def test_a_commit_waits_for_the_commit_lock_no_longer_than_the_timeout(
        config, storage):
    other = open_config(config)
    other._shared.timeout = 0.5
    mine = storage.new_instance()
    txn = transaction.Transaction()
    mine.tpc_begin(txn)
    try:
        other_txn = transaction.Transaction()
        with pytest.raises(CommitLockTimeout) as exc:
            other.tpc_begin(other_txn)
        assert 'another process holds it' in str(exc.value)
        assert 'commit-lock-timeout' in str(exc.value)
    finally:
        mine.tpc_abort(txn)
        mine.release()
    # once let go of, the other commits
    other_txn = transaction.Transaction()
    other.tpc_begin(other_txn)
    other.tpc_vote(other_txn)
    other.tpc_finish(other_txn)
    other.close()


def test_oids_of_two_composites_never_meet(config, storage):
    other = open_config(config)
    try:
        mine = [storage.new_oid_in('b') for _ in range(100)]
        theirs = [other.new_oid_in('b') for _ in range(100)]
        mine += [storage.new_oid_in('b') for _ in range(100)]
        assert not set(mine) & set(theirs)
        assert all(oid[0] == 1 for oid in mine + theirs)
    finally:
        other.close()


def test_a_transaction_id_is_above_every_process_s(config, storage):
    from ZODB.Connection import TransactionMetaData
    db = ZODB.DB(storage)
    fill(db)
    mine = storage.new_instance()
    other = open_config(config)
    other_db = ZODB.DB(other)
    try:
        move(other_db, 'b', 'c')
        # the root of the other brings its view up to date when asked
        last = other.lastTransaction()
        # this instance has not polled since: its snapshot is older
        assert mine.lastTransaction() < last
        txn = TransactionMetaData()
        mine.tpc_begin(txn)
        mine.tpc_vote(txn)
        tid = mine.tpc_finish(txn)
        assert tid > last
    finally:
        mine.release()
        other_db.close()
        db.close()


def test_conflicts_between_processes_are_resolved(config, storage):
    """Two composites (as two processes) add to one resolvable counter in
    partition b at once: RelStorage's resolution in the child merges
    them, and nothing is lost."""
    from BTrees.Length import Length
    db = ZODB.DB(storage)
    with db.transaction() as conn:
        with placement(conn, 'b'):
            conn.root()['n'] = Length()
            conn.add(conn.root()['n'])
    other_db = ZODB.DB(open_config(config))
    try:
        tm1, tm2 = transaction.TransactionManager(), \
            transaction.TransactionManager()
        one, two = db.open(tm1), other_db.open(tm2)
        one.root()['n'].change(3)
        two.root()['n'].change(4)
        tm1.commit()
        tm2.commit()        # a conflict, resolved
        tm1.begin()
        assert one.root()['n']() == 7
        assert one.root()['n']._p_oid[0] == 1
    finally:
        other_db.close()
        db.close()


def test_a_conflict_between_processes_is_raised_and_nothing_is_lost(
        config, storage):
    from ZODB.POSException import ConflictError
    db = ZODB.DB(storage)
    fill(db)
    other_db = ZODB.DB(open_config(config))
    try:
        tm1, tm2 = transaction.TransactionManager(), \
            transaction.TransactionManager()
        one, two = db.open(tm1), other_db.open(tm2)
        one.root()['b']['v'] += 1
        one.root()['c']['v'] -= 1
        two.root()['b']['v'] += 10
        two.root()['main']['v'] -= 10
        tm1.commit()
        with pytest.raises(ConflictError) as exc:
            tm2.commit()
        assert exc.value.oid == one.root()['b']._p_oid
        tm2.abort()
        # retried on a new snapshot, as an application does
        two.root()['b']['v'] += 10
        two.root()['main']['v'] -= 10
        tm2.commit()
        tm1.begin()
        assert {k: one.root()[k]['v'] for k in NAMES} == {
            'main': -10, 'b': 11, 'c': -1}
    finally:
        other_db.close()
        db.close()


def test_a_zeo_server_is_refused(storage):
    from ZEO.interfaces import IServeable
    from ZEO.StorageServer import StorageServerDB
    assert not IServeable.providedBy(storage)
    with pytest.raises(ConfigurationError, match='shared false'):
        storage.registerDB(StorageServerDB(None, '1'))


def die_between_finishes(config, where, names=('b', 'c'),
                         point='finished:b'):
    """A writer of another composite dies at ``point`` (between the
    finishes of b and c), in a transaction over ``names``, its sessions
    ending with it; returns the order the participants finished in."""
    from ZODB.Connection import TransactionMetaData
    dead = open_config(config).new_instance()
    order = []

    def hook(name):
        if name.startswith('finished:'):
            order.append(name.split(':')[1])
        if name == point:
            raise Died()

    txn = TransactionMetaData()
    dead.tpc_begin(txn)
    for name in names:
        data, serial = dead.load(where[name])
        dead.store(where[name], serial, data, '', txn)
    dead.tpc_vote(txn)
    faults.hook = hook
    try:
        with pytest.raises(Died):
            dead.tpc_finish(txn)
    finally:
        faults.hook = None
    dead._root.close()
    return order


def test_a_read_only_composite_waits_for_a_writer_to_recover(
        config, storage):
    """A read-only composite cannot recover what a dead writer left, and
    must not take a snapshot past it (RelStorage would cache what
    recovery takes back): its poll waits for a writer, then sees the
    state after, or says what to do."""
    db = ZODB.DB(storage)
    fill(db)
    where = oids(db)
    reader = storage.new_instance()
    before = {name: reader.load(where[name]) for name in NAMES}
    reader.release()
    read_only = open_config(config.replace(
        'placement default\n', 'placement default\nread-only true\n'))
    read_only._shared.timeout = 0.5
    try:
        assert IMVCCStorage.providedBy(read_only)
        die_between_finishes(config, where)
        intent = storage.journal.read()
        assert intent is not None
        with pytest.raises(RecoveryError) as exc:
            read_only.new_instance()
        message = str(exc.value)
        assert intent.tid.hex() in message and 'b, c' in message
        assert 'open the composite for writing' in message
        assert storage.journal.read() == intent     # not recovered by it
        # a writer recovers it meanwhile: the poll goes on, past it
        read_only._shared.timeout = 30
        recovering = threading.Timer(0.3, storage.poll_invalidations)
        recovering.start()
        mine = read_only.new_instance()
        recovering.join()
        assert storage.journal.read() is None
        assert {name: mine.load(where[name]) for name in NAMES} == before
        mine.release()
        move(db, 'b', 'c')
        mine = read_only.new_instance()
        assert mine.load(where['b'])[1] == mine.load(where['c'])[1] \
            > before['b'][1]
        mine.release()
    finally:
        read_only.close()
        db.close()


def test_the_recover_command_on_a_shared_composite(config, storage, tmp_path,
                                                   capsys):
    """``recover --dry-run`` reads a dead writer's intent from the
    primary's database without waiting for a writer; ``recover`` takes
    the transaction back; ``info`` names where the journal is."""
    from compositestorage.cli import main as cli_main
    db = ZODB.DB(storage)
    fill(db)
    where = oids(db)
    db.close()
    path = tmp_path / 'shared.conf'
    path.write_text(config)
    die_between_finishes(config, where)

    def run(*args):
        capsys.readouterr()
        code = cli_main([str(a) for a in args])
        return code, capsys.readouterr().out

    code, out = run('recover', '--dry-run', path)
    assert code == 0
    assert 'table compositestorage_state' in out
    assert 'over b, c: to be rolled back in b' in out, out
    assert 'dry run' in out
    code, out = run('recover', path)
    assert code == 0 and 'over b, c: rolled back in b' in out, out
    code, out = run('recover', path)
    assert code == 0 and 'nothing to recover' in out
    code, out = run('verify', '--strict', '-q', path)
    assert (code, out.splitlines()[-1]) == (0, 'ok'), out


def test_children_in_one_cluster_commit_with_one_flush(storage):
    """Every test database is on one server: one write-ahead log."""
    from compositestorage.mvcc import one_cluster
    assert storage._shared.same_cluster
    instance = storage.new_instance()
    try:
        assert instance._shared.same_cluster
    finally:
        instance.release()

    class Child:
        def __init__(self, cluster):
            self.cluster = cluster

        def cluster_id(self):
            return self.cluster

    class Part:
        def __init__(self, cluster):
            self.child = Child(cluster)
    assert one_cluster([Part(7), Part(7)])
    assert not one_cluster([Part(7), Part(8)])
    assert not one_cluster([Part(7), Part(None)])


def test_a_history_free_child_finishes_last_and_is_recovered(tmp_path):
    """A shared composite with a history-free partition b: it finishes
    after the others, so a writer that dies before it leaves a
    transaction that the next poll of another composite takes back from
    the rest; one that dies after it, one that is complete."""
    require_postgres()
    with databases('postgresql', tmp_path, NAMES) as where:
        config = composite_config(tmp_path, [
            (name, prefix, child_section('postgresql', where[name],
                                         keep_history=(name != 'b')))
            for prefix, name in enumerate(NAMES)],
            primary_file=False, journal=False)
        storage = open_config(config)
        db = ZODB.DB(storage)
        try:
            assert IMVCCStorage.providedBy(storage)
            assert not storage.partitions[1].child.rolls_back
            fill(db)
            at = oids(db)
            reader = storage.new_instance()
            before = {name: reader.load(at[name]) for name in NAMES}
            for point, whole in (('finished:main', False),
                                 ('finished:b', True)):
                order = die_between_finishes(config, at, ('main', 'b'),
                                             point)
                assert order == ['main'] if not whole else ['main', 'b']
                assert storage.journal.read() is not None
                changed = reader.poll_invalidations()
                assert storage.journal.read() is None
                now = {name: reader.load(at[name]) for name in NAMES}
                if whole:
                    assert now['main'][1] == now['b'][1] > before['b'][1]
                    assert set(changed) == {at['main'], at['b']}
                else:
                    assert now == before
                    assert not set(changed or ())
        finally:
            reader.release()
            db.close()
