"""Scenario 10: every bad input fails with the right error, names the
partition and/or the oid in hex, and writes nothing."""
import os

import pytest
import transaction
import ZODB
import ZODB.config
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage
from ZODB.POSException import POSKeyError
from ZODB.POSException import ReadOnlyError
from ZODB.utils import z64

import compositestorage
from compositestorage import CompositeStorage
from compositestorage import CompositeStorageError
from compositestorage import ConfigurationError
from compositestorage import CorruptStubError
from compositestorage import PartitionFullError
from compositestorage import PartitionMapError
from compositestorage import ReadOnlyPartitionError
from compositestorage import UnknownPartitionError
from compositestorage import placement

from conftest import THREE
from conftest import TWO
from conftest import child_history
from conftest import child_records
from conftest import composite_xml
from conftest import file_state
from conftest import is_stub
from conftest import make_composite
from conftest import new_tm
from conftest import open_composite
from conftest import partition_xml
from conftest import pm_record
from conftest import raw_commit


def open_children(tmp_path, spec):
    """FileStorages for ``[(name, prefix), ...]``: ``(tuples, paths)``."""
    paths = {name: str(tmp_path / ('%s.fs' % name)) for name, _ in spec}
    return ([(name, prefix, FileStorage(paths[name]))
             for name, prefix in spec], paths)


def refused(tmp_path, spec, error, *needles, **kw):
    """Open a composite over fresh files, expect ``error`` whose message
    holds every needle, and check that no child file changed."""
    children, paths = open_children(tmp_path, spec)
    before = file_state(paths)
    try:
        with pytest.raises(error) as exc:
            CompositeStorage(children, **kw).close()
    finally:
        for _, _, fs in children:
            fs.close()
    text = str(exc.value)
    for needle in needles:
        assert needle in text, (needle, text)
    assert file_state(paths) == before
    return text


def refused_config(tmp_path, xml, error, *needles):
    """Open a ZConfig composite, expect ``error`` naming every needle, and
    check that no file was created at all."""
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(error) as exc:
        ZODB.config.storageFromString(xml).close()
    text = str(exc.value)
    for needle in needles:
        assert needle in text, (needle, text)
    assert sorted(os.listdir(tmp_path)) == before
    return text


# --- configuration ----------------------------------------------------------

def test_two_partitions_with_one_prefix(tmp_path):
    refused(tmp_path, [('main', 0), ('b', 1), ('c', 1)],
            ConfigurationError, "'b'", "'c'", 'prefix 1')


def test_two_partitions_with_one_prefix_config(tmp_path):
    xml = composite_xml([
        partition_xml('main', 0, tmp_path / 'm.fs'),
        partition_xml('b', 1, tmp_path / 'b.fs'),
        partition_xml('c', 1, tmp_path / 'c.fs')])
    refused_config(tmp_path, xml, ConfigurationError, "'b'", "'c'",
                   'prefix 1')


def test_no_prefix_zero(tmp_path):
    refused(tmp_path, [('a', 1), ('b', 2)], ConfigurationError,
            'prefix 0', 'a=1', 'b=2')


def test_no_prefix_zero_config(tmp_path):
    xml = composite_xml([partition_xml('a', 1, tmp_path / 'a.fs'),
                         partition_xml('b', 2, tmp_path / 'b.fs')])
    refused_config(tmp_path, xml, ConfigurationError, 'prefix 0', 'a=1',
                   'b=2')


@pytest.mark.parametrize('prefix', [128, 255, 256, 1000, -1])
def test_prefix_out_of_range(tmp_path, prefix):
    refused(tmp_path, [('main', 0), ('big', prefix)], ConfigurationError,
            "'big'", str(prefix))


@pytest.mark.parametrize('prefix', [128, 1000, -1])
def test_prefix_out_of_range_config(tmp_path, prefix):
    xml = composite_xml([partition_xml('main', 0, tmp_path / 'm.fs'),
                         partition_xml('big', prefix, tmp_path / 'b.fs')])
    refused_config(tmp_path, xml, ConfigurationError, "'big'", str(prefix))


