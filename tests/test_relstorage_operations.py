"""The command line over composites with RelStorage children: ``info``,
``stats``, ``verify``, ``repair``, ``pack``, ``recover``, ``backup`` and
``restore``, run through ``compositestorage.cli.main`` on real children.

Each kind of RelStorage child (SQLite and PostgreSQL, history-preserving
and history-free) is tried in two layouts: beside a FileStorage primary,
and in a composite whose children are all RelStorage (with a journal
path).  Damage is done behind the composite's back with the database's
own driver, as an operator's mistake or a bad restore would.
"""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import persistent.mapping
import pytest
import transaction
import ZODB
from ZODB.FileStorage import FileStorage
from ZODB.POSException import POSKeyError
from ZODB.utils import u64
from ZODB.utils import z64

from compositestorage import placement
from compositestorage.cli import main as cli_main
from compositestorage.partition import is_internal

from conftest import TIMEOUT
from relstorage_engines import PG_HOST
from relstorage_engines import PG_PORT
from relstorage_engines import PG_USER
from relstorage_engines import child_section
from relstorage_engines import composite_config
from relstorage_engines import databases
from relstorage_engines import open_child
from relstorage_engines import open_config

KINDS = [('sqlite', True), ('sqlite', False),
         ('postgresql', True), ('postgresql', False)]
KIND_IDS = ['sqlite-hp', 'sqlite-hf', 'pg-hp', 'pg-hf']
LAYOUTS = [True, False]         # a FileStorage primary, or none
LAYOUT_IDS = ['fs-primary', 'all-relstorage']
HERE = os.path.dirname(os.path.abspath(__file__))


def PM(**kw):
    return persistent.mapping.PersistentMapping(**kw)


def oid_hex(oid):
    return '0x' + oid.hex()


class Composite:
    """A composite of ``main`` (prefix 0) and ``cat`` (prefix 1, a
    RelStorage child of the kind under test); ``main`` is a FileStorage
    or a history-preserving RelStorage child on the same engine."""

    def __init__(self, tmp_path, engine, keep_history, file_primary, where):
        self.engine = engine
        self.keep_history = keep_history
        self.file_primary = file_primary
        self.where = where
        self.tmp_path = tmp_path
        #: whether each RelStorage child keeps history: a RelStorage
        #: ``main`` does, since a transaction over two history-free
        #: children is refused (tests/test_history_free_atomic.py)
        self.history = {'main': True, 'cat': keep_history}
        children = [(name, prefix,
                     child_section(engine, where[name], self.history[name]))
                    for name, prefix in (('main', 0), ('cat', 1))
                    if name in where]
        self.text = composite_config(tmp_path, children,
                                     primary_file=file_primary)
        self.config = tmp_path / 'composite.conf'
        self.config.write_text(self.text)

    def open(self):
        return open_config(self.text)

    def open_alone(self, name):
        """One child, opened alone as a plain storage."""
        if name == 'main' and self.file_primary:
            return FileStorage(str(self.tmp_path / 'main.fs'),
                               read_only=True)
        return open_child(self.engine, self.where[name], self.history[name])

    def delete_rows(self, name, oid):
        """Delete every row of ``oid`` in child ``name``, with the
        database's own driver, behind the composite's back."""
        tables = ['object_state']
        if self.history[name]:
            tables.insert(0, 'current_object')
        if self.engine == 'sqlite':
            conn = sqlite3.connect(
                os.path.join(self.where[name], 'main.sqlite3'))
            mark = '?'
        else:
            import psycopg2
            conn = psycopg2.connect(host=PG_HOST, port=PG_PORT,
                                    user=PG_USER, dbname=self.where[name])
            mark = '%s'
        try:
            cursor = conn.cursor()
            for table in tables:
                cursor.execute('DELETE FROM %s WHERE zoid = %s'
                               % (table, mark), (u64(oid),))
                assert cursor.rowcount >= 1, (table, oid)
            conn.commit()
        finally:
            conn.close()


@pytest.fixture(params=[(k, l) for l in LAYOUTS for k in KINDS],
                ids=['%s-%s' % (k, l) for l in LAYOUT_IDS for k in KIND_IDS])
