"""Recreating missing stubs and removing orphaned ones, offline.

``repair(storage)`` runs :func:`compositestorage.verify.verify` and fixes
what it can in one transaction of internal records, which iteration and
the undo log never show:

* a missing stub (a record refers to an object of another partition and
  its child holds no stub) is stored, with the target's class;
* an orphaned stub (no record of its child refers to it) is deleted.

Everything else ``verify`` reports needs a person: a dangling reference
has lost its target, a corrupt stub or a foreign object may hold data.
Those are returned, untouched.  The storage must be offline (opened here
as its one writer), because a running coordinator is the only writer of
its children.
"""
from ZODB.Connection import TransactionMetaData
from ZODB.POSException import POSKeyError
from ZODB.utils import z64

from compositestorage.references import class_of
from compositestorage.stubs import stub_record
from compositestorage.verify import verify


class Action:
    """One repair: ``create`` or ``remove`` the stub at ``oid``."""

    def __init__(self, what, partition, oid, data=None):
        self.what = what
        self.partition = partition
        self.oid = oid
        self.data = data

    def as_dict(self):
        return {'action': self.what, 'partition': self.partition.name,
                'oid': '0x' + self.oid.hex()}

    #: How an action is reported: done, and to be done (dry run).
    VERBS = {'create': ('created', 'would create'),
             'remove': ('removed', 'would remove')}

    def describe(self, done=True):
        """``created the stub ...`` once done, ``would create ...`` in a
        dry run."""
        return '%s the stub for 0x%s in partition %r' % (
            self.VERBS[self.what][0 if done else 1], self.oid.hex(),
            self.partition.name)

    def __str__(self):
        return self.describe(done=False)


def plan(storage):
    """``(actions, untouched)``: what repair would do, and the problems it
    leaves to a person."""
    problems, _ = verify(storage)
    actions, untouched = [], []
    for problem in problems:
        if problem.kind == 'orphan-stub':
            actions.append(Action('remove',
                                  storage.partition_named(problem.partition),
                                  problem.oid))
        elif problem.kind == 'missing-stub':
            home = storage.partition_for(problem.oid)
            try:
                data = home.storage.load(problem.oid)[0]
            except POSKeyError:
                untouched.append(problem)   # the target is gone too
                continue
            actions.append(Action(
                'create', storage.partition_named(problem.partition),
                problem.oid, stub_record(home.name, class_of(data))))
        else:
            untouched.append(problem)
    # A stub both orphaned and without its target is reported twice; its
    # removal settles both, so the second is not left for a person.
    removed = {(a.partition.name, a.oid) for a in actions
               if a.what == 'remove'}
    untouched = [p for p in untouched
                 if not (p.garbage and (p.partition, p.oid) in removed)]
    return actions, untouched


def repair(storage, dry_run=False):
    """Plan, and unless ``dry_run`` carry out, the repairs; returns
    ``(actions, untouched)``."""
    actions, untouched = plan(storage)
    if dry_run or not actions:
        return actions, untouched
    coordinator = storage._coordinator
    txn = TransactionMetaData(description='compositestorage repair')
    storage.tpc_begin(txn)
    try:
        state = coordinator.current(txn)
        for action in actions:
            part = action.partition
            child_txn = coordinator.begin(state, part, internal=True)
            serial = part.current_serial(action.oid)
            if action.what == 'create':
                part.storage.store(action.oid, serial or z64, action.data,
                                   '', child_txn)
            else:
                part.child.delete_object(action.oid, serial, child_txn)
            part.stubs.pop(action.oid, None)
        storage.tpc_vote(txn)
    except BaseException:
        storage.tpc_abort(txn)
        raise
    storage.tpc_finish(txn)
    return actions, untouched
