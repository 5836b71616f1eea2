"""Many real processes over one shared composite (IMVCCStorage).

Three RelStorage children on PostgreSQL (history-preserving), no journal
key: the composite is shared, and every process (``shared_worker.py``, run
with ``subprocess``) opens it itself from the configuration text.  The
composite holds one counter per partition; the workers move units between
them, so the counters always add up to the same total, and record in each
counter the id of every transaction that changed it.

* concurrent commits of two and three processes beside a reader: no
  snapshot ever shows half a transaction, and the counters end at their
  start plus every process's acknowledged moves, exactly;
* ``kill -9`` of a writer at random instants, and inside its finish
  phase, while another keeps committing: every acknowledged move is
  applied, every applied move is applied in all its partitions, and only
  the one transaction in flight at each kill may be applied without its
  acknowledgement; no intent is left, verify is clean;
* invalidations reach another process's cache at its next transaction
  boundary, for partitions its own transactions never touched;
* configurations that cannot be shared are refused with a clear message.
"""
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping

from compositestorage import placement
from compositestorage.cli import main as cli_main
from compositestorage.errors import ConfigurationError
from relstorage_engines import PG_HOST
from relstorage_engines import PG_PORT
from relstorage_engines import PG_USER
from relstorage_engines import child_section
from relstorage_engines import composite_config
from relstorage_engines import open_config
from relstorage_engines import postgres_database
from relstorage_engines import require_postgres

NAMES = ('main', 'b', 'c')
START = 1000
TOTAL = START * len(NAMES)
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      'shared_worker.py')
#: how long the processes commit concurrently (seconds)
COMMIT_SECONDS = 4


class Composite(str):
    """The path of the configuration; ``primary`` names the primary's
    database."""

    def __new__(cls, path, primary):
        self = super().__new__(cls, path)
        self.primary = primary
        return self


def stored_intent(dbname):
    """The intent tid in the primary's ``compositestorage_state``, read
    with a connection of its own (``None`` when there is none)."""
    import psycopg2
    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER,
                            dbname=dbname)
    try:
        with conn.cursor() as cursor:
            cursor.execute('SELECT intent_tid FROM compositestorage_state '
                           'WHERE id = 0')
            return cursor.fetchone()[0]
    finally:
        conn.close()


def wait_until_recovered(dbname, timeout=20):
    """Wait until no intent is stored; whether one was seen at first."""
    seen = stored_intent(dbname) is not None
    deadline = time.monotonic() + timeout
    while stored_intent(dbname) is not None:
        assert time.monotonic() < deadline, 'the intent was not recovered'
        time.sleep(0.05)
    return seen


def shared_config(stack, tmp_path):
    """``(text, path, primary database)`` of the configuration of a shared
    composite of three history-preserving PostgreSQL children, on
    databases that ``stack`` drops."""
    dbs = [stack.enter_context(postgres_database()) for _ in NAMES]
    text = composite_config(
        tmp_path, [(name, prefix, child_section('postgresql', db))
                   for prefix, (name, db) in enumerate(zip(NAMES, dbs))],
        primary_file=False, journal=False)
    path = tmp_path / 'composite.conf'
    path.write_text(text)
    return text, path, dbs[0]


@pytest.fixture
def composite(tmp_path):
    """The path of the configuration of a shared composite of three
    history-preserving PostgreSQL children, with its counters set up."""
    require_postgres()
    with contextlib.ExitStack() as stack:
        text, path, primary = shared_config(stack, tmp_path)
        storage = open_config(text)
        assert storage._shared is not None      # shared auto: shared
        db = ZODB.DB(storage)
        try:
            conn = db.open()
            root = conn.root()
            for name in NAMES:
                with placement(conn, name):
                    counter = PersistentMapping(value=START, touched=0,
                                                moves=())
                    conn.add(counter)
                assert counter._p_oid[0] == NAMES.index(name)
                root[name] = counter
            transaction.commit()
            conn.close()
        finally:
            db.close()
        yield Composite(str(path), primary)


def say(capsys, *args):
    """Print past pytest's capture (the figures of a run)."""
    with capsys.disabled():
        print(*args)


