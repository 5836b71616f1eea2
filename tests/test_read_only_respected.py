"""Read-only partitions are respected everywhere (issue 11, case 7).

A partition is read-only when its section says ``read-only true``, when
its child is opened read-only (``read-only true`` in the child's own
section) or when the whole composite is read-only.  Then ``readCurrent``
of its objects works without beginning the child, a pack leaves its file
byte for byte as it was and keeps alive what it references, and a
read-only composite opens every child read-only, beside a running writer.
"""
import subprocess
import sys
import time

import pytest
import transaction
import ZODB
import ZODB.config
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ReadConflictError
from ZODB.POSException import POSKeyError
from ZODB.Connection import TransactionMetaData

from compositestorage import placement
from compositestorage.uri import resolve_composite
from conftest import CLI
from conftest import new_tm
from conftest import pm_record

#: how the archive partition is made read-only
READ_ONLY = {
    'partition': ('read-only true', ''),
    'child': ('', 'read-only true'),
}


def config(directory, archive='', archive_child='', top=''):
    """main (0) and archive (1); ``archive`` goes in the partition section,
    ``archive_child`` in its ``<filestorage>``."""
    return '''%%import compositestorage
<compositestorage>
  %s
  <partition main>
    prefix 0
    <filestorage>
      path %s/main.fs
    </filestorage>
  </partition>
  <partition archive>
    prefix 1
    %s
    <filestorage>
      path %s/archive.fs
      %s
    </filestorage>
  </partition>
</compositestorage>
''' % (top, directory, archive, directory, archive_child)


def open_db(directory, how=None, top=''):
    archive, child = READ_ONLY[how] if how else ('', '')
    return ZODB.DB(ZODB.config.storageFromString(
        config(directory, archive, child, top)))


def read(path):
    with open(path, 'rb') as f:
        return f.read()


@pytest.fixture
def archive(tmp_path):
    """main and archive, written while both were writable.

    ``root['docs']`` (archive) refers to ``root['doc']`` (main) and holds a
    document with two revisions; ``cited`` (main) is referenced only from
    the archive's ``docs``; ``orphan`` (archive), unreachable, refers to
    ``orphaned_ref`` (main); ``garbage`` (main) is referenced by nothing.
    Returns ``{name: oid}``.
    """
    db = open_db(tmp_path)
    tm = new_tm()
    conn = db.open(tm)
    root = conn.root()
    root['doc'] = PersistentMapping(title='in main')
    cited = PersistentMapping(title='cited from the archive only')
    orphaned_ref = PersistentMapping(title='cited from archive garbage')
    garbage = PersistentMapping(title='garbage in main')
    for obj in (cited, orphaned_ref, garbage):
        conn.add(obj)
    with placement(conn, 'archive'):
        docs = PersistentMapping(doc=root['doc'], cited=cited)
        conn.add(docs)
        docs['entry'] = entry = PersistentMapping(rev=1)
        conn.add(entry)
        orphan = PersistentMapping(ref=orphaned_ref)
        conn.add(orphan)
    root['docs'] = docs
    root['orphan'] = orphan
    root['garbage'] = garbage
    tm.commit()
    entry['rev'] = 2
    tm.commit()
    oids = {name: obj._p_oid for name, obj in (
        ('doc', root['doc']), ('cited', cited), ('docs', docs),
        ('entry', entry), ('orphan', orphan),
        ('orphaned_ref', orphaned_ref), ('garbage', garbage))}
    del root['orphan']
    del root['garbage']
    tm.commit()
    db.close()
    return oids


# --- readCurrent -------------------------------------------------------------

def open_entry(db):
    """``(tm, conn, root, entry)``, the archive's entry loaded: a ghost
    has no serial, so readCurrent would record nothing."""
    tm = new_tm()
    conn = db.open(tm)
    root = conn.root()
    entry = root['docs']['entry']
    assert entry['rev'] == 2
    return tm, conn, root, entry


