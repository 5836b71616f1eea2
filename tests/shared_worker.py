"""A process of a shared composite, for test_shared_processes (run as a
script; each process opens the composite itself, from the configuration).

``python shared_worker.py MODE CONFIG_FILE [OPTIONS as JSON]``

The composite holds one counter per partition, at ``root[name]``: a
``PersistentMapping`` with ``value``, ``touched`` and ``moves``, a tuple
of ``(move id, delta)`` of every transaction that changed it, so the
final state tells exactly which transactions were applied, and where.

``mover``
    After opening it prints ``ready``, waits for the file ``go`` (an
    option) and then commits until the file ``stop`` exists or
    ``seconds`` have passed.  Each transaction takes a new snapshot,
    checks that the counters add up to ``total`` (a violation is a
    reader seeing half a transaction), then moves units between the
    counters of two or three partitions (the deltas add up to 0), or
    touches one counter (delta 0).  It retries after a ``ConflictError``
    with a new transaction (and a new move id).  With ``log``, it writes
    ``I id deltas`` before the commit and ``A id`` once
    ``transaction.commit()`` has returned (``F id`` after a conflict),
    each flushed and fsynced.  At the end it prints one JSON line: its
    tally of acknowledged deltas, commits, conflicts, violations and the
    recoveries it made of a dead process's intent.
    ``crash_finished=K`` kills the process (SIGKILL, itself) after the
    first child's ``tpc_finish`` of the K-th transaction of several
    partitions: its intent stays in the primary's database for another
    process to recover.  ``new_objects``: each transaction of several
    partitions also makes a new object, in a partition chosen at random,
    and the first counter it changes refers to it as ``last`` (the one
    before is garbage); and a second new object, a link of the chain that
    the second counter holds as ``chain`` (each link refers to the one
    before: they all stay reachable).
``reader``
    Reads in a tight loop, a new transaction each time, checking the sum,
    until ``stop`` exists; prints the JSON line.
``watch``
    Line protocol on stdin/stdout for the invalidation test: prints the
    counters it has cached; ``commit NAME`` touches NAME's counter and
    commits; ``peek`` prints the values without a transaction boundary;
    ``sync`` begins a new transaction, and prints which counters were
    ghosts (invalidated) and then their values; ``quit`` ends.
"""
import json
import logging
import os
import random
import signal
import sys
import time


class RecoveryCounter(logging.Handler):
    """Counts the composite's "recovered ... left by a process that
    died" warnings."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        if 'left by a process that died' in record.getMessage():
            self.count += 1


def open_db(config_text):
    import ZODB
    import ZODB.config
    storage = ZODB.config.storageFromString(config_text)
    return ZODB.DB(storage)


def counters(root, names):
    return [root[name] for name in names]


class Log:
    def __init__(self, path):
        self.file = open(path, 'a') if path else None

    def write(self, line):
        if self.file is None:
            return
        self.file.write(line + '\n')
        self.file.flush()
        os.fsync(self.file.fileno())


def install_crash(after):
    """SIGKILL this process at the first child's ``tpc_finish`` of the
    ``after``-th transaction that writes an intent (one of several
    partitions): one child has finished, the others not, and the intent
    stays in the primary's database."""
    from compositestorage import faults
    remaining = [after]

    def hook(point):
        if point == 'intent-written':
            remaining[0] -= 1
        elif point.startswith('finished:') and remaining[0] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)
    faults.hook = hook


def wait_for(path):
    while path and not os.path.exists(path):
        time.sleep(0.01)


