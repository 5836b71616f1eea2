"""Crash-atomic commits with PostgreSQL children (DESIGN.md, invariant 6;
issue 13).

The crash tests of ``test_atomic.py`` and ``test_atomic_mixed.py`` over
two composites opened from a configuration, as a user writes it:

* ``fs-pg-fs``: a FileStorage primary ``main``, a history-preserving
  PostgreSQL child ``b`` and a FileStorage child ``c`` (the journal beside
  ``main.fs``);
* ``all-pg``: three history-preserving PostgreSQL children, the journal
  where the configuration says (no child is a file).

The writer (``crash_writer.py`` with ``CONFIG``) is killed with SIGKILL at
every point of the commit protocol and of recovery, and at random
instants with transactions over one, two and three partitions mixed; the
files (not PostgreSQL, whose commits the server makes durable) are put
back to their last fsync as a power loss would.  After each, the
composite is reopened and every child is read alone
(``atomic_checks.check_mixed``).  The databases are real, created for the
module and dropped after it.
"""
import contextlib
import functools
import json
import os
import random
import signal
import subprocess
import sys

import pytest
from ZODB.FileStorage import FileStorage

from atomic_checks import Layout
from atomic_checks import NAMES
from atomic_checks import check_mixed
from atomic_checks import check_nothing_to_recover
from atomic_checks import check_outcome
from atomic_checks import fork_writer_lines
from compositestorage.cli import main as cli_main
from compositestorage.journal import Intent
from compositestorage.journal import Journal
from compositestorage.partition import is_internal
from relstorage_engines import PG_HOST
from relstorage_engines import PG_PORT
from relstorage_engines import PG_USER
from relstorage_engines import child_section
from relstorage_engines import composite_config
from relstorage_engines import open_child
from relstorage_engines import postgres_database
from test_atomic import COMMIT_POINTS
from test_atomic import _durable_state
from test_atomic import _power_loss
from test_atomic import run_writer_lines

#: The kind of each child, by layout: 'fs' or 'pg'.
LAYOUTS = {'fs-pg-fs': ('fs', 'pg', 'fs'), 'all-pg': ('pg', 'pg', 'pg')}
#: Where recovery itself is killed (after a kill at ``finished:b``).
RECOVERY_POINTS = ['rolled-back:main', 'rolled-back:b', 'recovered']
#: Kills at random instants, per layout.
RANDOM_KILLS = 15


class Rig:
    """A layout and every transaction the writers acknowledged there so
    far.  The tests of one layout go on from each other's state: three
    new databases and a new seed per test would cost more than the test.
    """

    def __init__(self, layout, kinds, databases):
        self.layout = layout
        self.kinds = kinds
        self.databases = databases      # {name: PostgreSQL database}
        self.acknowledged = []

    def run(self, count, env=None, kill_after=None, fork=True):
        """Run the writer (forked from this process, or with ``fork``
        false as a script); returns ``(exit code, acknowledged)``."""
        run = fork_writer_lines if fork else run_writer_lines
        code, acked = run(self.layout.directory, count,
                          dict(self.layout.env, **env or {}), kill_after)
        self.acknowledged.extend(acked)
        return code, acked

    def check(self, again=True):
        return check_mixed(self.layout, self.acknowledged, again)


def _layout(directory, kinds, databases):
    """The :class:`Layout` of children of ``kinds`` ('fs' or 'pg', in the
    order of ``NAMES``) in ``directory`` and ``databases``."""
    sections, alone = [], {}
    for prefix, (name, kind) in enumerate(zip(NAMES, kinds)):
        if kind == 'pg':
            section = child_section('postgresql', databases[name])
            alone[name] = functools.partial(open_child, 'postgresql',
                                            databases[name])
        else:
            path = str(directory / (name + '.fs'))
            section = '<filestorage>\n path %s\n</filestorage>' % path
            alone[name] = functools.partial(FileStorage, path,
                                            read_only=True)
        sections.append((name, prefix, section))
    primary_file = kinds[0] == 'fs'
    if primary_file:
        sections.pop(0)     # composite_config writes main's section
    config = directory / 'composite.conf'
    # a FileStorage primary has its journal beside it; else it is configured
    config.write_text(composite_config(directory, sections,
                                       primary_file=primary_file,
                                       journal=not primary_file))
    journal = directory / ('main.fs.journal' if primary_file
                           else 'composite.journal')
    return Layout(directory, str(journal), alone, str(config))


