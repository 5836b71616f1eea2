"""A writer process for the crash tests (run as a script, killed with -9).

``python crash_writer.py DIR COUNT`` opens a composite of three FileStorage
partitions (main, b and c) in DIR; with ``CONFIG=FILE`` it opens the
composite that ZConfig file describes instead (RelStorage children, say),
whose partitions must be named main, b and c with prefixes 0, 1 and 2.
Each transaction adds 1 to a counter in each partition and, once
``tpc_finish`` has returned, prints ``done TID N NAMES`` (flushed; NAMES
are the partitions it touched, comma-separated).  It prints ``ready``
after opening.

``MIX=SEED`` makes each transaction touch one, two or all three partitions,
chosen at random (seeded by SEED and the process id); ``PLAN=main,b;b``
makes the transactions touch those partitions in turn.  Each counter it
changes records the partitions of its transaction under ``with``, so a
check can tell, from any child alone, which partitions must hold it.

``CRASH_AT=POINT:K`` kills the process with SIGKILL the K-th time the
commit protocol or recovery passes POINT (see ``compositestorage.faults``);
with ``CRASH_DELAY=SECONDS``, that many seconds later, while it goes on.
``FSYNC_LOG=FILE`` records, for every fsync, the file, its size then and
(for small files, rewritten in place) its content, so a test can put each
file back to what was durable (as a power loss would).
``RAISE_IN_FINISH=NAME`` wraps partition NAME's child so that its
``tpc_finish`` raises (after the real one when it ends in ``+``).
"""
import os
import random
import signal
import sys

import transaction
import ZODB
from persistent.mapping import PersistentMapping
from ZODB.FileStorage import FileStorage

from compositestorage import CompositeStorage
from compositestorage import faults
from compositestorage import placement

PARTS = (('main', 0), ('b', 1), ('c', 2))


def install_crash(spec, delay=None):
    name, _, count = spec.rpartition(':')
    remaining = [int(count)]

    def kill():
        os.kill(os.getpid(), signal.SIGKILL)

    def hook(point):
        if point == name:
            remaining[0] -= 1
            if remaining[0] == 0 and delay:
                # killed while the writer goes on (inside a child's commit)
                import threading
                threading.Timer(float(delay), kill).start()
            elif remaining[0] <= 0 and not delay:
                kill()

    faults.hook = hook


def install_fsync_log(path):
    # the module, not the class the package exports under the same name
    fsmodule = sys.modules['ZODB.FileStorage.FileStorage']
    log = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    def recording(real):
        def sync(fd):
            real(fd)
            name = os.readlink('/proc/self/fd/%d' % fd)
            size = os.fstat(fd).st_size
            # small files are rewritten in place: keep what was synced
            content = os.pread(fd, size, 0).hex() if size <= 4096 else ''
            os.write(log, ('%s\t%d\t%s\n' % (name, size, content)).encode())
        return sync

    os.fsync = fsmodule.fsync = recording(os.fsync)
    os.fdatasync = recording(os.fdatasync)


class RaisingInFinish:
    """A child whose tpc_finish raises: a fault no real storage makes on
    demand.  Everything else goes to the wrapped FileStorage."""

    def __init__(self, storage, after, times=None):
        self._storage = storage
        self._after = after
        self._times = times      # None: every time

    def tpc_finish(self, transaction, func=lambda tid: None):
        if self._times is not None:
            if self._times <= 0:
                return self._storage.tpc_finish(transaction, func)
            self._times -= 1
        if self._after:
            self._storage.tpc_finish(transaction, func)
        raise OSError('injected failure in tpc_finish')

    def __getattr__(self, name):
        return getattr(self._storage, name)


def open_composite(directory, raise_in=None, config=None):
    """The composite in ``directory``, or the one ``config`` (the path of
    a ZConfig file) describes."""
    if config:
        import ZODB.config
        with open(config) as f:
            return ZODB.config.storageFromFile(f)
    children = []
    for name, prefix in PARTS:
        fs = FileStorage(os.path.join(directory, name + '.fs'))
        if raise_in and raise_in.rstrip('+') == name:
            fs = RaisingInFinish(fs, raise_in.endswith('+'))
        children.append((name, prefix, fs))
    return CompositeStorage(children)


def ensure_counters(conn):
    root = conn.root()
    if 'counters' not in root:
        counters = {}
        for name, _ in PARTS:
            with placement(conn, name):
                counter = PersistentMapping(n=0)
                conn.add(counter)
            counters[name] = counter
        root['counters'] = PersistentMapping(counters)
        transaction.commit()
    return root['counters']


def main():
    directory, count = sys.argv[1], int(sys.argv[2])
    if os.environ.get('FSYNC_LOG'):
        install_fsync_log(os.environ['FSYNC_LOG'])
    if os.environ.get('CRASH_AT'):
        install_crash(os.environ['CRASH_AT'], os.environ.get('CRASH_DELAY'))
    storage = open_composite(directory, os.environ.get('RAISE_IN_FINISH'),
                             os.environ.get('CONFIG'))
    db = ZODB.DB(storage)
    conn = db.open()
    counters = ensure_counters(conn)
    print('ready', flush=True)
    choose = chooser()
    for _ in range(count):
        names = choose()
        for name in names:
            counters[name]['n'] += 1
            counters[name]['with'] = names
        transaction.commit()
        print('done %s %d %s' % (storage.lastTransaction().hex(),
                                 counters['main']['n'], ','.join(names)),
              flush=True)
    db.close()


def chooser():
    """What each transaction touches: every partition, a plan, or a mix."""
    names = tuple(name for name, _ in PARTS)
    if os.environ.get('PLAN'):
        plan = [tuple(step.split(','))
                for step in os.environ['PLAN'].split(';')]
        steps = iter(plan)
        return lambda: next(steps, plan[-1])
    if os.environ.get('MIX'):
        rng = random.Random('%s-%d' % (os.environ['MIX'], os.getpid()))
        return lambda: tuple(sorted(rng.sample(names, rng.randint(1, 3)),
                                    key=names.index))
    return lambda: names


if __name__ == '__main__':
    main()
