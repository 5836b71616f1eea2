"""What the processes that share one composite share, in the primary's
PostgreSQL database.

RelStorage users open the storage in every application process, with no
ZEO server: the database server is the one shared part.  A composite
opened that way (``shared``; see :mod:`compositestorage.mvcc`) keeps in the
primary child's database what one coordinator process keeps in memory
otherwise (DESIGN.md, "Many processes over one composite"):

* **the commit lock** (a PostgreSQL advisory lock, exclusive), held from
  ``tpc_begin`` to the end of ``tpc_finish`` or ``tpc_abort``.  Under it
  a committer reads the last tid any process chose, chooses the next
  one and writes it back before any child is begun, so that every child
  sees one tid sequence (invariant 5);
* **the finish lock** (a second advisory lock), held exclusively by a
  committer from before its first child finishes to after its last, and
  by recovery.  A poll takes it shared while it takes its snapshot of
  every child: no snapshot then sees a transaction in only some
  partitions, or a later transaction of one partition without an
  earlier one of another (invariant 6);
* **the journal**: the intent of a transaction over several partitions,
  in a row of ``compositestorage_state``, committed before the first
  child finishes and cleared after the last.  Any process finds it: the
  next committer, the next poll of a writer and the next open recover
  an intent whose writer died (advisory locks end with their session, so
  a dead process holds none);
* **oid blocks** (``compositestorage_oids``): each partition's allocator
  takes its oids in blocks from one counter per partition;
* **packs**: how many are running, and how many have swept, so that a
  commit writes again every stub it refers through while a pack runs,
  and forgets what it cached of stubs after one (``write_stubs``).

Every process keeps one connection per composite instance for this, in
autocommit-like use (each statement group is committed at once).
"""
import contextlib
import logging

from ZODB.utils import p64
from ZODB.utils import u64
from ZODB.utils import z64

from compositestorage.errors import CommitLockTimeout
from compositestorage.errors import JournalError
from compositestorage.journal import Intent

logger = logging.getLogger(__name__)

#: The advisory locks' first key: "CSt1".
LOCK_CLASS = 0x43537431
COMMIT_LOCK = 1
FINISH_LOCK = 2

#: PostgreSQL's SQLSTATE for a lock not granted within lock_timeout
LOCK_NOT_AVAILABLE = '55P03'

STATE = 'compositestorage_state'
OIDS = 'compositestorage_oids'

SCHEMA = """
CREATE TABLE IF NOT EXISTS %s (
    id INTEGER PRIMARY KEY,
    last_tid BIGINT NOT NULL,
    intent_tid BIGINT,
    intent_prefixes BYTEA,
    finished_tid BIGINT NOT NULL,
    packed_to BIGINT NOT NULL,
    packs_running INTEGER NOT NULL,
    packs_done INTEGER NOT NULL
);
INSERT INTO %s VALUES (0, 0, NULL, NULL, 0, 0, 0, 0)
    ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS %s (
    prefix INTEGER PRIMARY KEY,
    next_oid BIGINT NOT NULL
);
""" % (STATE, STATE, OIDS)


class CommitState:
    """What a committer reads under the commit lock: the tid it chose
    (without one to choose, the last one any process chose), the journal's
    intent, and the packs."""

    def __init__(self, tid, intent, packs_running, packs_done):
        self.tid = tid
        self.intent = intent
        self.packs_running = packs_running
        self.packs_done = packs_done


def _intent(tid, prefixes):
    if tid is None:
        return None
    return Intent(p64(tid), bytes(prefixes))


