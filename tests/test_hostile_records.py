"""A client's record must not make the coordinator use memory or time out of
proportion to it (DESIGN.md, invariant 4; issue 11, case 5).

The issue's record: a ``bytes`` value that holds what looks like ZODB's
layout of a reference to another partition.  The rewrite used to edit the
hint inside the bytes value and run the C unpickler on the misaligned
result, where a stray ``LONG_BINPUT`` grew its memo to gigabytes.  A match
that does not begin at an opcode is user data now, and every record is
walked within bounds before the C unpickler sees it.

The records that could take the machine down are run in a subprocess under
a cap on its address space (``hostile_records.py``).
"""
import json
import os
import random
import re
import socket
import subprocess
import sys
import time

import pytest
import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.POSException import POSKeyError

from compositestorage.errors import CorruptRecordError
from compositestorage.opcodes import MAX_NESTING
from compositestorage.opcodes import NotAPickle
from compositestorage.opcodes import UnsafeRecordError
from compositestorage.opcodes import walk
from compositestorage.references import class_of
from compositestorage.references import strong_and_weak_oids
from compositestorage.references import to_child_record
from conftest import TWO
from conftest import accelerator_built
from conftest import make_composite
from conftest import raw_commit

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, 'hostile_records.py')
sys.path.insert(0, HERE)
import hostile_records  # noqa: E402  (the subprocess's own module)

HEAD = b'\x80\x03' + hostile_records.GLOBAL + b'q\x00.\x80\x03'