def composite(request, tmp_path):
    (engine, keep_history), file_primary = request.param
    names = ['cat'] if file_primary else ['main', 'cat']
    with databases(engine, tmp_path, names) as where:
        yield Composite(tmp_path, engine, keep_history, file_primary, where)


def run(capsys, *args):
    """``(exit status, stdout, stderr)`` of the command line."""
    capsys.readouterr()
    code = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *args):
    code, out, err = run(capsys, *args)
    return code, json.loads(out), err


def fill(composite):
    """main's root refers to x, g and k in cat, and to m in main; m to x
    and k; x to y (in cat).  Returns the oids by name."""
    storage = composite.open()
    db = ZODB.DB(storage)
    try:
        conn = db.open()
        root = conn.root()
        with placement(conn, 'cat'):
            root['x'] = PM(name='x', y=PM(name='y'))
            root['g'] = PM(name='g')
            root['k'] = PM(name='k')
            transaction.commit()
        root['m'] = PM(name='m', x=root['x'], k=root['k'])
        transaction.commit()
        oids = {key: root[key]._p_oid for key in ('x', 'g', 'k', 'm')}
        oids['y'] = root['x']['y']._p_oid
        oids['root'] = z64
        conn.close()
    finally:
        db.close()
    assert {oid[0] for key, oid in oids.items()
            if key in 'xygk'} == {1}
    assert oids['m'][0] == 0
    return oids


def counted_alone(composite, name, prefix):
    """``(own objects, stubs)`` of child ``name`` opened alone, counted
    from its current records (deleted ones and the partition map left
    out), independently of the composite."""
    storage = composite.open_alone(name)
    own = stubs = 0
    try:
        token = None
        while True:
            try:
                oid, _, data, token = storage.record_iternext(token)
            except (ValueError, POSKeyError):
                break
            if data is not None:
                if oid[0] != prefix:
                    stubs += 1
                elif not is_internal(oid, prefix):
                    own += 1
            if token is None:
                break
    finally:
        storage.close()
    return own, stubs


def check_counts(capsys, composite, expected):
    """``info``, ``stats`` and ``verify`` give the real counts, the ones
    each child opened alone holds, and never an unknown."""
    for name, prefix in (('main', 0), ('cat', 1)):
        assert counted_alone(composite, name, prefix) == expected[name]
    code, info, _ = run_json(capsys, 'info', '--json', composite.config)
    assert code == 0
    assert {p['name']: (p['objects'], p['stubs'])
            for p in info['partitions']} == expected
    assert info['objects'] == sum(n for n, _ in expected.values())
    cat = info['partitions'][1]
    assert cat['type'] == 'RelStorage'
    # where its data is, by the database's own words (no object ids)
    assert cat['path'].startswith(
        ('sqlite data-dir %s' if composite.engine == 'sqlite' else
         'postgresql dsn dbname=%s host=') % composite.where['cat'])
    code, stats, _ = run_json(capsys, 'stats', '--json', '-q',
                              composite.config)
    assert code == 0
    assert {name: (p['objects'], p['stubs'])
            for name, p in stats['partitions'].items()} == expected
    code, out, _ = run(capsys, 'stats', '-q', composite.config)
    assert code == 0 and '?' not in out.split('cross-partition')[0]
    code, verified, _ = run_json(capsys, 'verify', '--json', '-q',
                                 composite.config)
    assert {name: (c['objects'], c['stubs'])
            for name, c in verified['partitions'].items()} == expected
    return stats, verified


