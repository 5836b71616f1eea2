"""History-free RelStorage children in transactions that span partitions.

Such a child overwrites rows in place, so a finished transaction cannot be
taken back from it.  The composite finishes it after every other
participant (which can still be taken back until it has finished), and
refuses a transaction that writes to two such children.  A crash is a
``BaseException`` raised at a named point of the protocol, after which
the storage is dropped without another write (the journal keeps its
intent), then reopened as after a ``kill -9``.
"""
import persistent.mapping
import pytest
import transaction
import ZODB

from compositestorage import faults
from compositestorage import placement
from compositestorage.errors import NotAtomicError
from compositestorage.recovery import has_transaction
from compositestorage.verify import verify

from relstorage_engines import child_section
from relstorage_engines import composite_config
from relstorage_engines import databases
from relstorage_engines import open_config

ENGINES = ['sqlite', 'postgresql']


class Crash(BaseException):
    """Stands for the process dying at a point of the protocol."""


def PM(**kw):
    return persistent.mapping.PersistentMapping(**kw)


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


@pytest.fixture
def hf_config(engine, tmp_path):
    """A FileStorage primary, history-free ``hf1`` (1), history-free
    ``hf2`` (2), and history-preserving ``hp`` (3), all of ``engine``."""
    with databases(engine, tmp_path, ['hf1', 'hf2', 'hp']) as where:
        yield composite_config(tmp_path, [
            ('hf1', 1, child_section(engine, where['hf1'], False)),
            ('hf2', 2, child_section(engine, where['hf2'], False)),
            ('hp', 3, child_section(engine, where['hp'], True))])


def fill(storage):
    """x in main, a in hf1, b in hf2, c in hp, each ``v=0``."""
    db = ZODB.DB(storage)
    with db.transaction() as conn:
        conn.root()['x'] = PM(v=0)
    # one history-free child a transaction
    for key, name in (('a', 'hf1'), ('b', 'hf2'), ('c', 'hp')):
        with db.transaction() as conn:
            with placement(conn, name):
                conn.root()[key] = PM(v=0)
                conn.add(conn.root()[key])
    return db


def values(storage):
    db = ZODB.DB(storage)
    try:
        root = db.open().root()
        return {k: root[k]['v'] for k in ('x', 'a', 'b', 'c')}
    finally:
        db.close()


def test_a_fresh_composite_of_history_free_children_commits(engine, tmp_path):
    """Its first transaction writes the partition map of every child:
    internal records, which never make a transaction non-atomic."""
    with databases(engine, tmp_path, ['m', 'hf1', 'hf2']) as where:
        text = composite_config(tmp_path, [
            (name, prefix, child_section(engine, where[name], False))
            for name, prefix in (('m', 0), ('hf1', 1), ('hf2', 2))],
            primary_file=False)
        storage = open_config(text)
        db = ZODB.DB(storage)
        with db.transaction() as conn:
            conn.root()['v'] = 1
        assert all(p.count_stubs() == 1 for p in storage.partitions[1:])
        with pytest.raises(NotAtomicError, match="'m', 'hf1'"):
            with db.transaction() as conn:
                with placement(conn, 'hf1'):
                    conn.root()['a'] = PM(v=1)
                    conn.add(conn.root()['a'])
        db.close()
        storage = open_config(text)
        root = ZODB.DB(storage).open().root()
        assert dict(root) == {'v': 1}
        storage.close()


def test_two_history_free_children_in_one_transaction_are_refused(
        hf_config, engine):
    storage = open_config(hf_config)
    db = fill(storage)
    before = {p.name: p.child.last_finished() for p in storage.partitions}
    tm = transaction.TransactionManager()
    root = db.open(tm).root()
    root['a']['v'] = root['b']['v'] = 1
    with pytest.raises(NotAtomicError) as exc:
        tm.commit()
    tm.abort()
    message = str(exc.value)
    assert "'hf1', 'hf2'" in message and 'keep-history true' in message
    assert 'history-free RelStorage on %s' % engine in message
    assert 'Nothing was committed' in message
    assert before == {p.name: p.child.last_finished()
                      for p in storage.partitions}
    # each alone, and each with the others, still commits
    root['a']['v'] = root['x']['v'] = root['c']['v'] = 2
    tm.commit()
    root['b']['v'] = root['x']['v'] = 3
    tm.commit()
    db.close()
    assert values(open_config(hf_config)) == {'x': 3, 'a': 2, 'b': 3,
                                              'c': 2}


