"""Shared fixtures and helpers for the compositestorage scenario tests.

Everything here uses real parts: real ``FileStorage`` files in pytest's
``tmp_path``, real ``ZODB.DB`` objects and real transactions.
"""
import os
import queue
import re
import signal
import subprocess
import sys
import threading

import pytest
import transaction
import ZODB
from ZODB.FileStorage import FileStorage
from ZODB.POSException import POSKeyError
from ZODB.serialize import referencesf
from ZODB.utils import get_pickle_metadata
from ZODB.utils import z64

from compositestorage import CompositeStorage
from compositestorage import PartitionStub

#: (name, prefix) of the partitions most tests use.
THREE = (('main', 0), ('b', 1), ('c', 2))
TWO = (('main', 0), ('b', 1))

STUB_CLASS = ('compositestorage.stubs', 'PartitionStub')
MAP_CLASS = ('compositestorage.partition', 'PartitionMap')


def map_oid(prefix):
    """The oid of the partition-map record of partition ``prefix``."""
    return bytes((prefix,)) + b'\xff' * 7


def paths_for(tmp_path, parts=THREE):
    return {name: str(tmp_path / ('%s.fs' % name)) for name, _ in parts}


def open_composite(paths, parts=THREE, read_only_children=(),
                   read_only_partitions=(), **kw):
    """Open a composite over the FileStorage files in ``paths``.

    ``read_only_children`` opens those children as read-only FileStorages;
    ``read_only_partitions`` marks those partitions read-only in the
    composite while their child is writable.
    """
    children = []
    try:
        for name, prefix in parts:
            fs = FileStorage(paths[name],
                             read_only=name in read_only_children)
            children.append((name, prefix, fs))
        from compositestorage import Partition
        partitions = [Partition(name, prefix, fs,
                                read_only=name in read_only_partitions)
                      for name, prefix, fs in children]
        return CompositeStorage(partitions, **kw)
    except BaseException:
        for _, _, fs in children:
            fs.close()
        raise


def make_composite(tmp_path, parts=THREE, **kw):
    """A fresh composite over new FileStorage files: ``(storage, paths)``."""
    paths = paths_for(tmp_path, parts)
    return open_composite(paths, parts, **kw), paths


@pytest.fixture
def closing():
    """Collects storages/DBs to close at teardown (closing twice is fine)."""
    things = []
    yield things.append
    for thing in reversed(things):
        try:
            thing.close()
        except Exception:
            pass


@pytest.fixture
def composite(tmp_path, closing):
    """A fresh three-partition composite: ``(storage, paths)``."""
    storage, paths = make_composite(tmp_path)
    closing(storage)
    return storage, paths


@pytest.fixture
def composite_db(composite, closing):
    """``(db, storage, paths)`` for a fresh three-partition composite."""
    storage, paths = composite
    db = ZODB.DB(storage)
    closing(db)
    return db, storage, paths


def new_tm():
    return transaction.TransactionManager()


# --- reading child files directly -------------------------------------------

def iter_current(storage):
    """Yield ``(oid, tid, data)`` of every current record of ``storage``."""
    from compositestorage.verify import current_records
    return current_records(storage)


def blob_paths(directory):
    """The paths of every committed blob file under ``directory``."""
    found = set()
    for dirpath, _, files in os.walk(str(directory)):
        found.update(os.path.join(dirpath, f) for f in files
                     if f.endswith('.blob'))
    return found


def child_records(path):
    """``{oid: data}`` of the current records of the FileStorage at path."""
    fs = FileStorage(path, read_only=True)
    try:
        return {oid: data for oid, _, data in iter_current(fs)}
    finally:
        fs.close()


def child_history(path):
    """``[(tid, [(oid, data), ...]), ...]`` of every transaction in a file."""
    fs = FileStorage(path, read_only=True)
    try:
        out = []
        it = fs.iterator()
        for txn in it:
            out.append((txn.tid, [(r.oid, r.data) for r in txn]))
        return out
    finally:
        fs.close()


def pickle_class(data):
    """``(module, name)`` of a record's class, without importing it."""
    return get_pickle_metadata(data)


