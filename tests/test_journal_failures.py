"""When the commit journal cannot be written (issue 11, case 4).

A failure before the commit point must abort every child and leave the
storage usable, with an error that says what failed; a full disk or a
process out of file descriptors must never leave a child mid-commit, where
the next ``tpc_begin`` would wait for its commit lock forever.

The journal is opened, and its blocks allocated, when a writer opens, so
a full disk or no file descriptor left is met then, for real; a write of
an intent that fails at commit time, which allocation rules out on an
ordinary disk, is injected at the fault point before it.
"""
import errno
import os
import subprocess
import sys
import threading

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage

from compositestorage import CompositeStorage
from compositestorage import faults
from compositestorage import placement
from compositestorage.errors import JournalError

NAMES = ('main', 'b')


def open_two(directory, journal=None):
    children = [(name, prefix, FileStorage(os.path.join(str(directory),
                                                        name + '.fs')))
                for prefix, name in enumerate(NAMES)]
    try:
        return CompositeStorage(children, journal=journal)
    except BaseException:
        for _, _, child in children:
            child.close()
        raise


def seed(db):
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    root = conn.root()
    for name in NAMES:
        with placement(conn, name):
            root[name] = PersistentMapping(n=0)
            conn.add(root[name])
    tm.commit()
    assert [root[name]._p_oid[0] for name in NAMES] == [0, 1]
    conn.close()


def commit(db, names, timeout=20):
    """Add 1 in each partition of ``names``, in a thread: a commit that
    hangs fails the test instead of the run."""
    result = {}

    def run():
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        tm.begin()      # a ZEO client with server_sync waits for the server
        try:
            for name in names:
                conn.root()[name]['n'] += 1
                # more than a page: a full disk has no room for it
                conn.root()[name]['pad'] = os.urandom(12000)
            tm.commit()
            result['ok'] = True
        except Exception as e:
            result['error'] = e
            tm.abort()
        finally:
            conn.close()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), 'the commit hung'
    return result


def values(db):
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    tm.begin()      # a ZEO client with server_sync waits for the server
    try:
        return tuple(conn.root()[name]['n'] for name in NAMES)
    finally:
        conn.close()


def fail_intent_once(monkeypatch, err=errno.ENOSPC):
    calls = []

    def hook(point):
        if point == 'write-intent' and not calls:
            calls.append(point)
            raise OSError(err, os.strerror(err))
    monkeypatch.setattr(faults, 'hook', hook)
    return calls


@pytest.mark.parametrize('err', [errno.ENOSPC, errno.EMFILE, errno.EIO])
def test_an_intent_that_cannot_be_written_aborts_every_child(
        tmp_path, monkeypatch, err):
    storage = open_two(tmp_path)
    db = ZODB.DB(storage)
    try:
        seed(db)
        before = storage.lastTransaction()
        sizes = {n: os.path.getsize(str(tmp_path / (n + '.fs')))
                 for n in NAMES}
        calls = fail_intent_once(monkeypatch, err)
        result = commit(db, NAMES)
        assert calls
        error = result['error']
        assert isinstance(error, JournalError)
        message = str(error)
        assert 'main.fs.journal' in message and os.strerror(err) in message
        assert 'aborted in every partition' in message
        assert 'main, b' in message
        # nothing of it anywhere
        assert storage.lastTransaction() == before
        for name in NAMES:
            assert os.path.getsize(str(tmp_path / (name + '.fs'))) == \
                sizes[name]
        assert values(db) == (0, 0)
        # every child was aborted: the next commits, over one partition
        # and over both, go through at once
        assert commit(db, ['b']) == {'ok': True}
        assert commit(db, NAMES) == {'ok': True}
        assert values(db) == (1, 2)
    finally:
        db.close()
    # and the files hold exactly that
    storage = open_two(tmp_path)
    db = ZODB.DB(storage)
    try:
        assert storage.recovered is None
        assert values(db) == (1, 2)
    finally:
        db.close()


def test_through_zeo_the_next_client_commits(tmp_path, monkeypatch):
    """The server's composite fails to write an intent once: the client
    gets the error, and another client commits at once after it."""
    import ZEO
    from conftest import composite_xml
    from conftest import partition_xml
    conf = composite_xml([partition_xml(name, prefix,
                                        str(tmp_path / (name + '.fs')))
                          for prefix, name in enumerate(NAMES)],
                         'placement round-robin', section_name='1')
    addr, stop = ZEO.server(storage_conf=conf)
    try:
        db = ZEO.DB(addr, server_sync=True)
        other = ZEO.DB(addr, server_sync=True)
        try:
            tm = transaction.TransactionManager()
            conn = db.open(tm)
            root = conn.root()
            root['main'] = PersistentMapping(n=0)
            root['b'] = PersistentMapping(n=0)
            tm.commit()
            assert {root['main']._p_oid[0], root['b']._p_oid[0]} == {0, 1}
            conn.close()
            calls = fail_intent_once(monkeypatch)
            result = commit(db, NAMES)
            assert calls and 'error' in result
            assert 'commit journal' in str(result['error'])
            assert commit(other, NAMES, timeout=20) == {'ok': True}
            assert commit(db, ['main'], timeout=20) == {'ok': True}
            assert values(other) == (2, 1)
        finally:
            db.close()
            other.close()
    finally:
        stop()