@pytest.mark.parametrize('point, whole', [
    ('intent-written', False),
    ('finished:main', False),
    ('finished:hp', False),
    ('finished:hf1', True),
])
def test_a_crash_around_the_history_free_finish(hf_config, point, whole):
    """main and hp finish first and are taken back if the process dies
    before hf1 has finished; once hf1 has, the transaction stands."""
    storage = open_config(hf_config)
    db = fill(storage)
    conn = db.open()
    root = conn.root()
    # hf1 is changed (and begun) first: it still finishes last
    root['a']['v'] = 1
    conn.add(root['a'])
    root['c']['v'] = root['x']['v'] = 1
    order, states = [], []

    def hook(name):
        states.append(storage._coordinator.state)
        if name.startswith('finished:'):
            order.append(name.split(':')[1])
        if name == point:
            raise Crash(name)
    faults.hook = hook
    try:
        with pytest.raises(Crash):
            transaction.commit()
    finally:
        faults.hook = None
    state = states[-1]
    tid = state.tid
    transaction.abort()
    # hf1 finishes last, whatever the order of the others
    assert 'hf1' not in order[:-1] and len(set(order)) == len(order)
    assert order == [] if point == 'intent-written' else \
        order[-1] == point.split(':')[1]
    assert (sorted(order) == ['hf1', 'hp', 'main']) is whole
    # The process is gone: the database servers roll back what the
    # children had not committed, and nothing more is written.  (Closing
    # a RelStorage on SQLite would commit it instead.)
    for p in storage.partitions:
        if p.prefix in state.begun and p.name not in order:
            p.storage.tpc_abort(state.child_txn[p.prefix])
        p.storage.close()
    storage.journal.close()
    storage._release_writer_lock()
    storage = open_config(hf_config)
    try:
        outcome = storage.recovered
        assert outcome is not None
        if whole:
            assert outcome.action == 'complete'
            expected = {'x': 1, 'a': 1, 'b': 0, 'c': 1}
        else:
            # RelStorage on SQLite commits a transaction's row when it
            # begins: recovery takes that row back as well
            assert set(order) <= set(outcome.rolled_back) <= {'main', 'hp'}
            expected = {'x': 0, 'a': 0, 'b': 0, 'c': 0}
        assert verify(storage)[0] == []
        held = [p.name for p in storage.partitions
                if has_transaction(p, tid)]
        assert held == (['main', 'hf1', 'hp'] if whole else [])
        assert values(storage) == expected
    finally:
        storage.close()


def test_an_aborted_transaction_leaves_no_row(hf_config):
    """A conflict aborts a transaction over main and hp: no child keeps a
    trace of it, although RelStorage on SQLite commits the row that
    restore mode writes at ``tpc_begin`` at once."""
    from ZODB.POSException import ConflictError
    storage = open_config(hf_config)
    db = fill(storage)
    hp = storage.partitions[3]
    before = {p.name: p.child.last_finished() for p in storage.partitions}
    transactions = len(list(storage.iterator()))
    tm1, tm2 = transaction.TransactionManager(), transaction.TransactionManager()
    r1, r2 = db.open(tm1).root(), db.open(tm2).root()
    r1['c']['v'] = 1
    r1['x']['v'] = 1
    r2['c']['v'] = 2
    tm2.commit()
    with pytest.raises(ConflictError):
        tm1.commit()
    tm1.abort()
    last = storage.lastTransaction()
    assert hp.child.last_finished() == last
    assert {p.name: p.child.last_finished() for p in storage.partitions
            if p.name != 'hp'} == {k: v for k, v in before.items()
                                   if k != 'hp'}
    assert len(list(storage.iterator())) == transactions + 1
    db.close()
