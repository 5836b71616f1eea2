"""The adapter for RelStorage children (SQLite, PostgreSQL, ...).

It reads the child's tables through RelStorage's own adapter (its
connection manager and driver), on a connection of its own, so that what
it reads is what is committed now, not the child's MVCC snapshot:

* oids and counts from ``current_object`` (history-preserving) or
  ``object_state`` (history-free), by primary key ranges;
* the transactions a history-preserving child holds, and the partitions
  each spans, from its ``transaction`` table (a history-free child keeps
  no transaction metadata);
* taking a finished transaction back from a history-preserving child by
  deleting that tid's rows, as a FileStorage file is cut;
* removing garbage by deleting the rows of every oid the composite's mark
  did not keep, then packing without GC (history-preserving only).

A RelStorage instance serves one thread at a time (an IMVCCStorage gives
each ZODB connection an instance of its own), while every thread of the
composite calls the same child.  The composite therefore calls each
RelStorage child through :class:`OneThreadAtATime`, which serializes the
calls; the composite's own commit lock already keeps one transaction at a
time in each child.

RelStorage's ``pack`` takes no ``gc`` argument: its ``pack-gc`` option
decides.  A writable child is therefore opened with that option forced
off, so that it never collects garbage on its own (DESIGN.md, invariant 7).

The composite begins every child with ``tpc_begin(txn, tid)``, which is
RelStorage's restore mode: the transaction row, with its metadata, is
written at begin, on the store connection, so the span is set there
before the vote; and that mode lacks ``deleteObject`` (RelStorage 4.3
spells it ``deletObject``), so a deletion is stored as a restore of no
data, which is what ``deleteObject`` writes.
"""
import base64
import contextlib
import logging
import threading

from ZODB.POSException import ConflictError
from ZODB.POSException import POSKeyError
from ZODB.serialize import referencesf
from ZODB.utils import p64
from ZODB.utils import u64
from ZODB.utils import z64

from compositestorage.children.generic import Child
from compositestorage.errors import RecoveryError

logger = logging.getLogger(__name__)

#: How many oids one statement deletes.
BATCH = 500


def _stay_in_transaction():
    """See :meth:`RelStorageChild._keep_sqlite_transaction_open`."""


def configured_db(opener):
    """What a ``<relstorage>`` section of a config names as its database
    (``PostgreSQL dsn ...`` without a password, ``SQLite data-dir ...``),
    for messages; ``None`` for any other section."""
    adapter_section = getattr(getattr(opener, 'config', None), 'adapter',
                              None)
    section = getattr(adapter_section, 'config', None)
    if section is None:
        return None
    engine = section.getSectionType()
    return _where(engine, getattr(section, 'data_dir', None),
                  getattr(section, 'dsn', None)) or engine


def _where(engine, data_dir, dsn):
    """``ENGINE data-dir PATH`` or ``ENGINE dsn DSN``, never showing a
    password (as RelStorage's own repr does); ``None`` without either."""
    if data_dir:
        return '%s data-dir %s' % (engine, data_dir)
    if dsn:
        return '%s dsn %s' % (engine, ' '.join(
            p for p in dsn.split() if not p.startswith('password')))
    return None


def handles(base):
    try:
        from relstorage.storage import RelStorage
    except ImportError:     # pragma: no cover
        return False
    return isinstance(base, RelStorage)


def adapter(storage, base):
    return RelStorageChild(storage, base)


class _OldStatesByRevision:
    """RelStorage's cache, giving a conflict's old states by revision.

    At vote, RelStorage fetches the state each conflicting store was based
    on as the *current* state of its load snapshot, and raises
    ``CacheConsistencyError`` when that is another revision: an instance
    serves one ZODB connection, whose view is its snapshot.  The
    composite's connections share the child instance, whose snapshot is
    often newer than a connection's view, so the old states are read by
    revision here, as ``loadSerial`` reads them.
    """
    __slots__ = ()

    def prefetch_for_conflicts(self, cursor, oid_tid_pairs):
        load = self.adapter.mover.load_revision
        return {oid: (load(cursor, oid, tid), tid)
                for oid, tid in oid_tid_pairs}