def test_unknown_default_partition(tmp_path):
    refused(tmp_path, THREE, ConfigurationError, "'nowhere'", 'main=0',
            'b=1', default_partition='nowhere')


def test_unknown_default_partition_config(tmp_path):
    xml = composite_xml([partition_xml('main', 0, tmp_path / 'm.fs'),
                         partition_xml('b', 1, tmp_path / 'b.fs')],
                        top='default-partition nowhere')
    refused_config(tmp_path, xml, ConfigurationError, "'nowhere'")


def test_unknown_placement_policy(tmp_path):
    refused(tmp_path, TWO, ConfigurationError, "'sideways'",
            placement='sideways')


def test_partition_without_storage_section(tmp_path):
    xml = composite_xml([partition_xml('main', 0, tmp_path / 'm.fs'),
                         partition_xml('empty', 1)])
    refused_config(tmp_path, xml, ConfigurationError, "'empty'",
                   'storage')


def test_same_file_for_two_partitions_config(tmp_path):
    (tmp_path / 'sub').mkdir()
    same = tmp_path / 'shared.fs'
    other_spelling = tmp_path / 'sub' / '..' / 'shared.fs'
    xml = composite_xml([partition_xml('main', 0, same),
                         partition_xml('b', 1, other_spelling)])
    refused_config(tmp_path, xml, ConfigurationError, "'main'", "'b'",
                   'shared.fs')


def test_same_storage_for_two_partitions(tmp_path):
    path = str(tmp_path / 'shared.fs')
    fs = FileStorage(path)
    before = file_state({'x': path})
    try:
        with pytest.raises(ConfigurationError) as exc:
            CompositeStorage([('main', 0, fs), ('b', 1, fs)])
    finally:
        fs.close()
    assert "'main'" in str(exc.value) and "'b'" in str(exc.value)
    assert file_state({'x': path}) == before


# --- partition maps ------------------------------------------------------------

@pytest.fixture
def existing(tmp_path):
    """A composite with data in all three partitions, closed again."""
    storage, paths = make_composite(tmp_path)
    db = ZODB.DB(storage)
    conn = db.open()
    for name in ('b', 'c'):
        with placement(conn, name):
            conn.root()[name] = PersistentMapping()
            transaction.commit()
    db.close()
    return paths


def reopen_refused(paths, parts, *needles, error=PartitionMapError):
    before = file_state(paths)
    with pytest.raises(error) as exc:
        open_composite(paths, parts).close()
    text = str(exc.value)
    for needle in needles:
        assert needle in text, (needle, text)
    assert file_state(paths) == before
    return text


def test_child_reopened_under_another_prefix(existing):
    reopen_refused(existing, (('main', 0), ('b', 3), ('c', 2)),
                   "'b'", 'prefix 3', 'prefix 1')


def test_child_reopened_under_another_name(existing):
    paths = dict(existing, x=existing['b'])
    reopen_refused(paths, (('main', 0), ('x', 1), ('c', 2)), "'x'", "'b'")


def test_children_swapped(existing):
    paths = dict(existing, b=existing['c'], c=existing['b'])
    reopen_refused(paths, THREE, "'b'", "'c'")


def test_child_reopened_under_another_prefix_config(existing, tmp_path):
    xml = composite_xml([
        partition_xml('main', 0, existing['main']),
        partition_xml('b', 1, existing['b']),
        partition_xml('c', 9, existing['c'])])
    before = file_state(existing)
    with pytest.raises(PartitionMapError) as exc:
        ZODB.config.storageFromString(xml).close()
    assert "'c'" in str(exc.value)
    assert 'prefix 9' in str(exc.value) and 'prefix 2' in str(exc.value)
    assert file_state(existing) == before