# --- real failures: a full disk, no file descriptor left ---------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs of our own (needs root, as CI runs)."""
    mount = tmp_path / 'disk'
    mount.mkdir()
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs',
                           str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        if os.environ.get('CI') == 'true':
            pytest.fail('cannot mount a tmpfs under CI: %s' % done.stderr)
        pytest.skip('cannot mount a small tmpfs here (%s): needs root'
                    % done.stderr.strip())
    try:
        yield mount
    finally:
        subprocess.run(['umount', '-l', str(mount)])


def fill(directory):
    """Fill the disk; returns the filler's path."""
    path = os.path.join(str(directory), 'filler')
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b'\0' * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return path


def test_a_full_disk_fails_commits_cleanly_and_commits_again(small_disk):
    storage = open_two(small_disk)
    db = ZODB.DB(storage)
    try:
        seed(db)
        filler = fill(small_disk)
        for names in (NAMES, ['b'], ['main']):
            result = commit(db, names)
            assert isinstance(result.get('error'), OSError), result
            assert result['error'].errno == errno.ENOSPC
        assert values(db) == (0, 0)
        os.remove(filler)
        for names in (NAMES, ['b'], NAMES):
            assert commit(db, names) == {'ok': True}
        assert values(db) == (2, 3)
    finally:
        db.close()
    storage = open_two(small_disk)
    db = ZODB.DB(storage)
    try:
        assert values(db) == (2, 3)
    finally:
        db.close()


def test_a_journal_on_a_full_disk_is_an_error_at_open(tmp_path, small_disk):
    fill(small_disk)
    journal = str(small_disk / 'composite.journal')
    # the lock file fits (an empty file) only if there is an inode and no
    # block is needed; either way the open must fail cleanly
    with pytest.raises(JournalError) as exc:
        open_two(tmp_path, journal=journal)
    message = str(exc.value)
    assert 'composite.journal' in message and 'No space left' in message
    assert 'nothing was written' in message
    # nothing stays locked: with space, the same composite opens
    os.remove(str(small_disk / 'filler'))
    storage = open_two(tmp_path, journal=journal)
    storage.close()


OUT_OF_DESCRIPTORS = r'''
import os, resource, sys
from ZODB.FileStorage import FileStorage
from compositestorage import CompositeStorage
from compositestorage.errors import JournalError
directory = sys.argv[1]
children = [(name, prefix, FileStorage(os.path.join(directory, name + '.fs')))
            for prefix, name in enumerate(('main', 'b'))]
used = len(os.listdir('/proc/self/fd'))
resource.setrlimit(resource.RLIMIT_NOFILE, (used + 1, used + 1))
try:
    CompositeStorage(children)
except JournalError as e:
    print('refused:', e)
else:
    print('opened')
'''


def test_no_file_descriptor_left_is_an_error_at_open(tmp_path):
    done = subprocess.run([sys.executable, '-c', OUT_OF_DESCRIPTORS,
                           str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith('refused:'), out + done.stderr
    assert 'Too many open files' in out and 'ulimit -n' in out


# --- one writer guard for every writable composite -------------------------------

def test_a_child_another_writable_composite_uses_is_refused():
    """Two writable composites of one process over the same MappingStorage
    (no file, no journal): the second is refused until the first closes."""
    from ZODB.MappingStorage import MappingStorage
    from compositestorage.errors import WriterLockedError
    main, b = MappingStorage('main'), MappingStorage('b')
    first = CompositeStorage([('main', 0, main), ('b', 1, b)])
    assert first.journal is None
    with pytest.raises(WriterLockedError) as exc:
        CompositeStorage([('main', 0, MappingStorage('other')),
                          ('b', 1, b)])
    assert "partition 'b'" in str(exc.value)
    assert 'read-only' in str(exc.value)
    # read-only beside it is fine
    reader = CompositeStorage([('main', 0, main), ('b', 1, b)],
                              read_only=True)
    assert reader.isReadOnly()
    first.close()


def test_the_journal_goes_beside_the_first_file_child(tmp_path):
    """A primary that is not a file: the journal and the writer lock go
    beside the first FileStorage child, so a second writer process is
    refused by the composite's own lock too."""
    from ZODB.MappingStorage import MappingStorage
    from compositestorage.errors import WriterLockedError
    b = FileStorage(str(tmp_path / 'b.fs'))
    storage = CompositeStorage([('main', 0, MappingStorage()), ('b', 1, b)])
    try:
        assert storage.journal.path == str(tmp_path / 'b.fs.journal')
        assert os.path.exists(str(tmp_path / 'b.fs.journal.lock'))
        with pytest.raises(WriterLockedError):
            CompositeStorage([('main', 0, MappingStorage()),
                              ('c', 1, MappingStorage())],
                             journal=str(tmp_path / 'b.fs.journal'))
    finally:
        storage.close()
