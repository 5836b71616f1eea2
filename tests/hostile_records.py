"""Hostile records for ``test_hostile_records.py``, run in a subprocess of
its own under a cap on its address space (``RLIMIT_AS``), so that a record
that makes the composite allocate gigabytes fails the test instead of
taking the machine down.

``python hostile_records.py commit DIR`` commits the issue's record (user
bytes holding what looks like a reference to another partition) through a
composite of two FileStorages in DIR and prints what it measured, as JSON.

``python hostile_records.py fuzz SEED SECONDS`` feeds the store and load
sides random, mutated and adversarial records until SECONDS have passed and
prints a JSON summary; any failure is an exception naming the seed and the
record.
"""
import itertools
import json
import os
import random
import resource
import sys
import time
import tracemalloc

#: The address-space cap of the subprocess.
CAP = 1024 * 1024 * 1024
#: A foreign oid (partition 1) and a class, as ZODB's pickler spells them.
FOREIGN = b'\x01' + b'\0' * 6 + b'\x05'
GLOBAL = b'cpersistent.mapping\nPersistentMapping\n'


def cap():
    resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))


def lookalike(index=1 << 23):
    """User bytes that look like ZODB's layout of ``(FOREIGN, class)``,
    then NONE opcodes and a LONG_BINPUT of ``index``: rewriting the hint
    inside them knocks the record out of alignment, and the unpickler
    lands on the LONG_BINPUT (a memo of ``2 * index`` slots)."""
    return (b'C\x08' + FOREIGN + b'q\x05' + GLOBAL + b'q\x06\x86q\x07Q'
            + b'N' * 80 + b'r' + index.to_bytes(4, 'little') + b'NNN')


def open_composite(directory):
    from ZODB.FileStorage import FileStorage

    from compositestorage import CompositeStorage
    from compositestorage import Partition
    return CompositeStorage([
        Partition(name, prefix, FileStorage(os.path.join(directory,
                                                         name + '.fs')))
        for name, prefix in (('main', 0), ('other', 1))])


def commit(directory):
    """Commit the lookalike through ZODB; report time, traced peak memory,
    whether the child's record is ZODB's own bytes, and any stub made."""
    import transaction
    import ZODB
    from persistent.mapping import PersistentMapping
    from ZODB.POSException import POSKeyError

    storage = open_composite(directory)
    handed = {}
    store = storage.store

    def spy(oid, serial, data, version, txn):
        handed[oid] = data
        return store(oid, serial, data, version, txn)

    storage.store = spy
    db = ZODB.DB(storage)
    conn = db.open()
    transaction.commit()
    payload = lookalike()
    conn.root()['hostile'] = obj = PersistentMapping(data=payload)
    tracemalloc.start()
    began = time.perf_counter()
    transaction.commit()
    seconds = time.perf_counter() - began
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    oid = obj._p_oid
    main = storage.partitions[0].storage
    try:
        main.load(FOREIGN)
        stub = True
    except POSKeyError:
        stub = False
    result = {
        'seconds': seconds, 'peak': peak, 'size': len(handed[oid]),
        'child_exact': main.load(oid)[0] == handed[oid],
        'load_exact': storage.load(oid)[0] == handed[oid],
        'stub': stub,
    }
    db.close()
    db = ZODB.DB(open_composite(directory))
    result['round_trip'] = db.open().root()['hostile']['data'] == payload
    db.close()
    return result


# --- the fuzzer ----------------------------------------------------------------

def zodb_records(directory):
    """Records ZODB's own serializer hands a composite: references across
    partitions (plain, class-hinted, weak), bytes values holding reference
    patterns, nested structures.  ``[(prefix, data)]``."""
    import transaction
    import ZODB
    from BTrees.OOBTree import OOBTree
    from persistent.list import PersistentList
    from persistent.mapping import PersistentMapping
    from persistent.wref import WeakRef

    from compositestorage import placement
    from conftest import record_stores

    storage = open_composite(directory)
    handed = record_stores(storage)
    db = ZODB.DB(storage)
    conn = db.open()
    root = conn.root()
    with placement(conn, 'other'):
        targets = [PersistentMapping(n=n) for n in range(6)]
        root['there'] = PersistentList(targets)
    root['tree'] = tree = OOBTree()
    for i in range(40):
        tree['k%03d' % i] = targets[i % 6]
    root['weak'] = PersistentMapping(w=WeakRef(targets[0]))
    root['bytes'] = PersistentMapping(
        a=lookalike(), b=b'C\x08' + FOREIGN, c=GLOBAL * 3,
        d=lookalike().decode('latin-1'), t=targets[1])
    nested = targets[2]
    for _ in range(30):
        nested = (nested, [nested], {'k': nested})
    root['nested'] = PersistentMapping(n=nested)
    transaction.commit()
    db.close()
    return handed