def test_child_moved_between_composites(existing, tmp_path):
    (tmp_path / 'other').mkdir()
    other, other_paths = make_composite(tmp_path / 'other')
    db = ZODB.DB(other)
    db.close()
    paths = dict(existing, b=other_paths['b'])
    text = reopen_refused(paths, THREE, "'b'")
    assert 'composite' in text


def test_partition_dropped_from_config(existing):
    """Not a rename: any refusal that names the missing partition or its
    prefix will do."""
    before = file_state(existing)
    with pytest.raises(CompositeStorageError) as exc:
        open_composite(existing, TWO).close()
    text = str(exc.value)
    assert "'c'" in text or '0x02' in text, text
    assert file_state(existing) == before


# --- oids with no partition -----------------------------------------------------

UNKNOWN = bytes([0x05]) + b'\0' * 6 + b'\x07'


def test_load_of_unknown_prefix(composite_db):
    db, storage, paths = composite_db
    for call in (storage.load,
                 lambda oid: storage.loadBefore(oid, b'\xff' * 8),
                 storage.history):
        with pytest.raises(UnknownPartitionError) as exc:
            call(UNKNOWN)
        assert isinstance(exc.value, POSKeyError)
        assert '0x' + UNKNOWN.hex() in str(exc.value)
        assert 'prefix 5' in str(exc.value)


def test_store_of_unknown_prefix(composite_db):
    db, storage, paths = composite_db
    last = storage.lastTransaction()
    before = file_state(paths)
    good = storage.new_oid_in('b')
    with pytest.raises(UnknownPartitionError) as exc:
        # a good store first, so that a child has begun
        raw_commit(storage, [(good, z64, pm_record(v=1)),
                             (UNKNOWN, z64, pm_record(v=2))])
    assert '0x' + UNKNOWN.hex() in str(exc.value)
    assert storage.lastTransaction() == last
    assert file_state(paths) == before
    with pytest.raises(POSKeyError):
        storage.load(good)


def test_reference_to_unknown_prefix(composite_db):
    db, storage, paths = composite_db
    import io
    from ZODB._compat import PersistentPickler
    f = io.BytesIO()
    marker = object()
    p = PersistentPickler(
        lambda o: (UNKNOWN, None) if o is marker else None, f, 3)
    p.dump((PersistentMapping, None))
    p.dump({'data': {'bad': marker}})
    oid = storage.new_oid_in('main')
    last = storage.lastTransaction()
    before = file_state(paths)
    with pytest.raises(UnknownPartitionError) as exc:
        raw_commit(storage, [(oid, z64, f.getvalue())])
    text = str(exc.value)
    assert '0x' + UNKNOWN.hex() in text and '0x' + oid.hex() in text
    assert storage.lastTransaction() == last
    assert file_state(paths) == before


# --- read-only partitions ----------------------------------------------------------

def _read_only_case(existing, how):
    kw = ({'read_only_children': ('b',)} if how == 'child'
          else {'read_only_partitions': ('b',)})
    storage = open_composite(existing, **kw)
    assert storage.partition_named('b').read_only
    assert not storage.isReadOnly()
    return storage


@pytest.mark.parametrize('how', ['child', 'partition'])
def test_write_to_read_only_partition(existing, how):
    storage = _read_only_case(existing, how)
    db = ZODB.DB(storage)
    try:
        tm = new_tm()
        conn = db.open(transaction_manager=tm)
        root = conn.root()
        root['c']['v'] = 'c changed'     # c and main are writable
        root['touched'] = 1
        root['b']['v'] = 'b changed'     # b is not
        last = storage.lastTransaction()
        before = file_state(existing)
        with pytest.raises(ReadOnlyPartitionError) as exc:
            tm.commit()
        tm.abort()
        assert isinstance(exc.value, ReadOnlyError)
        text = str(exc.value)
        assert "'b'" in text and 'prefix 1' in text
        assert '0x' + root['b']._p_oid.hex() in text
        assert storage.lastTransaction() == last
        assert file_state(existing) == before
        # nothing visible either
        tm.begin()
        assert 'touched' not in root
        assert 'v' not in root['c']

        # allocating in b, and placing in b, are refused too
        with pytest.raises(ReadOnlyPartitionError) as exc:
            storage.new_oid_in('b')
        assert "'b'" in str(exc.value)
        with pytest.raises(ReadOnlyPartitionError):
            with placement(conn, 'b'):
                pass
        # reading b and writing elsewhere still work
        assert root['b'] is not None and 'v' not in root['b']
        root['c']['v'] = 'ok'
        tm.commit()
    finally:
        db.close()