@pytest.mark.parametrize('how', sorted(READ_ONLY))
def test_read_current_in_read_only_partition(tmp_path, archive, how):
    """readCurrent of an object in a read-only partition, in a commit that
    writes elsewhere: the commit succeeds and the archive is untouched."""
    before = read(tmp_path / 'archive.fs')
    db = open_db(tmp_path, how)
    try:
        tm, conn, root, entry = open_entry(db)
        conn.readCurrent(entry)
        root['doc']['title'] = 'changed'
        tm.commit()
        # a transaction that does nothing but readCurrent commits too
        conn.readCurrent(root['docs'])
        tm.get().note('read only')
        tm.commit()
        conn.cacheMinimize()
        assert root['doc']['title'] == 'changed'
    finally:
        db.close()
    assert read(tmp_path / 'archive.fs') == before


@pytest.mark.parametrize('how', sorted(READ_ONLY))
def test_read_current_stale_serial(tmp_path, archive, how):
    """A serial that is not the current one raises ZODB's
    ReadConflictError with the oid and both serials; the current one
    passes.  The stale serial is the entry's real first revision."""
    db = open_db(tmp_path, how)
    storage = db.storage
    try:
        oid = archive['entry']
        first, second = [h['tid'] for h in storage.history(oid, 2)][::-1]
        txn = TransactionMetaData()
        storage.tpc_begin(txn)
        try:
            storage.store(archive['doc'], storage.load(archive['doc'])[1],
                          pm_record(title='x'), '', txn)
            storage.checkCurrentSerialInTransaction(oid, second, txn)
            with pytest.raises(ReadConflictError) as exc:
                storage.checkCurrentSerialInTransaction(oid, first, txn)
            assert exc.value.oid == oid
            assert exc.value.serials == (second, first)
            with pytest.raises(POSKeyError):
                storage.checkCurrentSerialInTransaction(
                    b'\1' + b'\0' * 6 + b'\x99', first, txn)
        finally:
            storage.tpc_abort(txn)
    finally:
        db.close()


CHANGE_ENTRY = '''
import sys, transaction, ZODB
from ZODB.FileStorage import FileStorage
db = ZODB.DB(FileStorage(sys.argv[1]))
conn = db.open()
entry = conn.get(bytes.fromhex(sys.argv[2]))
entry['rev'] = 3
transaction.commit()
db.close()
'''


def test_read_current_sees_another_writer_of_the_archive(tmp_path, archive):
    """The archive's child opened read-only can be written by another
    process (here the archive's own application, with a plain ZODB).  A
    readCurrent of an object it changed fails with a ReadConflictError
    that says to reopen, and the commit writes nothing."""
    db = open_db(tmp_path, 'child')
    try:
        tm, conn, root, entry = open_entry(db)
        subprocess.run([sys.executable, '-c', CHANGE_ENTRY,
                        str(tmp_path / 'archive.fs'),
                        archive['entry'].hex()], check=True, timeout=120)
        main_before = read(tmp_path / 'main.fs')
        conn.readCurrent(entry)
        root['doc']['title'] = 'changed'
        with pytest.raises(ReadConflictError) as exc:
            tm.commit()
        tm.abort()
        assert exc.value.oid == archive['entry']
        assert "'archive'" in str(exc.value)
        assert 'reopen' in str(exc.value)
        assert read(tmp_path / 'main.fs') == main_before
        # a commit that does not depend on the entry still goes through
        root['doc']['title'] = 'changed'
        tm.commit()
    finally:
        db.close()
    db = open_db(tmp_path, 'child')
    try:
        assert db.open().root()['docs']['entry']['rev'] == 3
    finally:
        db.close()


# --- pack --------------------------------------------------------------------

@pytest.mark.parametrize('how', sorted(READ_ONLY))
def test_pack_leaves_read_only_partition_untouched(tmp_path, archive, how):
    """The archive's file is byte for byte as it was; what it references
    in main (even from its own garbage) is kept; main's garbage goes; the
    report says the archive was left untouched."""
    before = read(tmp_path / 'archive.fs')
    main_size = (tmp_path / 'main.fs').stat().st_size
    db = open_db(tmp_path, how)
    storage = db.storage
    try:
        storage.pack(time.time() + 1)
        assert storage.last_pack['archive'] == {'read_only': True}
        assert storage.last_pack['main']['objects'] == 1     # garbage
        with pytest.raises(POSKeyError):
            storage.load(archive['garbage'])
        for name in ('doc', 'cited', 'orphaned_ref', 'orphan', 'entry'):
            storage.load(archive[name])
        conn = db.open()
        assert conn.root()['docs']['cited']['title'] == \
            'cited from the archive only'
        assert conn.get(archive['orphan'])['ref']['title'] == \
            'cited from archive garbage'
    finally:
        db.close()
    assert read(tmp_path / 'archive.fs') == before
    assert (tmp_path / 'main.fs').stat().st_size < main_size


