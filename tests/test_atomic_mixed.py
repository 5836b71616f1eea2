"""Crash atomicity with transactions over one, two and three partitions,
mixed (DESIGN.md, invariant 6), and what the crash tests that only ever
touched every partition could not see:

* an intent left in the journal by a lost clear, beside later, acknowledged
  one-partition commits (a power loss after an ordinary sequence);
* a child whose damaged tail lost its part of a transaction;
* readers other than ``load`` while a commit finishes.

The writer (``crash_writer.py`` with ``MIX`` or ``PLAN``) records in each
counter it changes the partitions its transaction touched, so the check
below reads, from each child alone, which partitions must hold each
transaction, independently of what the composite records about it.
"""
import os
import random
import signal
import threading
import time

import pytest
import transaction
import ZODB
from ZODB.FileStorage import FileStorage

from compositestorage import CompositeStorage
from compositestorage import faults
from compositestorage.errors import RecoveryError
from compositestorage.journal import Intent
from compositestorage.journal import Journal
from compositestorage.recovery import participants_in
import atomic_checks
from atomic_checks import Layout
from crash_writer import PARTS
from crash_writer import open_composite
from test_atomic import _durable_state
from test_atomic import _power_loss
from test_atomic import run_writer_lines

NAMES = [name for name, _ in PARTS]


def child_history(directory, name):
    """``(tids, changes)`` of one child read alone: every tid, and for each
    transaction that changed its counter, the partitions it touched."""
    storage = Layout.files(directory).alone[name]()
    try:
        return atomic_checks.child_history(storage, name)[:2]
    finally:
        storage.close()


def check_mixed(directory, acknowledged):
    """Reopen (and so recover), then check that every transaction is in
    all the partitions it touched or in none, and nothing acknowledged is
    lost (see ``atomic_checks.check_mixed``)."""
    return atomic_checks.check_mixed(Layout.files(directory), acknowledged)


@pytest.fixture
def seeded(tmp_path):
    code, acked = run_writer_lines(tmp_path, 1)
    assert code == 0 and len(acked) == 1
    return tmp_path


def test_the_writer_mixes_one_two_and_three_partitions(seeded):
    """The mix is real: all three sizes occur, and the check holds."""
    code, acked = run_writer_lines(seeded, 60, {'MIX': '1'})
    assert code == 0
    assert {len(names) for _, _, names in acked} == {1, 2, 3}
    assert check_mixed(seeded, acked) is None


def test_random_kills_with_mixed_transactions(seeded):
    rng = random.Random(int(os.environ.get('CRASH_SEED', '8765')))
    acked_all = []
    deadline = time.time() + 150
    kills = 0
    while kills < 40 and time.time() < deadline:
        code, acked = run_writer_lines(
            seeded, 10 ** 6, {'MIX': str(kills)},
            kill_after=rng.uniform(0.0, 0.25))
        assert code == -signal.SIGKILL
        kills += 1
        acked_all.extend(acked)
        check_mixed(seeded, acked_all)
    assert kills >= 10
    assert {len(names) for _, _, names in acked_all} == {1, 2, 3}


def test_lost_unsynced_writes_with_mixed_transactions(seeded):
    """Power losses (every file back to its last fsync) at protocol points
    and at random instants, with mixed transactions."""
    log_path = str(seeded / 'fsync.log')
    rng = random.Random(4242)
    acked_all = []
    crash_points = ['intent-written:3', 'finished:main:2', 'finished:b:2',
                    'journal-cleared:2', 'journal-cleared:4']
    for i in range(14):
        baseline = _durable_state(seeded)
        env = {'FSYNC_LOG': log_path, 'MIX': str(100 + i)}
        if i < len(crash_points):
            env['CRASH_AT'] = crash_points[i]
            code, acked = run_writer_lines(seeded, 10 ** 6, env)
        else:
            code, acked = run_writer_lines(seeded, 10 ** 6, env,
                                           kill_after=rng.uniform(0.05, 0.3))
        assert code == -signal.SIGKILL
        _power_loss(seeded, log_path, baseline)
        acked_all.extend(acked)
        check_mixed(seeded, acked_all)


# --- case 1: a stale intent beside later one-partition commits -------------------