def spawn(mode, config, **opts):
    return subprocess.Popen(
        [sys.executable, WORKER, mode, config, json.dumps(opts)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def expect_ready(proc):
    line = proc.stdout.readline()
    if line.strip() != 'ready':
        proc.kill()
        raise AssertionError('worker did not open: %r %s' % (
            line, proc.stderr.read()))


def result(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


@contextlib.contextmanager
def opened(config):
    with open(config) as f:
        storage = open_config(f.read())
    db = ZODB.DB(storage)
    try:
        yield storage, db
    finally:
        db.close()


def final_counters(config):
    """``{name: (value, touched, moves)}`` as a new process sees them, and
    the intent left in the primary's database after that open."""
    with opened(config) as (storage, db):
        conn = db.open()
        root = conn.root()
        state = {name: (root[name]['value'], root[name]['touched'],
                        root[name]['moves']) for name in NAMES}
        conn.close()
        return state, storage.journal.read()


def assert_verify_clean(config, capsys, garbage=False):
    """``compositestorage verify`` finds no problem; with ``garbage``, it
    may find garbage that the next pack removes (and nothing else)."""
    capsys.readouterr()
    code = cli_main(['verify', '--quiet', config])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    last = out.strip().splitlines()[-1]
    if garbage:
        assert last == 'ok' or last.startswith('ok, with '), out
    else:
        assert last == 'ok', out


def applied_moves(state):
    """``{move id: {name: delta}}`` of every transaction the counters
    record."""
    applied = {}
    for name, (_, _, moves) in state.items():
        for move, delta in moves:
            assert name not in applied.get(move, {}), (move, name)
            applied.setdefault(move, {})[name] = delta
    return applied


def check_counters(state):
    """Each counter is its start plus the deltas it records; the touches
    it records are its ``touched``; the counters add up to the total."""
    for name, (value, touched, moves) in state.items():
        assert value == START + sum(d for _, d in moves), name
        assert touched == sum(1 for _, d in moves if d == 0), name
    assert sum(v for v, _, _ in state.values()) == TOTAL


@pytest.mark.parametrize('writers', [2, 3])
def test_concurrent_writers_and_a_reader(composite, tmp_path, capsys,
                                         writers):
    go, stop = str(tmp_path / 'go'), str(tmp_path / 'stop')
    common = dict(names=NAMES, total=TOTAL, go=go, stop=stop)
    procs = [spawn('mover', composite, tag='p%d' % i, seed=i, **common)
             for i in range(writers)]
    procs.append(spawn('reader', composite, **common))
    for proc in procs:
        expect_ready(proc)
    open(go, 'w').close()
    time.sleep(COMMIT_SECONDS)
    open(stop, 'w').close()
    results = [result(proc) for proc in procs]
    movers, read = results[:-1], results[-1]
    say(capsys, 'writers %d: commits %s, conflicts %s, kinds %s; '
        'reader: %s' % (
            writers, [r['commits'] for r in movers],
            [r['conflicts'] for r in movers],
            [r['kinds'] for r in movers], read))

    # every writer took snapshots and tried; how many of its commits got
    # through the conflicts is the machine's business
    assert all(r['checks'] > 0 for r in movers), movers
    assert sum(r['commits'] for r in movers) > 0, movers
    assert [r['violations'] for r in movers] == [0] * writers
    assert read['reads'] > 0 and read['violations'] == 0, read

    state, intent = final_counters(composite)
    assert intent is None
    check_counters(state)
    for name in NAMES:
        value, touched, moves = state[name]
        assert value == START + sum(r['tally'][name] for r in movers), name
        assert touched == sum(r['touched'][name] for r in movers), name
    # every acknowledged transaction, and nothing else, is applied, in all
    # of its partitions
    applied = applied_moves(state)
    assert len(applied) == sum(r['commits'] for r in movers)
    assert {m.split('.')[0] for m in applied} == {
        r['tag'] for r in movers if r['commits']}
    # transactions of two and three partitions both committed
    assert any(len(d) == 3 for d in applied.values())
    assert any(len(d) == 2 for d in applied.values())
    assert_verify_clean(composite, capsys)


def read_log(path):
    """``(intents, acked, failed, in_flight, violations)`` of a worker's
    log: ``in_flight`` is its last intent without an outcome, if any."""
    intents, acked, failed, violations = {}, set(), set(), []
    last = None
    if not os.path.exists(path):
        return intents, acked, failed, None, violations
    with open(path) as f:
        for line in f:
            if not line.endswith('\n'):
                break       # cut by the kill
            kind, _, rest = line.rstrip('\n').partition(' ')
            if kind == 'I':
                move, _, deltas = rest.partition(' ')
                intents[move] = json.loads(deltas)
                last = move
            elif kind == 'A':
                acked.add(rest)
            elif kind == 'F':
                failed.add(rest)
            elif kind == 'V':
                violations.append(rest)
    in_flight = last if last is not None and last not in acked \
        and last not in failed else None
    return intents, acked, failed, in_flight, violations


def test_kill_writers_while_another_commits(composite, tmp_path, capsys):
    """A writer killed (SIGKILL) at random instants, and twice inside its
    finish phase (one child finished, the others not: its intent stays),
    while a survivor commits; restarted each time.  The survivor recovers
    what a killed writer left; at the end a last writer is killed in its
    finish phase with no one else open, and the next open recovers.
    Nothing acknowledged is lost, and the state accounts exactly for
    every transaction."""
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    say(capsys, 'seed', seed)
    stop = str(tmp_path / 'stop')
    common = dict(names=NAMES, total=TOTAL)
    survivor_log = str(tmp_path / 'survivor.log')
    survivor = spawn('mover', composite, tag='s', seed=seed, stop=stop,
                     log=survivor_log, **common)
    expect_ready(survivor)
    killed = []
    plans = ['random'] * 4 + ['finish'] * 2
    rng.shuffle(plans)
    plans.append('alone')

    def run_killed(k, plan):
        tag = 'w%d' % k
        log = str(tmp_path / ('%s.log' % tag))
        opts = dict(common, tag=tag, seed=seed + k + 1, log=log)
        if plan != 'random':
            opts['crash_finished'] = rng.randint(1, 6)
        proc = spawn('mover', composite, **opts)
        expect_ready(proc)
        if plan == 'random':
            time.sleep(rng.uniform(0.2, 1.0))
            os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, err
        killed.append((tag, log, plan))

    try:
        for k, plan in enumerate(plans[:-1]):
            run_killed(k, plan)
            if plan == 'finish':
                # the survivor is the only process open: it recovers
                wait_until_recovered(composite.primary)
        time.sleep(0.3)     # the survivor commits after the last kill
    finally:
        open(stop, 'w').close()
    survived = result(survivor)
    say(capsys, 'survivor:', survived)
    assert survived['violations'] == 0
    assert survived['recoveries'] >= plans.count('finish')

    # killed in its finish phase, alone: the intent waits for the next open
    run_killed(len(plans) - 1, 'alone')
    assert stored_intent(composite.primary) is not None
    state, intent = final_counters(composite)
    assert intent is None
    assert stored_intent(composite.primary) is None
    check_counters(state)
    applied = applied_moves(state)

    s_intents, s_acked, s_failed, s_in_flight, s_viol = read_log(
        survivor_log)
    assert s_in_flight is None and s_viol == []
    assert s_acked == {m for m in applied if m.startswith('s.')}
    assert len(s_acked) == survived['commits']
    intents = dict(s_intents)
    acked, failed = set(s_acked), set(s_failed)
    in_flight = set()
    report = []
    for tag, log, plan in killed:
        w_intents, w_acked, w_failed, w_in_flight, w_viol = read_log(log)
        assert w_viol == [], tag
        intents.update(w_intents)
        acked |= w_acked
        failed |= w_failed
        if w_in_flight is not None:
            in_flight.add(w_in_flight)
        report.append((tag, plan, len(w_acked), w_in_flight,
                       w_in_flight in applied))
    say(capsys, 'killed writers (tag, plan, acknowledged, in flight, '
        'applied):', report)
    # nothing acknowledged is lost
    assert acked <= set(applied), sorted(acked - set(applied))[:5]
    # nothing that failed with a conflict is applied
    assert not failed & set(applied)
    # every applied transaction is applied whole, as it was meant
    for move, deltas in applied.items():
        assert move in intents, move
        assert deltas == intents[move], move
    # only the one transaction in flight at each kill may be applied
    # without its acknowledgement
    assert set(applied) - acked <= in_flight
    # a writer killed inside its finish phase had one in flight
    for tag, plan, _, w_in_flight, _ in report:
        if plan != 'random':
            assert w_in_flight is not None, tag
    assert_verify_clean(composite, capsys)


def test_invalidations_reach_another_process(composite):
    """Process B keeps the counters in its connection's cache; this
    process commits in one partition at a time; B sees each change at its
    next transaction boundary, and not before, including in partitions its
    own transactions never touched (B commits in main only)."""
    b = spawn('watch', composite, names=NAMES)

    def ask(command):
        b.stdin.write(command + '\n')
        b.stdin.flush()
        line = b.stdout.readline()
        if not line:
            raise AssertionError(b.stderr.read())
        return json.loads(line)

    try:
        line = b.stdout.readline()
        assert line, b.stderr.read()
        seen = json.loads(line)
        assert seen == {name: START for name in NAMES}
        assert ask('commit main') == seen       # B touches main only
        with opened(composite) as (storage, db):
            conn = db.open()
            root = conn.root()
            expected = dict(seen)
            for round, name in enumerate(['c', 'b', 'c', 'main']):
                delta = round + 1
                other = 'b' if name != 'b' else 'c'
                root[name]['value'] += delta
                root[other]['value'] -= delta
                transaction.commit()
                # no transaction boundary in B: its snapshot stays
                assert ask('peek') == expected
                expected[name] += delta
                expected[other] -= delta
                synced = ask('sync')
                assert synced['values'] == expected, (round, name)
                assert synced['ghosts'] == sorted({name, other}), round
            # a change of c alone, B never having written c
            root['c']['touched'] += 1
            transaction.commit()
            synced = ask('sync')
            assert synced['ghosts'] == ['c']
            assert synced['values'] == expected
            conn.close()
        b.stdin.write('quit\n')
        b.stdin.flush()
        _, err = b.communicate(timeout=60)
        assert b.returncode == 0, err
    finally:
        if b.poll() is None:
            b.kill()
            b.wait()


# --- configurations that cannot be shared ------------------------------------

def _refused(text):
    with pytest.raises(ConfigurationError) as info:
        storage = open_config(text)
        storage.close()
    return str(info.value)


def test_shared_true_refuses_a_filestorage_child(tmp_path):
    with postgres_database() as db:
        text = composite_config(
            tmp_path, [('b', 1, child_section('postgresql', db))],
            primary_file=True, journal=False, extra='shared true\n')
        message = _refused(text)
    assert "partition 'main'" in message
    assert 'FileStorage' in message or 'filestorage' in message.lower()
    assert 'shared false' in message


def test_shared_true_refuses_a_journal_key(tmp_path):
    with postgres_database() as one, postgres_database() as two:
        text = composite_config(
            tmp_path, [('main', 0, child_section('postgresql', one)),
                       ('b', 1, child_section('postgresql', two))],
            primary_file=False, journal=True, extra='shared true\n')
        message = _refused(text)
    assert 'journal' in message
    assert 'remove the journal key' in message and 'shared false' in message
    assert not os.path.exists(tmp_path / 'composite.journal')


def test_shared_true_refuses_an_sqlite_child(tmp_path):
    with postgres_database() as db:
        text = composite_config(
            tmp_path, [('main', 0, child_section('postgresql', db)),
                       ('b', 1, child_section('sqlite',
                                              str(tmp_path / 'b-sqlite')))],
            primary_file=False, journal=False, extra='shared true\n')
        message = _refused(text)
    assert "partition 'b'" in message
    assert 'sqlite' in message.lower()
    assert 'PostgreSQL' in message and 'shared false' in message


def test_shared_auto_with_an_sqlite_child_is_one_writer(tmp_path):
    """``shared auto`` (the default) over a child that cannot be shared
    opens a composite of one writer process, as before."""
    with postgres_database() as db:
        text = composite_config(
            tmp_path, [('main', 0, child_section('postgresql', db)),
                       ('b', 1, child_section('sqlite',
                                              str(tmp_path / 'b-sqlite')))],
            primary_file=False, journal=True)
        storage = open_config(text)
        try:
            assert storage._shared is None
            from ZODB.interfaces import IMVCCStorage
            assert not IMVCCStorage.providedBy(storage)
        finally:
            storage.close()


def test_shared_value_must_be_auto_true_or_false(tmp_path):
    with postgres_database() as db:
        text = composite_config(
            tmp_path, [('main', 0, child_section('postgresql', db))],
            primary_file=False, journal=False, extra='shared maybe\n')
        message = _refused(text)
    assert 'shared must be auto, true or false' in message
    assert "'maybe'" in message


def test_verify_and_iterate_a_composite_never_written(tmp_path, capsys):
    """A shared composite just opened, nothing committed: its children
    hold no record, and RelStorage's ``record_iternext`` raises
    StopIteration for them (not ValueError, as FileStorage does).
    ``verify`` says it is healthy (it said "RuntimeError: generator raised
    StopIteration"), and the composite's ``record_iternext`` ends with
    ValueError, as for any empty storage (StopIteration escaped it)."""
    with contextlib.ExitStack() as stack:
        text, path, primary = shared_config(stack, tmp_path)
        assert_verify_clean(str(path), capsys)
        storage = open_config(text)
        try:
            assert storage._shared is not None
            with pytest.raises(ValueError):
                storage.record_iternext()
        finally:
            storage.close()


def test_pack_undo_log_and_history_of_a_process_that_committed(composite,
                                                               capsys):
    """``DB.storage`` of a shared composite is its root, which ZODB asks
    for ``pack``, ``undoLog`` and ``history``; the connections commit and
    read through instances of their own.  What this process's connections
    committed after it opened, and what another process committed, is
    seen there: the pack keeps it (it deleted every object created since
    the open), the undo log lists it and its history is there (they
    showed the composite as of its open)."""
    other = spawn('watch', composite, names=NAMES)
    try:
        assert json.loads(other.stdout.readline()) == {
            name: START for name in NAMES}
        with opened(composite) as (storage, db):
            conn = db.open()
            root = conn.root()
            with placement(conn, 'c'):
                new = PersistentMapping(v='new in c')
                conn.add(new)
            root['b']['child'] = new        # lives in c, referred from b
            transaction.get().note('new in c')
            transaction.commit()
            oid = new._p_oid
            # another process commits after this one did
            other.stdin.write('commit main\nquit\n')
            other.stdin.flush()
            _, err = other.communicate(timeout=60)
            assert other.returncode == 0, err
            log = db.undoLog(0, 5)
            assert len(log) >= 2
            assert [e['description'] for e in log[1:2]] == ['new in c']
            assert db.history(oid, 5)[0]['tid'] == new._p_serial
            time.sleep(0.05)
            db.pack(time.time())
            assert storage.last_pack['c']['objects'] == 0
            transaction.begin()
            assert root['b']['child']['v'] == 'new in c'
            conn.close()
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
    with opened(composite) as (storage, db):
        conn = db.open()
        assert conn.root()['b']['child']['v'] == 'new in c'
        assert conn.root()['main']['touched'] == 1
        conn.close()
    assert_verify_clean(composite, capsys)


def test_last_transaction_and_historical_connections(composite):
    """``DB.lastTransaction()`` asks the root, which no connection polls:
    it keeps up with what this process's connections committed and saw,
    as RelStorage's root does (it stayed at the tid of the open), and a
    historical connection at a tid committed since the open is not taken
    for one "in the future"."""
    with opened(composite) as (storage, db):
        at_open = db.lastTransaction()
        conn = db.open()
        root = conn.root()
        root['c']['touched'] += 1
        transaction.commit()
        first = root['c']._p_serial
        assert first > at_open
        assert db.lastTransaction() == first
        root['b']['touched'] += 1
        transaction.commit()
        second = root['b']._p_serial
        assert db.lastTransaction() == second
        past = db.open(before=second)
        try:
            assert past.root()['c']['touched'] == 1
            assert past.root()['b']['touched'] == 0
        finally:
            past.close()
        conn.close()


def test_pack_while_other_processes_commit(composite, tmp_path, capsys):
    """Two processes commit moves that make new objects in any partition,
    referred to across partitions through stubs: one that leaves the one
    before it as garbage, and a link of a chain that stays reachable,
    while this process packs with garbage collection, twice.  Nothing
    reachable goes (every link of the chains is there), no
    stub that a commit refers through goes, the counters account for every
    acknowledged move, and verify finds no dangling reference or missing
    stub."""
    go, stop = str(tmp_path / 'go'), str(tmp_path / 'stop')
    common = dict(names=NAMES, total=TOTAL, go=go, stop=stop,
                  new_objects=True)
    procs = [spawn('mover', composite, tag='p%d' % i, seed=i, **common)
             for i in range(2)]
    for proc in procs:
        expect_ready(proc)
    open(go, 'w').close()
    removed = []
    try:
        with opened(composite) as (storage, db):
            for _ in range(2):
                time.sleep(1.0)
                db.pack(time.time())
                removed.append(storage.last_pack)
        time.sleep(0.5)
    finally:
        open(stop, 'w').close()
    movers = [result(proc) for proc in procs]
    say(capsys, 'pack while committing: commits %s, conflicts %s; '
        'removed %s' % ([r['commits'] for r in movers],
                        [r['conflicts'] for r in movers], removed))
    assert [r['violations'] for r in movers] == [0, 0]
    state, intent = final_counters(composite)
    assert intent is None
    check_counters(state)
    applied = applied_moves(state)
    assert len(applied) == sum(r['commits'] for r in movers)
    for name in NAMES:
        assert state[name][0] == START + sum(r['tally'][name]
                                             for r in movers), name
    # the objects the counters refer to are there, each the one made by
    # an applied move; every link of the chains is there: one for each
    # applied move of several partitions
    links = []
    with opened(composite) as (storage, db):
        conn = db.open()
        for name in NAMES:
            counter = conn.root()[name]
            if 'last' in counter:
                assert counter['last']['move'] in applied, name
            link = counter.get('chain')
            while link is not None:
                links.append(link['move'])
                link = link['prev']
        conn.close()
    assert sorted(links) == sorted(
        move for move, deltas in applied.items() if len(deltas) > 1)
    # both packs swept every partition (what they removed is netted
    # against what the commits added meanwhile: no count to check)
    assert [sorted(r) for r in removed] == [sorted(NAMES)] * 2
    # what the moves made garbage after the last pack stays until the next
    assert_verify_clean(composite, capsys, garbage=True)


def test_a_commit_after_a_pack_swept_a_stub_its_snapshot_has(composite,
                                                            capsys):
    """A stub that no record refers to any more (an orphan) is swept by a
    pack of another process while a transaction is under way; that
    transaction then refers through it again.  Its snapshot, taken before
    the sweep, still holds the stub, but the child no longer does: the
    commit writes it again (it took the stub as there, and the child was
    left referring to a missing stub)."""
    with opened(composite) as (storage, db):
        conn = db.open()
        root = conn.root()
        with placement(conn, 'c'):
            holder = PersistentMapping(target=root['b'])   # stub in c
            conn.add(holder)
        root['holder'] = holder
        transaction.commit()
        del holder['target']                # the stub in c is an orphan
        transaction.commit()
        # a transaction under way: its snapshot holds the stub
        transaction.begin()
        b_counter = root['b']
        with opened(composite) as (other, other_db):
            time.sleep(0.05)
            other_db.pack(time.time())      # sweeps the orphan stub
        with placement(conn, 'c'):
            again = PersistentMapping(target=b_counter)
            conn.add(again)
        root['again'] = again
        transaction.commit()
        conn.close()
    with opened(composite) as (storage, db):
        conn = db.open()
        assert conn.root()['again']['target'] is not None
        conn.close()
    assert_verify_clean(composite, capsys)
