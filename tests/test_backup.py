"""Backing up and restoring a composite at one tid (docs/backup.rst).

Real FileStorage files, real ``repozo`` (``ZODB.scripts.repozo``), real
commits.  ``repozo`` alone backs each child up faithfully; run on the
children one after the other it catches them at different tids, and the
restored composite is broken.  ``compositestorage backup`` records one tid
T and ``restore`` cuts every child back to it.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import transaction
import ZODB
import ZODB.config
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob
from ZODB.FileStorage import FileStorage
from ZODB.fsIndex import fsIndex
from ZODB.MappingStorage import MappingStorage
from ZODB.scripts import repozo

from compositestorage import placement
from compositestorage.backup import BackupError
from compositestorage.backup import backup
from compositestorage.backup import cut_back
from compositestorage.backup import restore
from compositestorage.cli import main as cli_main
from compositestorage.journal import Intent
from compositestorage.journal import Journal
from compositestorage.verify import verify
from conftest import blob_paths
from conftest import THREE
from conftest import composite_xml
from conftest import config_file
from conftest import file_state
from conftest import open_composite
from conftest import partition_xml
from conftest import paths_for

HERE = os.path.dirname(os.path.abspath(__file__))
WRITER = os.path.join(HERE, 'crash_writer.py')
NAMES = [name for name, _ in THREE]


# --- helpers -------------------------------------------------------------------

def tids(path):
    """The tids of every transaction in a FileStorage file."""
    fs = FileStorage(path, read_only=True)
    try:
        return [t.tid for t in fs.iterator()]
    finally:
        fs.close()


def run_repozo(*argv):
    """Real repozo, in this process; SystemExit (its errors) propagates."""
    repozo.main([str(a) for a in argv])


def zodb_tool(name, path):
    return subprocess.run([sys.executable, '-m', 'ZODB.scripts.' + name,
                           str(path)], capture_output=True, text=True,
                          timeout=120)


def assert_zodb_tools_clean(path):
    for script in ('fsrefs', 'fstest'):
        proc = zodb_tool(script, path)
        assert proc.returncode == 0, (path, script, proc.stderr)
        assert proc.stdout.strip() == '', (path, script, proc.stdout)


def cli(capsys, *argv):
    """``(exit status, stdout, stderr)`` of the command line, in process."""
    code = cli_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *words):
    assert code == 1, err
    assert err.startswith('compositestorage: error: '), err
    assert err.strip().count('\n') == 0, err
    assert 'Traceback' not in err
    for word in words:
        assert word in err, (word, err)


def verify_paths(paths, parts=THREE):
    """``(problems, lastTransaction)`` of a composite over ``paths``."""
    storage = open_composite(paths, parts, read_only=True)
    try:
        problems, _ = verify(storage)
        return problems, storage.lastTransaction()
    finally:
        storage.close()


def build(paths):
    """Objects in every partition, main's referring to b's and c's."""
    db = ZODB.DB(open_composite(paths))
    try:
        with db.transaction() as conn:
            root = conn.root()
            for name in ('b', 'c'):
                with placement(conn, name):
                    obj = PersistentMapping(home=name, v=0)
                    conn.add(obj)
                root[name] = obj
            root['a'] = PersistentMapping(home='main', v=0)
        for i in range(1, 3):
            with db.transaction() as conn:
                root = conn.root()
                for name in ('a', 'b', 'c'):
                    root[name]['v'] = i
    finally:
        db.close()


def cross_commit(paths):
    """One transaction over main and b: main's object ``a`` gets a new
    object in b, and b's object gets a new object in main.  Its tid."""
    storage = open_composite(paths)
    db = ZODB.DB(storage)
    try:
        with db.transaction() as conn:
            root = conn.root()
            with placement(conn, 'b'):
                new_b = PersistentMapping(home='b', new=True)
                conn.add(new_b)
            with placement(conn, 'main'):
                new_a = PersistentMapping(home='main', new=True)
                conn.add(new_a)
            root['a']['new_b'] = new_b
            root['b']['new_a'] = new_a
        return storage.lastTransaction()
    finally:
        db.close()