def test_power_loss_after_a_cross_partition_then_a_one_partition_commit(
        seeded):
    """T1 over main and b, then T2 in b only, both acknowledged, then a
    power loss.  FileStorage children record each transaction's span, so
    T1's intent was never synced and the power loss leaves none.  Where
    the first participant keeps no span, the intent is synced and its
    clear is not: the same power loss leaves T1's intent beside b's later
    T2, written here as such a composite would have left it.  Recovery
    keeps both either way."""
    log_path = str(seeded / 'fsync.log')
    baseline = _durable_state(seeded)
    code, acked = run_writer_lines(
        seeded, 3, {'FSYNC_LOG': log_path, 'PLAN': 'main,b;b;b'})
    assert code == 0 and [n for _, _, n in acked] == [
        ('main', 'b'), ('b',), ('b',)]
    _power_loss(seeded, log_path, baseline)
    t1 = acked[0][0]
    journal = Journal(str(seeded / 'main.fs.journal'))
    assert journal.read() is None           # never synced
    journal.write_intent(Intent(t1, (0, 1)))
    journal.close()
    assert journal.read() == Intent(t1, (0, 1))
    # a read-only composite sees T1 and everything after it
    reader = CompositeStorage(
        [(name, prefix, FileStorage(str(seeded / (name + '.fs')),
                                    read_only=True))
         for name, prefix in PARTS], read_only=True)
    try:
        assert reader.lastTransaction() == acked[-1][0]
    finally:
        reader.close()
    outcome = check_mixed(seeded, acked)
    assert outcome.action == 'complete'
    assert outcome.present == ['main', 'b']


def test_recover_command_after_the_same_power_loss(seeded, capsys):
    from compositestorage.cli import main as cli_main
    from conftest import config_file
    log_path = str(seeded / 'fsync.log')
    baseline = _durable_state(seeded)
    code, acked = run_writer_lines(
        seeded, 2, {'FSYNC_LOG': log_path, 'PLAN': 'main,b;b'})
    assert code == 0
    _power_loss(seeded, log_path, baseline)
    # the intent a first participant without a span would have synced
    journal = Journal(str(seeded / 'main.fs.journal'))
    journal.write_intent(Intent(acked[0][0], (0, 1)))
    journal.close()
    config = config_file(seeded, {name: str(seeded / (name + '.fs'))
                                  for name in NAMES}, parts=PARTS)
    assert cli_main(['recover', str(config)]) == 0
    assert 'complete' in capsys.readouterr().out
    check_mixed(seeded, acked)


def test_a_crash_between_finishes_with_the_intent_lost(seeded, capsys):
    """A kill after main finished T over main and b, and b did not, then
    a power loss: T's intent was never synced (main's record of T names
    both partitions), so the journal holds nothing.  ``recover --dry-run``
    names T from main's span; the open takes it back from main."""
    from compositestorage.cli import main as cli_main
    from conftest import config_file
    log_path = str(seeded / 'fsync.log')
    baseline = _durable_state(seeded)
    code, acked = run_writer_lines(
        seeded, 3, {'FSYNC_LOG': log_path, 'PLAN': 'main,b',
                    'CRASH_AT': 'finished:main:2'})
    assert code == -signal.SIGKILL and len(acked) == 1
    _power_loss(seeded, log_path, baseline)
    assert Journal(str(seeded / 'main.fs.journal')).read() is None
    config = str(config_file(seeded, {name: str(seeded / (name + '.fs'))
                                      for name in NAMES}, parts=PARTS))
    assert cli_main(['recover', '--dry-run', config]) == 0
    out = capsys.readouterr().out
    assert 'is missing from b, to be taken back from main' in out, out
    assert cli_main(['recover', config]) == 0
    out = capsys.readouterr().out
    assert 'is missing from b, taken back from main' in out, out
    check_mixed(seeded, acked)


# --- case 2: a child that lost its tail --------------------------------------------

def _cut(directory, name, nbytes=10):
    path = str(directory / (name + '.fs'))
    for suffix in ('.index', '.tmp'):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) - nbytes)


def _tids(directory):
    return {name: child_history(directory, name)[0] for name in NAMES}


@pytest.mark.parametrize('damaged', NAMES)
def test_a_damaged_tail_takes_the_transaction_back_everywhere(seeded,
                                                              damaged):
    code, acked = run_writer_lines(seeded, 3)
    assert code == 0
    last = acked[-1][0]
    _cut(seeded, damaged)
    storage = open_composite(str(seeded))
    try:
        assert [p.tid for p in storage.partial] == [last]
        db = ZODB.DB(storage)
        counters = db.open().root()['counters']
        assert {counters[n]['n'] for n in NAMES} == {acked[-2][1]}
        db.close()
    finally:
        storage.close()
    for name, tids in _tids(seeded).items():
        assert last not in tids, name
        assert acked[-2][0] in tids
    check_mixed(seeded, acked[:-1])


