"""The quick opcode scan and the exact stack-tracking parse must agree.

``rewrite_class_hints`` tries a quick scan first and falls back to the
exact parse for anything the scan does not recognise.  These tests feed
both the records of real composite databases, in both directions (class to
stub, as on store; stub to class, as on load), and hand-made pickles in the
older layouts, and check that they produce the same edits, and that the
quick scan really handles the common ZODB layouts.
"""
import pytest
import transaction
import ZODB
from BTrees.OOBTree import OOBTree
from persistent.list import PersistentList
from persistent.mapping import PersistentMapping
from persistent.wref import WeakRef

from compositestorage.references import STUB_GLOBAL
from compositestorage.references import _exact_edits
from compositestorage.references import _oid_bytes
from compositestorage.references import _quick_edits
from compositestorage.references import persistent_ids
from compositestorage.references import rewrite_class_hints
from conftest import make_composite


def to_stub(prefix):
    return lambda oid, klass: STUB_GLOBAL if oid[0] != prefix else None


def to_class(oid, klass):
    return ('some.module', 'Klass') if klass == STUB_GLOBAL else None


def child_records(storage):
    for part in storage.partitions:
        for txn in part.storage.iterator():
            for r in txn:
                if r.data:
                    yield part.prefix, r.data


@pytest.fixture
def records(tmp_path):
    storage, _ = make_composite(tmp_path, placement='round-robin')
    db = ZODB.DB(storage)
    conn = db.open()
    root = conn.root()
    root['tree'] = tree = OOBTree()
    for i in range(300):
        tree['k%04d' % i] = PersistentMapping(i=i)
    root['list'] = PersistentList(PersistentMapping() for _ in range(20))
    root['weak'] = PersistentMapping(w=WeakRef(root['list']))
    root['same'] = PersistentMapping(a=root['list'], b=root['list'])
    transaction.commit()
    found = list(child_records(storage))
    db.close()
    return found


def test_quick_scan_agrees_with_the_exact_parse(records):
    quick_handled = 0
    stub_records = 0
    for prefix, data in records:
        for replace in (to_stub(prefix), to_class):
            quick = _quick_edits(data, replace)
            exact = _exact_edits(data, replace)
            if quick is not None:
                quick_handled += 1
                assert quick == exact
        if _exact_edits(data, to_class):
            stub_records += 1
    assert stub_records > 20                 # cross references were stored
    assert quick_handled == 2 * len(records)  # ZODB's layout: all quick


def test_rewriting_keeps_the_persistent_ids(records):
    for prefix, data in records:
        loaded = rewrite_class_hints(data, to_class)
        assert [p if not isinstance(p, tuple) else p[0]
                for p in persistent_ids(loaded)] == \
            [p if not isinstance(p, tuple) else p[0]
             for p in persistent_ids(data)]


# Hand-made records in the layouts of older picklers (Python 2's cPickle,
# protocol 1: MARK ... TUPLE pids and SHORT_BINSTRING oids), with a class
# memoized once and fetched again by BINGET, and the same oid twice.
OID_A = b'\x01' + b'\0' * 6 + b'\x05'
OID_B = b'\x02' + b'\0' * 6 + b'\x07'
KLASS = b'cmy.module\nKlass\n'


def _protocol1_record():
    pid_a = b'(U\x08' + OID_A + b'q\x05' + KLASS + b'q\x06tq\x07Q'
    pid_b = b'(U\x08' + OID_B + b'q\x08h\x06tq\x09Q'
    pid_a2 = b'(h\x05h\x06tq\x0aQ'
    meta = KLASS + b'q\x01.'
    state = (b'}q\x02(U\x01aq\x03' + pid_a + b'U\x01bq\x04' + pid_b
             + b'U\x01cq\x0b' + pid_a2 + b'u.')
    return meta + state


def _protocol3_record():
    pid_a = b'C\x08' + OID_A + b'q\x05' + KLASS + b'q\x06\x86q\x07Q'
    pid_b = b'C\x08' + OID_B + b'q\x08h\x06\x86q\x09Q'
    pid_a2 = b'h\x05h\x06\x86q\x0aQ'
    meta = b'\x80\x03' + KLASS + b'q\x01.'
    state = (b'\x80\x03}q\x02(X\x01\x00\x00\x00aq\x03' + pid_a
             + b'X\x01\x00\x00\x00bq\x04' + pid_b
             + b'X\x01\x00\x00\x00cq\x0b' + pid_a2 + b'u.')
    return meta + state


@pytest.mark.parametrize('make', [_protocol1_record, _protocol3_record])
def test_hand_made_layouts_agree(make):
    data = make()
    assert [_oid_bytes(p[0]) for p in persistent_ids(data)] == [
        OID_A, OID_B, OID_A]
    replace = to_stub(0)
    exact = _exact_edits(data, replace)
    assert len(exact) == 3
    assert _quick_edits(data, replace) == exact
    stored = rewrite_class_hints(data, replace)
    assert stored != data
    # and back, through the quick scan and the exact parse alike
    back = lambda oid, klass: (('my.module', 'Klass')
                               if klass == STUB_GLOBAL else None)
    assert _quick_edits(stored, back) == _exact_edits(stored, back)
    loaded = rewrite_class_hints(stored, back)
    assert [_oid_bytes(p[0]) for p in persistent_ids(loaded)] == [
        OID_A, OID_B, OID_A]
    assert _exact_edits(loaded, back) == []


def test_unrecognised_layouts_fall_back():
    # a text-mode GET (protocol 0) is left to the exact parse
    assert _quick_edits(b'g1\n.', to_class) is None
