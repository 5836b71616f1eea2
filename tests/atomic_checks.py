"""The check of the crash tests, for any kind of children (DESIGN.md,
invariant 6).

A :class:`Layout` says how to open a crash test's composite and each of
its children alone: FileStorage files in a directory (``crash_writer``'s
own composite), or a ZConfig file whose children may be RelStorage
databases.  :func:`check_mixed` reopens the composite (which recovers)
and then reads every child alone, so that what it checks does not depend
on what the composite records about itself:

* each counter the writer changed records the partitions of its
  transaction (``with``): every one of them holds that transaction;
* each child's record of a transaction names the partitions it spans:
  every one of them holds it too;
* every acknowledged transaction is in every partition it touched;
* the journal holds no intent, and a second open finds nothing to do.
"""
import os

import ZODB
from ZODB.FileStorage import FileStorage

from compositestorage.journal import Journal
from compositestorage.recovery import participants_in
from conftest import unpickle_record
from crash_writer import PARTS
from crash_writer import open_composite

NAMES = [name for name, _ in PARTS]
PREFIX = dict(PARTS)
NAME_OF = {prefix: name for name, prefix in PARTS}


class Layout:
    """Where a crash test's composite lives.

    ``directory`` holds the writer's files; ``config`` is the path of a
    ZConfig file (``None``: ``crash_writer``'s FileStorage children in
    ``directory``); ``journal`` is the journal's path; ``alone`` maps each
    partition name to a function that opens its child alone, read-only.
    """

    def __init__(self, directory, journal, alone, config=None):
        self.directory = directory
        self.journal = journal
        self.alone = alone
        self.config = config

    @classmethod
    def files(cls, directory):
        """``crash_writer``'s composite of three FileStorage files."""
        def opener(name):
            path = os.path.join(str(directory), name + '.fs')
            return lambda: FileStorage(path, read_only=True)
        return cls(directory, os.path.join(str(directory), 'main.fs.journal'),
                   {name: opener(name) for name in NAMES})

    @property
    def env(self):
        """What the writer's environment needs to open this composite."""
        return {'CONFIG': str(self.config)} if self.config else {}

    def open(self):
        """The composite, opened as its writer (which recovers)."""
        return open_composite(str(self.directory), config=self.config)


def child_history(storage, name):
    """``(tids, changes, spans)`` of the child ``storage`` of partition
    ``name``, opened alone: every tid; for each transaction that changed
    its counter, the partitions it touched; for each transaction whose
    record names the partitions it spans (and a pack did not rewrite),
    their names."""
    tids, changes, spans = [], {}, {}
    for txn in storage.iterator():
        tids.append(txn.tid)
        prefixes = participants_in(bytes(txn.extension_bytes or b''))
        if prefixes and txn.status != 'p':
            spans[txn.tid] = tuple(NAME_OF.get(p, p) for p in prefixes)
        for record in txn:
            if record.oid[0] != PREFIX[name] or not record.data:
                continue
            state = unpickle_record(record.data)[1]
            data = state.get('data', {}) if isinstance(state, dict) \
                else {}
            if 'with' in data:
                changes[txn.tid] = tuple(data['with'])
    return tids, changes, spans


def histories(layout):
    """``{name: child_history(...)}`` of every child, each read alone."""
    out = {}
    for name in NAMES:
        storage = layout.alone[name]()
        try:
            out[name] = child_history(storage, name)
        finally:
            storage.close()
    return out