def test_a_damaged_tail_under_later_commits_is_refused(seeded, capsys):
    """main loses T (over all three); b committed T2 after it, so T can not
    be taken out of b without T2: the open refuses and says why, and a
    read-only composite shows the state before T."""
    code, acked = run_writer_lines(seeded, 3, {'PLAN': 'main,b,c;main,b,c;b'})
    assert code == 0
    t, t2 = acked[1][0], acked[2][0]
    # cut main's last transaction (T) off
    _cut(seeded, 'main')
    before = {name: open(str(seeded / (name + '.fs')), 'rb').read()
              for name in ('b', 'c')}
    with pytest.raises(RecoveryError) as exc:
        open_composite(str(seeded))
    message = str(exc.value)
    assert t.hex() in message and 'main' in message and "'b'" in message
    assert t2.hex() in message and 'restore' in message
    for name in ('b', 'c'):
        assert open(str(seeded / (name + '.fs')), 'rb').read() == \
            before[name]
    # verify names it
    from compositestorage.cli import main as cli_main
    from conftest import config_file
    config = config_file(seeded, {name: str(seeded / (name + '.fs'))
                                  for name in NAMES}, parts=PARTS)
    assert cli_main(['verify', '--quiet', str(config)]) == 1
    out = capsys.readouterr().out
    assert 'partial-transaction' in out and t.hex() in out
    assert "partition 'main'" in out
    reader = _read_only(seeded)
    try:
        assert acked[0][0] <= reader.lastTransaction() < t
        db = ZODB.DB(reader)
        counters = db.open().root()['counters']
        assert {counters[n]['n'] for n in NAMES} == {2}
        assert [t.tid for t in reader.iterator()][-1] == acked[0][0]
        db.close()
    finally:
        reader.close()


def test_the_span_is_recorded_in_each_child(seeded):
    code, acked = run_writer_lines(seeded, 3,
                                   {'PLAN': 'main,b,c;b,c;main'})
    assert code == 0
    expected = {acked[0][0]: (0, 1, 2), acked[1][0]: (1, 2),
                acked[2][0]: ()}
    for name in NAMES:
        fs = FileStorage(str(seeded / (name + '.fs')), read_only=True)
        try:
            for txn in fs.iterator():
                if txn.tid in expected:
                    assert participants_in(txn.extension_bytes) == \
                        expected[txn.tid]
                    # ZODB reads the extension as it was
                    assert txn.extension == {}
        finally:
            fs.close()
    # and the composite gives back ZODB's extension
    storage = open_composite(str(seeded))
    try:
        for txn in storage.iterator():
            assert txn.extension_bytes == b''
    finally:
        storage.close()


# --- case 3: every reader during the finish window ---------------------------------

def test_every_reader_while_a_commit_finishes(seeded, monkeypatch):
    """Between the finishes of the children, no reader shows the new
    transaction: not getTid, history, loadSerial, iterator,
    record_iternext or undoLog."""
    storage = open_composite(str(seeded))
    db = ZODB.DB(storage)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        counters = conn.root()['counters']
        oids = {name: counters[name]._p_oid for name in NAMES}
        before = storage.lastTransaction()
        seen = {}

        def hook(point):
            if point != 'finished:b':
                return
            tid = storage._coordinator.state.tid
            seen['tid'] = tid
            seen['getTid'] = {n: storage.getTid(o) for n, o in oids.items()}
            seen['history'] = {n: storage.history(o, 5)[0]['tid']
                               for n, o in oids.items()}
            seen['iterator'] = [t.tid for t in storage.iterator()]
            seen['records'] = _record_serials(storage)
            seen['undo'] = [e['id'] for e in storage.undoLog(0, 5)]
            with pytest.raises(Exception):
                storage.loadSerial(oids['main'], tid)
        monkeypatch.setattr(faults, 'hook', hook)
        for name in NAMES:
            counters[name]['n'] += 1
        tm.commit()
        monkeypatch.setattr(faults, 'hook', None)
        tid = seen['tid']
        assert tid > before
        assert set(seen['getTid'].values()) == {before}
        assert set(seen['history'].values()) == {before}
        assert seen['iterator'][-1] == before
        assert max(seen['records'].values()) == before
        assert all(storage.undoLog(0, 1)[0]['id'] != e
                   for e in seen['undo'])
        # afterwards every reader shows it
        assert {storage.getTid(o) for o in oids.values()} == {tid}
        assert [t.tid for t in storage.iterator()][-1] == tid
        assert max(_record_serials(storage).values()) == tid
    finally:
        db.close()


def _record_serials(storage):
    serials, token = {}, None
    while True:
        oid, tid, _, token = storage.record_iternext(token)
        serials[oid] = tid
        if token is None:
            return serials