def test_counts_and_a_pack_that_collects_garbage(composite, capsys):
    oids = fill(composite)
    # main: the root and m; stubs for x, g and k.  cat: x, y, g and k;
    # the root's stub at z64.
    stats, verified = check_counts(capsys, composite, {
        'main': (2, 3), 'cat': (4, 1)})
    assert stats['edges'] == {'main': {'cat': 5}, 'cat': {'main': 0}}
    assert verified['ok'] and verified['problems'] == []

    storage = composite.open()
    db = ZODB.DB(storage)
    old_x = storage.load(oids['x'])[1]
    with db.transaction() as conn:
        del conn.root()['g']                  # g becomes garbage
        conn.root()['x']['name'] = 'x2'       # x gets an old revision
    db.close()
    time.sleep(0.05)

    code, out, _ = run(capsys, 'pack', '-q', '--days', '0', composite.config)
    assert code == 0, out
    assert 'cat: removed 1 objects, 0 stubs' in out
    assert 'main: removed 0 objects, 1 stubs' in out
    code, out, _ = run(capsys, 'verify', '--strict', '-q', composite.config)
    assert (code, out.splitlines()[-1]) == (0, 'ok'), out
    check_counts(capsys, composite, {'main': (2, 2), 'cat': (3, 1)})

    # each child opens alone; what another partition refers to stayed
    cat = composite.open_alone('cat')
    try:
        with pytest.raises(POSKeyError):
            cat.load(oids['g'])
        for key in ('x', 'y', 'k'):
            cat.load(oids[key])
        if composite.keep_history:            # the old revision went
            with pytest.raises(POSKeyError):
                cat.loadSerial(oids['x'], old_x)
        db = ZODB.DB(cat)
        conn = db.open()
        assert 'PartitionStub' in repr(conn.root())
        assert conn.get(oids['x'])['y']['name'] == 'y'
        assert conn.get(oids['k'])['name'] == 'k'
        db.close()
    finally:
        cat.close()
    main = composite.open_alone('main')
    try:
        db = ZODB.DB(main)
        conn = db.open()
        assert conn.root()['m']['name'] == 'm'
        assert 'PartitionStub' in repr(conn.root()['m']['k'])
        db.close()
    finally:
        main.close()


def test_verify_reports_damage_and_repair_fixes_what_it_can(composite,
                                                             capsys):
    storage = composite.open()
    db = ZODB.DB(storage)
    with db.transaction() as conn:
        root = conn.root()
        root['a'] = PM(name='a')
        root['b'] = PM(name='b')
    conn = db.open()
    root = conn.root()
    with placement(conn, 'cat'):
        root['x'] = PM(name='x', a=root['a'], b=root['b'])
        root['t'] = PM(name='t')
        transaction.commit()
    del root['x']['b']                        # cat's stub for b: orphaned
    transaction.commit()
    a, b, x, t = [root[key]._p_oid for key in 'abxt']
    conn.close()
    db.close()
    assert (a[0], b[0], x[0], t[0]) == (0, 0, 1, 1)
    composite.delete_rows('cat', a)           # cat's stub for a
    composite.delete_rows('cat', t)           # main's stub now dangles

    code, out, _ = run(capsys, 'verify', '-q', composite.config)
    assert code == 1
    lines = out.splitlines()
    assert ("missing-stub: partition 'cat', oid %s, referred to by %s in "
            "partition 'cat'" % (oid_hex(a), oid_hex(x))) in out
    assert ("stub-target-missing: partition 'main', oid %s"
            % oid_hex(t)) in out
    assert ("dangling-reference: partition 'cat', oid %s, referred to by "
            "%s in partition 'main'" % (oid_hex(t), oid_hex(z64))) in out
    assert lines[-1] == '3 problem(s)'

    code, out, _ = run(capsys, 'repair', '--dry-run', composite.config)
    assert code == 1                          # t's loss is left for you
    assert ("would create the stub for %s in partition 'cat'" % oid_hex(a)
            in out)
    assert ("would remove the stub for %s in partition 'cat'" % oid_hex(b)
            in out)
    assert out.count('left for you: ') == 2
    code, again, _ = run(capsys, 'verify', '-q', composite.config)
    assert code == 1 and again.splitlines() == lines  # nothing changed

    code, out, _ = run(capsys, 'repair', composite.config)
    assert code == 1
    assert "created the stub for %s in partition 'cat'" % oid_hex(a) in out
    assert "removed the stub for %s in partition 'cat'" % oid_hex(b) in out
    code, report, _ = run_json(capsys, 'verify', '--json', '-q',
                               composite.config)
    assert code == 1
    assert {(p['kind'], p['oid']) for p in report['problems']} == {
        ('stub-target-missing', oid_hex(t)),
        ('dangling-reference', oid_hex(t))}

    # the person's part: drop the lost object; then repair and pack
    storage = composite.open()
    db = ZODB.DB(storage)
    with db.transaction() as conn:
        del conn.root()['t']
        assert conn.root()['x']['a']['name'] == 'a'
    db.close()
    code, out, _ = run(capsys, 'repair', composite.config)
    assert (code, out.strip()) == (
        0, "removed the stub for %s in partition 'main'" % oid_hex(t))
    code, out, _ = run(capsys, 'verify', '--strict', '-q', composite.config)
    assert (code, out.splitlines()[-1]) == (0, 'ok'), out
    # the stub repair wrote serves a plain ZODB on the child alone
    cat = composite.open_alone('cat')
    try:
        db = ZODB.DB(cat)
        assert 'PartitionStub' in repr(db.open().get(x)['a'])
        db.close()
    finally:
        cat.close()