def check_mixed(layout, acknowledged, again=True):
    """Reopen (and so recover), then check that every transaction is in
    all the partitions it touched or in none, and nothing acknowledged is
    lost.  ``acknowledged`` is ``[(tid, n, names)]`` as the writer printed
    them.  With ``again``, a second open must find nothing to do.
    Returns the reopened composite's ``recovered``."""
    storage = layout.open()
    try:
        outcome = storage.recovered
        # A transaction some of its partitions lack, found by its span: one
        # whose intent was not synced (the first participant's record names
        # them all), never acknowledged, at most the one being committed.
        # Anything else would be a child that lost what it had finished.
        done = {tid for tid, _, _ in acknowledged}
        assert len(storage.partial) <= 1, [str(p) for p in storage.partial]
        assert not [p for p in storage.partial if p.tid in done]
        db = ZODB.DB(storage)
        counters = db.open().root()['counters']
        values = {name: counters[name]['n'] for name in NAMES}
        db.close()
    finally:
        storage.close()
    history = histories(layout)
    for name in NAMES:
        tids, changes, spans = history[name]
        # the counter is the count of this child's changes to it
        assert values[name] == len(changes), (name, values, len(changes))
        for tid, touched in changes.items():
            for other in touched:
                assert tid in history[other][0], (
                    'transaction %s over %s is in %s but not in %s'
                    % (tid.hex(), touched, name, other))
        for tid, spanned in spans.items():
            for other in spanned:
                assert tid in history[other][0], (
                    'transaction %s spans %s; %s holds it, %s does not'
                    % (tid.hex(), spanned, name, other))
    for tid, _, names in acknowledged:
        for name in names:
            assert tid in history[name][0], (
                'acknowledged %s over %s lost from %s' % (tid.hex(), names,
                                                          name))
    assert Journal(layout.journal).read() is None
    if again:
        check_nothing_to_recover(layout)
    return outcome


def check_nothing_to_recover(layout):
    """An open finds nothing to recover and no partial transaction."""
    storage = layout.open()
    try:
        assert storage.recovered is None and storage.partial == []
    finally:
        storage.close()


def fork_writer_lines(directory, count, env=None, kill_after=None):
    """``test_atomic.run_writer_lines``, with the writer forked from this
    process rather than started afresh: the same ``crash_writer.main()``,
    killed with SIGKILL all the same, but without importing ZODB,
    RelStorage and the database driver again for each of the many kills
    (half a second each).  The caller must hold no storage open.

    Returns ``(exit code, [(tid, n, names)])``.
    """
    import signal
    import sys
    import tempfile
    import time
    import crash_writer
    read_end, write_end = os.pipe()
    errors = tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:    # pragma: no cover - the writer
        code = 1
        try:
            os.close(read_end)
            os.dup2(write_end, 1)
            os.dup2(errors.fileno(), 2)
            sys.stdout = os.fdopen(1, 'w')
            sys.stderr = os.fdopen(2, 'w')
            os.environ.update(env or {})
            sys.argv = [crash_writer.__file__, str(directory), str(count)]
            import transaction
            transaction.manager.abort()     # what the parent left
            crash_writer.main()
            sys.stdout.flush()
            code = 0
        except BaseException:
            import traceback
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(write_end)
    acknowledged = []
    with os.fdopen(read_end) as out:
        if kill_after is not None:
            if out.readline().strip() == 'ready':
                time.sleep(kill_after)
                os.kill(pid, signal.SIGKILL)
        text = out.read()
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    for line in text.splitlines():
        if line.startswith('done '):
            _, tid, n, names = line.split()
            acknowledged.append((bytes.fromhex(tid), int(n),
                                 tuple(names.split(','))))
    errors.seek(0)
    if code not in (0, -signal.SIGKILL):
        raise AssertionError('writer failed (%s): %s'
                             % (code, errors.read().decode()))
    errors.close()
    return code, acknowledged


def check_outcome(point, outcome):
    """What recovery must have done after a kill at ``point`` of a commit
    over all three partitions (finished in the order of ``NAMES``)."""
    if point in ('finished:main', 'finished:b'):
        # finished in some partitions, not in all: taken back from those
        assert outcome.action == 'rolled back'
        assert outcome.rolled_back == NAMES[:NAMES.index(point[9:]) + 1]
    elif point == 'finished:c':
        assert outcome.action == 'complete'     # finished everywhere
    elif point == 'intent-written':
        assert outcome.action == 'absent'       # finished nowhere
    else:
        assert outcome is None                  # no intent left behind