#: Fragments spliced into records: the opcodes a hostile client would use.
FRAGMENTS = [
    b'r\xff\xff\xff\x7f', b'r\x00\x00\x00\x10', b'r\x00\x00\x80\x00',
    b'p99999999999\n', b'p4294967295\n', b'j\xff\xff\xff\xff',
    b'C\x08' + FOREIGN + b'q\x05' + GLOBAL + b'q\x06\x86q\x07Q',
    b'C\x08' + FOREIGN + b'h\x00\x86Q', b'h\x05h\x06\x86Q',
    b'C\x08' + FOREIGN + b'Q', b'(X\x01\x00\x00\x00wC\x08' + FOREIGN
    + b'\x85lQ', b'B\xff\xff\xff\xff', b'X\xff\xff\xff\x7f',
    b'T\x00\x00\x00\x80', b'C\xff', b'\x8b\xff\xff\xff\x7f', b'(' * 50,
    b'\x85' * 50, b'Lx' + b'9' * 5000 + b'L\n', b'I' + b'9' * 5000 + b'\n',
    b'.', b'\x80\x03', b'ccompositestorage.stubs\nPartitionStub:a:b\n',
    b'\x00compositestorage.stubs\nPartitionStub\x00exact\x00',
]


def adversarial(index, lookalike_index, depth, cut):
    """Hand-made records: whole pickles with a hostile opcode at an opcode
    boundary, reference patterns inside bytes and text values, truncated
    records, deep nesting."""
    head = b'\x80\x03' + GLOBAL + b'q\x00.\x80\x03'
    inner = lookalike(lookalike_index)
    return [
        head + b'}q\x01N' + b'r' + index.to_bytes(4, 'little') + b'0.',
        head + b'}q\x01Np%d\n0.' % index,
        head + b'}q\x01(X\x01\x00\x00\x00aC' + bytes([len(inner)]) + inner
        + b'u.',
        head + b'}q\x01(X\x01\x00\x00\x00aB' + len(inner * 3).to_bytes(
            4, 'little') + inner * 3 + b'u.',
        head + b'}q\x01(X\x01\x00\x00\x00aX' + len(inner).to_bytes(
            4, 'little') + inner + b'u.',
        head + b'}q\x01N' + b'\x85' * depth + b'Ns.',
        head + b'}q\x01' + b'(' * depth + b'N' + b't' * depth + b'Ns.',
        head + b'(' * depth + b'.',
        (head + b'}q\x01(X\x01\x00\x00\x00aC' + bytes([len(inner)]) + inner
         + b'u.')[:cut],
    ]


def every_adversarial():
    """Each adversarial record with each of its parameters' extremes."""
    for index in (1 << 16, 1 << 22, 1 << 23, 1 << 31, 0xffffffff):
        for depth in (10, 1000, 6000, 60000, 250000):
            yield from adversarial(index, 1 << 23, depth, 100)


def mutate(rng, data):
    data = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        how = rng.randrange(5)
        at = rng.randrange(len(data) + 1)
        if how == 0 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif how == 1:
            data[at:at] = rng.choice(FRAGMENTS)
        elif how == 2:
            del data[at:at + rng.randint(1, 16)]
        elif how == 3:
            data = data[:at]
        else:
            data[at:at] = bytes(rng.randrange(256)
                                for _ in range(rng.randint(1, 8)))
    return bytes(data)