@pytest.fixture(scope='module', params=sorted(LAYOUTS))
def rig(request, tmp_path_factory):
    kinds = LAYOUTS[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    with contextlib.ExitStack() as stack:
        databases = {name: stack.enter_context(postgres_database())
                     for name, kind in zip(NAMES, kinds) if kind == 'pg'}
        rig = Rig(_layout(directory, kinds, databases), kinds, databases)
        # the first writer runs as a script: python crash_writer.py, CONFIG
        code, acked = rig.run(1, fork=False)
        assert code == 0 and len(acked) == 1
        yield rig


@pytest.mark.parametrize('point', COMMIT_POINTS)
def test_kill_at_every_point_of_the_protocol(rig, point):
    """The second commit (over all three) is cut at ``point``."""
    code, acked = rig.run(10, {'CRASH_AT': point + ':2'})
    assert code == -signal.SIGKILL
    assert len(acked) == 1
    outcome = rig.check(again=False)
    if outcome is not None:
        # what recovery did is done: a second open finds nothing to do
        check_nothing_to_recover(rig.layout)
    check_outcome(point, outcome)


@pytest.mark.parametrize('point', RECOVERY_POINTS)
def test_kill_during_recovery(rig, point):
    code, _ = rig.run(10, {'CRASH_AT': 'finished:b:2'})
    assert code == -signal.SIGKILL
    # recovery itself is killed (the writer recovers when it opens)
    code, acked = rig.run(1, {'CRASH_AT': point + ':1'})
    assert code == -signal.SIGKILL and acked == []
    outcome = rig.check()
    if point == 'recovered':
        assert outcome is None      # the journal was cleared before
    else:
        assert outcome.action in ('rolled back', 'absent')


@contextlib.contextmanager
def slow_commits(database, seconds):
    """Every commit of a RelStorage database takes ``seconds`` more, in
    the server: a deferred trigger on its ``transaction`` table sleeps at
    COMMIT.  Leaving waits for a commit still running."""
    import psycopg2
    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER,
                            dbname=database)
    conn.autocommit = True
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                'CREATE FUNCTION slow_commit() RETURNS trigger AS $$ BEGIN '
                'PERFORM pg_sleep(%s); RETURN NULL; END $$ '
                'LANGUAGE plpgsql' % float(seconds))
            cursor.execute(
                'CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON '
                '"transaction" DEFERRABLE INITIALLY DEFERRED FOR EACH ROW '
                'EXECUTE FUNCTION slow_commit()')
        yield
    finally:
        with conn.cursor() as cursor:
            cursor.execute('DROP TRIGGER IF EXISTS slow_commit '
                           'ON "transaction"')
            cursor.execute('DROP FUNCTION IF EXISTS slow_commit()')
        conn.close()


def test_a_kill_while_the_server_commits(rig):
    """The writer dies after main finished, while b's server runs its
    COMMIT: the server finishes that commit after the client is gone.
    The reopen must not decide from b before then: had it seen b without
    the transaction, it would take it back from main only, and b would
    hold it alone a moment later."""
    with slow_commits(rig.databases['b'], 1.5):
        code, acked = rig.run(5, {'PLAN': 'main,b,c',
                                  'CRASH_AT': 'finished:main:1',
                                  'CRASH_DELAY': '0.5'})
        assert code == -signal.SIGKILL and acked == []
        storage = rig.layout.open()     # at once: b is still committing
        outcome = storage.recovered
        storage.close()
    # b's late commit is over (the trigger's drop waited for it)
    assert outcome.action == 'rolled back'
    assert outcome.rolled_back == ['main', 'b']
    assert rig.check() is None


def test_random_kills_with_mixed_transactions(rig):
    """Kills at random instants, with transactions over one, two and
    three partitions; the check after each, and every acknowledged one
    kept."""
    rng = random.Random(int(os.environ.get('CRASH_SEED', '1313')))
    for kill in range(RANDOM_KILLS):
        code, _ = rig.run(10 ** 6, {'MIX': str(kill)},
                          kill_after=rng.uniform(0.0, 0.25))
        assert code == -signal.SIGKILL
        rig.check(again=False)
    rig.check()
    sizes = {len(names) for _, _, names in rig.acknowledged}
    assert sizes == {1, 2, 3}