class SharedState:
    """One session on the primary's database, for one composite instance.

    ``connect()`` returns a new ``(connection, cursor)`` in READ
    COMMITTED; ``where`` names the database in messages.  The session is
    opened at first use and again after it was lost.
    """

    def __init__(self, connect, where, timeout=30):
        self._connect = connect
        self.where = where
        #: seconds a lock is waited for (RelStorage's commit-lock-timeout)
        self.timeout = timeout
        self._conn = None
        self._cursor = None
        self.holds_commit = False
        self.holds_finish = False
        #: how many packs had swept, in any process, when the last
        #: snapshot was taken (see ``Coordinator._begin_shared``)
        self.snapshot_packs_done = None

    # --- the session --------------------------------------------------------

    def _run(self, sql, params=None, fetch=False):
        """Run ``sql`` and commit; the rows of its last statement when
        ``fetch``."""
        if self._conn is None:
            self._open()
        cursor = self._cursor
        try:
            cursor.execute(sql, params)
            rows = cursor.fetchall() if fetch else None
            self._conn.commit()
        except BaseException as e:
            self._drop()
            if getattr(e, 'pgcode', None) == LOCK_NOT_AVAILABLE:
                raise CommitLockTimeout(
                    'a lock of the shared composite (%s) was not granted '
                    'within %s s: another process holds it, committing or '
                    'recovering (see pg_locks, locktype advisory, classid '
                    '%d); try again, or raise commit-lock-timeout of the '
                    'primary\'s <relstorage>' % (
                        self.where, self.timeout, LOCK_CLASS)) from e
            raise
        return rows

    def _open(self):
        conn, cursor = self._connect()
        try:
            cursor.execute("SET lock_timeout = '%dms'"
                           % max(1, int(self.timeout * 1000)))
            conn.commit()
        except BaseException:
            conn.close()
            raise
        self._conn, self._cursor = conn, cursor

    def _drop(self):
        """Forget the session: a lost session holds no lock any more."""
        conn, self._conn, self._cursor = self._conn, None, None
        self.holds_commit = self.holds_finish = False
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def close(self):
        self._drop()

    def install(self):
        """Create the tables, once, under the commit lock (two processes
        creating them at once would collide)."""
        self._run('SELECT pg_advisory_lock(%d, %d); %s'
                  'SELECT pg_advisory_unlock(%d, %d)' % (
                      LOCK_CLASS, COMMIT_LOCK, SCHEMA,
                      LOCK_CLASS, COMMIT_LOCK))

    # --- the commit lock ----------------------------------------------------

    def begin_commit(self, proposed=None, given=None):
        """Take the commit lock; returns the :class:`CommitState`.

        With ``proposed``, a tid also chosen and recorded, in the same
        statement: ``proposed`` if it is above the last tid any process
        chose, else that one plus one.  With ``given`` (a caller's tid, as
        ``restore`` and copying pass) that tid, recorded if it is higher.
        Either way it is recorded before any child is begun with it, so a
        later transaction of any process chooses above it, whether this
        one commits or not (``CommitState.tid``).
        """
        lock = 'SELECT pg_advisory_lock(%d, %d); ' % (LOCK_CLASS, COMMIT_LOCK)
        columns = ('last_tid, intent_tid, intent_prefixes, packs_running, '
                   'packs_done')
        if proposed is None and given is None:
            rows = self._run(lock + 'SELECT %s FROM %s WHERE id = 0' % (
                columns, STATE), fetch=True)
        else:
            if given is not None:
                chosen, params = 'GREATEST(last_tid, %s)', (u64(given),)
            else:
                chosen = 'GREATEST(last_tid + 1, %s)'
                params = (u64(proposed),)
            rows = self._run(
                lock + self._not_flushed() +
                'UPDATE %s SET last_tid = %s WHERE id = 0 RETURNING %s' % (
                    STATE, chosen, columns), params, fetch=True)
        self.holds_commit = True
        chosen, tid, prefixes, running, done = rows[0]
        return CommitState(given if given is not None else p64(chosen),
                           _intent(tid, prefixes), running, done)

    #: Whether the primary's database and every child's are in one
    #: PostgreSQL cluster, which writes one log (set by the composite):
    #: then a commit flushed to disk has flushed every commit before it,
    #: in any of those databases.
    same_cluster = False

    def _not_flushed(self):
        """Where the log is one, a write that the next flushed commit
        makes durable need not wait for the disk itself."""
        return ('SET LOCAL synchronous_commit TO OFF; '
                if self.same_cluster else '')

    def end_commit(self):
        """Let go of the finish lock, if held, and of the commit lock."""
        if self._conn is None:
            self.holds_commit = self.holds_finish = False
            return
        sql = []
        if self.holds_finish:
            sql.append('SELECT pg_advisory_unlock(%d, %d)' % (
                LOCK_CLASS, FINISH_LOCK))
        if self.holds_commit:
            sql.append('SELECT pg_advisory_unlock(%d, %d)' % (
                LOCK_CLASS, COMMIT_LOCK))
        if sql:
            try:
                self._run('; '.join(sql))
            except Exception:
                logger.exception('could not let go of the commit lock on %s;'
                                 ' the session was closed, which does',
                                 self.where)
        self.holds_commit = self.holds_finish = False

    # --- the finish lock ----------------------------------------------------

    def hold_finish(self, then=None, params=None):
        """Take the finish lock exclusively: no poll takes a snapshot until
        :meth:`release_finish`.  ``then``, SQL run after it in the same
        transaction (the journal's intent)."""
        sql = 'SELECT pg_advisory_lock(%d, %d)' % (LOCK_CLASS, FINISH_LOCK)
        if self.holds_finish:
            sql = ''
        if then:
            sql = sql + '; ' + then if sql else then
        if sql:
            self._run(sql, params)
        self.holds_finish = True

    def release_finish(self):
        if self.holds_finish:
            self._run('SELECT pg_advisory_unlock(%d, %d)' % (LOCK_CLASS,
                                                             FINISH_LOCK))
            self.holds_finish = False

    @contextlib.contextmanager
    def snapshot(self):
        """Hold the finish lock shared; yields the journal's intent.

        An intent seen while no committer holds the finish lock is one a
        dead process left (a live one holds the lock from before it writes
        its intent to after it clears it)."""
        rows = self._run(
            'SELECT pg_advisory_lock_shared(%d, %d); '
            'SELECT intent_tid, intent_prefixes, packs_done FROM %s '
            'WHERE id = 0' % (LOCK_CLASS, FINISH_LOCK, STATE), fetch=True)
        tid, prefixes, self.snapshot_packs_done = rows[0]
        try:
            yield _intent(tid, prefixes)
        finally:
            if self._conn is not None:
                self._run('SELECT pg_advisory_unlock_shared(%d, %d)' % (
                    LOCK_CLASS, FINISH_LOCK))

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the commit lock and the finish lock (recovery, an open)."""
        held = self.holds_commit
        if not held:
            self.begin_commit()
        finish = self.holds_finish
        try:
            if not finish:
                self.hold_finish()
            yield
        finally:
            if not finish:
                self.release_finish()
            if not held:
                self.end_commit()

    # --- oids ------------------------------------------------------------------

    def reserve_oids(self, prefix, floor, count):
        """The first of ``count`` oids (integers) of partition ``prefix``
        that no other process is given, none below ``floor``."""
        rows = self._run(
            'INSERT INTO %s VALUES (%%s, %%s) ON CONFLICT (prefix) DO '
            'NOTHING; UPDATE %s SET next_oid = GREATEST(next_oid, %%s) + %%s'
            ' WHERE prefix = %%s RETURNING next_oid' % (OIDS, OIDS),
            (prefix, floor, floor, count, prefix), fetch=True)
        return rows[0][0] - count

    # --- packs ---------------------------------------------------------------

    def pack_started(self):
        """Count a pack as running, between two commits."""
        with self.exclusive():
            self._run('UPDATE %s SET packs_running = packs_running + 1 '
                      'WHERE id = 0' % STATE)

    def pack_ended(self):
        self._run('UPDATE %s SET packs_running = GREATEST(packs_running - 1,'
                  ' 0), packs_done = packs_done + 1 WHERE id = 0' % STATE)


class TableJournal:
    """The commit journal in ``compositestorage_state`` (see
    :mod:`compositestorage.journal` for the file it stands in for)."""

    def __init__(self, shared):
        self.shared = shared
        self.path = 'table %s in %s' % (STATE, shared.where)

    def _run(self, sql, params=None, fetch=False):
        return self.shared._run(sql, params, fetch)

    def open(self):
        """Nothing to open: the session opens at first use."""

    def close(self):
        """The session is the instance's; it closes it."""

    def read(self):
        rows = self._run('SELECT intent_tid, intent_prefixes FROM %s WHERE '
                         'id = 0' % STATE, fetch=True)
        return _intent(*rows[0])

    def write_intent(self, intent, durable=True):
        """Take the finish lock, and commit ``intent`` in the same
        statement, durable whatever ``durable`` says: other processes
        recover from it while this one runs, not only an open.  It is durable once PostgreSQL acknowledges it, or, where
        every child's database is in the primary's cluster, once the first
        child's commit is (see ``same_cluster``): that cannot reach the
        disk before it."""
        shared = self.shared
        try:
            shared.hold_finish(
                shared._not_flushed() +
                'UPDATE %s SET intent_tid = %%s, intent_prefixes = %%s '
                'WHERE id = 0' % STATE,
                (u64(intent.tid), bytes(intent.prefixes)))
        except Exception as e:
            raise JournalError('could not write the intent of %s to %s: %s'
                               % (intent.tid.hex(), self.path, e)) from e

    def clear(self, finished=None):
        """Forget the intent, without waiting for the disk: an intent that
        a crash brings back names a transaction every participant holds,
        which recovery finds complete (as a file journal's clear, which
        is not synced either)."""
        self._clear('SET LOCAL synchronous_commit TO OFF; ', finished)

    def clear_durably(self):
        self._clear('', None)

    def _clear(self, head, finished):
        if finished is None:
            self._run(head + 'UPDATE %s SET intent_tid = NULL, '
                      'intent_prefixes = NULL WHERE id = 0' % STATE)
        else:
            self._run(head + 'UPDATE %s SET intent_tid = NULL, '
                      'intent_prefixes = NULL, finished_tid = %%s WHERE '
                      'id = 0' % STATE, (u64(finished),))

    def note_pack(self, tid):
        self._run('UPDATE %s SET packed_to = GREATEST(packed_to, %%s) '
                  'WHERE id = 0' % STATE, (u64(tid),))

    def packed_to(self):
        rows = self._run('SELECT packed_to FROM %s WHERE id = 0' % STATE,
                         fetch=True)
        return p64(rows[0][0]) if rows[0][0] else z64

    def __repr__(self):
        return '<TableJournal %s>' % self.path
