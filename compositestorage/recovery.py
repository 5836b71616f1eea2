"""Completing or removing a multi-partition transaction that did not finish.

Two things on disk say that a transaction spans several partitions:

* the journal's intent (see :mod:`compositestorage.journal`), made durable
  before the first participant finishes and cleared, without a sync, after
  the last;
* each participant's own record of the transaction, whose extension names
  every participant (:data:`SPAN_MARK`), written with the data.

Recovery decides from these, and from what each child durably holds:

* every participant holds the tid: the transaction is complete, whatever
  the children committed after it (a stale intent: the unsynced clear was
  lost, and later one-partition commits are as durable as it is);
* no participant holds it: nothing to do (the process died before the
  first child finished);
* some hold it: it was never acknowledged (``tpc_finish`` returns after the
  last participant finished), or a child lost its tail to damage.  It is
  rolled back in the participants that hold it, where it is their last
  transaction; anything else is refused with a message, because taking it
  back would take later, acknowledged transactions with it.

Rolling a child back is its adapter's job (:mod:`compositestorage.children`):
a FileStorage child's file is cut at the start of that transaction, its
blobs removed and its index rebuilt; a history-preserving RelStorage
child loses that tid's rows.  Each step is idempotent, and
the journal is cleared (durably) only after all of them, so a crash during
recovery is recovered by the next one.

See ``docs/commit-protocol.rst``.
"""
import logging

from ZODB._compat import dumps
from ZODB.utils import z64

from compositestorage.errors import RecoveryError
from compositestorage.faults import point as fault_point

logger = logging.getLogger(__name__)

COMPLETE = 'complete'
ABSENT = 'absent'
ROLLED_BACK = 'rolled back'


class Outcome:
    """What recovery found and did for one intent."""

    def __init__(self, intent, participants, action, present, rolled_back,
                 dry_run=False):
        self.intent = intent
        self.participants = participants  # names, from the intent
        self.action = action
        self.present = present            # names of those that had it
        self.rolled_back = rolled_back    # names of those rolled back
        self.dry_run = dry_run

    def as_dict(self):
        return {'tid': self.intent.tid.hex(), 'action': self.action,
                'dry_run': self.dry_run,
                'partitions': list(self.participants),
                'present': list(self.present),
                'rolled_back': list(self.rolled_back)}

    def __str__(self):
        action = self.action
        if self.dry_run and action == ROLLED_BACK:
            action = 'to be rolled back'
        text = 'transaction %s over %s: %s' % (
            self.intent.tid.hex(), ', '.join(self.participants), action)
        if self.rolled_back:
            text += ' in ' + ', '.join(self.rolled_back)
        return text


#: Appended to the pickled extension of every child's record of a
#: transaction, then the partitions it spans, as a bitmask of prefixes (all
#: zero when it spans one).  A pickle ends at its STOP, so ZODB and its
#: tools read the extension as it was; the composite's readers give back
#: the exact bytes without the span.  The length is fixed because a
#: FileStorage takes the length of its metadata at ``tpc_begin``, before
#: the participants are known; the bits are set before its vote.
SPAN_MARK = b'\x00composite-span\x00'
SPAN_BYTES = 16
_SPAN_LEN = len(SPAN_MARK) + SPAN_BYTES
#: The extension a child is given when ZODB's is empty: an empty dict.
_EMPTY = dumps({}, 3)
#: How many of each child's last transactions an open checks for one that
#: some of its participants lack (``compositestorage verify`` checks all).
CHECK_DEPTH = 1000


def _has_span(extension_bytes):
    return extension_bytes[-_SPAN_LEN:-SPAN_BYTES] == SPAN_MARK


def zodb_extension(extension_bytes):
    """A child's pickled extension as ZODB wrote it: without the span."""
    if not extension_bytes or not _has_span(extension_bytes):
        return extension_bytes
    extension_bytes = extension_bytes[:-_SPAN_LEN]
    return b'' if extension_bytes == _EMPTY else extension_bytes


def with_empty_span(extension_bytes):
    """The pickled extension a child is given for ZODB's
    ``extension_bytes``: the same, then an empty span (and no span a caller
    copied from a child's history)."""
    extension_bytes = zodb_extension(extension_bytes)
    return (extension_bytes or _EMPTY) + SPAN_MARK + bytes(SPAN_BYTES)


