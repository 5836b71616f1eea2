#!/usr/bin/env python
"""Where a composite's cross-partition commits spend their time, against
FileStorage.

``python benchmarks/breakdown.py [-n 20000] [--transactions 500]
[--rounds 3] [--json FILE]``

Runs ``bench.py``'s ``xadd`` and ``xupdate`` (N/2 sources, each referring
to a new target, committed in one transaction, then all changed and
committed again) and ``small2`` (small transactions that each change a
source and its target) on plain FileStorage (``fs``) and on
``composite2`` (the targets in a second partition), one after the other,
``--rounds`` times, each time in fresh files.  It reports the median wall
time of each workload for each storage, and for the composite the median
time spent in each of its own steps, measured by timers around them:

``store``
    the composite's ``store`` calls, of which ``rewrite`` is the scan and
    rewrite of records with references to another partition
    (``to_child``), and ``child stores`` the children's own ``store``;
``stubs``
    writing the stub records, at the vote;
``child votes``, ``intent``, ``child finishes``
    the children's ``tpc_vote``, the journal's intent (written and synced
    before any child finishes), and the children's ``tpc_finish`` (each
    with its fsync).

FileStorage gets the same timers around its ``store``, ``tpc_vote`` and
``tpc_finish``.  What is left of a workload's time is ZODB's own work
(pickling, the connection, the transaction machinery).  The timers cost
about a microsecond per call, on both sides.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from bench import Store  # noqa: E402
from bench import cross_add  # noqa: E402
from bench import cross_pairs  # noqa: E402
from bench import cross_update  # noqa: E402
from bench import time_calls  # noqa: E402

STEPS = ('store', 'rewrite', 'child stores', 'stubs', 'child votes',
         'intent', 'child finishes')


class Timers(dict):
    """Seconds per step, summed; ``wrap`` puts a timer around a method of
    one object."""

    def wrap(self, obj, method, step):
        time_calls(obj, method, self, step)


def instrument(storage, timers):
    """Put the timers in place on ``storage`` (a FileStorage or a
    composite)."""
    children = getattr(storage, 'partitions', None)
    if children is None:
        timers.wrap(storage, 'store', 'store')
        timers.wrap(storage, 'tpc_vote', 'child votes')
        timers.wrap(storage, 'tpc_finish', 'child finishes')
        return
    timers.wrap(storage, 'store', 'store')
    timers.wrap(storage, 'to_child', 'rewrite')
    timers.wrap(storage._coordinator, 'write_stubs', 'stubs')
    for part in children:
        timers.wrap(part.storage, 'store', 'child stores')
        timers.wrap(part.child, 'tpc_vote', 'child votes')
        timers.wrap(part.storage, 'tpc_finish', 'child finishes')
    if storage.journal is not None:
        timers.wrap(storage.journal, 'write_intent', 'intent')


def run_once(kind, n, transactions):
    """``{workload: {'seconds': s, step: s, ...}}`` for one storage."""
    import transaction

    directory = tempfile.mkdtemp(prefix='csbreakdown-')
    store = Store(kind, directory, cache_size=4 * n)
    out = {}
    try:
        db = store.open()
        timers = Timers()
        instrument(db.storage, timers)
        # the pooled connection's storage adapter holds methods it copied
        db.pool.clear()
        tm = transaction.TransactionManager(explicit=True)
        conn = db.open(tm)
        half = n // 2
        sources, targets = cross_pairs(half)

        def timed(name, func):
            timers.clear()
            start = time.perf_counter()
            func()
            out[name] = dict(timers, seconds=time.perf_counter() - start)

        def small2():
            for i in range(transactions):
                source = sources[i % half]
                tm.begin()
                source.value += 1
                source.ref.value += 1
                tm.commit()

        timed('xadd', lambda: cross_add(store, conn, tm, sources, targets,
                                        ''))
        timed('xupdate', lambda: cross_update(tm, sources))
        timed('small2', small2)
        conn.close()
    finally:
        store.close()
        shutil.rmtree(directory, ignore_errors=True)
    return out


def summarize(runs):
    """Medians over the rounds: ``{kind: {workload: {step: seconds}}}``."""
    summary = {}
    for kind, rounds in runs.items():
        summary[kind] = {}
        for workload in rounds[0]:
            keys = set().union(*(r[workload] for r in rounds))
            summary[kind][workload] = {
                key: statistics.median(r[workload].get(key, 0.0)
                                       for r in rounds)
                for key in keys}
    return summary


def format_summary(summary, n, transactions, rounds):
    lines = ['median of %d round(s); xadd and xupdate: N=%d (N/2 pairs), '
             'small2: %d transactions; milliseconds' % (rounds, n,
                                                       transactions),
             '',
             '%-16s %10s %10s %10s %10s %10s %10s' % (
                 '', 'xadd fs', 'composite', 'xupd fs', 'composite',
                 'small2 fs', 'composite')]
    fs, composite = summary['fs'], summary['composite2']
    for step in ('seconds',) + STEPS:
        cells = []
        for workload in ('xadd', 'xupdate', 'small2'):
            for side in (fs, composite):
                value = side[workload].get(step)
                cells.append('%10.1f' % (value * 1e3) if value is not None
                             else '%10s' % '')
        lines.append('%-16s %s' % ('total' if step == 'seconds' else step,
                                   ' '.join(cells)))
    lines.append('')
    lines.append('ratio fs/composite: ' + ', '.join(
        '%s %.2f' % (w, fs[w]['seconds'] / composite[w]['seconds'])
        for w in ('xadd', 'xupdate', 'small2')))
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-n', type=int, default=20000)
    parser.add_argument('--transactions', type=int, default=500)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--json', metavar='FILE')
    args = parser.parse_args(argv)
    if args.n < 2 or args.transactions < 1 or args.rounds < 1:
        parser.error('-n must be at least 2, --transactions and --rounds '
                     'at least 1')
    runs = {'fs': [], 'composite2': []}
    for round_ in range(args.rounds):
        order = ('fs', 'composite2') if round_ % 2 == 0 \
            else ('composite2', 'fs')
        for kind in order:
            runs[kind].append(run_once(kind, args.n, args.transactions))
    summary = summarize(runs)
    print(format_summary(summary, args.n, args.transactions, args.rounds))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(summary, f, indent=1, sort_keys=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
