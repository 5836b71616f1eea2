"""A hint used more than once in a record is written once and memoized.

A container whose entries live in other partitions would otherwise spell
the 70-byte stub hint for every entry, where ZODB spends a 2-byte GET
(``docs/performance.rst``, "Disk with round-robin placement").  These
tests hold the rewrite to what it must keep: ZODB gets its own bytes back
on every path, the child still opens alone with a stub for every foreign
entry (invariant 2), and records stored before memoization still load.
"""
import ZODB
import pytest
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage

from compositestorage import PartitionStub
from compositestorage import opcodes
from compositestorage import references
from compositestorage.references import HINT_MARK
from compositestorage.references import classes_to_hints
from compositestorage.references import hints_to_classes
from compositestorage.references import to_child_record

from conftest import child_records
from conftest import make_composite
from conftest import record_stores


def no_lookup(oid):
    raise AssertionError('a hint that says how never needs the stub')


def build_holder(tmp_path, count=400):
    """A round-robin composite with one mapping of ``count`` documents;
    returns ``(holder_oid, zodb_bytes, paths)``, where ``zodb_bytes`` is
    the holder's last record as ZODB handed it to the composite."""
    storage, paths = make_composite(tmp_path, placement='round-robin')
    handed = record_stores(storage)
    db = ZODB.DB(storage)
    with db.transaction() as conn:
        conn.root()['items'] = items = PersistentMapping()
        for i in range(count):
            items[i] = PersistentMapping(n=i)
    with db.transaction() as conn:
        oid = conn.root()['items']._p_oid
    zodb = storage.load(oid)[0]         # what the composite gives ZODB
    db.close()
    assert zodb in [data for _, data in handed]
    return oid, zodb, paths


def test_a_container_names_each_hint_once(tmp_path):
    oid, zodb, paths = build_holder(tmp_path)
    stored = child_records(paths['main'])[oid]
    # one hint per class the entries stand for; the rest are memo GETs
    assert stored.count(HINT_MARK) == 1
    assert stored.count(b':m') == 1
    # far beyond 256 memo entries: LONG_BINGETs, 5 bytes where ZODB has 2
    assert len(stored) < len(zodb) * 1.25, (len(stored), len(zodb))
    inline = classes_to_hints(zodb, 0)[0]
    assert inline.count(HINT_MARK) > 200
    assert len(inline) > len(zodb) * 2
    assert hints_to_classes(stored, 0, no_lookup) == zodb


def test_the_child_alone_sees_a_stub_for_every_foreign_entry(tmp_path):
    oid, _, paths = build_holder(tmp_path, count=300)
    db = ZODB.DB(FileStorage(paths['main'], read_only=True))
    try:
        conn = db.open()
        holder = conn.get(oid)
        kinds = {}
        for key, value in holder.items():
            if value._p_oid[0] == 0:
                assert type(value) is PersistentMapping
                assert value['n'] == key
            else:
                assert type(value) is PartitionStub, (key, value)
                value._p_activate()     # the stub record is in this child
                assert value.home in ('b', 'c')
            kinds[type(value)] = kinds.get(type(value), 0) + 1
        assert kinds[PartitionStub] >= 190 and kinds[PersistentMapping] >= 90
    finally:
        db.close()


def test_the_pure_python_walk_restores_the_same(tmp_path, monkeypatch):
    oid, zodb, paths = build_holder(tmp_path, count=300)
    stored = child_records(paths['main'])[oid]
    monkeypatch.setattr(opcodes, '_accelerated', None)
    assert hints_to_classes(stored, 0, no_lookup) == zodb
    assert to_child_record(zodb, 0)[0] == stored


def test_the_exact_parse_restores_the_same(tmp_path, monkeypatch):
    """Where the walk cannot restore (it would only refuse a record not
    as stored), the stack-tracking parse gives the same bytes."""
    oid, zodb, paths = build_holder(tmp_path, count=300)
    stored = child_records(paths['main'])[oid]
    monkeypatch.setattr(references, '_restore_memoized',
                        lambda data, parts: None)
    assert hints_to_classes(stored, 0, no_lookup) == zodb


def test_the_memo_index_is_one_the_record_never_used():
    oid_b = b'\x01' + b'\0' * 6 + b'\x05'
    oid_c = b'\x02' + b'\0' * 6 + b'\x07'
    klass = b'cmy.module\nKlass\n'
    # memo indices 0, 1 and 0xc8 are used; a gap is not free to take
    meta = b'\x80\x03' + klass + b'q\x00.'
    state = (b'\x80\x03]q\xc8(C\x08' + oid_b + b'q\x01h\x00\x86q\x02Q'
             + b'C\x08' + oid_c + b'h\x00\x86Qe.')
    data = meta + state
    stored, foreign, hints = to_child_record(data, 0)
    assert foreign == {oid_b, oid_c}
    assert stored.count(HINT_MARK) == 1
    assert b':mc9\nq\xc9' in stored and b'h\xc9\x86' in stored
    assert hints_to_classes(stored, 0, no_lookup) == data


def test_records_stored_before_memoization_still_load():
    oid_b = b'\x01' + b'\0' * 6 + b'\x05'
    klass = b'cmy.module\nKlass\n'
    ref = b'C\x08' + oid_b + b'%sh\x00\x86Q'
    data = (b'\x80\x03' + klass + b'q\x00.\x80\x03](' + ref % b'q\x01'
            + ref % b'q\x02' + b'e.')
    old_hint = (b'ccompositestorage.stubs\n'
                b'PartitionStub:my.module:Klass:h00\n')
    old = data.replace(b'h\x00\x86', old_hint + b'\x86')
    assert old.count(old_hint) == 2
    assert hints_to_classes(old, 0, no_lookup) == data
    assert to_child_record(data, 0)[0] != old      # written memoized now


@pytest.mark.parametrize('broken', [
    lambda s: s.replace(b':m', b':mzz'),            # not a memo index
    lambda s: s.replace(b':m1\nq\x01', b':m1\nq\x02'),  # another PUT
])
def test_a_memoized_hint_not_as_stored_is_never_half_restored(broken):
    oid_b = b'\x01' + b'\0' * 6 + b'\x05'
    klass = b'cmy.module\nKlass\n'
    ref = b'C\x08' + oid_b + b'h\x00\x86Q'
    data = b'\x80\x03' + klass + b'q\x00.\x80\x03](' + ref * 3 + b'e.'
    stored = to_child_record(data, 0)[0]
    assert stored.count(HINT_MARK) == 1
    assert b':m1\nq\x01' in stored
    assert references.restore_hints(broken(stored)) is None


def test_no_memo_index_beyond_what_a_walk_allows():
    """A record whose GETs name a memo index far beyond its size (which
    ZODB never writes) keeps a hint per reference: a PUT of that index in
    the child would be refused by every later walk of it."""
    oid_b = b'\x01' + b'\0' * 6 + b'\x05'
    klass = b'cmy.module\nKlass\n'
    ref = b'C\x08' + oid_b + b'h\x00\x86Q'
    far = b'j\xff\xf0\x00\x00'       # a LONG_BINGET of index 61695
    data = (b'\x80\x03' + klass + b'q\x00.\x80\x03](' + ref * 3 + far
            + b'e.')
    stored = to_child_record(data, 0)[0]
    assert stored.count(HINT_MARK) == 3 and b':m' not in stored
    assert hints_to_classes(stored, 0, no_lookup) == data