def is_stub(data):
    return data is not None and pickle_class(data) == STUB_CLASS


def file_state(paths):
    """Size and bytes of each file, to prove that nothing was written."""
    out = {}
    for name, path in paths.items():
        if os.path.exists(path):
            with open(path, 'rb') as f:
                out[name] = f.read()
        else:
            out[name] = None
    return out


def _persistent_objects(state, seen=None):
    """Persistent objects directly inside an unpickled state."""
    import persistent
    from persistent.wref import WeakRef
    if seen is None:
        seen = set()
    if id(state) in seen:
        return
    seen.add(id(state))
    if isinstance(state, persistent.Persistent):
        yield state
    elif isinstance(state, WeakRef):
        return
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from _persistent_objects(k, seen)
            yield from _persistent_objects(v, seen)
    elif isinstance(state, (list, tuple, set, frozenset)):
        for v in state:
            yield from _persistent_objects(v, seen)


def check_child_self_contained(path, prefix, home_names):
    """Open one child file alone with a plain ZODB and check invariant 2.

    Every record loads; every persistent reference in every record
    resolves inside the child; every foreign record is a PartitionStub whose
    repr names its home partition and its oid in hex; a secondary child has
    the root stub at z64.  ``home_names`` maps prefix -> partition name.
    Returns ``{oid: loaded object's class}`` for further checks.
    """
    fs = FileStorage(path, read_only=True)
    db = ZODB.DB(fs)
    try:
        conn = db.open()
        classes = {}
        records = list(iter_current(fs))
        assert records, 'child %s is empty' % path
        oids = {oid for oid, _, _ in records}
        if prefix != 0:
            assert z64 in oids, 'secondary child %s lacks the root stub' % path
        for oid, tid, data in records:
            # every reference resolves inside this child
            for ref in referencesf(data):
                try:
                    fs.load(ref)
                except POSKeyError:
                    raise AssertionError(
                        'record %s in %s refers to %s, which is not in '
                        'the child' % (oid.hex(), path, ref.hex()))
            obj = conn.get(oid)
            obj._p_activate()
            classes[oid] = type(obj)
            if oid[0] != prefix:
                assert isinstance(obj, PartitionStub), (oid, obj)
                home = home_names[oid[0]]
                assert obj.home == home
                text = repr(obj)
                assert oid.hex() in text, text
                assert repr(home) in text, text
            elif oid == map_oid(prefix):
                assert pickle_class(data) == MAP_CLASS
            else:
                assert not isinstance(obj, PartitionStub), (oid, obj)
                # the ghosts a plain ZODB makes for foreign references,
                # from the class hints, are stubs too
                for ref in _persistent_objects(conn._reader.getState(data)):
                    if ref._p_oid[0] != prefix:
                        assert isinstance(ref, PartitionStub), (oid, ref)
                    else:
                        assert not isinstance(ref, PartitionStub), (oid, ref)
        conn.close()
        return classes
    finally:
        db.close()


def record_stores(storage):
    """``[(prefix, data)]`` that fills with every record ZODB hands
    ``storage.store``, before the composite rewrites anything."""
    handed = []
    store = storage.store

    def spy(oid, serial, data, version, txn):
        handed.append((oid[0], data))
        return store(oid, serial, data, version, txn)

    storage.store = spy
    return handed


def raw_commit(storage, records, tid=None, **meta):
    """Commit ``[(oid, serial, data), ...]`` through the storage API,
    with the given ``tid`` if any.

    Returns the tid.  Aborts (and re-raises) on any error.
    """
    from ZODB.Connection import TransactionMetaData
    txn = TransactionMetaData(**meta)
    storage.tpc_begin(txn, tid)
    try:
        for oid, serial, data in records:
            storage.store(oid, serial, data, '', txn)
        storage.tpc_vote(txn)
    except BaseException:
        storage.tpc_abort(txn)
        raise
    return storage.tpc_finish(txn)


class Ref:
    """A reference to ``oid`` (a PersistentMapping) in :func:`pm_record`."""

    def __init__(self, oid):
        self.oid = oid