_CACHE_CLASSES = {}


def _by_revision(cache):
    """Have ``cache`` (a StorageCache, which has slots) give conflicts'
    old states by revision."""
    cls = type(cache)
    if issubclass(cls, _OldStatesByRevision):
        return
    if cls not in _CACHE_CLASSES:
        _CACHE_CLASSES[cls] = type(cls.__name__, (_OldStatesByRevision, cls),
                                   {'__slots__': ()})
    cache.__class__ = _CACHE_CLASSES[cls]


class OneThreadAtATime:
    """A RelStorage, called by one thread at a time.

    Every public method runs under one reentrant lock; attributes are
    read and set on the RelStorage itself (the composite sets
    ``tryToResolveConflict`` there, as RelStorage calls it on itself).
    ``tpc_finish`` also lets the adapter drop what the child cached of
    rows an undo rewrote in the database, before another thread loads.
    """

    #: attributes handed on as they are, not called under the lock
    _unlocked = frozenset(['tryToResolveConflict'])

    def __init__(self, storage, child):
        object.__setattr__(self, '_storage', storage)
        object.__setattr__(self, '_child', child)
        object.__setattr__(self, 'lock', threading.RLock())

    def __getattr__(self, name):
        value = getattr(self._storage, name)
        if (name.startswith('_') or name in self._unlocked
                or not callable(value)):
            return value
        lock = self.lock

        def locked(*args, **kwargs):
            with lock:
                return value(*args, **kwargs)
        locked.__name__ = name
        # bound once: the next call finds it without __getattr__
        object.__setattr__(self, name, locked)
        return locked

    def __setattr__(self, name, value):
        self.__dict__.pop(name, None)
        setattr(self._storage, name, value)

    def loadBefore(self, oid, tid):
        """RelStorage 4.3 makes the POSKeyError for a revision that undid
        the object's creation, but forgets to raise it (its ``load``
        raises it; ``loadBefore`` returns no data instead)."""
        with self.lock:
            r = self._storage.loadBefore(oid, tid)
        if r is not None and r[0] is None:
            raise POSKeyError(oid)
        return r

    def tpc_finish(self, transaction, func=None):
        with self.lock:
            if func is None:
                tid = self._storage.tpc_finish(transaction)
            else:
                tid = self._storage.tpc_finish(transaction, func)
            self._child.finished()
            return tid

    def __repr__(self):
        return '<one thread at a time: %r>' % (self._storage,)


