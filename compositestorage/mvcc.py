"""Many processes over one composite: ``IMVCCStorage``.

A composite whose children are all RelStorage on PostgreSQL is *shared*:
every application process opens it directly, as RelStorage users open
RelStorage, and the primary's database is the one shared part (see
:mod:`compositestorage.shared` for what is kept there).  As RelStorage
does, the composite then provides ``IMVCCStorage``: ZODB gives each
connection an instance of its own (:func:`new_instance`), made of one
RelStorage instance per child, and each instance polls at every
transaction boundary (:func:`poll`).

A poll takes the snapshot of every child while it holds the finish lock
shared, which a committer holds exclusively from before its first child
finishes to after its last: the children's snapshots then all end at the
same transaction, and no instance sees a transaction in only some
partitions, or one partition's later transaction without another's
earlier one (DESIGN.md, invariant 6).

FileStorage, MappingStorage and ZEO children cannot be shared by
processes: a composite with one of them keeps one coordinator process.
"""
import itertools
import threading
import time

from compositestorage.errors import ConfigurationError
from compositestorage.errors import RecoveryError
from compositestorage.partition import MAP_SUFFIX
from compositestorage.partition import Partition
from compositestorage.shared import SharedState
from compositestorage.shared import TableJournal

#: What a shared composite is made of, in the words of its messages.
SUPPORTED = ('every partition a RelStorage on PostgreSQL (history-preserving'
             ' or history-free), none an overlay')

#: How often a poll recovers a dead process's intent before it gives up.
POLL_ATTEMPTS = 5
#: Seconds between two looks of a read-only poll at such an intent.
WAIT = 0.1


def shareable(part):
    """Whether ``part``'s child can be opened by many processes at once."""
    return bool(getattr(part.child, 'shareable', False))


def decide(shared, partitions, journal, overlays):
    """Whether the composite over ``partitions`` is shared.

    ``shared`` is ``'auto'`` (the default: shared when every child can be,
    and no journal file is configured, which names one writer process),
    true or false.  A composite asked to be shared that cannot be is
    refused, naming the partition and the way out.
    """
    if shared in (False, 'false', 'off', 'no'):
        return False
    if shared in ('auto', None):
        return bool(all(shareable(p) for p in partitions)
                    and journal is None and not overlays)
    for p in partitions:
        if not shareable(p):
            raise ConfigurationError(
                'partition %r is a %s, which processes cannot share: a '
                'shared composite (shared true) needs %s.  Set shared false'
                ' to open it from one process (or serve it with ZEO)'
                % (p.name, p.child.describe(), SUPPORTED))
    if journal is not None:
        raise ConfigurationError(
            'a shared composite keeps its commit journal in the primary\'s '
            'database, where every process finds it, not in the file %s: '
            'remove the journal key, or set shared false to keep one '
            'writer process' % journal)
    if overlays:
        raise ConfigurationError(
            'overlay partitions (%s) are not supported in a shared '
            'composite; set shared false' % ', '.join(sorted(overlays)))
    return True


def shared_state(primary):
    """A :class:`SharedState` session on ``primary``'s database."""
    child = primary.child
    return SharedState(child.shared_session, child.location,
                       child.commit_lock_timeout)


def one_cluster(partitions):
    """Whether every child's database is in one PostgreSQL cluster, whose
    one log makes a commit durable with every commit before it (see
    ``SharedState.same_cluster``)."""
    ids = {p.child.cluster_id() for p in partitions}
    return len(ids) == 1 and None not in ids


class InstancePartition(Partition):
    """A partition as one instance sees it: its own child instance, the
    allocator and the stub cache of the partition it was made from."""

    def __init__(self, root, child):
        self.__dict__.update(root.__dict__)
        self.root = root
        self.child = child
        self.storage = child.storage
        self.base = child.base

    def new_oid(self):
        return self.root.new_oid()

    def saw_oid(self, oid):
        self.root.saw_oid(oid)