def test_read_only_partition_config(existing):
    xml = composite_xml([
        partition_xml('main', 0, existing['main']),
        partition_xml('b', 1, existing['b'], 'read-only true'),
        partition_xml('c', 2, existing['c'])])
    storage = ZODB.config.storageFromString(xml)
    try:
        assert storage.partition_named('b').read_only
        oid = storage.new_oid_in('main')
        before = file_state(existing)
        b_oid = [o for o in child_records(existing['b']) if o[0] == 1
                 and o[1:] != b'\xff' * 7][0]
        serial = storage.load(b_oid)[1]
        with pytest.raises(ReadOnlyPartitionError) as exc:
            raw_commit(storage, [(oid, z64, pm_record(v=1)),
                                 (b_oid, serial, pm_record(v=2))])
        assert "'b'" in str(exc.value)
        assert file_state(existing) == before
    finally:
        storage.close()


# --- records that belong nowhere ----------------------------------------------------

def test_child_record_of_no_configured_partition(existing):
    """b's child holds a record at an oid whose prefix (5) is no
    partition's.  It is no stub the composite wrote; the composite must
    say so rather than hide it as an internal record."""
    foreign = bytes([5]) + b'\0' * 6 + b'\x01'
    fs = FileStorage(existing['b'])
    raw_commit(fs, [(foreign, z64, pm_record(v='stray'))])
    fs.close()
    before = file_state(existing)
    found = None
    storage = None
    try:
        storage = open_composite(existing)
        list(storage.iterator())
        token = None
        while True:
            _, _, _, token = storage.record_iternext(token)
            if token is None:
                break
    except CompositeStorageError as e:
        found = e
    finally:
        if storage is not None:
            storage.close()
    assert found is not None, (
        'a child record at %s, an oid of no configured partition, went '
        'unnoticed' % ('0x' + foreign.hex()))
    assert "'b'" in str(found) and '0x' + foreign.hex() in str(found)
    assert file_state(existing) == before


# --- a full partition ---------------------------------------------------------

def restore_one(storage, oid, data):
    """restore() one record, as copyTransactionsFrom does, with a new tid."""
    from ZODB.Connection import TransactionMetaData
    from ZODB.utils import newTid
    tid = newTid(storage.lastTransaction())
    txn = TransactionMetaData()
    storage.tpc_begin(txn, tid)
    storage.restore(oid, tid, data, '', None, txn)
    storage.tpc_vote(txn)
    storage.tpc_finish(txn)
    return tid


def test_partition_runs_out_of_oids(composite_db):
    db, storage, paths = composite_db
    storage.new_oid_in('b')                     # the allocator is started
    # the allocator's range ends below the keyed half of the partition
    last_oid = bytes([1, 0x7f]) + b'\xff' * 6
    restore_one(storage, last_oid, pm_record(v='last'))
    assert storage.load(last_oid)[0] == pm_record(v='last')
    before = file_state(paths)
    with pytest.raises(PartitionFullError) as exc:
        storage.new_oid_in('b')
    text = str(exc.value)
    assert "'b'" in text and 'prefix 1' in text
    assert '0x017fffffffffffff' in text
    # other partitions are not affected, and no keyed oid was ever given
    assert storage.new_oid_in('c')[0] == 2
    # through ZODB: nothing is written
    tm = new_tm()
    conn = db.open(transaction_manager=tm)
    with placement(conn, 'b'):
        conn.root()['more'] = PersistentMapping()
        with pytest.raises(PartitionFullError):
            tm.commit()
    tm.abort()
    assert file_state(paths) == before
    db.close()

    # after a restart the allocator finds the top oid again
    storage = open_composite(paths)
    try:
        with pytest.raises(PartitionFullError):
            storage.new_oid_in('b')
    finally:
        storage.close()