def set_participants(extension_bytes, prefixes):
    """``extension_bytes`` with its span naming ``prefixes``: the same
    length, so a child that took it at ``tpc_begin`` can be given it."""
    if not _has_span(extension_bytes):
        return extension_bytes
    mask = 0
    for prefix in prefixes:
        mask |= 1 << prefix
    return extension_bytes[:-SPAN_BYTES] + mask.to_bytes(SPAN_BYTES,
                                                         'little')


def participants_in(extension_bytes):
    """The prefixes a child's pickled extension names, or ``()``.

    Read from the bytes, never unpickled: an extension is a client's
    pickle, and this runs over many transactions at open."""
    if not extension_bytes or not _has_span(extension_bytes):
        return ()
    mask = int.from_bytes(extension_bytes[-SPAN_BYTES:], 'little')
    return tuple(prefix for prefix in range(SPAN_BYTES * 8)
                 if mask >> prefix & 1)


def recover(partitions, journal, dry_run=False):
    """Resolve the journal's intent, if any; returns an :class:`Outcome`
    or ``None``.  ``partitions`` maps prefix to partition."""
    intent = journal.read()
    if intent is None:
        return None
    parts = []
    for prefix in intent.prefixes:
        part = partitions.get(prefix)
        if part is None:
            raise RecoveryError(
                'the journal %s names partition prefix %d for transaction '
                '%s, which is not configured; configure that partition '
                'again and reopen' % (journal.path, prefix, intent.tid.hex()))
        parts.append(part)
    for part in parts:
        # a commit the dead coordinator left running in a server ends first
        part.child.settle()
    present = [p for p in parts if has_transaction(p, intent.tid)]
    if len(present) == len(parts):
        action, rolled_back = COMPLETE, []
    elif not present:
        action, rolled_back = ABSENT, []
    else:
        action, rolled_back = ROLLED_BACK, [p.name for p in present]
        _check_last(present, intent.tid, [p.name for p in parts
                                          if p not in present], dry_run)
    outcome = Outcome(intent, [p.name for p in parts], action,
                      [p.name for p in present], rolled_back, dry_run)
    if dry_run:
        return outcome
    if action == ROLLED_BACK:
        for part in present:
            roll_back(part, intent.tid)
            fault_point('rolled-back', part.name)
    journal.clear_durably()
    fault_point('recovered')
    log = logger.warning if action == ROLLED_BACK else logger.info
    log('recovered %s', outcome)
    return outcome


def _check_last(holders, tid, lacking, dry_run=False):
    """Refuse to take ``tid`` back from a holder that committed after it,
    or that is read-only (unless only reporting)."""
    for part in holders:
        if part.read_only and not dry_run:
            raise RecoveryError(
                'transaction %s must be taken back from partition %r (%s '
                'lack(s) it), but that partition is read-only; open it '
                'writable once, so that recovery can remove it'
                % (tid.hex(), part.name, ', '.join(lacking)))
        last = last_finished(part)
        if last != tid:
            raise RecoveryError(
                'transaction %s spans partition(s) %s, which lack it, and '
                'partition %r, which holds it followed by later transactions '
                '(the last is %s); taking it back would lose those.  A child '
                'lost part of its history (a damaged or replaced file?): '
                'restore the composite from a backup (compositestorage '
                'restore)' % (tid.hex(), ', '.join(lacking), part.name,
                              last.hex()))


class Partial:
    """A transaction that some of the partitions it spans do not hold."""

    def __init__(self, tid, participants, holders, lacking):
        self.tid = tid
        self.participants = participants    # prefixes, as recorded
        self.holders = holders              # Partitions that hold it
        self.lacking = lacking              # names (or prefixes) lacking it

    def __str__(self):
        return 'transaction %s spans %s but is missing from %s' % (
            self.tid.hex(), ', '.join(p.name for p in self.holders)
            + ', ' + ', '.join(self.lacking), ', '.join(self.lacking))

    def as_dict(self):
        return {'tid': self.tid.hex(),
                'held_by': [p.name for p in self.holders],
                'lacking': list(self.lacking)}