def new_instance(root):
    """An instance of the shared composite ``root``, for one connection:
    a RelStorage instance per child, a session of its own on the primary's
    database, and a first snapshot."""
    from compositestorage.commit import Coordinator
    inst = object.__new__(type(root))
    inst.__dict__.update(root.__dict__)
    inst._root = root
    inst._index([InstancePartition(p, p.child.new_instance())
                 for p in root.partitions])
    inst.default_partition = inst._by_name[root.default_partition.name]
    inst._wrap_resolvers()
    inst._shared = SharedState(root._shared._connect, root._shared.where,
                               root._shared.timeout)
    inst._shared.same_cluster = root._shared.same_cluster
    inst.journal = TableJournal(inst._shared)
    inst._finish_lock = threading.RLock()
    inst._writer_lock = None
    inst._coordinator = Coordinator(inst, like=root._coordinator)
    inst._queued = {}
    inst._synced = False
    try:
        poll(inst)
    except BaseException:
        release(inst)
        raise
    return inst


def poll(storage, opening=False):
    """Take a new snapshot of every child; the oids that changed.

    ``None`` when a child can no longer tell (ZODB then drops its whole
    cache).  The snapshot is taken while no commit is finishing.  An
    intent found then was left by a process that died, and some children
    may hold its transaction: a writable composite recovers it before it
    polls; a read-only one waits for a writer to (it must not poll past
    it: RelStorage would cache records that recovery then takes back).
    A read-only composite ``opening`` takes no snapshot then, and does
    not wait: what it shows until its first poll, it found as every
    read-only composite does (hiding the intent's tid), and ``compositestorage
    recover --dry-run`` can read the intent.
    """
    shared = storage._shared
    waited = 0.0
    for attempt in itertools.count():
        with shared.snapshot() as intent:
            if intent is None:
                return _poll_children(storage)
        if not storage._read_only and attempt < POLL_ATTEMPTS:
            storage.recover_shared()
            continue
        if storage._read_only and opening:
            return {}
        if storage._read_only and waited < shared.timeout:
            time.sleep(WAIT)
            waited += WAIT
            continue
        raise RecoveryError(
            'transaction %s over partitions %s was left unfinished by a '
            'process that died, and %s; open the composite for writing, '
            'or run "compositestorage recover", to recover it' % (
                intent.tid.hex(), ', '.join(
                    storage._by_prefix[prefix].name
                    if prefix in storage._by_prefix else str(prefix)
                    for prefix in intent.prefixes),
                'no writer recovered it within %s s' % shared.timeout
                if storage._read_only else
                'it came back after %d recoveries' % POLL_ATTEMPTS))


def _poll_children(storage):
    changed = {}
    last = None
    for p in storage.partitions:
        oids = p.storage.poll_invalidations()
        if oids is None:
            changed = None
        elif changed is not None:
            prefix = p.prefix
            for oid in oids:
                if oid[0] == prefix and oid[1:] != MAP_SUFFIX:
                    changed[oid] = 1
        tid = p.storage.lastTransaction()
        last = tid if last is None else max(last, tid)
    with storage._finish_lock:
        storage._ltid = last
        storage.advance_visible(last)
    seen(storage, last)
    return changed


def seen(storage, tid):
    """An instance of ``storage``'s root saw ``tid`` whole (it polled or
    committed it): the root's ``lastTransaction()``, which ZODB's
    ``DB.lastTransaction()`` asks and no connection polls, keeps up with
    its instances', as RelStorage's root does."""
    root = getattr(storage, '_root', None)
    if root is None or tid is None:
        return
    with root._finish_lock:
        if tid > root._ltid:
            root._ltid = tid


def sync(storage, force=True):
    """``sync(True)`` takes a new snapshot now; its invalidations wait for
    the next ``poll_invalidations``, which then does not poll again.
    ``sync(False)`` does nothing: ``poll_invalidations`` follows."""
    if not force:
        return
    changed = poll(storage)
    _queue(storage, changed)
    storage._synced = True


#: Beyond this many oids waiting for ``poll_invalidations``, ZODB is told
#: to drop its whole cache instead (a composite whose snapshot is moved by
#: ``sync`` or ``lastTransaction`` and rarely asked for invalidations).
MAX_QUEUED = 100000


def _queue(storage, changed):
    queued = storage._queued
    if queued is None or changed is None or \
            len(queued) + len(changed) > MAX_QUEUED:
        storage._queued = None
    else:
        queued.update(changed)


def poll_invalidations(storage):
    if storage._synced:
        storage._synced = False
    else:
        _queue(storage, poll(storage))
    changed, storage._queued = storage._queued, {}
    return changed


def release(storage):
    """Let go of every session of the instance (its children's and its
    own on the primary's database)."""
    try:
        for p in storage.partitions:
            p.storage.release()
    finally:
        storage._shared.close()