class RelStorageChild(Child):

    kind = 'RelStorage'
    collects_garbage = True
    counts_cheaply = True

    def __init__(self, storage, base=None):
        base = storage if base is None else base
        Child.__init__(self, OneThreadAtATime(storage, self), base)
        _by_revision(base._cache)
        #: whether the transaction being committed undid something
        self._undid = False
        self.keep_history = base._options.keep_history
        self.reads_spans = self.keep_history
        self.rolls_back = self.records_spans = self.keep_history
        self._db = base._adapter
        #: the table that has one row per current object
        self._current = ('current_object' if self.keep_history
                         else 'object_state')
        driver = self._db.driver
        self._binary = driver.Binary
        self._mark = '?' if 'sqlite' in type(driver).__module__ else '%s'
        self._tid = None        # the tid of the transaction being restored

    def type_name(self):
        return type(self.base).__name__      # not the OneThreadAtATime

    @property
    def shareable(self):
        """Whether processes on several machines can open the child at
        once: a database server's (an SQLite file is one machine's)."""
        return self.engine == 'postgresql'

    @property
    def commit_lock_timeout(self):
        """Seconds a commit waits for a lock (``commit-lock-timeout``)."""
        return self.base._options.commit_lock_timeout

    def shared_session(self):
        """A new ``(connection, cursor)`` on the child's database, in
        READ COMMITTED, for what the processes of a shared composite
        share there (:mod:`compositestorage.shared`)."""
        connmanager = self._db.connmanager
        return connmanager.open(
            isolation=connmanager.isolation_read_committed)

    def cluster_id(self):
        """The PostgreSQL cluster the child's database is in (its system
        identifier), or ``None`` where it cannot be read."""
        if self.engine != 'postgresql':
            return None
        try:
            return self._scalar(
                'SELECT system_identifier FROM pg_control_system()')
        except Exception:
            logger.info('partition child %s: cannot read its cluster\'s '
                        'system identifier; every commit waits for the '
                        'disk', self.location, exc_info=True)
            return None

    def commit_without_flush(self):
        """Let the transaction being finished commit without waiting for
        the disk (``synchronous_commit`` off, for it alone).  The composite
        asks it only of a participant whose commit a later one, in the
        same PostgreSQL cluster, flushes to disk before any reader can see
        either, and before ``tpc_finish`` returns."""
        state = self._restore_state()
        if state is not None:
            state.shared_state.store_connection.cursor.execute(
                'SET LOCAL synchronous_commit TO OFF')

    def new_instance(self):
        """The adapter of a new RelStorage instance of this child, for one
        instance of a shared composite: its own sessions and snapshot."""
        return RelStorageChild(self.base.new_instance(), None)

    def describe(self):
        return '%s RelStorage on %s' % (
            'history-preserving' if self.keep_history else 'history-free',
            self.engine)

    @property
    def location(self):
        """``sqlite3 data-dir PATH`` or ``postgresql dsn ...`` (without
        a password), not RelStorage's name, which shows object ids."""
        return _where(self.engine, getattr(self._db, 'data_dir', None),
                      getattr(self._db, '_dsn', None)) \
            or self.storage.getName()

    @property
    def engine(self):
        """The database's name as RelStorage's driver gives it."""
        return type(self._db).__module__.split('.')[2]

    def prepare(self, read_only):
        """Never let the child collect garbage on its own."""
        options = self.base._options
        if options.pack_gc:
            logger.info('partition child %s: pack-gc switched off; the '
                        'composite collects garbage globally',
                        self.storage.getName())
            options.pack_gc = False

    @contextlib.contextmanager
    def _cursor(self, write=False):
        """A cursor on a connection of its own, committed (``write``) or
        rolled back at the end, and closed."""
        connmanager = self._db.connmanager
        conn, cursor = connmanager.open()
        try:
            yield cursor
            if write:
                conn.commit()
            else:
                conn.rollback()
        except BaseException:
            try:
                conn.rollback()
            finally:
                connmanager.close(conn, cursor)
            raise
        connmanager.close(conn, cursor)

    def _query(self, sql, params=()):
        with self._cursor() as cursor:
            cursor.execute(sql.replace('%s', self._mark), params)
            return cursor.fetchall()

    def _scalar(self, sql, params=()):
        rows = self._query(sql, params)
        return rows[0][0] if rows else None

    # --- oids -------------------------------------------------------------

    def oids_in(self, lo, hi):
        rows = self._query(
            'SELECT zoid FROM %s WHERE zoid >= %%s AND zoid <= %%s '
            'ORDER BY zoid' % self._current, (u64(lo), u64(hi)))
        return [p64(row[0]) for row in rows]

    def max_oid(self, lo, hi):
        n = self._scalar('SELECT MAX(zoid) FROM %s WHERE zoid >= %%s AND '
                         'zoid <= %%s' % self._current, (u64(lo), u64(hi)))
        return None if n is None else p64(n)

    def min_oid(self, lo, hi):
        n = self._scalar('SELECT MIN(zoid) FROM %s WHERE zoid >= %%s AND '
                         'zoid <= %%s' % self._current, (u64(lo), u64(hi)))
        return None if n is None else p64(n)

    def count_in(self, lo, hi):
        return self._scalar('SELECT COUNT(*) FROM %s WHERE zoid >= %%s AND '
                            'zoid <= %%s' % self._current, (u64(lo), u64(hi)))

    def count_outside(self, lo, hi):
        return self._scalar('SELECT COUNT(*) FROM %s WHERE zoid < %%s OR '
                            'zoid > %%s' % self._current, (u64(lo), u64(hi)))

    def prefixes_held(self):
        """The prefixes of the oids the child holds.

        One indexed probe per prefix held, plus one: each finds the
        lowest oid from the next possible prefix on, and so skips the
        prefixes no oid has.  (Probing all 128 prefixes cost 128 queries
        per call, twice per child at every open: a quarter of a second
        for three PostgreSQL children, paid again at every reopen after a
        crash.)  Oids stay below 2**63, so prefixes below 0x80."""
        held = set()
        sql = ('SELECT MIN(zoid) FROM %s WHERE zoid >= %%s'
               % self._current).replace('%s', self._mark)
        with self._cursor() as cursor:
            prefix = 0
            while prefix < 0x80:
                cursor.execute(sql, (prefix << 56,))
                row = cursor.fetchall()
                if not row or row[0][0] is None:
                    break
                found = row[0][0] >> 56
                held.add(found)
                prefix = found + 1
        return held

    def current_serial(self, oid):
        n = self._scalar('SELECT tid FROM %s WHERE zoid = %%s'
                         % self._current, (u64(oid),))
        return None if n is None else p64(n)

    # --- transactions -----------------------------------------------------

    def settle(self):
        """Wait for a commit that a coordinator which died left running in
        the database server.

        PostgreSQL finishes a COMMIT it was sent even when the client is
        gone: killed while the server commits, the coordinator leaves the
        child lacking the transaction for a moment, then holding it.
        Recovery deciding in that moment took it back from the other
        participants only, and the child held it alone
        (``test_a_kill_while_the_server_commits`` in
        tests/test_atomic_relstorage.py).  RelStorage holds its commit lock
        from a commit's begin to its end: taking it, then letting go,
        waits for that commit.  SQLite commits in the coordinator's
        process, which a kill ends."""
        if self._mark == '?':
            return
        with self._cursor() as cursor:
            self._db.locker.hold_commit_lock(cursor)

    def last_finished(self):
        if self.keep_history:
            n = self._scalar('SELECT MAX(tid) FROM "transaction"')
        else:
            n = self._scalar('SELECT MAX(tid) FROM object_state')
        return p64(n) if n else z64

    def has_transaction(self, tid):
        if not self.keep_history:
            # Older rows were overwritten, so only the last tid can be
            # told.  A child that cannot roll back finishes after every
            # other participant, and recovery runs before any later
            # commit: a later tid here means ``tid`` finished.  (A
            # transaction that only deleted objects here leaves no row to
            # tell it by.)
            return self.last_finished() >= tid
        return self._scalar('SELECT COUNT(*) FROM "transaction" WHERE tid = %s',
                            (u64(tid),)) > 0

    def recent_transactions(self, floor, depth):
        if not self.keep_history:
            return ()
        sql = ('SELECT tid, extension, packed FROM "transaction" '
               'WHERE tid > %s ORDER BY tid DESC')
        if depth != float('inf'):
            sql += ' LIMIT %d' % depth
        # a transaction a pack rewrote may have lost parts
        return [(p64(tid), b'' if packed else bytes(extension or b''))
                for tid, extension, packed
                in self._query(sql, (u64(floor),))]

    def _restore_state(self):
        """The restore-mode state of the transaction being committed."""
        phase = self.base._tpc_phase
        return getattr(phase, 'wrapping', None)

    def record_participants(self, extension):
        """RelStorage's restore mode wrote the transaction's row at
        ``tpc_begin``, on its store connection, uncommitted: its extension
        is updated there."""
        if not self.keep_history:
            return      # a history-free child keeps no transaction row
        state = self._restore_state()
        if state is None or self._tid is None:
            return
        cursor = state.shared_state.store_connection.cursor
        cursor.execute(
            'UPDATE "transaction" SET extension = %s WHERE tid = %s'.replace(
                '%s', self._mark),
            (self._binary(extension), u64(self._tid)))

    def tpc_begin(self, transaction, tid, status=' '):
        Child.tpc_begin(self, transaction, tid, status)
        self._tid = tid
        self._undid = False
        if self._mark == '?':
            self._keep_sqlite_transaction_open()

    def _keep_sqlite_transaction_open(self):
        """Keep an SQLite child's store transaction open until it finishes.

        RelStorage's SQLite mover commits the store connection after it
        writes its temporary tables (``return_to_repeatable_read``), to
        leave the database unlocked until the vote.  In restore mode,
        which the composite always begins, that connection already holds
        the exclusive lock and the transaction's row, written at begin:
        that commit made the row (with its span) durable at the vote,
        before the data, so a crash between two children's finishes left
        a child that seemed to hold a transaction it had no record of,
        and recovery called it complete.  Here the lock is held anyway,
        so the temporary tables are written in the same transaction.
        """
        state = self._restore_state()
        if state is None:
            return
        connection = state.shared_state.store_connection.connection
        if connection is not None:
            connection.return_to_repeatable_read = _stay_in_transaction

    def tpc_abort(self, transaction):
        self._tid = None
        self.storage.tpc_abort(transaction)

    def undo(self, transaction_id, transaction, internal):
        """Undo in RelStorage's restore mode, at the composite's tid.

        Restore mode (``tpc_begin(txn, tid)``) hands ``undo`` to the
        ordinary begin state, which would lock a tid of its own for the
        copied rows, and RelStorage's ``undo`` returns no oids; so the
        rows are copied here, through RelStorage's own ``packundo``, at
        the tid the composite began the child with, and the oids taken
        from the rows copied.  An internal record's copy is dropped
        before ``current_object`` is updated, so it keeps its current
        state.  After ``tpc_finish`` the child forgets what it cached,
        so that a load sees the undone state (see :meth:`finished`).
        """
        state = self._restore_state()
        if state is None or self._tid is None:
            return Child.undo(self, transaction_id, transaction, internal)
        if isinstance(transaction_id, str):
            transaction_id = transaction_id.encode('ascii')
        undo_tid = u64(base64.decodebytes(transaction_id + b'\n'))
        tid = u64(self._tid)
        db = self._db
        cursor = state.shared_state.store_connection.cursor
        with self.storage.lock:
            db.locker.hold_pack_lock(cursor)
            try:
                db.packundo.verify_undoable(cursor, undo_tid)
                copied = db.packundo.undo(cursor, undo_tid, tid)
                oids = [p64(oid) for oid, _ in copied]
                kept = [u64(oid) for oid in oids if internal(oid)]
                for i in range(0, len(kept), BATCH):
                    batch = kept[i:i + BATCH]
                    marks = ', '.join([self._mark] * len(batch))
                    for table in ('blob_chunk', 'object_state'):
                        cursor.execute(
                            'DELETE FROM %s WHERE tid = %s AND zoid IN (%s)'
                            % (table, self._mark, marks), [tid] + batch)
                db.mover.update_current(cursor, tid)
                kept = set(kept)
                state.shared_state.blobhelper.copy_undone(
                    [row for row in copied if row[0] not in kept], self._tid)
            finally:
                db.locker.release_pack_lock(cursor)
            self.base._cache.remove_all_cached_data_for_oids(
                [oid for oid, _ in copied])
            self._undid = True
        return [oid for oid in oids if u64(oid) not in kept]

    def finished(self):
        """The child finished a transaction: if it undid something, drop
        what the child cached and read afresh.  RelStorage's cache learns
        the tids of the objects a transaction stored, not those of rows
        an undo copied in the database, and would serve the state the
        undo replaced."""
        if self._undid:
            self._undid = False
            self._forget()

    def roll_back(self, tid, name):
        """Delete the rows of ``tid``, the child's last transaction, and
        point each object it wrote back at its previous revision."""
        if not self.keep_history:
            raise RecoveryError(
                'partition %r: transaction %s cannot be taken back from a '
                'history-free RelStorage child (it overwrote the revisions '
                'before it); see "What holds for each child kind" in '
                'docs/commit-protocol.rst' % (name, tid.hex()))
        last = self.last_finished()
        if last != tid:
            raise RecoveryError(
                'partition %r (%s): its last transaction is %s, not %s; it '
                'cannot be rolled back' % (name, self.storage.getName(),
                                           last.hex(), tid.hex()))
        t = u64(tid)
        with self._cursor(write=True) as cursor:
            def run(sql, params=(t,)):
                cursor.execute(sql.replace('%s', self._mark), params)
            run('DELETE FROM current_object WHERE tid = %s')
            run('INSERT INTO current_object (zoid, tid) '
                'SELECT zoid, MAX(tid) FROM object_state WHERE tid < %s AND '
                'zoid IN (SELECT zoid FROM object_state WHERE tid = %s) '
                'GROUP BY zoid', (t, t))
            run('DELETE FROM blob_chunk WHERE tid = %s')
            run('DELETE FROM object_ref WHERE tid = %s')
            run('DELETE FROM object_refs_added WHERE tid = %s')
            run('DELETE FROM object_state WHERE tid = %s')
            run('DELETE FROM "transaction" WHERE tid = %s')
        self._forget()

    def _forget(self):
        """Drop what the child cached of rows changed behind its back."""
        with self.storage.lock:
            self.base._cache.clear(load_persistent=False)
            self.base.sync()

    # --- pack ---------------------------------------------------------------

    def sweep(self, t, verdict, name):
        """Delete every object whose current revision is at or before the
        pack time and that the verdict does not keep (all its rows, its
        blob chunks with them), then pack without GC (old revisions).

        The rows are chosen and deleted under RelStorage's commit lock,
        which a commit to this child takes at its ``tpc_begin``: an object
        written since the pack time is never taken for garbage."""
        from compositestorage.gc import pack_tid
        stop = u64(pack_tid(t))
        with self._cursor(write=True) as cursor:
            if self._mark != '?':
                # SQLite lets one writer in at a time anyway: the DELETEs
                # below wait for a commit of this child to end
                self._db.locker.hold_commit_lock(cursor)
            cursor.execute(('SELECT zoid FROM %s WHERE tid <= %%s'
                            % self._current).replace('%s', self._mark),
                           (stop,))
            garbage = [row[0] for row in cursor.fetchall()
                       if row[0] not in verdict]
            self._delete(cursor, garbage)
        if garbage:
            self._forget()
        logger.info('pack: partition %r: deleted %d unreachable objects',
                    name, len(garbage))
        self.pack_without_gc(t)

    def _delete(self, cursor, oids):
        tables = ['object_ref', 'object_refs_added', 'blob_chunk']
        if self.keep_history:
            tables = ['current_object', 'object_ref', 'blob_chunk']
        for i in range(0, len(oids), BATCH):
            batch = oids[i:i + BATCH]
            marks = ', '.join([self._mark] * len(batch))
            for table in tables + ['object_state']:
                cursor.execute('DELETE FROM %s WHERE zoid IN (%s)'
                               % (table, marks), batch)

    def pack_without_gc(self, t):
        """Remove old revisions (``pack-gc`` is off).

        A history-free child has none, and its ``pack`` without GC only
        warns that it does nothing, then deletes what an earlier GC
        pre-pack left marked in its ``pack_object`` table: it is not
        asked.  The pack runs on an instance of its own, which shares the
        child's cache: the child's lock is not held while the pack waits
        for RelStorage's commit lock, which a transaction being committed
        through the child holds from its ``tpc_begin``."""
        if not self.keep_history:
            return
        instance = self.base.new_instance()
        try:
            instance.pack(t, referencesf)
        finally:
            instance.release()
        self.storage.sync()

    def delete_object(self, oid, serial, transaction):
        """``deleteObject`` in restore mode: a restore of no data, which is
        what ``deleteObject`` writes (a deletion record when history is
        kept, no row when not)."""
        base = self.storage
        if self._restore_state() is None or self._tid is None:
            return base.deleteObject(oid, serial, transaction)
        current = self.current_serial(oid)
        if current != serial:
            raise ConflictError(oid=oid, serials=(current, serial))
        base.restore(oid, self._tid, None, '', None, transaction)
        # as deleteObject does: the cache must not serve the deleted state
        self.base._cache.remove_cached_data(u64(oid), u64(serial))