def test_pack_without_gc_leaves_read_only_child_untouched(tmp_path, archive):
    before = read(tmp_path / 'archive.fs')
    db = open_db(tmp_path, 'child')
    try:
        db.storage.pack(time.time() + 1, gc=False)
        assert db.storage.last_pack['archive'] == {'read_only': True}
    finally:
        db.close()
    assert read(tmp_path / 'archive.fs') == before


@pytest.mark.parametrize('how', sorted(READ_ONLY))
def test_pack_command_says_read_only_partition_untouched(
        tmp_path, archive, how):
    before = read(tmp_path / 'archive.fs')
    conf = tmp_path / 'composite.conf'
    conf.write_text(config(tmp_path, *READ_ONLY[how]))
    proc = subprocess.run(CLI + ['pack', str(conf)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert ('archive: left untouched, it is read-only (what it references '
            'was kept)') in proc.stdout, proc.stdout
    assert 'main: removed 1 objects' in proc.stdout, proc.stdout
    assert read(tmp_path / 'archive.fs') == before


# --- a read-only composite beside its writer -----------------------------------

WRITER = '''
import sys, transaction, ZODB, ZODB.config
db = ZODB.DB(ZODB.config.storageFromFile(open(sys.argv[1])))
conn = db.open()
conn.root()['writer'] = 'running'
transaction.commit()
print('ready', flush=True)
sys.stdin.readline()
db.close()
'''


@pytest.fixture
def running_writer(tmp_path, archive):
    """A second process holding the composite open for writing, so that
    it holds every FileStorage's lock and the journal's writer lock."""
    conf = tmp_path / 'writer.conf'
    conf.write_text(config(tmp_path))
    proc = subprocess.Popen([sys.executable, '-c', WRITER, str(conf)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == 'ready', proc.stderr.read()
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def check_reads(storage):
    db = ZODB.DB(storage)
    try:
        assert storage.isReadOnly()
        assert all(p.storage.isReadOnly() for p in storage.partitions)
        root = db.open().root()
        assert root['writer'] == 'running'
        assert root['docs']['entry']['rev'] == 2
    finally:
        db.close()


def test_read_only_composite_opens_beside_its_writer(tmp_path,
                                                     running_writer):
    check_reads(ZODB.config.storageFromString(
        config(tmp_path, top='read-only true')))


def test_read_only_composite_uri_opens_beside_its_writer(tmp_path,
                                                         running_writer):
    zconfig = tmp_path / 'archive.conf'
    zconfig.write_text('<filestorage>\n  path %s/archive.fs\n'
                       '</filestorage>\n' % tmp_path)
    factory, _ = resolve_composite(
        'composite:(file://%s/main.fs)/archive=1:(zconfig://%s)'
        '?read_only=true' % (tmp_path, zconfig))
    check_reads(factory())


def test_read_only_composite_creates_no_file(tmp_path):
    """Children opened read-only: a missing child is an error, not a new
    empty file."""
    FileStorage(str(tmp_path / 'main.fs')).close()
    with pytest.raises(FileNotFoundError, match='archive.fs'):
        ZODB.config.storageFromString(config(tmp_path, top='read-only true'))
    assert not (tmp_path / 'archive.fs').exists()
    FileStorage(str(tmp_path / 'main.fs')).close()   # no lock left behind


def test_read_current_in_read_only_partition_through_zeo(tmp_path, archive):
    """The same through a ZEO server, which calls the composite's
    checkCurrentSerialInTransaction for its client."""
    import ZEO
    before = read(tmp_path / 'archive.fs')
    text = config(tmp_path, *READ_ONLY['partition']).replace(
        '<compositestorage>', '<compositestorage 1>')
    addr, stop = ZEO.server(storage_conf=text)
    try:
        db = ZEO.DB(addr)
        try:
            tm, conn, root, entry = open_entry(db)
            conn.readCurrent(entry)
            root['doc']['title'] = 'through zeo'
            tm.commit()
        finally:
            db.close()
    finally:
        stop()
    assert read(tmp_path / 'archive.fs') == before