def test_last_oid_below_the_keyed_range(composite_db):
    """The oid just below the keyed half of the range is the last one
    handed out, and keyed oids above it do not move the allocator."""
    db, storage, paths = composite_db
    oid = bytes([2, 0x7f]) + b'\xff' * 5 + b'\xfe'
    restore_one(storage, oid, pm_record(v=1))
    restore_one(storage, bytes([2, 0x80]) + b'\0' * 6, pm_record(v=2))
    db.close()
    storage = open_composite(paths)
    try:
        assert storage.new_oid_in('c') == bytes([2, 0x7f]) + b'\xff' * 6
        with pytest.raises(PartitionFullError):
            storage.new_oid_in('c')
    finally:
        storage.close()


# --- a corrupt stub ----------------------------------------------------------

def test_corrupt_stub(tmp_path):
    storage, paths = make_composite(tmp_path, TWO)
    db = ZODB.DB(storage)
    conn = db.open()
    root = conn.root()
    with placement(conn, 'b'):
        x = PersistentMapping(v='x')
        conn.add(x)
    root['holder'] = holder = PersistentMapping(x=x)
    transaction.commit()
    x_oid, h_oid = x._p_oid, holder._p_oid
    db.close()
    assert is_stub(child_records(paths['main'])[x_oid])

    # someone overwrites the stub in main's child with a normal record
    fs = FileStorage(paths['main'])
    raw_commit(fs, [(x_oid, fs.load(x_oid)[1], pm_record(v='impostor'))])
    fs.close()
    before = file_state(paths)
    history = {name: len(child_history(p)) for name, p in paths.items()}

    storage = open_composite(paths, TWO)
    try:
        # Loads never need the stub: the class is in the reference itself.
        assert_stub_refused_on_write(storage, h_oid, x_oid, 'x')
    finally:
        storage.close()
    assert file_state(paths) == before
    assert {name: len(child_history(p)) for name, p in paths.items()} == \
        history


def assert_stub_refused_on_write(storage, h_oid, x_oid, value):
    """The holder still loads; a commit that needs the stub is refused,
    naming the partition and the oid, and writes nothing."""
    db = ZODB.DB(storage)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        holder = conn.get(h_oid)
        assert holder['x']['v'] == value
        conn.root()['again'] = holder['x']
        with pytest.raises(CorruptStubError) as exc:
            tm.commit()
        tm.abort()
        text = str(exc.value)
        assert "'main'" in text and '0x' + x_oid.hex() in text
    finally:
        db.close()


def test_stub_pointing_at_the_wrong_class_of_record(tmp_path):
    """An unreadable stub record (garbage bytes) is a CorruptStubError."""
    storage, paths = make_composite(tmp_path, TWO)
    db = ZODB.DB(storage)
    conn = db.open()
    with placement(conn, 'b'):
        x = PersistentMapping(v='x')
        conn.add(x)
    conn.root()['holder'] = holder = PersistentMapping(x=x)
    transaction.commit()
    x_oid, h_oid = x._p_oid, holder._p_oid
    db.close()
    fs = FileStorage(paths['main'])
    raw_commit(fs, [(x_oid, fs.load(x_oid)[1], b'not a pickle at all')])
    fs.close()
    storage = open_composite(paths, TWO)
    assert_stub_refused_on_write(storage, h_oid, x_oid, 'x')


def test_error_classes():
    assert issubclass(UnknownPartitionError, POSKeyError)
    assert issubclass(ReadOnlyPartitionError, ReadOnlyError)
    assert issubclass(PartitionMapError, ConfigurationError)
    assert compositestorage.PartitionFullError is PartitionFullError