def restore_target(tmp_path, name='out', parts=THREE):
    """A folder and config to restore into: ``(paths, config)``."""
    directory = tmp_path / name
    directory.mkdir()
    paths = paths_for(directory, parts)
    return paths, str(config_file(directory, paths, parts))


# --- cut_back --------------------------------------------------------------------

def test_cut_back_a_filestorage_file_to_a_tid(tmp_path):
    path = str(tmp_path / 'Data.fs')
    blobs = str(tmp_path / 'blobs')
    db = ZODB.DB(FileStorage(path, blob_dir=blobs))
    blob_sets = []
    try:
        for i in range(5):
            with db.transaction() as conn:
                root = conn.root()
                root['v'] = i
                root['blob%d' % i] = blob = Blob()
                with blob.open('w') as f:
                    f.write(b'blob %d' % i)
            db.storage._save_index()
            blob_sets.append(blob_paths(blobs))
    finally:
        db.close()
    all_tids = tids(path)
    keep = all_tids[3]
    with open(path + '.index', 'rb') as f:
        stale_index = f.read()

    removed = cut_back(path, keep, blob_dir=blobs)

    assert removed == all_tids[4:] and len(removed) == 2
    assert tids(path) == all_tids[:4]
    # the stale index is gone: the one there now ends where the file does
    with open(path + '.index', 'rb') as f:
        assert f.read() != stale_index
    assert fsIndex.load(path + '.index')['pos'] == os.path.getsize(path)
    # the blobs of the removed transactions went with them
    assert blob_paths(blobs) == blob_sets[2]
    assert_zodb_tools_clean(path)
    db = ZODB.DB(FileStorage(path, blob_dir=blobs))
    try:
        root = db.open().root()
        assert root['v'] == 2 and 'blob3' not in root
        with root['blob2'].open() as f:
            assert f.read() == b'blob 2'
    finally:
        db.close()
    # cutting back again, or to a later tid, changes nothing
    before = file_state({'fs': path})
    assert cut_back(path, keep, blob_dir=blobs) == []
    assert cut_back(path, all_tids[-1].hex()) == []
    assert file_state({'fs': path}) == before


def test_cut_back_an_open_filestorage(tmp_path):
    path = str(tmp_path / 'Data.fs')
    db = ZODB.DB(FileStorage(path))
    for i in range(4):
        with db.transaction() as conn:
            conn.root()['v'] = i
    db.close()
    all_tids = tids(path)
    storage = FileStorage(path)
    assert cut_back(storage, all_tids[2]) == all_tids[3:]
    assert [t.tid for t in storage.iterator()] == all_tids[:3]
    assert storage.load(b'\0' * 8)[1] == all_tids[2]
    db = ZODB.DB(storage)
    try:
        with db.transaction() as conn:
            assert conn.root()['v'] == 1
            conn.root()['v'] = 9
        # later tids stay above the ones taken back
        assert storage.lastTransaction() > all_tids[-1]
    finally:
        db.close()
    assert tids(path)[:3] == all_tids[:3] and len(tids(path)) == 4


def test_cut_back_refuses_what_it_cannot_cut(tmp_path):
    not_fs = tmp_path / 'notes.txt'
    not_fs.write_text('hello')
    with pytest.raises(BackupError, match='not a FileStorage file'):
        cut_back(str(not_fs), b'\0' * 8)
    with pytest.raises(BackupError, match='no such file'):
        cut_back(str(tmp_path / 'nothere.fs'), b'\0' * 8)
    with pytest.raises(BackupError, match='not a tid'):
        cut_back(str(not_fs), 'xyz')
    path = str(tmp_path / 'Data.fs')
    FileStorage(path).close()
    fs = FileStorage(path, read_only=True)
    try:
        with pytest.raises(BackupError, match='read-only'):
            cut_back(fs, b'\0' * 8)
    finally:
        fs.close()


# --- (a) repozo alone, one child at a time ---------------------------------------