def check(data, prefix, stats):
    """One record through the store side, the load side and the other
    readers of references; raises AssertionError on anything wrong."""
    from compositestorage.errors import CorruptRecordError
    from compositestorage.references import PLAIN_MARK
    from compositestorage.references import class_of
    from compositestorage.references import persistent_ids
    from compositestorage.references import hints_to_classes
    from compositestorage.references import strong_and_weak_oids
    from compositestorage.references import to_child_record

    budget = 0.5 + len(data) * 2e-5
    began = time.perf_counter()
    try:
        record, foreign, hints = to_child_record(data, prefix, b'\0' * 8,
                                                 'main')
    except CorruptRecordError as e:
        assert 'oid 0x0000000000000000' in str(e) and "'main'" in str(e), e
        stats['refused'] += 1
    else:
        loaded = hints_to_classes(record, prefix, hints.get)
        if PLAIN_MARK in record and PLAIN_MARK not in data:
            # a class no hint can spell ('my:module', an empty module):
            # ZODB's serializer never writes one, and such a record comes
            # back with the same references, not the same bytes
            assert persistent_ids(loaded) == persistent_ids(data)
            stats['plain'] = stats.get('plain', 0) + 1
        else:
            assert loaded == data, 'store then load changed the record'
        assert all(len(oid) == 8 and oid[0] != prefix for oid in foreign)
        stats['stored'] += 1
        stats['rewritten'] += record != data
    hints_to_classes(data, prefix, lambda oid: None)    # hostile child bytes
    strong_and_weak_oids(data)
    class_of(data)
    seconds = time.perf_counter() - began
    assert seconds < budget, '%.2f s for %d bytes' % (seconds, len(data))
    both_walks_agree(data, stats)       # not timed: it walks four times
    grown = peak_rss() - stats['rss']
    assert grown < RSS_GROWTH, (
        'peak memory grew by %d MB' % (grown // (1024 * 1024)))


def walk_outcome(walk, data, refs, census=False):
    """What ``walk`` makes of ``data``: its result, match spans and groups
    included (and with ``census``, the count of persistent ids and the
    first free memo index), or the error it raises with its message."""
    try:
        if census:
            found = walk(data, refs=refs, census=True)
        else:
            found = walk(data, refs=refs)
    except Exception as e:
        return type(e).__name__, str(e)
    if refs is None:
        return found
    end, matches = found[:2]
    return (end, [(m.span(), m.groups()) for m in matches]) + found[2:]


def python_census(data, refs):
    """The Python walk, with the census the C walk takes: what
    :func:`compositestorage.opcodes.walk` answers without the accelerator."""
    from compositestorage import opcodes
    found = opcodes.walk_python(data, refs=refs)
    return found + opcodes._census(data, found[0])


def both_walks_agree(data, stats):
    """The C walk, where it is built, and the Python walk give the same
    answer, and the record the composite makes is the same byte for byte
    either way."""
    from compositestorage import opcodes
    from compositestorage.errors import CorruptRecordError
    from compositestorage.references import _PID_RE
    from compositestorage.references import to_child_record

    accelerated = opcodes._accelerated
    if accelerated is None:
        return
    for refs in (None, _PID_RE):
        fast = walk_outcome(opcodes.walk, data, refs)
        slow = walk_outcome(opcodes.walk_python, data, refs)
        assert fast == slow, (refs, fast, slow)
    if accelerated(data, 2, max(256, len(data) // 2), opcodes._LAYOUT_BYTES,
                   True, True) is not None:
        # where the C walk declines, opcodes.walk takes the Python census;
        # where it answers, the Python walk (``slow``, above) did too
        fast = walk_outcome(opcodes.walk, data, _PID_RE, census=True)
        if isinstance(slow[0], int):        # not an error refusing it
            slow += opcodes._census(data, slow[0])
        assert fast == slow, ('census', fast, slow)
    if accelerated(data, 2, max(256, len(data) // 2),
                   opcodes._LAYOUT_BYTES, False) is not None:
        stats['accelerated'] = stats.get('accelerated', 0) + 1
    made = []
    try:
        for walk in (accelerated, None):
            opcodes._accelerated = walk
            try:
                made.append(to_child_record(data, 1, b'\0' * 8, 'main'))
            except CorruptRecordError as e:
                made.append(('refused', type(e).__name__, str(e)))
    finally:
        opcodes._accelerated = accelerated
    assert made[0] == made[1], made


#: How far the fuzzer's peak resident memory may grow over what it had
#: after making its real records.  The largest record it makes is 250 kB;
#: a memo allocated for a hostile LONG_BINPUT is 64 MB and more.
RSS_GROWTH = 40 * 1024 * 1024


def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


#: How many random records the fuzz checks at least, past its time.
MIN_RANDOM = 300


def fuzz(seed, seconds, directory):
    rng = random.Random(seed)
    real = zodb_records(directory)
    stats = dict(records=0, stored=0, refused=0, rewritten=0,
                 real=len(real), rss=peak_rss())
    for prefix, data in real:       # every real record, unchanged
        check(data, prefix, stats)
        stats['records'] += 1
    for data in every_adversarial():
        check(data, 1, stats)
        stats['records'] += 1
    deadline = time.monotonic() + seconds
    # at least MIN_RANDOM records, however slow the machine
    for n in itertools.count():
        if n >= MIN_RANDOM and time.monotonic() >= deadline:
            break
        kind = rng.randrange(4)
        if kind == 0:
            data = bytes(rng.randrange(256)
                         for _ in range(rng.randrange(1, 300)))
        elif kind == 1:
            data = rng.choice(adversarial(
                rng.choice([1 << 16, 1 << 22, 1 << 31, 0xffffffff]),
                rng.choice([1 << 22, 1 << 23]),
                rng.choice([10, 1000, 6000, 60000]), rng.randrange(1, 220)))
        else:
            data = mutate(rng, rng.choice(real)[1])
        prefix = rng.randrange(2)
        try:
            check(data, prefix, stats)
        except BaseException as e:
            raise AssertionError('seed %d, prefix %d, record %r: %s: %s' % (
                seed, prefix, data[:2000], type(e).__name__, e)) from e
        stats['records'] += 1
    return stats


if __name__ == '__main__':
    cap()
    if sys.argv[1] == 'commit':
        print(json.dumps(commit(sys.argv[2])))
    else:
        print(json.dumps(fuzz(int(sys.argv[2]), float(sys.argv[3]),
                              sys.argv[4])))