def record_participants(part, metadata, prefixes):
    """Have ``part``'s child record ``prefixes`` as the participants of the
    transaction it is committing, before its vote.  ``metadata`` is the
    transaction object the child was begun with (the composite's own copy),
    which a child that reads it when it finishes (MappingStorage) sees
    changed; the child's adapter replaces what the others took at
    ``tpc_begin`` (the same length).
    """
    extension = set_participants(metadata.extension_bytes, prefixes)
    metadata.extension_bytes = extension
    part.child.record_participants(extension)


def partial_transactions(partitions, depth=CHECK_DEPTH, packed_to=z64):
    """The :class:`Partial` transactions among each child's last ``depth``
    ones, oldest first.  ``partitions`` maps prefix to partition.

    A pack may drop a child's part of a transaction at or before its pack
    time (``packed_to``, which the journal keeps) when that part was
    garbage, so only later transactions are checked; those a pack kept
    are marked packed in a FileStorage and are left out too.

    A child that lost its tail (a damaged file, cut by FileStorage when it
    opens) lacks transactions whose tids are above its last one; the other
    participants still name it in their records of them.  Only tids above
    the lowest last tid of all children can be lacking that way, so the
    walk back stops there.
    """
    last = {prefix: last_finished(part)
            for prefix, part in partitions.items()}
    if not last:
        return []
    floor = max(min(last.values()), packed_to)
    found = {}
    for part in partitions.values():
        for tid, prefixes in recent_transactions(part, floor, depth):
            if tid in found or len(prefixes) < 2:
                continue
            if any(prefix not in last or last[prefix] < tid
                   for prefix in prefixes):
                found[tid] = prefixes
    result = []
    for tid in sorted(found):
        prefixes = found[tid]
        holders = [partitions[q] for q in prefixes
                   if q in last and has_transaction(partitions[q], tid)]
        lacking = [partitions[q].name if q in partitions
                   else 'prefix %d (not configured)' % q
                   for q in prefixes
                   if partitions.get(q) not in holders]
        result.append(Partial(tid, prefixes, holders, lacking))
    return result


def remove_partial(partitions, depth=CHECK_DEPTH, dry_run=False,
                   packed_to=z64):
    """Take back every transaction that some of its partitions lost.

    As FileStorage loses a damaged last transaction whole, the composite
    removes such a transaction from the partitions that still hold it,
    newest first, where it is their last one; otherwise it refuses
    (:func:`_check_last`).  Returns the :class:`Partial` transactions.
    """
    partial = partial_transactions(partitions, depth, packed_to)
    for entry in reversed(partial):
        _check_last(entry.holders, entry.tid, entry.lacking, dry_run)
        if dry_run:
            continue
        for part in entry.holders:
            roll_back(part, entry.tid)
        logger.warning('transaction %s is missing from partition(s) %s (a '
                       'commit that did not finish there, or a damaged '
                       'child); it was taken back from %s, which held it',
                       entry.tid.hex(), ', '.join(entry.lacking),
                       ', '.join(p.name for p in entry.holders))
    return partial


def recent_transactions(part, floor, depth):
    """``(tid, participant prefixes)`` of ``part``'s child's transactions
    above ``floor``, newest first, at most ``depth`` of them.  A
    transaction a pack rewrote names none.  Children that keep no
    transaction metadata give none."""
    return [(tid, participants_in(extension)) for tid, extension
            in part.child.recent_transactions(floor, depth)]


def last_finished(part):
    """The tid of the last transaction ``part``'s child finished (not
    always ``lastTransaction()``: see the FileStorage adapter)."""
    return part.child.last_finished()


def has_transaction(part, tid):
    """Whether ``part``'s child holds transaction ``tid``.

    Usually ``tid`` is the child's last transaction; after a lost journal
    clear (a power loss) later ones may follow, and are walked past.
    """
    return part.child.has_transaction(tid)


def roll_back(part, tid):
    """Remove transaction ``tid``, the last one, from ``part``'s child."""
    part.child.roll_back(tid, part.name)
    logger.warning('partition %r: removed unfinished transaction %s',
                   part.name, tid.hex())