def test_iterating_while_another_thread_commits(seeded):
    """A thread commits over three partitions while another iterates the
    storage, again and again: every transaction it sees is whole."""
    storage = open_composite(str(seeded))
    db = ZODB.DB(storage)
    stop = threading.Event()
    errors = []

    def commit():
        tm = transaction.TransactionManager()
        counters = db.open(tm).root()['counters']
        try:
            while not stop.is_set():
                for name in NAMES:
                    counters[name]['n'] += 1
                tm.commit()
        except Exception as e:      # pragma: no cover - reported below
            errors.append(e)
    writer = threading.Thread(target=commit)
    writer.start()
    partial, whole = [], 0
    try:
        deadline = time.time() + 8
        while time.time() < deadline:
            for txn in storage.iterator(storage.lastTransaction()):
                records = list(txn)
                if len(records) == 3:
                    whole += 1
                else:
                    partial.append((txn.tid.hex(),
                                    [r.oid.hex() for r in records]))
    finally:
        stop.set()
        writer.join()
        db.close()
    assert not errors, errors
    assert partial == [] and whole > 20, (partial[:5], whole)


def test_a_read_only_composite_beside_a_running_writer(seeded):
    """A read-only composite opened while a writer process commits: its
    iterator ends at its own lastTransaction, and every transaction in it
    is whole."""
    import subprocess
    import sys
    from test_atomic import WRITER
    proc = subprocess.Popen([sys.executable, WRITER, str(seeded), '100000'],
                            stdout=subprocess.PIPE, text=True)
    views = []
    try:
        assert proc.stdout.readline().strip() == 'ready'
        for _ in range(5):
            time.sleep(0.3)
            reader = _read_only(seeded)
            try:
                last = reader.lastTransaction()
                time.sleep(0.2)     # the writer goes on meanwhile
                txns = [(t.tid, len(list(t))) for t in reader.iterator()]
                assert txns[-1][0] <= last
                assert all(n == 3 for _, n in txns[2:]), txns
                views.append((last, [tid for tid, _ in txns]))
            finally:
                reader.close()
    finally:
        proc.kill()
        proc.wait()
    # nothing up to its lastTransaction was missing from what it showed
    final = open_composite(str(seeded))
    try:
        tids = [t.tid for t in final.iterator()]
    finally:
        final.close()
    for last, seen in views:
        assert [tid for tid in tids if tid <= last] == seen


def _read_only(directory):
    return CompositeStorage(
        [(name, prefix, FileStorage(str(directory / (name + '.fs')),
                                    read_only=True))
         for name, prefix in PARTS], read_only=True)


def test_recovery_never_cuts_a_read_only_partition(seeded):
    """A transaction main finished and b, c did not must come out of
    main; with main configured read-only, the open says so instead."""
    from compositestorage.partition import Partition
    code, _ = run_writer_lines(seeded, 5, {'CRASH_AT': 'finished:main:2'})
    assert code == -signal.SIGKILL
    before = open(str(seeded / 'main.fs'), 'rb').read()
    children = [Partition(name, prefix,
                          FileStorage(str(seeded / (name + '.fs'))),
                          read_only=(name == 'main'))
                for name, prefix in PARTS]
    with pytest.raises(RecoveryError) as exc:
        CompositeStorage(children)
    for part in children:
        part.storage.close()
    assert "partition 'main'" in str(exc.value)
    assert 'read-only' in str(exc.value)
    assert open(str(seeded / 'main.fs'), 'rb').read() == before
    # opened writable, recovery takes it back
    assert check_mixed(seeded, []).action == 'rolled back'


def test_a_pack_that_drops_a_partition_s_part_is_no_damage(tmp_path,
                                                           capsys):
    """A transaction over main and b whose part in b became garbage: the
    pack drops it from b and keeps it in main.  That is not a lost tail:
    the journal keeps the pack time, and checks of spans stop there."""
    from compositestorage.cli import main as cli_main
    from conftest import config_file
    from persistent.mapping import PersistentMapping
    from compositestorage import placement
    storage = open_composite(str(tmp_path))
    db = ZODB.DB(storage)
    conn = db.open()
    root = conn.root()
    root['x'] = PersistentMapping()
    transaction.commit()
    with placement(conn, 'b'):
        root['x']['y'] = y = PersistentMapping(v=1)
        conn.add(y)
    root['x']['keep'] = PersistentMapping()     # stays, in main
    transaction.commit()
    spanning = storage.lastTransaction()
    assert y._p_oid[0] == 1
    del root['x']['y']
    transaction.commit()
    time.sleep(0.01)
    storage.pack(time.time(), None)
    db.close()
    tids = _tids(tmp_path)
    assert spanning in tids['main'] and spanning not in tids['b']
    again = open_composite(str(tmp_path))
    try:
        assert again.partial == []
        assert again.packed_to() > spanning
    finally:
        again.close()
    config = config_file(tmp_path, {name: str(tmp_path / (name + '.fs'))
                                    for name in NAMES}, parts=PARTS)
    assert cli_main(['verify', '--quiet', str(config)]) == 0, \
        capsys.readouterr().out