def mover(config_text, opts):
    import transaction
    from ZODB.POSException import ConflictError

    from persistent.mapping import PersistentMapping
    from compositestorage import placement

    names = opts['names']
    total = opts['total']
    tag = opts['tag']
    new_objects = opts.get('new_objects')
    rng = random.Random(opts.get('seed'))
    log = Log(opts.get('log'))
    recoveries = RecoveryCounter()
    logging.getLogger('compositestorage').addHandler(recoveries)
    db = open_db(config_text)
    conn = db.open()
    print('ready', flush=True)
    wait_for(opts.get('go'))
    if opts.get('crash_finished'):
        install_crash(opts['crash_finished'])
    stop = opts.get('stop')
    deadline = time.monotonic() + opts.get('seconds', 3600)
    tally = {name: 0 for name in names}
    touched = {name: 0 for name in names}
    commits = conflicts = violations = checks = seq = 0
    kinds = {1: 0, 2: 0, 3: 0}
    while time.monotonic() < deadline and not (stop and
                                                os.path.exists(stop)):
        transaction.begin()
        root = conn.root()
        found = sum(c['value'] for c in counters(root, names))
        checks += 1
        if found != total:
            violations += 1
            log.write('V %d' % found)
        width = rng.choice((1, 2, 2, 3, 3))
        chosen = rng.sample(names, width)
        if width == 1:
            deltas = {chosen[0]: 0}
        elif width == 2:
            deltas = {chosen[0]: 1, chosen[1]: -1}
        else:
            deltas = {chosen[0]: 2, chosen[1]: -1, chosen[2]: -1}
        seq += 1
        move = '%s.%d' % (tag, seq)
        if new_objects and width > 1:
            # a new object in any partition, that the first counter refers
            # to (through a stub when it lives elsewhere); the one it
            # referred to before is garbage
            with placement(conn, rng.choice(names)):
                last = PersistentMapping(move=move)
                conn.add(last)
            root[chosen[0]]['last'] = last
            # and one that stays reachable: a link of a chain that the
            # second counter holds
            with placement(conn, rng.choice(names)):
                link = PersistentMapping(move=move,
                                         prev=root[chosen[1]].get('chain'))
                conn.add(link)
            root[chosen[1]]['chain'] = link
        for name, delta in deltas.items():
            counter = root[name]
            counter['value'] += delta
            counter['moves'] += ((move, delta),)
            if width == 1:
                counter['touched'] += 1
        log.write('I %s %s' % (move, json.dumps(deltas)))
        try:
            transaction.get().note('move %s' % move)
            transaction.commit()
        except ConflictError:
            transaction.abort()
            conflicts += 1
            log.write('F %s' % move)
            continue
        log.write('A %s' % move)
        commits += 1
        kinds[width] += 1
        for name, delta in deltas.items():
            tally[name] += delta
            if width == 1:
                touched[name] += 1
    transaction.abort()
    conn.close()
    db.close()
    print(json.dumps({
        'tag': tag, 'tally': tally, 'touched': touched, 'commits': commits,
        'conflicts': conflicts, 'violations': violations, 'checks': checks,
        'kinds': kinds, 'recoveries': recoveries.count}), flush=True)


def reader(config_text, opts):
    import transaction
    names = opts['names']
    total = opts['total']
    db = open_db(config_text)
    conn = db.open()
    print('ready', flush=True)
    wait_for(opts.get('go'))
    stop = opts['stop']
    reads = violations = 0
    seen = set()
    while not os.path.exists(stop):
        transaction.begin()
        cs = counters(conn.root(), names)
        found = sum(c['value'] for c in cs)
        reads += 1
        if found != total:
            violations += 1
        seen.add(tuple(len(c['moves']) for c in cs))
        transaction.abort()
    conn.close()
    db.close()
    print(json.dumps({'reads': reads, 'violations': violations,
                      'states': len(seen)}), flush=True)


def watch(config_text, opts):
    import transaction
    names = opts['names']
    db = open_db(config_text)
    conn = db.open()
    root = conn.root()

    def values():
        return {name: root[name]['value'] for name in names}

    print(json.dumps(values()), flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == 'quit':
            break
        if command[0] == 'commit':
            root[command[1]]['touched'] += 1
            transaction.commit()
            print(json.dumps(values()), flush=True)
        elif command[0] == 'peek':
            print(json.dumps(values()), flush=True)
        elif command[0] == 'sync':
            transaction.begin()
            ghosts = sorted(name for name in names
                            if root[name]._p_changed is None)
            print(json.dumps({'ghosts': ghosts, 'values': values()}),
                  flush=True)
    transaction.abort()
    conn.close()
    db.close()


def main(argv):
    mode, config_file = argv[:2]
    opts = json.loads(argv[2]) if len(argv) > 2 else {}
    with open(config_file) as f:
        config_text = f.read()
    {'mover': mover, 'reader': reader, 'watch': watch}[mode](
        config_text, opts)


if __name__ == '__main__':
    main(sys.argv[1:])