def run_capped(*args, timeout=300):
    """Run ``hostile_records.py`` with ``args`` under its memory cap; its
    JSON result."""
    done = subprocess.run(
        [sys.executable, SCRIPT] + [str(a) for a in args],
        capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_a_reference_lookalike_in_bytes_is_user_data(tmp_path):
    """The issue's reproduction, through ZODB and a real composite."""
    found = run_capped('commit', tmp_path)
    assert found['size'] < 300
    assert found['seconds'] < 1.0, found
    # the old rewrite allocated a 128 MB memo for this 215-byte record
    assert found['peak'] < 1024 * 1024, found
    assert found['child_exact'] and found['load_exact'], found
    assert not found['stub'], found     # no stub for the lookalike's oid
    assert found['round_trip'], found


def test_fuzz_store_and_load_sides(tmp_path):
    """Random bytes, mutations of ZODB's own records and adversarial
    records: each is stored as it is or rewritten (and comes back byte for
    byte), or refused with an error naming oid and partition, in time and
    memory bounded by its size.  ``COMPOSITESTORAGE_FUZZ_SEED`` replays a
    seed, ``COMPOSITESTORAGE_FUZZ_SECONDS`` sets the random phase's length.
    """
    seed = int(os.environ.get('COMPOSITESTORAGE_FUZZ_SEED')
               or random.SystemRandom().randrange(1 << 32))
    seconds = float(os.environ.get('COMPOSITESTORAGE_FUZZ_SECONDS', 15))
    print('fuzz seed %d (replay: COMPOSITESTORAGE_FUZZ_SEED=%d)'
          % (seed, seed))
    for one in (20260101, seed):
        (tmp_path / str(one)).mkdir()
        stats = run_capped('fuzz', one, seconds / 2, tmp_path / str(one),
                           timeout=300 + seconds)
        # the random phase is timed, but checks at least MIN_RANDOM
        assert stats['real'] > 10 and stats['rewritten'] > 0, stats
        assert stats['records'] >= \
            stats['real'] + hostile_records.MIN_RANDOM, stats
        assert stats['refused'] and stats['stored'] > stats['refused']
        if accelerator_built():
            # the C walk answered for most records, and agreed each time
            assert stats['accelerated'] > stats['real'], stats


# --- the bounds, one by one ----------------------------------------------------

@pytest.mark.parametrize('hostile', [
    HEAD + b'}q\x01Nr\x00\x00\x00\x100.',       # LONG_BINPUT 2**28
    HEAD + b'}q\x01Np4294967296\n0.',           # text PUT
    HEAD + b'}q\x01N' + b'\x85' * (MAX_NESTING + 1) + b'Ns.',
    HEAD + b'}q\x01' + b'(' * (MAX_NESTING + 1) + b'N'
    + b't' * (MAX_NESTING + 1) + b'Ns.',
])
def test_a_pickle_beyond_its_bounds_is_refused(tmp_path, hostile):
    with pytest.raises(UnsafeRecordError):
        walk(hostile)
    with pytest.raises(UnsafeRecordError):
        strong_and_weak_oids(hostile, strict=True)
    assert strong_and_weak_oids(hostile) == ([], [])
    # with a foreign reference, so that the store side must parse it
    storage, _ = make_composite(tmp_path, TWO)
    try:
        foreign = hostile[:-1] + b'C\x08' + hostile_records.FOREIGN + b'Q0.'
        oid = storage.new_oid()
        with pytest.raises(CorruptRecordError) as e:
            raw_commit(storage, [(oid, b'\0' * 8, foreign)])
        message = str(e.value)
        assert '0x%s' % oid.hex() in message and "'main'" in message
        assert 'nothing was stored' in message
        with pytest.raises(POSKeyError):
            storage.load(oid)
    finally:
        storage.close()


def test_what_zodb_writes_is_within_bounds(tmp_path):
    """Every record of a real graph walks, and a memo past 256 entries
    (LONG_BINPUT) and nesting near the recursion limit are accepted."""
    for prefix, data in hostile_records.zodb_records(str(tmp_path)):
        assert walk(data) == len(data)
    nested = ()
    for _ in range(400):
        nested = (nested,)
    (tmp_path / 'big').mkdir()
    db = ZODB.DB(make_composite(tmp_path / 'big', TWO)[0])
    try:
        conn = db.open()
        conn.root()['big'] = big = PersistentMapping(
            {str(i): b'%d' % i for i in range(2000)}, nested=nested)
        transaction.commit()
        data = db.storage.load(big._p_oid)[0]
        assert b'r\x00\x01\x00\x00' in data       # LONG_BINPUT 256
        assert walk(data) == len(data)
        assert to_child_record(data, 0)[0] == data
    finally:
        db.close()


def test_bytes_that_only_look_like_hostile_opcodes_are_stored():
    """Not a pickle at all: stored as any bytes are, never unpickled."""
    for data in (b'r\xff\xff\xff\x7f', b'raw\x00' + b'x' * 10,
                 b'p99999999999\nraw'):
        with pytest.raises(NotAPickle):
            walk(data)
        assert to_child_record(data, 0) == (data, (), {})


def test_class_of_reads_without_unpickling(tmp_path):
    """ZODB's get_pickle_metadata fully loads any layout it does not know,
    importing and calling what the record names."""
    made = tmp_path / 'made-by-a-record'
    path = str(made).encode()
    data = (b'\x80\x03X\x00\x00\x00\x000cos\nmkdir\n(X'
            + len(path).to_bytes(4, 'little') + path + b'tR.')
    assert class_of(data) is None
    assert not made.exists()
    assert class_of(HEAD + b'}q\x01.') == (
        'persistent.mapping', 'PersistentMapping')


# --- through ZEO -----------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _peak_rss(pid):
    with open('/proc/%d/status' % pid) as f:
        return int(re.search(r'VmHWM:\s+(\d+) kB', f.read()).group(1)) * 1024


@pytest.mark.skipif(not os.path.exists('/proc/self/status'),
                    reason='reads the server peak memory from /proc')
def test_a_hostile_commit_through_zeo_leaves_the_server_well(tmp_path):
    import ZEO
    port = _free_port()
    conf = tmp_path / 'zeo.conf'
    conf.write_text('''%%import compositestorage
<zeo>
  address 127.0.0.1:%d
</zeo>
<compositestorage 1>
  <partition main>
    prefix 0
    <filestorage>
      path %s/main.fs
    </filestorage>
  </partition>
  <partition other>
    prefix 1
    <filestorage>
      path %s/other.fs
    </filestorage>
  </partition>
</compositestorage>
''' % (port, tmp_path, tmp_path))
    server = subprocess.Popen(
        [sys.executable, '-c', 'import resource, sys; '
         'resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30)); '
         'from ZEO.runzeo import main; sys.argv[1:] = ["-C", %r]; main()'
         % str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                socket.create_connection(('127.0.0.1', port), 0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, 'runzeo did not listen'
                time.sleep(0.1)
        db = ZEO.DB(('127.0.0.1', port))
        try:
            conn = db.open()
            conn.root()['warm'] = PersistentMapping(a=1)
            transaction.commit()
            before = _peak_rss(server.pid)
            payload = hostile_records.lookalike()
            conn.root()['hostile'] = PersistentMapping(data=payload)
            began = time.monotonic()
            transaction.commit()
            assert time.monotonic() - began < 5
            # the old rewrite: a 128 MB memo in the server
            assert _peak_rss(server.pid) - before < 32 * 1024 * 1024

            # a record beyond its bounds: refused, the server lives on
            oid = db.storage.new_oid()
            hostile = (HEAD + b'}q\x01Nr\x00\x00\x00\x100C\x08'
                       + hostile_records.FOREIGN + b'Q0.')
            with pytest.raises(Exception) as e:
                raw_commit(db.storage, [(oid, b'\0' * 8, hostile)])
            # ZEO sends the error's fields when it does not rebuild it
            assert 'LONG_BINPUT of memo index 268435456' in str(e.value)
            assert "'main'" in str(e.value)
            transaction.abort()
            conn.root()['after'] = PersistentMapping(b=2)
            transaction.commit()
        finally:
            db.close()
        db = ZEO.DB(('127.0.0.1', port))
        try:
            root = db.open().root()
            assert root['hostile']['data'] == payload
            assert root['after']['b'] == 2
        finally:
            db.close()
        assert server.poll() is None
    finally:
        server.terminate()
        server.wait(30)