def test_repozo_round_trip_of_each_child(tmp_path):
    paths = paths_for(tmp_path)
    build(paths)
    (tmp_path / 'out').mkdir()
    out = paths_for(tmp_path / 'out')
    for name in NAMES:
        repository = tmp_path / 'repo' / name
        repository.mkdir(parents=True)
        # the repozo script itself, as an operator runs it
        proc = subprocess.run(
            [sys.executable, '-m', 'ZODB.scripts.repozo', '-B', '-r',
             str(repository), '-f', paths[name]],
            capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        proc = subprocess.run(
            [sys.executable, '-m', 'ZODB.scripts.repozo', '-R', '-r',
             str(repository), '-o', out[name]],
            capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        with open(paths[name], 'rb') as a, open(out[name], 'rb') as b:
            assert a.read() == b.read()
        assert os.path.exists(out[name] + '.index')
        assert_zodb_tools_clean(out[name])
    problems, last = verify_paths(out)
    assert problems == []
    assert last == max(tids(paths['main'])[-1], tids(paths['b'])[-1])
    db = ZODB.DB(open_composite(out, read_only=True))
    try:
        root = db.open().root()
        assert [root[n]['v'] for n in ('a', 'b', 'c')] == [2, 2, 2]
    finally:
        db.close()


# --- (b) separate repozo runs are inconsistent; restore cuts back ----------------

def test_separate_repozo_runs_break_the_composite(tmp_path, capsys):
    paths = paths_for(tmp_path)
    build(paths)
    repository = tmp_path / 'repo'
    for name in NAMES:
        (repository / name).mkdir(parents=True)
    originals = {}
    run_repozo('-B', '-r', repository / 'main', '-f', paths['main'])
    originals['main'] = tids(paths['main'])
    x = cross_commit(paths)
    for name in ('b', 'c'):
        run_repozo('-B', '-r', repository / name, '-f', paths[name])
    assert x in tids(paths['main']) and x in tids(paths['b'])

    # restored naively, one repozo -R per child: half of x, and broken
    naive, naive_config = restore_target(tmp_path, 'naive')
    for name in NAMES:
        run_repozo('-R', '-r', repository / name, '-o', naive[name])
    assert x in tids(naive['b']) and x not in tids(naive['main'])
    problems, _ = verify_paths(naive)
    kinds = {(p.kind, p.partition) for p in problems}
    assert ('dangling-reference', 'main') in kinds
    assert ('stub-target-missing', 'b') in kinds
    code, out, _ = cli(capsys, 'verify', naive_config)
    assert code == 1 and 'dangling-reference' in out

    # restore: no composite-backup.json, so back to the oldest common
    # point, main's last tid, which is before x
    target, config = restore_target(tmp_path)
    code, out, err = cli(capsys, 'restore', config, repository)
    assert code == 0, err
    point = originals['main'][-1]
    assert point < x
    assert 'to transaction %s' % point.hex() in out
    assert 'oldest common point' in out
    assert 'b: restored %s' % target['b'] in out
    assert 'removed 1 transaction(s)' in out        # x, from b
    assert 'verify: ok' in out
    for name in NAMES:
        assert tids(target[name]) == [t for t in tids(paths[name])
                                      if t <= point]
        assert_zodb_tools_clean(target[name])
    assert verify_paths(target) == ([], point)
    code, out, _ = cli(capsys, 'verify', config)
    assert code == 0 and out.strip().endswith('ok')


def test_backup_records_one_tid_and_restore_cuts_back_to_it(tmp_path):
    """``backup`` copies main, then x commits (main and b), then b and c
    are copied: b's copy holds x, main's does not; restore cuts b back."""
    paths = paths_for(tmp_path)
    build(paths)
    config = str(config_file(tmp_path, paths))
    repository = tmp_path / 'repo'
    repository.mkdir()
    before = {name: tids(paths[name]) for name in NAMES}
    committed = []

    def between(name):
        if name == 'main':
            committed.append(cross_commit(paths))

    report = backup(config, repository, between=between)
    t = report.tid
    x, = committed
    assert t == max(before['main'][-1], before['b'][-1]) and t < x
    manifest = json.loads((repository / 'composite-backup.json').read_text())
    assert manifest['tid'] == t.hex()
    assert [(p['name'], p['prefix'], p['path']) for p in
            manifest['partitions']] == [(n, p, paths[n]) for n, p in THREE]
    assert {p.action for p in report.partitions} == {'full'}

    target, target_config = restore_target(tmp_path)
    result = restore(target_config, repository)
    assert result.tid == t and result.recorded
    removed = {p.name: p.removed for p in result.partitions}
    assert removed == {'main': [], 'b': [x], 'c': []}
    assert result.problems == []
    for name in NAMES:
        assert tids(target[name]) == [u for u in before[name] if u <= t]
    assert verify_paths(target) == ([], t)


# --- (c) a backup while a writer keeps committing ---------------------------------

class Writer:
    """tests/crash_writer.py, committing to all three partitions until
    stopped; ``acked`` collects ``(tid, n)`` as each commit returns."""

    def __init__(self, directory, count=10 ** 6, env=None):
        self.proc = subprocess.Popen(
            [sys.executable, WRITER, str(directory), str(count)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, **(env or {})))
        self.acked = []
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith('ready'):
                self.ready.set()
            elif line.startswith('done '):
                _, tid, n = line.split()[:3]
                self.acked.append((bytes.fromhex(tid), int(n)))

    def wait_for_commits(self, count, timeout=60):
        goal = len(self.acked) + count
        deadline = time.time() + timeout
        while len(self.acked) < goal:
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.time() < deadline, 'the writer does not commit'
            time.sleep(0.005)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        self.thread.join(timeout=60)
        self.proc.stderr.close()


def counters(paths):
    db = ZODB.DB(open_composite(paths, read_only=True))
    try:
        c = db.open().root()['counters']
        return {name: c[name]['n'] for name in NAMES}
    finally:
        db.close()


def test_backup_while_a_writer_process_commits(tmp_path, capsys):
    data = tmp_path / 'data'
    data.mkdir()
    paths = paths_for(data)
    config = str(config_file(data, paths))
    repository = tmp_path / 'repo'
    repository.mkdir()
    writer = Writer(data)
    try:
        assert writer.ready.wait(60)
        writer.wait_for_commits(5)
        # more commits after each child's copy, before the next one's
        report = backup(config, repository,
                        between=lambda name: writer.wait_for_commits(3))
        writer.wait_for_commits(2)
    finally:
        writer.stop()
    t = report.tid
    acked = dict(writer.acked)
    assert t in acked                   # T is a commit the writer finished

    target, target_config = restore_target(tmp_path)
    result = restore(target_config, repository)
    assert result.problems == [] and result.tid == t
    # the children were copied one after the other, while the writer
    # committed: the later copies held more transactions after T, which
    # were cut off
    removed = [len(p.removed) for p in result.partitions]
    assert 1 <= removed[1] < removed[2], removed
    assert all(p.last_tid == t for p in result.partitions)
    for name in NAMES:
        assert tids(target[name])[-1] == t
        assert_zodb_tools_clean(target[name])
    assert verify_paths(target) == ([], t)
    assert set(counters(target).values()) == {acked[t]}


def test_backup_while_a_transaction_is_voted_but_not_finished(tmp_path):
    """The writer (a thread here) has voted a transaction over main, b and
    c, and not finished it: each file ends with it, flagged unfinished,
    and no intent is in the journal yet.  A FileStorage opened read-only
    then reports that tid as its last transaction.  The backup must not
    take it for finished: it finishes only after main is copied, so b's
    and c's copies hold it and main's does not."""
    from compositestorage import faults
    paths = paths_for(tmp_path)
    build(paths)
    config = str(config_file(tmp_path, paths))
    repository = tmp_path / 'repo'
    repository.mkdir()
    storage = open_composite(paths)
    db = ZODB.DB(storage)
    before = storage.lastTransaction()
    voted, go = threading.Event(), threading.Event()
    errors = []

    def commit():
        try:
            tm = transaction.TransactionManager()
            root = db.open(tm).root()
            for name in ('a', 'b', 'c'):
                root[name]['v'] += 1
            tm.commit()
        except BaseException as e:      # shown by the main thread
            errors.append(e)

    writer = threading.Thread(target=commit)

    def hook(point):
        if point == 'voted:c' and threading.current_thread() is writer:
            voted.set()
            assert go.wait(60)

    def between(name):
        if name == 'main':
            go.set()
            writer.join(60)

    faults.hook = hook
    try:
        writer.start()
        assert voted.wait(60)
        fs = FileStorage(paths['main'], read_only=True)
        try:
            assert fs.lastTransaction() > before    # the unfinished one
        finally:
            fs.close()
        assert Journal(paths['main'] + '.journal').read() is None
        report = backup(config, repository, between=between)
    finally:
        faults.hook = None
        go.set()
        writer.join(60)
        x = storage.lastTransaction()
        db.close()
    assert errors == [] and x > before
    assert report.tid == before

    target, target_config = restore_target(tmp_path)
    result = restore(target_config, repository)
    assert {p.name: p.removed for p in result.partitions} == {
        'main': [], 'b': [x], 'c': [x]}
    assert result.problems == []
    for name in NAMES:
        assert tids(target[name]) == [t for t in tids(paths[name])
                                      if t <= before]
    assert verify_paths(target) == ([], before)


def test_backup_hides_a_transaction_the_journal_says_is_unfinished(
        tmp_path, capsys):
    """The writer dies after finishing transaction 3 in main only: the
    journal holds its intent.  backup (read-only, no recovery) backs up
    at the transaction before it, and restore leaves it out."""
    data = tmp_path / 'data'
    data.mkdir()
    paths = paths_for(data)
    config = str(config_file(data, paths))
    seed = Writer(data, count=2)
    assert seed.proc.wait(timeout=120) == 0
    seed.stop()
    assert [n for _, n in seed.acked] == [1, 2]
    writer = Writer(data, count=10, env={'CRASH_AT': 'finished:main:3'})
    writer.proc.wait(timeout=120)
    writer.stop()
    assert [n for _, n in writer.acked] == [3, 4]
    assert writer.proc.returncode == -signal.SIGKILL
    intent = Journal(paths['main'] + '.journal').read()
    assert isinstance(intent, Intent)
    assert tids(paths['main'])[-1] == intent.tid
    assert intent.tid not in tids(paths['b'])
    repository = tmp_path / 'repo'
    repository.mkdir()
    code, out, err = cli(capsys, 'backup', config, repository)
    assert code == 0, err
    t = bytes.fromhex(json.loads(
        (repository / 'composite-backup.json').read_text())['tid'])
    assert t == writer.acked[-1][0] and t < intent.tid
    # the backup did not recover: the intent is still there
    assert Journal(paths['main'] + '.journal').read() == intent
    target, target_config = restore_target(tmp_path)
    code, out, err = cli(capsys, 'restore', target_config, repository)
    assert code == 0, err
    lines = {line.split(':')[0]: line for line in out.splitlines()}
    assert 'restored' in lines['main']
    assert 'removed 1 transaction(s)' in lines['main']
    assert 'removed 0 transaction(s)' in lines['b']
    assert 'removed 0 transaction(s)' in lines['c']
    for name in NAMES:
        assert tids(target[name])[-1] == t
    assert verify_paths(target) == ([], t)
    assert set(counters(target).values()) == {writer.acked[-1][1]}


# --- (d) incremental backups ---------------------------------------------------------

def bump(paths, names=('a', 'b', 'c')):
    db = ZODB.DB(open_composite(paths))
    try:
        with db.transaction() as conn:
            for name in names:
                conn.root()[name]['v'] += 1
        return db.storage.lastTransaction()
    finally:
        db.close()


def test_incremental_backups_then_restore(tmp_path, capsys):
    paths = paths_for(tmp_path)
    build(paths)
    config = str(config_file(tmp_path, paths))
    repository = tmp_path / 'repo'
    repository.mkdir()
    code, out, err = cli(capsys, 'backup', config, repository)
    assert code == 0, err
    assert out.count(': full backup') == 3
    bump(paths)
    bump(paths, ('a', 'b'))             # c changes no more
    code, out, err = cli(capsys, 'backup', config, repository)
    assert code == 0, err
    assert 'main: %s: incremental backup' % paths['main'] in out
    assert 'b: %s: incremental backup' % paths['b'] in out
    assert 'c: %s: incremental backup' % paths['c'] in out
    second = json.loads((repository / 'composite-backup.json').read_text())
    t = bytes.fromhex(second['tid'])
    for name in NAMES:
        files = os.listdir(repository / name)
        assert len([f for f in files if f.endswith('.deltafs')]) == 1
        assert len([f for f in files if f.endswith('.fs')]) == 1
    at_t = {name: tids(paths[name]) for name in NAMES}
    later = bump(paths)                 # not in any backup
    assert later > t
    # a later plain repozo backup of main alone is not used: restore
    # takes the files of the composite backup
    time.sleep(1.1)             # repozo names its files by the second
    run_repozo('-B', '-r', repository / 'main', '-f', paths['main'])

    target, target_config = restore_target(tmp_path)
    code, out, err = cli(capsys, 'restore', target_config, repository)
    assert code == 0, err
    assert 'from 2 repozo file(s)' in out and 'from 3' not in out
    assert out.count('removed 0 transaction(s)') == 3
    for name in NAMES:
        assert tids(target[name]) == at_t[name]
    assert verify_paths(target) == ([], t)
    db = ZODB.DB(open_composite(target, read_only=True))
    try:
        root = db.open().root()
        assert [root[n]['v'] for n in ('a', 'b', 'c')] == [4, 4, 3]
    finally:
        db.close()


def test_plain_incremental_gzipped_repozo_backups(tmp_path, capsys):
    """Plain repozo backups (gzipped, full then incremental), each child
    on its own, with commits in between: restore finds the oldest common
    point in the compressed backups."""
    paths = paths_for(tmp_path)
    build(paths)
    repository = tmp_path / 'repo'
    for name in NAMES:
        (repository / name).mkdir(parents=True)
        run_repozo('-B', '-z', '-r', repository / name, '-f', paths[name])
    time.sleep(1.1)             # repozo names its files by the second
    bump(paths)
    run_repozo('-B', '-z', '-r', repository / 'main', '-f', paths['main'])
    point = tids(paths['main'])[-1]
    bump(paths)
    for name in ('b', 'c'):
        run_repozo('-B', '-z', '-r', repository / name, '-f', paths[name])
    for name in NAMES:
        assert any(f.endswith('.deltafsz')
                   for f in os.listdir(repository / name))

    target, config = restore_target(tmp_path)
    code, out, err = cli(capsys, 'restore', config, repository, '--dry-run')
    assert code == 0, err
    assert 'would remove 1 transaction(s)' in out and 'dry run' in out
    assert not any(os.path.exists(p) for p in target.values())
    code, out, err = cli(capsys, 'restore', config, repository)
    assert code == 0, err
    assert 'to transaction %s' % point.hex() in out
    for name in NAMES:
        assert tids(target[name]) == [t for t in tids(paths[name])
                                      if t <= point]
    assert verify_paths(target) == ([], point)


# --- (e) bad input -------------------------------------------------------------------

def test_missing_repository(tmp_path, capsys):
    paths = paths_for(tmp_path)
    build(paths)
    config = config_file(tmp_path, paths)
    missing = tmp_path / 'nothere'
    code, _, err = cli(capsys, 'backup', config, missing)
    assert_one_line_error(code, err, 'no such repository folder',
                          str(missing))
    target, target_config = restore_target(tmp_path)
    code, _, err = cli(capsys, 'restore', target_config, missing)
    assert_one_line_error(code, err, 'no such repository folder',
                          str(missing))
    # a repository without a backup of one partition
    repository = tmp_path / 'repo'
    (repository / 'main').mkdir(parents=True)
    run_repozo('-B', '-r', repository / 'main', '-f', paths['main'])
    code, _, err = cli(capsys, 'restore', target_config, repository)
    assert_one_line_error(code, err, "no repozo backup of partition 'b'")
    assert not any(os.path.exists(p) for p in target.values())
    # and a config that is not there
    code, _, err = cli(capsys, 'backup', tmp_path / 'nothere.conf',
                       repository)
    assert_one_line_error(code, err, 'no such file', 'nothere.conf')
    assert not os.path.exists(missing)


def test_restore_over_existing_files_needs_force(tmp_path, capsys):
    paths = paths_for(tmp_path)
    build(paths)
    config = config_file(tmp_path, paths)
    repository = tmp_path / 'repo'
    repository.mkdir()
    assert cli(capsys, 'backup', config, repository)[0] == 0
    t = bytes.fromhex(json.loads(
        (repository / 'composite-backup.json').read_text())['tid'])
    # over the live files themselves, which have moved on
    bump(paths)
    live = file_state(paths)
    code, _, err = cli(capsys, 'restore', config, repository)
    assert_one_line_error(code, err, 'already exist', '--force',
                          paths['main'])
    code, _, err = cli(capsys, 'restore', config, repository, '--dry-run')
    assert_one_line_error(code, err, 'already exist', '--force')
    assert file_state(paths) == live
    # a journal left with an intent that names a tid the backup holds
    # would roll it back at the next open: --force removes it
    Journal(paths['main'] + '.journal').write_intent(Intent(t, (0, 1)))
    code, out, err = cli(capsys, 'restore', config, repository, '--force')
    assert code == 0, err
    lines = out.splitlines()
    assert 'removed the old %s.journal' % paths['main'] in lines
    # the old files are reported removed before the restored ones are
    # reported in their place
    removed = lines.index('removed the old %s' % paths['main'])
    restored = [i for i, line in enumerate(lines)
                if line.startswith('main: restored %s ' % paths['main'])]
    assert restored and removed < restored[0], lines
    assert not os.path.exists(paths['main'] + '.journal')
    assert verify_paths(paths) == ([], t)
    storage = open_composite(paths)     # a writer: recovers nothing
    try:
        assert storage.recovered is None
        assert storage.lastTransaction() == t
    finally:
        storage.close()


def test_an_interrupted_restore_leaves_the_files_as_they_were(
        tmp_path, capsys, monkeypatch):
    """Ctrl-C while repozo restores the second partition: every partition
    is restored beside its file and put in place only at the end, so the
    files stay as they were, and nothing is left beside them."""
    from compositestorage import backup as backup_module
    paths = paths_for(tmp_path)
    build(paths)
    config = config_file(tmp_path, paths)
    repository = tmp_path / 'repo'
    repository.mkdir()
    assert cli(capsys, 'backup', config, repository)[0] == 0
    bump(paths)
    live = file_state(paths)
    real = backup_module.run_repozo
    calls = []

    def interrupted_on_the_second(argv, what):
        calls.append(argv)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(argv, what)

    monkeypatch.setattr(backup_module, 'run_repozo',
                        interrupted_on_the_second)
    code, out, err = cli(capsys, 'restore', config, repository, '--force')
    assert code == 130 and 'interrupted' in err, (code, err)
    assert len(calls) == 2
    assert file_state(paths) == live
    assert not [f for f in os.listdir(str(tmp_path)) if 'restoring' in f]
    monkeypatch.setattr(backup_module, 'run_repozo', real)
    code, out, err = cli(capsys, 'restore', config, repository, '--force')
    assert code == 0, err
    assert file_state(paths) != live
    assert verify_paths(paths)[0] == []


def test_restore_in_place_removes_the_blobs_of_what_it_cuts_off(tmp_path,
                                                                capsys):
    blobs = tmp_path / 'blobs'
    conf = tmp_path / 'blobs.conf'
    conf.write_text(composite_xml(
        [partition_xml(name, prefix, str(tmp_path / (name + '.fs')))
         for name, prefix in THREE], top='blob-dir %s' % blobs))

    def commit_blobs(label):
        db = ZODB.DB(ZODB.config.storageFromFile(open(str(conf))))
        try:
            with db.transaction() as conn:
                for name in ('main', 'b'):
                    with placement(conn, name):
                        blob = Blob()
                        conn.add(blob)
                    with blob.open('w') as f:
                        f.write(b'%s in %s' % (label, name.encode()))
                    conn.root()['%s-%s' % (label.decode(), name)] = blob
            return db.storage.lastTransaction()
        finally:
            db.close()

    t = commit_blobs(b'kept')
    kept = blob_paths(blobs)
    repository = tmp_path / 'repo'
    repository.mkdir()
    code, out, err = cli(capsys, 'backup', conf, repository)
    assert code == 0, err
    assert 'repozo does not back up blobs' in out
    later = commit_blobs(b'later')
    assert later > t and len(blob_paths(blobs)) == len(kept) + 2
    # the blob directory is restored in place as a copy taken after the
    # backup would be: it holds the blobs of the later transaction
    code, out, err = cli(capsys, 'restore', conf, repository, '--force',
                         '--dry-run')
    assert code == 0, err
    assert 'would remove 2 blob file(s) later than %s' % t.hex() in out
    assert len(blob_paths(blobs)) == len(kept) + 2
    code, out, err = cli(capsys, 'restore', conf, repository, '--force')
    assert code == 0, err
    assert 'removed 2 blob file(s) later than %s' % t.hex() in out
    assert blob_paths(blobs) == kept
    db = ZODB.DB(ZODB.config.storageFromFile(open(str(conf))))
    try:
        assert db.storage.lastTransaction() == t
        root = db.open().root()
        assert 'later-main' not in root
        with root['kept-b'].open() as f:
            assert f.read() == b'kept in b'
    finally:
        db.close()


def test_restore_refuses_while_a_writer_has_the_composite_open(tmp_path,
                                                               capsys):
    paths = paths_for(tmp_path)
    build(paths)
    config = config_file(tmp_path, paths)
    repository = tmp_path / 'repo'
    repository.mkdir()
    assert cli(capsys, 'backup', config, repository)[0] == 0
    writer = open_composite(paths)
    try:
        live = file_state(paths)
        code, _, err = cli(capsys, 'restore', config, repository, '--force')
        assert_one_line_error(code, err, 'open for writing', 'stop it')
        assert file_state(paths) == live
    finally:
        writer.close()


def test_a_child_that_is_not_a_filestorage_is_refused(tmp_path, capsys):
    conf = tmp_path / 'mixed.conf'
    conf.write_text(composite_xml([
        partition_xml('main', 0, str(tmp_path / 'main.fs')),
        partition_xml('b', 1, extra='<mappingstorage/>')]))
    # a composite that opens, and works
    db = ZODB.DB(ZODB.config.storageFromFile(open(str(conf))))
    with db.transaction() as conn:
        with placement(conn, 'b'):
            conn.root()['x'] = x = PersistentMapping()
            conn.add(x)
    assert isinstance(db.storage.partition_named('b').storage,
                      MappingStorage)
    db.close()
    repository = tmp_path / 'repo'
    repository.mkdir()
    for command in ('backup', 'restore'):
        code, _, err = cli(capsys, command, conf, repository)
        assert_one_line_error(code, err, "partition 'b'", 'not a FileStorage',
                              'mappingstorage')
    assert os.listdir(repository) == []


def test_a_backup_of_other_partitions_is_refused(tmp_path, capsys):
    paths = paths_for(tmp_path)
    build(paths)
    config = config_file(tmp_path, paths)
    repository = tmp_path / 'repo'
    repository.mkdir()
    assert cli(capsys, 'backup', config, repository)[0] == 0
    two = (('main', 0), ('b', 1))
    target, target_config = restore_target(tmp_path, parts=two)
    code, _, err = cli(capsys, 'restore', target_config, repository)
    assert_one_line_error(code, err, 'has partitions b, c, main',
                          'the config has b, main')
    assert not any(os.path.exists(p) for p in target.values())


def test_help_names_the_commands(capsys):
    with pytest.raises(SystemExit):
        cli_main(['--help'])
    out = capsys.readouterr().out
    assert 'backup' in out and 'restore' in out
    for command, words in (('backup', ('REPOSITORY', '--full', 'repozo')),
                           ('restore', ('--force', '--dry-run',
                                        'smallest'))):
        with pytest.raises(SystemExit):
            cli_main([command, '--help'])
        out = capsys.readouterr().out
        for word in words:
            assert word in out, (command, word)