WRITER = '''
import os, signal, sys
sys.path.insert(0, %(tests)r)
import transaction, ZODB
from compositestorage import faults
from relstorage_engines import open_config

db = ZODB.DB(open_config(open(sys.argv[1]).read()))
root = db.open().root()
root['m']['n'] = root['x']['n'] = 1      # main and cat

def hook(point):
    if point.startswith('finished:'):
        print(point.split(':', 1)[1], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

faults.hook = hook
transaction.commit()
'''


def test_recover_after_a_commit_killed_between_two_children(composite,
                                                            capsys):
    oids = fill(composite)
    script = composite.tmp_path / 'writer.py'
    script.write_text(WRITER % {'tests': HERE})
    proc = subprocess.run([sys.executable, str(script), composite.config],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    holder = proc.stdout.strip()          # the one child that finished
    assert holder in ('main', 'cat')
    if not composite.keep_history:
        # the history-free child finishes after every other one
        assert holder == 'main'
    lacking = {'main': 'cat', 'cat': 'main'}[holder]

    code, out, _ = run(capsys, 'recover', '--dry-run', composite.config)
    assert code == 0
    assert 'over main, cat: to be rolled back in %s' % holder in out
    code, out, _ = run(capsys, 'recover', composite.config)
    assert code == 0
    assert 'over main, cat: rolled back in %s' % holder in out
    code, out, _ = run(capsys, 'recover', composite.config)
    assert code == 0 and 'nothing to recover' in out
    code, out, _ = run(capsys, 'verify', '--strict', '-q', composite.config)
    assert (code, out.splitlines()[-1]) == (0, 'ok'), out
    # neither partition shows the transaction
    storage = composite.open()
    db = ZODB.DB(storage)
    try:
        root = db.open().root()
        assert 'n' not in root['m'] and 'n' not in root['x']
        assert root['m']['x'] is root['x']
    finally:
        db.close()
    assert lacking and oids


@pytest.mark.parametrize('file_primary', LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize('engine', ['sqlite', 'postgresql'])
def test_backup_and_restore_refuse_naming_the_child(tmp_path, capsys,
                                                    engine, file_primary):
    """Refused before anything is opened (no database is needed), with
    the consistent way to back the composite up."""
    where = str(tmp_path / 'cat-sqlite') if engine == 'sqlite' else \
        'composite_never_created'
    children = [('cat', 1, child_section(engine, where))]
    if not file_primary:
        children.insert(0, ('main', 0, child_section(engine, where)))
    config = tmp_path / 'composite.conf'
    config.write_text(composite_config(tmp_path, children,
                                       primary_file=file_primary))
    repository = tmp_path / 'repo'
    repository.mkdir()
    refused = "partition 'cat' (prefix 1)" if file_primary else \
        "partition 'main' (prefix 0)"
    database = ('sqlite3 data-dir %s' % where if engine == 'sqlite'
                else 'postgresql dsn dbname=%s host=' % where)
    for command in ('backup', 'restore'):
        code, out, err = run(capsys, command, config, repository)
        assert code == 1 and out == ''
        lines = err.strip().splitlines()
        assert len(lines) == 1 and 'Traceback' not in err
        for words in (refused, '<relstorage> child (%s' % database,
                      'not a FileStorage', 'stop its writer', 'pg_dump',
                      'data directory', 'restore them all together'):
            assert words in lines[0], (words, lines[0])
    assert os.listdir(repository) == []
    assert not os.path.exists(where)          # nothing was opened