def test_lost_unsynced_writes(rig):
    """Power losses: every file (FileStorage children, the journal) back
    to its last fsync; PostgreSQL keeps what it committed."""
    directory = rig.layout.directory
    log_path = str(directory / 'fsync.log')
    rng = random.Random(4343)
    crash_points = ['intent-written:2', 'finished:main:2', 'finished:b:2',
                    'journal-cleared:2']
    for i in range(len(crash_points) + 2):
        baseline = _durable_state(directory)
        env = {'FSYNC_LOG': log_path, 'MIX': str(200 + i)}
        if i < len(crash_points):
            env['CRASH_AT'] = crash_points[i]
            code, _ = rig.run(10 ** 6, env)
        else:
            code, _ = rig.run(10 ** 6, env,
                              kill_after=rng.uniform(0.05, 0.25))
        assert code == -signal.SIGKILL
        _power_loss(directory, log_path, baseline)
        rig.check(again=False)
    rig.check()


def test_a_stale_intent_beside_later_one_partition_commits(rig):
    """T1 over main and b, then T2 in b only, both acknowledged, then a
    power loss.  The first participant records the span, so T1's intent
    was never synced and the loss leaves none; where one keeps no span,
    the intent is synced and its clear is not, and the loss leaves T1's
    intent beside b's later T2, written here as that composite would have
    left it.  Recovery keeps both."""
    directory = rig.layout.directory
    log_path = str(directory / 'fsync.log')
    baseline = _durable_state(directory)
    code, acked = rig.run(2, {'FSYNC_LOG': log_path, 'PLAN': 'main,b;b'})
    assert code == 0
    assert [names for _, _, names in acked] == [('main', 'b'), ('b',)]
    _power_loss(directory, log_path, baseline)
    journal = Journal(rig.layout.journal)
    assert journal.read() is None
    journal.write_intent(Intent(acked[0][0], (0, 1)))
    journal.close()
    intent = Journal(rig.layout.journal).read()
    assert intent.tid == acked[0][0] and intent.prefixes == (0, 1)
    outcome = rig.check()
    assert outcome.action == 'complete' and outcome.present == ['main', 'b']


def test_recover_command_and_verify(rig, capsys):
    """A kill between the children's finishes, repaired by ``compositestorage
    recover CONFIG``; ``verify`` is clean after it."""
    config = rig.layout.config
    code, _ = rig.run(10, {'CRASH_AT': 'finished:b:2'})
    assert code == -signal.SIGKILL
    intent = Journal(rig.layout.journal).read()
    assert intent is not None and intent.prefixes == (0, 1, 2)
    assert cli_main(['recover', '--dry-run', config]) == 0
    out = capsys.readouterr().out
    assert intent.tid.hex() in out and 'to be rolled back in main, b' in out
    assert Journal(rig.layout.journal).read() == intent
    proc = subprocess.run(
        [sys.executable, '-m', 'compositestorage', 'recover', config],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert 'rolled back in main, b' in proc.stdout, proc.stdout
    assert cli_main(['recover', '--json', config]) == 0
    assert json.loads(capsys.readouterr().out)['outcome'] is None
    assert cli_main(['verify', '--quiet', config]) == 0
    assert capsys.readouterr().out.strip().endswith('ok')
    assert rig.check() is None


def test_info_and_stats(rig, capsys):
    """``info`` and ``stats`` give each child's real counts, as its child
    read alone holds them."""
    config = rig.layout.config
    assert cli_main(['info', '--json', config]) == 0
    info = json.loads(capsys.readouterr().out)
    assert cli_main(['stats', '--json', config]) == 0
    report = json.loads(capsys.readouterr().out)
    parts = {p['name']: p for p in info['partitions']}
    last = b''
    for name, kind in zip(NAMES, rig.kinds):
        tids, oids = _read_alone(rig.layout, name)
        last = max(last, tids[-1])
        prefix = NAMES.index(name)
        own = len([oid for oid in oids if not is_internal(oid, prefix)])
        stubs = len([oid for oid in oids if oid[0] != prefix])
        assert own > 0 and stubs > 0
        assert parts[name]['objects'] == own, (name, parts[name])
        assert parts[name]['stubs'] == stubs
        assert parts[name]['type'] == ('RelStorage' if kind == 'pg'
                                       else 'FileStorage')
        counted = report['partitions'][name]
        assert (counted['objects'], counted['stubs']) == (own, stubs)
    assert info['last_transaction']['tid'] == last.hex()
    # main's root refers to the counters of b and c
    assert report['edges']['main'] == {'b': 1, 'c': 1}


def _read_alone(layout, name):
    """``(tids, oids)``: every transaction and every oid the child of
    partition ``name`` holds, read alone (the writer deletes nothing)."""
    storage = layout.alone[name]()
    try:
        tids, oids = [], set()
        for txn in storage.iterator():
            tids.append(txn.tid)
            oids.update(record.oid for record in txn)
        return tids, oids
    finally:
        storage.close()