def pm_record(**items):
    """A plain ZODB record of a PersistentMapping holding ``items``;
    :class:`Ref` values become ``(oid, PersistentMapping)`` references."""
    import io
    from persistent.mapping import PersistentMapping
    from ZODB._compat import PersistentPickler

    def pid(obj):
        if isinstance(obj, Ref):
            return (obj.oid, PersistentMapping)
        return None
    f = io.BytesIO()
    p = PersistentPickler(pid, f, 3)
    p.dump((PersistentMapping, None))
    p.dump({'data': dict(items)})
    return f.getvalue()


def partition_xml(name, prefix, path=None, extra=''):
    storage = ('<filestorage>\n      path %s\n    </filestorage>' % path
               if path else '')
    return '''
  <partition %s>
    prefix %s
    %s
    %s
  </partition>''' % (name, prefix, extra, storage)


def composite_xml(partitions, top='', section_name='', zodb=False):
    """A ``<compositestorage>`` config; ``section_name`` names it (ZEO's
    storage name), ``zodb`` wraps it in a ``<zodb>`` section."""
    text = '''
<compositestorage %s>
  %s
  %s
</compositestorage>
''' % (section_name, top, ''.join(partitions))
    if zodb:
        text = '<zodb>%s</zodb>\n' % text
    return '%import compositestorage\n' + text


def config_file(directory, paths, parts=THREE):
    """Write ``composite.conf`` in ``directory`` for the FileStorage
    partitions at ``paths``; returns its path."""
    config = directory / 'composite.conf'
    config.write_text(composite_xml(
        [partition_xml(name, prefix, paths[name]) for name, prefix in parts]))
    return config


def main_and_catalog(directory, catalog_extra=''):
    """The ``main`` (0) and ``catalog`` (1) FileStorage partitions."""
    return [partition_xml('main', 0, '%s/main.fs' % directory),
            partition_xml('catalog', 1, '%s/catalog.fs' % directory,
                          catalog_extra)]


def unpickle_record(data):
    """``(class metadata, state)`` of a record, with persistent ids kept as
    ``('pid', pid)`` so that two records can be compared by meaning."""
    import io
    from ZODB._compat import PersistentUnpickler
    u = PersistentUnpickler(None, lambda pid: ('pid', pid), io.BytesIO(data))
    return u.load(), u.load()


#: ``python -m compositestorage``, and how long a test waits for it.
CLI = [sys.executable, '-m', 'compositestorage']
TIMEOUT = 60


# --- a served composite ----------------------------------------------------------

class Served:
    """``compositestorage serve ...`` in a subprocess of its own."""

    def __init__(self, args, cwd, nparts):
        self.log = open(os.path.join(cwd, 'serve.log'), 'w+')
        self.proc = subprocess.Popen(
            CLI + ['serve'] + list(args), cwd=cwd, stdout=subprocess.PIPE,
            stderr=self.log, text=True)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        first = self.next_line()
        m = re.fullmatch(r'serving compositestorage on ([\d.]+):(\d+)', first)
        assert m, first
        self.host, self.port = m.group(1), int(m.group(2))
        self.partitions = [self.next_line() for _ in range(nparts)]

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip('\n'))
        self.lines.put(None)

    def next_line(self):
        try:
            line = self.lines.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError('serve printed nothing: %s' % self.stderr())
        assert line is not None, 'serve exited: %s' % self.stderr()
        return line

    def stderr(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=TIMEOUT)

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=TIMEOUT)
        self.proc.stdout.close()
        self.log.close()


@pytest.fixture
def serving():
    started = []

    def start(args, cwd, nparts):
        served = Served(args, str(cwd), nparts)
        started.append(served)
        return served
    yield start
    for served in started:
        served.close()


def accelerator_built():
    """Whether the C walk is built here; under CI it must be."""
    from compositestorage import opcodes
    built = opcodes._accelerated is not None
    if os.environ.get('CI') and not os.environ.get(
            'COMPOSITESTORAGE_PURE_PYTHON'):
        assert built, ('compositestorage._opcodes was not built: '
                       'install with a C compiler (pip install -e .)')
    return built
