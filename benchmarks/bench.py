#!/usr/bin/env python
"""Benchmark compositestorage against FileStorage and a ZODB multi-database.

Run ``python benchmarks/bench.py`` (defaults: ``-n 20000 --rounds 5
--repeat 2``); ``--quick`` is ``-n 200 --rounds 1 --repeat 1``.
``--json FILE`` writes every result, the raw per-round figures included.
``--profile STORAGE`` runs every workload once under cProfile instead.

The workloads are modelled on zodbshootout's.  Objects are instances of the
tiny ``PObject`` class below (one integer attribute, plus ``ref`` for the
cross workload).  All of them run, in this order, in one worker process per
storage per round, on storage files made fresh in a temporary directory
(the storages of ``--postgresql`` and ``--zeo`` are below):

``add``
    N new objects committed in one transaction.  They are held under the
    root by a ``PersistentList`` of ``PersistentList`` chunks of 100 objects
    (N/100 extra small records, not counted): one list of N references
    would make ZODB's pickler memo huge, and clearing it for every later
    object would dominate the figure (quadratic, whatever the storage).
``update``
    Every one of the N objects changed, committed in one transaction.
``cold``
    New storage objects and a new ``ZODB.DB`` (all ZODB caches empty), then
    every object read.  Opening is not timed.  The operating system's page
    cache is not dropped: "cold" means cold for ZODB.
``warm``
    The storage objects kept, the connection's cache emptied with
    ``conn.cacheMinimize()``, then every object read again.  FileStorage
    has no cache of its own, so this measures loading from the storage.
``hot``
    Every object read again while all of them sit in the connection cache,
    10 passes (10 N objects), because one pass takes only milliseconds.
``xadd``
    N/2 source objects (held in chunks like ``add``'s), each referencing
    one target object, N objects in all, committed in one transaction.
``xupdate``
    Every source and every target changed, in one transaction.
``xcold``
    As ``cold``: fresh storage and DB, then each source and its target read.
``small1``
    500 transactions, each changing one of the ``add`` objects.
``small2``
    500 transactions, each changing one source of the cross workload and its
    target.

Rates are objects per second (``small2`` changes two objects per
transaction); ``small1`` and ``small2`` also report the median (p50) and
99th percentile (p99) latency of one transaction (change + commit).
``--transactions K`` runs K small transactions instead of 500.

What each storage does in each workload:

``fs``
    One FileStorage.  Everything, cross targets included, lives in its one
    file: that is what a user of a single FileStorage gets.
``multidb``
    A ZODB multi-database of two FileStorages, ``main`` and ``other``
    (``ZODB.DB(..., databases=dbs, database_name=...)``).  The single
    partition workloads (add .. hot, small1) use only ``main``.  The cross
    targets are added through ``conn.get_connection('other')``, so sources
    hold real cross-database references, and ``xupdate``/``small2`` commit
    to both databases (two-phase commit over two storages).
``composite1``
    A ``CompositeStorage`` of two FileStorage partitions, ``main`` (prefix
    0) and ``other`` (prefix 1), with everything in the primary ``main``:
    the cost of the composite layer alone.
``composite2``
    The same composite, but the cross targets are placed in ``other`` with
    ``compositestorage.placement(conn, 'other')``: sources then refer across
    partitions (through stub records) and ``xupdate``/``small2`` touch both
    partitions in one transaction.  Single partition workloads are as in
    ``composite1``.
``zconfig:NAME`` (``--zconfig FILE``, repeatable)
    Any storage given as a ZConfig file (a storage section, or a ``<zodb>``
    section holding one; ``%import compositestorage`` works).  It is run like
    ``fs``: everything goes where the storage puts new objects by default.
    The worker runs in a fresh temporary directory, so relative paths in the
    file (``path data.fs``) give fresh files each round.

With ``--postgresql`` the storages are these instead, and ratios are to
``pg`` (each worker gets PostgreSQL databases made fresh for it and
dropped after it, by ``benchmarks/backends.py`` with the tests' helpers;
without a server that answers, the run stops at once and says so):

``pg``
    Plain RelStorage on one PostgreSQL database (history-preserving, the
    default settings).  Everything lives there.
``fs+pg``
    A composite of a FileStorage primary ``main`` and a RelStorage
    secondary ``other`` on PostgreSQL, with its journal a file; cross
    targets are placed in ``other``, as ``composite2`` places them.
``pg+pg``
    A composite of two RelStorage children on PostgreSQL, ``main`` and
    ``other``, each on a database of its own, with its journal a file;
    cross targets in ``other``.

With ``--zeo`` (and ``--clients 1,4``, the default: one run with one
client, then one with four) each storage is served by a ``runzeo`` process
of its own on a free port of 127.0.0.1, on fresh files, and ratios are to
``zeo-fs``.  Each client is a worker process of its own, with a
``ClientStorage``; the clients of a storage run each workload at the same
time, each on its own N objects under its own mapping in the root (made
before they start, so that they never conflict), and a rate is all their
objects over the slowest client's time.  Placement happens on the server,
so no storage places cross targets itself:

``zeo-fs``
    FileStorage served by ZEO.
``zeo-composite``
    A composite of two FileStorages served by ZEO, everything in the
    primary (default placement): the cost of the served composite layer.
``zeo-roundrobin``
    The same with ``placement round-robin``: new oids alternate between
    the partitions, so about half of all references cross partitions, and
    most transactions touch both.

With ``--processes 1,2,4`` the workload is another: many writer
processes, each opening the storage itself from a ZConfig file (as
RelStorage users run one application process per worker, with no ZEO
server), one run per number of processes.  Before they start, the driver
gives each writer its own objects (20 to change, and 20 sources each
referring to a target, the targets placed in partition ``other`` where
there is one) and makes 10 shared objects.  Once every writer has opened
the storage and loaded its objects, all start at once and each runs
``-n`` small transactions (default 200), in turn: ``one`` (two of its own
objects, one partition), ``two`` (a source and its target: two
partitions) and ``add`` (a new object, referred to by one of its own);
5 percent of them also change one of the shared objects, so that
writers conflict now and then.  A transaction that conflicts is
aborted and run again, and counted as a retry.  The rate is all the
writers' transactions over the slowest writer's time; the storages are:

``pg``
    Plain RelStorage on one PostgreSQL database (the reference).
``pg-shared``
    A composite of two RelStorage children on PostgreSQL, each on a
    database of its own, with no ``journal`` key: ``shared auto`` makes it
    a shared composite (``IMVCCStorage``), which every process opens
    directly and whose commit lock, finish lock and journal live in the
    primary's database.  In its writers the benchmark also times how long
    the commit lock is waited for and held (``tpc_begin`` to the end of
    ``tpc_finish``), and the steps inside it.

Each round runs, for each number of processes, each storage once (fresh
databases, fresh processes), the order of the two turned each time; the
report gives medians over the rounds of the rate, the per-round ratio to
``pg`` and the scaling (median rate at N processes over the median rate
at the fewest).

Each round starts a fresh subprocess per storage (``bench.py --worker
STORAGE``, on fresh files) and drives them in lockstep: each workload runs
on every storage, one after the other, before the next workload starts; a
worker waits, idle, while the others run.  The storages' runs of one
workload are then seconds apart, so that the drift of a noisy machine
hardly enters their ratio.  With ``--repeat K`` (default 2) the whole set
of workloads runs K times per round, on new objects in the same storage,
and each storage keeps its quickest run of each workload: on a machine
whose speed drifts, the slow runs measure the machine.  The reference
(FileStorage; ``pg`` or ``zeo-fs`` in the other modes) runs first and
again last in each round (``fs-again``, a worker of its own); the round's
reference rate is the geometric mean of the two, and their ratio is
printed as "fs noise".  The order of the other storages rotates by one
each round.  The table gives, per workload and storage, the median rate
over the rounds and, in brackets, the median over the rounds of the ratio
to the round's reference rate; then p50/p99 latencies of the small
transactions (medians over rounds), each storage's peak worker RSS
(``ru_maxrss``, maximum over rounds; the clients', not the ZEO server's)
and its disk use at the end of the last round (files, and PostgreSQL's
``pg_database_size`` of its databases).
"""
import argparse
import gc
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from persistent import Persistent

import backends

STORAGES = ('fs', 'multidb', 'composite1', 'composite2')
#: The storages of each mode; the first is the reference of the ratios.
MODES = {'files': STORAGES, 'postgresql': tuple(backends.POSTGRES),
         'zeo': backends.ZEO}
#: The storages whose cross targets are placed in partition ``other``.
PLACE_OTHER = ('composite2', 'fs+pg', 'pg+pg')
WORKLOADS = ('add', 'update', 'cold', 'warm', 'hot',
             'xadd', 'xupdate', 'xcold', 'small1', 'small2')
SMALL = ('small1', 'small2')
SMALL_TXNS = 500
HOT_PASSES = 10


# --- worker -------------------------------------------------------------------

class PObject(Persistent):
    """A small persistent object (pickled as ``__main__.PObject``)."""

    ref = None

    def __init__(self, value=0):
        self.value = value


class Store:
    """Opens, reopens and closes one kind of storage in one directory.

    ``db`` is the DB whose root holds everything; ``place_other(conn,
    objs)`` makes ``objs`` new objects of the second partition (or of the
    second database) where the storage kind has one, else does nothing.
    """

    def __init__(self, kind, directory, zconfig=None, cache_size=100000,
                 databases=(), address=None, client=None):
        self.kind = kind
        self.dir = directory
        self.zconfig = zconfig
        self.cache_size = cache_size
        self.databases = databases
        self.address = address
        self.client = client
        self.db = None
        self.other_db = None

    def _path(self, name):
        return os.path.join(self.dir, name + '.fs')

    def open(self):
        import ZODB
        from ZODB.FileStorage import FileStorage
        cs = self.cache_size
        if self.kind == 'fs':
            self.db = ZODB.DB(FileStorage(self._path('main')), cache_size=cs)
        elif self.kind == 'multidb':
            dbs = {}
            self.db = ZODB.DB(FileStorage(self._path('main')), cache_size=cs,
                              databases=dbs, database_name='main')
            self.other_db = ZODB.DB(FileStorage(self._path('other')),
                                    cache_size=cs, databases=dbs,
                                    database_name='other')
        elif self.kind in ('composite1', 'composite2'):
            from compositestorage import CompositeStorage
            storage = CompositeStorage([
                ('main', 0, FileStorage(self._path('main'))),
                ('other', 1, FileStorage(self._path('other')))])
            self.db = ZODB.DB(storage, cache_size=cs)
        elif self.kind.startswith('zconfig:'):
            self.db = ZODB.DB(open_zconfig_storage(self.zconfig),
                              cache_size=cs)
        elif self.kind in backends.POSTGRES:
            import ZODB.config
            self.db = ZODB.DB(ZODB.config.storageFromString(
                backends.postgres_config(self.kind, self.dir,
                                         self.databases)), cache_size=cs)
        elif self.kind in backends.ZEO:
            from ZEO.ClientStorage import ClientStorage
            host, port = self.address.rsplit(':', 1)
            self.db = ZODB.DB(ClientStorage((host, int(port))),
                              cache_size=cs)
        else:
            raise SystemExit('unknown storage %r' % self.kind)
        return self.db

    def close(self):
        for db in (self.db, self.other_db):
            if db is not None:
                db.close()
        self.db = self.other_db = None

    def reopen(self):
        self.close()
        gc.collect()
        return self.open()

    def home(self, conn):
        """The mapping that holds this worker's objects: the root, or a
        served client's own mapping in it."""
        root = conn.root()
        if self.client is None:
            return root
        return root[backends.client_home(self.client)]

    def place_other(self, conn, objs):
        if self.kind == 'multidb':
            other = conn.get_connection('other')
            for obj in objs:
                other.add(obj)
        elif self.kind in PLACE_OTHER:
            from compositestorage import placement
            with placement(conn, 'other'):
                for obj in objs:
                    conn.add(obj)

    def disk_bytes(self):
        total = 0
        for dirpath, _, files in os.walk(self.dir):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(dirpath, f))
                except OSError:
                    pass
        return total


def open_zconfig_storage(path):
    """Open the storage a ZConfig file describes.

    The file holds one storage section, or a ``<zodb>`` section holding one.
    """
    import ZConfig
    import ZODB.config
    with open(path) as f:
        text = f.read()
    if '<zodb' in text.lower():
        with open(path) as f:
            config, _ = ZConfig.loadConfigFile(ZODB.config.getDbSchema(), f)
        return config.database[0].config.storage.open()
    return ZODB.config.storageFromString(text)


def _timed(results, name, count, func):
    gc.collect()
    start = time.perf_counter()
    func()
    seconds = time.perf_counter() - start
    results[name] = {'objects': count, 'seconds': seconds,
                     'rate': count / seconds if seconds > 0 else float('inf')}


def chunked(objs, size=100):
    """``objs`` in persistent lists of ``size``, in one persistent list."""
    from persistent.list import PersistentList
    return PersistentList(PersistentList(objs[i:i + size])
                          for i in range(0, len(objs), size))


def cross_pairs(half):
    """``half`` new sources, each referring to a new target."""
    sources = [PObject(i) for i in range(half)]
    targets = [PObject(i) for i in range(half)]
    for s, t in zip(sources, targets):
        s.ref = t
    return sources, targets


def cross_add(store, conn, tm, sources, targets, key):
    """``xadd``: the targets placed in the second partition (or
    database), the sources under ``xsources`` + ``key``, one commit."""
    tm.begin()
    store.place_other(conn, targets)
    store.home(conn)['xsources' + key] = chunked(sources)
    tm.commit()


def cross_update(tm, sources):
    """``xupdate``: every source and its target changed, one commit."""
    tm.begin()
    for s in sources:
        s.value += 1
        s.ref.value += 1
    tm.commit()


def time_calls(owner, name, totals, key):
    """Replace ``owner``'s method ``name`` (on a class, or on one object)
    with one that adds the seconds each call takes to ``totals[key]``."""
    method = getattr(owner, name)
    clock = time.perf_counter

    def timed(*args, **kw):
        start = clock()
        try:
            return method(*args, **kw)
        finally:
            totals[key] = totals.get(key, 0.0) + clock() - start
    setattr(owner, name, timed)


def _percentile(sorted_values, q):
    """Nearest-rank percentile of an ascending list."""
    k = max(0, math.ceil(q * len(sorted_values)) - 1)
    return sorted_values[k]


def _small(results, name, tm, objs_per_txn, txns=SMALL_TXNS):
    """Run ``txns`` transactions; ``objs_per_txn(i)`` gives their
    objects."""
    gc.collect()
    latencies = []
    clock = time.perf_counter
    start = clock()
    for i in range(txns):
        t0 = clock()
        tm.begin()
        for obj in objs_per_txn(i):
            obj.value += 1
        tm.commit()
        latencies.append(clock() - t0)
    seconds = clock() - start
    latencies.sort()
    count = 0
    for i in range(txns):
        count += len(objs_per_txn(i))
    results[name] = {
        'objects': count, 'transactions': txns, 'seconds': seconds,
        'rate': count / seconds,
        'p50_ms': _percentile(latencies, 0.50) * 1000,
        'p99_ms': _percentile(latencies, 0.99) * 1000,
    }


def phases(kind, n, zconfig=None, repeat=1, txns=SMALL_TXNS, **where):
    """Run the workloads one by one: yields ``(workload, result)`` after
    each, ``repeat`` times over (each time on new objects in the same
    storage), and ``('done', totals)`` at the end.  ``where`` names what
    the driver made for the storage (``databases``, ``address``) and the
    index of a served ``client``.

    The driver resumes each storage's worker for one workload at a time,
    so that every storage runs a workload within seconds of the others.
    """
    with tempfile.TemporaryDirectory(prefix='csbench-') as directory:
        os.chdir(directory)
        store = Store(kind, directory, zconfig,
                      cache_size=2 * n * repeat + 1000, **where)
        store.open()
        for rep in range(repeat):
            for step in _one_set(store, n, '%d' % rep, txns):
                yield step
        disk = store.disk_bytes()
        store.close()
        os.chdir(os.path.dirname(directory))

    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == 'darwin':   # bytes there, kilobytes on Linux
        rss_kb //= 1024
    yield 'done', {'rss_kb': rss_kb, 'disk_bytes': disk}


def _one_set(store, n, key, txns=SMALL_TXNS):
    """Every workload once, on new objects under root keys ending in
    ``key``; yields ``(workload, result)`` after each."""
    import transaction

    half = max(1, n // 2)
    results = {}

    def result(name):
        return name, results[name]

    def new_conn(db):
        tm = transaction.TransactionManager(explicit=True)
        return db.open(tm), tm

    # -- add / update
    conn, tm = new_conn(store.db)
    objs = [PObject(i) for i in range(n)]

    def add():
        tm.begin()
        store.home(conn)['objs' + key] = chunked(objs)
        tm.commit()
    _timed(results, 'add', n, add)
    yield result('add')

    def update():
        tm.begin()
        for o in objs:
            o.value += 1
        tm.commit()
    _timed(results, 'update', n, update)
    conn.close()
    objs = None
    yield result('update')

    # -- cold / warm / hot
    db = store.reopen()
    conn, tm = new_conn(db)
    tm.begin()
    root = store.home(conn)
    holder = {}

    def read_all():
        total = 0
        for chunk in root['objs' + key]:
            for o in chunk:
                total += o.value
        holder['total'] = total
    _timed(results, 'cold', n, read_all)
    yield result('cold')
    conn.cacheMinimize()
    _timed(results, 'warm', n, read_all)
    yield result('warm')
    read_all()   # make sure every object is in the cache

    def read_hot():
        for _ in range(HOT_PASSES):
            read_all()
    _timed(results, 'hot', HOT_PASSES * n, read_hot)
    tm.abort()
    conn.close()
    yield result('hot')

    # -- cross references
    conn, tm = new_conn(db)
    sources, targets = cross_pairs(half)
    _timed(results, 'xadd', 2 * half,
           lambda: cross_add(store, conn, tm, sources, targets, key))
    yield result('xadd')

    _timed(results, 'xupdate', 2 * half, lambda: cross_update(tm, sources))
    conn.close()
    sources = targets = None
    yield result('xupdate')

    db = store.reopen()
    conn, tm = new_conn(db)
    tm.begin()
    root = store.home(conn)

    def xread():
        total = 0
        for chunk in root['xsources' + key]:
            for s in chunk:
                total += s.value + s.ref.value
        holder['xtotal'] = total
    _timed(results, 'xcold', 2 * half, xread)
    yield result('xcold')

    # -- small transactions (objects are already loaded: they are hot)
    objs = [o for chunk in root['objs' + key] for o in chunk]
    sources = [s for chunk in root['xsources' + key] for s in chunk]
    pairs = [(s, s.ref) for s in sources]
    tm.abort()
    _small(results, 'small1', tm, lambda i: (objs[i % len(objs)],), txns)
    yield result('small1')
    _small(results, 'small2', tm, lambda i: pairs[i % len(pairs)], txns)
    yield result('small2')
    conn.close()


def serve_worker(kind, n, zconfig=None, repeat=1, txns=SMALL_TXNS,
                 **where):
    """Run one workload per ``go`` line on stdin, answering in JSON."""
    work = phases(kind, n, zconfig, repeat, txns, **where)
    for line in sys.stdin:
        if line.strip() != 'go':
            break
        name, result = next(work)
        sys.stdout.write(json.dumps([name, result]) + '\n')
        sys.stdout.flush()
        if name == 'done':
            break


# --- driver -------------------------------------------------------------------

class Worker:
    """A fresh worker process for one storage (or for one served client
    of it) in one round."""

    def __init__(self, kind, n, zconfigs, repeat=1, extra=(),
                 txns=SMALL_TXNS):
        cmd = [sys.executable, os.path.abspath(__file__), '--worker', kind,
               '-n', str(n), '--repeat', str(repeat),
               '--transactions', str(txns)] + list(extra)
        if kind.startswith('zconfig:'):
            cmd += ['--zconfig', zconfigs[kind]]
        self.kind = kind
        self.stderr = tempfile.TemporaryFile(mode='w+')
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True)

    def go(self):
        """Let the worker run its next workload."""
        try:
            self.proc.stdin.write('go\n')
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass

    def answer(self, expected):
        """The result of the workload it ran, which must be ``expected``."""
        line = self.proc.stdout.readline()
        if not line:
            self.fail('exited')
        name, result = json.loads(line)
        if name != expected:
            self.fail('ran %s where %s was expected' % (name, expected))
        if name == 'done':
            self.proc.wait()
            self.stderr.close()
        return result

    def fail(self, what):
        self.stop()
        self.stderr.seek(0)
        sys.stderr.write(self.stderr.read())
        raise SystemExit('worker %s %s (exit code %s)'
                         % (self.kind, what, self.proc.returncode))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def combine(answers):
    """One workload's result over clients that ran it at the same time:
    all their objects over the slowest one's seconds, and the slowest
    client's p50 and p99."""
    if len(answers) == 1:
        return answers[0]
    objects = sum(a['objects'] for a in answers)
    seconds = max(a['seconds'] for a in answers)
    out = dict(answers[0], objects=objects, seconds=seconds,
               rate=objects / seconds, clients=len(answers))
    if 'transactions' in out:
        out['transactions'] = sum(a['transactions'] for a in answers)
        out['p50_ms'] = max(a['p50_ms'] for a in answers)
        out['p99_ms'] = max(a['p99_ms'] for a in answers)
    return out


class Contender:
    """One storage in one round: what it needs outside its workers
    (``backends``: PostgreSQL databases, a ZEO server) and its worker
    processes, one per served client, which run each workload at the
    same time.  A storage that is not served has one worker."""

    def __init__(self, kind, n, zconfigs, repeat=1, label=None, clients=1,
                 txns=SMALL_TXNS):
        self.kind = label or kind
        self.results = {}
        self.workers = []
        self.backing = backends.backing(kind, clients)
        try:
            if kind not in backends.ZEO:
                clients = 1
            for i in range(clients):
                extra = self.backing.worker_args()
                if kind in backends.ZEO:
                    extra += ['--client', str(i)]
                self.workers.append(
                    Worker(kind, n, zconfigs, repeat, extra, txns))
        except BaseException:
            self.close()
            raise

    def step(self, expected):
        """Run the next workload, which must be ``expected``, in every
        worker at once; at ``done``, the contender's results."""
        for w in self.workers:
            w.go()
        answers = [w.answer(expected) for w in self.workers]
        if expected == 'done':
            disk = sum(a['disk_bytes'] for a in answers)
            disk += self.backing.disk_bytes() or 0
            return dict(self.backing.describe(), storage=self.kind,
                        clients=len(answers),
                        rss_kb=max(a['rss_kb'] for a in answers),
                        disk_bytes=disk, results=self.best(),
                        repeats=self.results)
        self.results.setdefault(expected, []).append(combine(answers))

    def best(self):
        """Each workload's quickest repetition: on a machine whose speed
        drifts, the slow ones measure the machine, not the storage."""
        return {name: max(runs, key=lambda r: r['rate'])
                for name, runs in self.results.items()}

    def close(self):
        for w in self.workers:
            w.stop()
        self.backing.close()


def again(reference):
    """The label of the reference's second run in each round, which
    brackets the others (``fs-again``)."""
    return reference + '-again'


def run_round(order, n, zconfigs, repeat=1, reference='fs', clients=1,
              txns=SMALL_TXNS):
    """One round: a fresh contender per storage, driven in lockstep.

    Each workload runs on every storage before the next workload starts,
    so the storages' runs of one workload are seconds apart, not minutes;
    with ``repeat``, the whole set of workloads runs that many times, each
    storage keeping its quickest run of each workload.  The ``reference``
    storage runs first and again last (``fs-again``, a contender of its
    own): the reference for the round is the geometric mean of the two,
    which cancels a drift of the machine across the storages in between,
    and the ratio of the two shows how noisy the machine was.
    """
    plan = ([(reference, None)]
            + [(kind, None) for kind in order if kind != reference]
            + [(reference, again(reference))])
    contenders = []
    try:
        for kind, label in plan:
            contenders.append(Contender(kind, n, zconfigs, repeat, label,
                                        clients, txns))
        for _ in range(repeat):
            for workload in WORKLOADS:
                for c in contenders:
                    c.step(workload)
        results = [c.step('done') for c in contenders]
    finally:
        for c in contenders:
            c.close()
    return {r['storage']: dict(r, n=n) for r in results}


def reference_rate(round_, workload, reference='fs'):
    """The round's reference rate for ``workload``: the geometric mean of
    its run before and its run after the other storages."""
    first = round_[reference]['results'][workload]['rate']
    second = round_.get(again(reference))
    if second is None:
        return first
    return math.sqrt(first * second['results'][workload]['rate'])


def summarize(storages, rounds):
    """Medians over rounds; ``rounds`` is a list of {storage: result}.
    Ratios are to ``storages[0]``, the reference."""
    reference = storages[0]
    summary = {'reference': reference}
    for wl in WORKLOADS:
        summary[wl] = {}
        for kind in storages:
            per_round = [r[kind]['results'][wl] for r in rounds]
            refs = [reference_rate(r, wl, reference) for r in rounds]
            if kind == reference:
                rates = refs
                ratios = [1.0] * len(rounds)
            else:
                rates = [x['rate'] for x in per_round]
                ratios = [rate / ref for rate, ref in zip(rates, refs)]
            entry = {
                'rate': statistics.median(rates),
                'ratio': statistics.median(ratios),
                'rates': rates,
                'ratios': ratios,
            }
            if wl in SMALL:
                entry['p50_ms'] = statistics.median(
                    x['p50_ms'] for x in per_round)
                entry['p99_ms'] = statistics.median(
                    x['p99_ms'] for x in per_round)
            summary[wl][kind] = entry
    summary['noise'] = {
        wl: statistics.median(
            r[again(reference)]['results'][wl]['rate']
            / r[reference]['results'][wl]['rate']
            for r in rounds)
        for wl in WORKLOADS}
    summary['rss_kb'] = {kind: max(r[kind]['rss_kb'] for r in rounds)
                         for kind in storages}
    summary['disk_bytes'] = {kind: rounds[-1][kind]['disk_bytes']
                             for kind in storages}
    return summary


def _rate(x):
    if x >= 1e6:
        return '%.2fM/s' % (x / 1e6)
    if x >= 1e4:
        return '%.0fk/s' % (x / 1e3)
    if x >= 1e3:
        return '%.1fk/s' % (x / 1e3)
    return '%.0f/s' % x


#: What the reference of each mode is, for the table's header.
REFERENCE_NAMES = {'fs': 'a FileStorage run',
                   'pg': 'a RelStorage-on-PostgreSQL run',
                   'zeo-fs': 'a run on FileStorage served by ZEO'}


def format_table(storages, summary, n, nrounds, repeat=1, clients=1):
    ref = storages[0]
    width = max(20, max(len(s) for s in storages) + 2)
    lines = ['objects per second, median of %d round(s) (each the best of '
             '%d run(s)), N=%d; (x) = median per-round ratio to %s'
             % (nrounds, repeat, n, ref)]
    if clients > 1:
        lines.append('%d concurrent clients, N objects each; a rate is '
                     'all their objects over the slowest one\'s time'
                     % clients)
    lines += ['%s is the geometric mean of %s before and one '
              'after the others;' % (ref, REFERENCE_NAMES[ref]),
              '%s noise = median ratio of the second run to the first'
              % ref, '']
    head = ('%-9s' % 'workload' + ''.join('%*s' % (width, s)
                                          for s in storages)
            + '%*s' % (width, '%s noise' % ref))
    lines += [head, '-' * len(head)]
    for wl in WORKLOADS:
        cells = []
        for kind in storages:
            e = summary[wl][kind]
            cells.append('%*s' % (width, '%s (%.2f)' % (_rate(e['rate']),
                                                        e['ratio'])))
        cells.append('%*s' % (width, '(%.2f)' % summary['noise'][wl]))
        lines.append('%-9s' % wl + ''.join(cells))
    lines.append('')
    for wl in SMALL:
        cells = ['%*s' % (width, '%.2f / %.2f ms' % (
            summary[wl][k]['p50_ms'], summary[wl][k]['p99_ms']))
            for k in storages]
        lines.append('%-9s' % wl + ''.join(cells)
                     + '   (p50 / p99 per transaction)')
    lines.append('%-9s' % 'peak RSS' + ''.join(
        '%*s' % (width, '%.1f MB' % (summary['rss_kb'][k] / 1024))
        for k in storages))
    lines.append('%-9s' % 'disk' + ''.join(
        '%*s' % (width, '%.1f MB' % (summary['disk_bytes'][k] / 1e6))
        for k in storages))
    return '\n'.join(lines)


def profile(kind, n, zconfig_paths):
    """Run every workload once on ``kind`` under cProfile; print the stats."""
    import cProfile
    import pstats
    if kind not in STORAGES:
        raise SystemExit('unknown storage %r' % kind)
    zconfig = os.path.abspath(zconfig_paths[0]) if zconfig_paths else None
    profiler = cProfile.Profile()
    profiler.enable()
    for name, result in phases(kind, n, zconfig):
        if name != 'done':
            print('%-8s %s' % (name, _rate(result['rate'])))
    profiler.disable()
    pstats.Stats(profiler).sort_stats('tottime').print_stats(30)
    return 0


def overlay_read_ratio(n, repeat=3):
    """``(whole, overlaid, ratio)``: seconds to load ``n`` objects (each
    with three home attributes and two overlay attributes) from a
    composite whose ``hot`` partition overlays ``main``, against the same
    objects stored whole in a composite without an overlay.  Loads go
    straight to ``storage.loadBefore`` (what a connection's cache miss
    costs the storage); the quickest of ``repeat`` passes counts."""
    import tempfile
    import transaction
    import ZODB
    from ZODB.FileStorage import FileStorage
    from ZODB.utils import p64
    from compositestorage import CompositeStorage
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ('whole', 'overlaid'):
            storage = CompositeStorage(
                [('main', 0, FileStorage(os.path.join(tmp, kind + '.fs'))),
                 ('hot', 1, FileStorage(os.path.join(tmp, kind + '-hot.fs')))],
                overlays={'hot': ('main', 'hits last_seen')}
                if kind == 'overlaid' else None)
            db = ZODB.DB(storage)
            conn = db.open()
            objs = []
            for i in range(n):
                o = PObject(i)
                o.title, o.body = 'object %d' % i, 'x' * 100
                o.hits, o.last_seen = i, float(i)
                conn.add(o)
                objs.append(o)
            transaction.commit()
            oids = [o._p_oid for o in objs]
            before = p64(2 ** 62)
            best = None
            for _ in range(repeat):
                t0 = time.perf_counter()
                for oid in oids:
                    storage.loadBefore(oid, before)
                t = time.perf_counter() - t0
                best = t if best is None else min(best, t)
            times[kind] = best
            db.close()
    return times['whole'], times['overlaid'], (
        times['overlaid'] / times['whole'])


# --- many writer processes (--processes) ---------------------------------------

#: Objects of each writer's own (changed by ``one`` and ``add``), its
#: sources (``two``; each refers to a target in the second partition) and
#: the objects every writer may touch.
WRITER_OWN = 20
WRITER_SOURCES = 20
WRITER_SHARED = 10
#: The share of transactions that also change one of the shared objects:
#: the writers then conflict now and then, not all the time.
WRITER_SHARED_FRACTION = 0.05
#: The kinds of transaction a writer runs, in turn.
WRITER_MIX = ('one', 'two', 'add')
WRITER_TXNS = 200
WRITER_COUNTS = (1, 2, 4)


def writer_home(proc):
    """The root key of writer process ``proc``'s own objects."""
    return 'writer%d' % proc


def make_writer_homes(config_text, procs):
    """Open the storage once, before any writer starts, and give each
    writer its own objects, with their cross targets placed in partition
    ``other`` where there is one; and the shared objects.  Returns the
    prefixes (first oid bytes) the targets got."""
    import transaction
    import ZODB
    import ZODB.config
    from persistent.list import PersistentList
    from persistent.mapping import PersistentMapping
    from compositestorage import CompositeStorage
    db = ZODB.DB(ZODB.config.storageFromString(config_text))
    try:
        tm = transaction.TransactionManager(explicit=True)
        conn = db.open(tm)
        tm.begin()
        root = conn.root()
        composite = isinstance(db.storage, CompositeStorage)
        targets = []
        for p in range(procs):
            sources = [PObject(i) for i in range(WRITER_SOURCES)]
            for s in sources:
                s.ref = PObject()
                targets.append(s.ref)
            if composite:
                from compositestorage import placement
                with placement(conn, 'other'):
                    for s in sources:
                        conn.add(s.ref)
            root[writer_home(p)] = PersistentMapping(
                objs=PersistentList(PObject(i) for i in range(WRITER_OWN)),
                sources=PersistentList(sources))
        root['shared'] = PersistentList(PObject(i)
                                        for i in range(WRITER_SHARED))
        tm.commit()
        prefixes = sorted({t._p_oid[0] for t in targets})
        conn.close()
    finally:
        db.close()
    return prefixes


class CommitLockTimer:
    """How long a shared composite's commit lock is waited for and held
    in this process: wraps ``SharedState.begin_commit`` (which takes the
    lock, a round trip to PostgreSQL included) and ``end_commit`` (which
    lets go of it)."""

    def __init__(self):
        from compositestorage import shared
        self.reset()
        begin = shared.SharedState.begin_commit
        end = shared.SharedState.end_commit
        timer = self
        clock = time.perf_counter

        def begin_commit(state, *args, **kw):
            t0 = clock()
            found = begin(state, *args, **kw)
            t1 = clock()
            timer.wait += t1 - t0
            timer.count += 1
            state._bench_taken = t1
            return found

        def end_commit(state):
            taken = state.__dict__.pop('_bench_taken', None)
            end(state)
            if taken is not None:
                timer.held += clock() - taken

        shared.SharedState.begin_commit = begin_commit
        shared.SharedState.end_commit = end_commit
        for cls, name, _ in self.phase_methods():
            time_calls(cls, name, self.phases, name)

    @staticmethod
    def phase_methods():
        """``(class, method, label)`` of the steps timed inside the commit
        lock (each a part of the time it is held)."""
        from compositestorage import commit
        from compositestorage import shared
        return [(commit.Coordinator, 'tpc_vote', 'vote'),
                (shared.SharedState, 'hold_finish', 'finish lock'),
                (shared.TableJournal, 'write_intent', 'intent'),
                (commit.Coordinator, '_finish_children', 'finish children'),
                (shared.TableJournal, 'clear', 'clear intent')]

    def reset(self):
        self.wait = self.held = 0.0
        self.count = 0
        if not hasattr(self, 'phases'):
            self.phases = {}
        self.phases.clear()


def serve_writer(kind, config_path, proc, txns):
    """One writer process: open the storage from its configuration, load
    its objects, say ``ready``, wait for ``go``, run ``txns`` small
    transactions (``WRITER_MIX`` in turn), retrying each on a conflict,
    and answer in JSON."""
    import random
    import transaction
    import ZODB
    import ZODB.config
    from ZODB.interfaces import IMVCCStorage
    from ZODB.POSException import ConflictError
    with open(config_path) as f:
        text = f.read()
    timer = CommitLockTimer() if kind == 'pg-shared' else None
    storage = ZODB.config.storageFromString(text)
    db = ZODB.DB(storage)
    tm = transaction.TransactionManager(explicit=True)
    conn = db.open(tm)
    tm.begin()
    home = conn.root()[writer_home(proc)]
    objs = list(home['objs'])
    sources = list(home['sources'])
    shared = list(conn.root()['shared'])
    for o in objs + shared:
        o.value
    for s in sources:
        s.value + s.ref.value
    tm.abort()
    sys.stdout.write('ready\n')
    sys.stdout.flush()
    if sys.stdin.readline().strip() != 'go':
        return
    if timer is not None:
        timer.reset()
    rng = random.Random(proc)
    clock = time.perf_counter
    latencies = []
    retries = 0
    kinds = dict.fromkeys(WRITER_MIX, 0)
    start = clock()
    for i in range(txns):
        what = WRITER_MIX[i % len(WRITER_MIX)]
        j = rng.randrange(len(objs))
        s = sources[rng.randrange(len(sources))]
        hot = (shared[rng.randrange(len(shared))]
               if rng.random() < WRITER_SHARED_FRACTION else None)
        t0 = clock()
        for attempt in range(100):
            tm.begin()
            if what == 'one':       # two objects of one partition
                objs[j].value += 1
                objs[(j + 1) % len(objs)].value += 1
            elif what == 'two':     # a source and its target: two partitions
                s.value += 1
                s.ref.value += 1
            else:                   # a new object, referred to by an own one
                objs[j].ref = PObject(i)
            if hot is not None:
                hot.value += 1
            try:
                tm.commit()
                break
            except ConflictError:
                tm.abort()
                retries += 1
        else:
            raise SystemExit('writer %d: transaction %d conflicted 100 times'
                             % (proc, i))
        latencies.append(clock() - t0)
        kinds[what] += 1
    seconds = clock() - start
    latencies.sort()
    answer = {'proc': proc, 'transactions': txns, 'seconds': seconds,
              'retries': retries, 'kinds': kinds,
              'p50_ms': _percentile(latencies, 0.50) * 1000,
              'p99_ms': _percentile(latencies, 0.99) * 1000,
              'imvcc': bool(IMVCCStorage.providedBy(storage))}
    if timer is not None:
        answer.update(lock_wait=timer.wait, lock_held=timer.held,
                      lock_commits=timer.count, phases=dict(timer.phases))
    conn.close()
    db.close()
    sys.stdout.write(json.dumps(answer) + '\n')
    sys.stdout.flush()


def run_writers(kind, procs, txns, timeout=600):
    """``procs`` writer processes on ``kind``, made fresh: their databases,
    their objects, their processes.  They start together once all have
    opened the storage; the result is all their transactions over the
    slowest one's seconds."""
    backing = backends.Databases(kind)
    directory = tempfile.mkdtemp(prefix='csbench-writers-')
    workers = []
    try:
        config = os.path.join(directory, 'storage.conf')
        text = backends.postgres_config(kind, directory, backing.names)
        with open(config, 'w') as f:
            f.write(text)
        prefixes = make_writer_homes(text, procs)
        for p in range(procs):
            err = tempfile.TemporaryFile(mode='w+')
            workers.append((subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), '--writer', kind,
                 '--config', config, '--proc', str(p), '-n', str(txns)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                text=True, cwd=directory), err))

        def read(proc, err, expected):
            line = proc.stdout.readline()
            if not line or (expected and line.strip() != expected):
                proc.kill()
                proc.wait()
                err.seek(0)
                raise WriterFailed(
                    'writer process on %s %s (exit code %s)' % (
                        kind, 'exited' if not line else
                        'said %r' % line.strip(), proc.returncode),
                    err.read())
            return line
        for proc, err in workers:
            read(proc, err, 'ready')
        for proc, _ in workers:
            proc.stdin.write('go\n')
            proc.stdin.flush()
        answers = [json.loads(read(proc, err, None))
                   for proc, err in workers]
        for proc, _ in workers:
            proc.wait(timeout)
        seconds = max(a['seconds'] for a in answers)
        total = sum(a['transactions'] for a in answers)
        out = {'storage': kind, 'processes': procs, 'transactions': total,
               'seconds': seconds, 'rate': total / seconds,
               'retries': sum(a['retries'] for a in answers),
               'p50_ms': statistics.median(a['p50_ms'] for a in answers),
               'p99_ms': max(a['p99_ms'] for a in answers),
               'imvcc': all(a['imvcc'] for a in answers),
               'target_prefixes': prefixes,
               'databases': list(backing.names),
               'writers': answers}
        if 'lock_held' in answers[0]:
            # The share of the run's time the commit lock was held by one
            # process or another (it is exclusive: at most 1.0).
            out['lock_held'] = sum(a['lock_held'] for a in answers) / seconds
            commits = sum(a['lock_commits'] for a in answers)
            out['lock_wait_ms'] = (sum(a['lock_wait'] for a in answers)
                                   / max(1, commits) * 1000)
            out['lock_held_ms'] = (sum(a['lock_held'] for a in answers)
                                   / max(1, commits) * 1000)
            out['phases_ms'] = {
                name: sum(a['phases'].get(name, 0.0) for a in answers)
                / max(1, commits) * 1000
                for _, name, _ in CommitLockTimer.phase_methods()}
        return out
    finally:
        for proc, err in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            err.close()
        backing.close()
        shutil.rmtree(directory, ignore_errors=True)


class WriterFailed(Exception):
    """A writer process failed; ``output`` is what it wrote to stderr."""

    def __init__(self, message, output):
        Exception.__init__(self, message)
        self.output = output


#: What PostgreSQL says when its connection slots are all taken (other
#: users of a shared server): the run is then tried again, a little later.
NO_SLOTS = 'too many clients'


def run_writers_again(kind, procs, txns, attempts=5, pause=10):
    """``run_writers``, tried again when the server had no connection
    slot left for it; any other failure stops the benchmark."""
    import psycopg2
    for attempt in range(attempts):
        try:
            return run_writers(kind, procs, txns)
        except (WriterFailed, psycopg2.OperationalError) as e:
            text = getattr(e, 'output', '') + str(e)
            if NO_SLOTS not in text or attempt == attempts - 1:
                sys.stderr.write(getattr(e, 'output', ''))
                raise SystemExit(str(e))
            print('%s with %d process(es): the server had no connection '
                  'left; again in %d s' % (kind, procs, pause),
                  file=sys.stderr)
            time.sleep(pause)


def run_processes(counts, txns, rounds, storages=tuple(backends.WRITERS)):
    """Every round: for each process count, every storage once, the order
    of the storages turned by one each time (so that neither always runs
    first).  Returns ``{count: [{storage: result} per round]}``."""
    started = time.time()
    out = {c: [] for c in counts}
    turn = 0
    for r in range(rounds):
        for c in counts:
            k = turn % len(storages)
            turn += 1
            order = storages[k:] + storages[:k]
            out[c].append({kind: run_writers_again(kind, c, txns)
                           for kind in order})
            print('round %d/%d, %d process(es) done (%s), %.0f s elapsed'
                  % (r + 1, rounds, c, ' '.join(order),
                     time.time() - started), file=sys.stderr)
    return out


def summarize_processes(storages, per_count):
    """Medians over rounds, per process count and storage; the ratio of
    each storage to the reference (median of the per-round ratios) and
    each storage's scaling (median rate at N processes over the median
    at the fewest)."""
    reference = storages[0]
    counts = sorted(per_count)
    summary = {'reference': reference, 'counts': counts, 'runs': {}}
    for c in counts:
        rounds = per_count[c]
        entry = {}
        for kind in storages:
            rs = [r[kind] for r in rounds]
            rates = [x['rate'] for x in rs]
            e = {'rate': statistics.median(rates), 'rates': rates,
                 'ratio': statistics.median(
                     r[kind]['rate'] / r[reference]['rate'] for r in rounds),
                 'retries': statistics.median(x['retries'] for x in rs),
                 'p50_ms': statistics.median(x['p50_ms'] for x in rs),
                 'p99_ms': statistics.median(x['p99_ms'] for x in rs)}
            if 'lock_held' in rs[0]:
                for key in ('lock_held', 'lock_wait_ms', 'lock_held_ms'):
                    e[key] = statistics.median(x[key] for x in rs)
                e['phases_ms'] = {name: statistics.median(
                    x['phases_ms'][name] for x in rs)
                    for name in rs[0]['phases_ms']}
            entry[kind] = e
        summary['runs'][c] = entry
    base = counts[0]
    for c in counts:
        for kind in storages:
            summary['runs'][c][kind]['scaling'] = (
                summary['runs'][c][kind]['rate']
                / summary['runs'][base][kind]['rate'])
    return summary


def format_processes(storages, summary, txns, nrounds):
    reference = storages[0]
    counts = summary['counts']
    runs = summary['runs']
    base = counts[0]
    lines = [
        'writer processes, each opening the storage itself: transactions '
        'per second over all processes, median of %d round(s); %d '
        'transactions per process (%s in turn, %d%% also change one of %d '
        'shared objects; a conflict is retried); scaling = rate at N '
        'processes / rate at %d' % (
            nrounds, txns, '/'.join(WRITER_MIX),
            round(WRITER_SHARED_FRACTION * 100), WRITER_SHARED, base), '']
    head = ('%-10s%-11s%10s%8s%9s%9s%9s%10s%12s' % (
        'processes', 'storage', 'txn/s', 'ratio', 'scaling', 'retries',
        'p50 ms', 'p99 ms', 'lock held'))
    lines += [head, '-' * len(head)]
    for c in counts:
        for kind in storages:
            e = runs[c][kind]
            held = ('%.0f%% %.1fms' % (e['lock_held'] * 100,
                                      e['lock_held_ms'])
                    if 'lock_held' in e else '')
            lines.append('%-10d%-11s%10.1f%8.2f%9.2f%9g%9.2f%10.2f%12s' % (
                c, kind, e['rate'], e['ratio'], e['scaling'], e['retries'],
                e['p50_ms'], e['p99_ms'], held))
    lines.append('')
    for kind in storages[1:]:
        lines.append('ratio %s/%s: ' % (kind, reference) + ', '.join(
            '%d proc %.2f' % (c, runs[c][kind]['ratio']) for c in counts))
    for kind in storages:
        lines.append('scaling %s: ' % kind + ', '.join(
            '%d proc %.2f' % (c, runs[c][kind]['scaling']) for c in counts))
    if any('lock_held' in runs[c][k] for c in counts for k in storages):
        lines.append('lock held = share of the run\'s time some process held '
                     'the shared composite\'s commit lock (tpc_begin to the '
                     'end of tpc_finish), and its mean per commit')
        labels = [(name, label) for _, name, label
                  in CommitLockTimer.phase_methods()]
        for kind in storages:
            for c in counts:
                e = runs[c][kind]
                if 'lock_held' not in e:
                    continue
                ph = e['phases_ms']
                lines.append(
                    '%s, %d proc, ms per commit: lock wait %.1f, held %.1f ='
                    ' %s, other %.1f' % (
                        kind, c, e['lock_wait_ms'], e['lock_held_ms'],
                        ', '.join('%s %.1f' % (label, ph[name])
                                  for name, label in labels),
                        e['lock_held_ms'] - sum(ph.values())))
    return '\n'.join(lines)


def _parser():
    parser = argparse.ArgumentParser(
        description='Benchmark compositestorage against FileStorage and a '
                    'ZODB multi-database (zodbshootout-style workloads); '
                    'with --postgresql, composites with PostgreSQL '
                    'children against plain RelStorage on PostgreSQL; '
                    'with --zeo, composites served by ZEO against '
                    'FileStorage served by ZEO.',
        epilog='Workloads: %s. See the module docstring for what each '
               'storage does in each workload.' % ', '.join(WORKLOADS))
    parser.add_argument('-n', type=int, default=None,
                        help='objects per bulk workload (default 20000); '
                             'with --processes, transactions per writer '
                             'process (default %d)' % WRITER_TXNS)
    parser.add_argument('--rounds', type=int, default=None,
                        help='rounds; each runs every storage once in a '
                             'fresh process (default 5; with --processes, '
                             '3)')
    parser.add_argument('--repeat', type=int, default=2,
                        help='runs of the whole set of workloads in each '
                             'round; each storage keeps its quickest run of '
                             'each workload (default 2)')
    parser.add_argument('--transactions', type=int, default=SMALL_TXNS,
                        help='transactions of each small workload (default '
                             '%d)' % SMALL_TXNS)
    parser.add_argument('--quick', action='store_true',
                        help='shorthand for -n 200 --rounds 1 --repeat 1')
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument('--postgresql', action='store_true',
                      help='run %s instead: plain RelStorage on one fresh '
                           'PostgreSQL database (the reference), a '
                           'composite of a FileStorage primary and a '
                           'PostgreSQL secondary, and one of two PostgreSQL '
                           'children; every database is made for the run '
                           'and dropped after it (server: '
                           'COMPOSITE_PG_HOST, COMPOSITE_PG_PORT, '
                           'COMPOSITE_PG_USER; default 127.0.0.1:5432, '
                           'postgres)' % ','.join(MODES['postgresql']))
    mode.add_argument('--zeo', action='store_true',
                      help='run %s instead: FileStorage served by ZEO (the '
                           'reference), a composite of two FileStorages '
                           'served by ZEO, and the same with round-robin '
                           'placement; each a runzeo process of its own on '
                           '127.0.0.1' % ','.join(MODES['zeo']))
    mode.add_argument('--processes', default=None, metavar='P,P...',
                      help='run many writer processes instead, one run '
                           'per number given (e.g. 1,2,4): each process '
                           'opens the storage itself from a configuration '
                           'and runs -n small transactions (one-partition, '
                           'two-partition and adds in turn) on objects of '
                           'its own, retrying conflicts; plain RelStorage on '
                           'one PostgreSQL database (pg, the reference) '
                           'against a shared composite of two PostgreSQL '
                           'children (pg-shared).  Reports transactions per '
                           'second over all processes, the ratio to pg and '
                           'the scaling from the fewest processes')
    parser.add_argument('--clients', default=None, metavar='C,C...',
                        help='with --zeo: the numbers of concurrent client '
                             'processes, one run each (default 1,4)')
    parser.add_argument('--storages', default=None,
                        help='comma-separated subset of the mode\'s '
                             'storages (default %s; the first is always '
                             'run: ratios are to it)' % ','.join(STORAGES))
    parser.add_argument('--zconfig', action='append', default=[],
                        metavar='FILE',
                        help='also benchmark the storage this ZConfig file '
                             'describes (repeatable; run like the '
                             'reference; not with --zeo)')
    parser.add_argument('--json', metavar='FILE',
                        help='write all results, per-round raw figures '
                             'included, to FILE')
    parser.add_argument('--profile', metavar='STORAGE',
                        help='run every workload once on STORAGE in this '
                             'process under cProfile and print where the '
                             'time went (the 30 costliest functions)')
    parser.add_argument('--overlay', action='store_true',
                        help='only measure the read cost of an overlaid '
                             'object against the same object stored whole '
                             '(N objects) and print the ratio')
    parser.add_argument('--worker', metavar='STORAGE', help=argparse.SUPPRESS)
    parser.add_argument('--databases', help=argparse.SUPPRESS)
    parser.add_argument('--address', help=argparse.SUPPRESS)
    parser.add_argument('--client', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--writer', metavar='STORAGE', help=argparse.SUPPRESS)
    parser.add_argument('--config', help=argparse.SUPPRESS)
    parser.add_argument('--proc', type=int, help=argparse.SUPPRESS)
    return parser


def _process_counts(parser, args):
    try:
        counts = [int(c) for c in args.processes.split(',') if c.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        parser.error('--processes takes numbers >= 1, e.g. 1,2,4')
    return sorted(set(counts))


def main_processes(parser, args):
    """``--processes``: many writer processes on each storage."""
    counts = _process_counts(parser, args)
    if args.n < 1 or args.rounds < 1:
        parser.error('need -n >= 1 and --rounds >= 1')
    if args.storages or args.zconfig:
        parser.error('--processes runs %s; no --storages or --zconfig'
                     % ','.join(backends.WRITERS))
    missing = backends.postgres_unavailable()
    if missing:
        raise SystemExit('bench.py: ' + missing.replace(
            '--postgresql', '--processes'))
    storages = list(backends.WRITERS)
    started = time.time()
    per_count = run_processes(counts, args.n, args.rounds, storages)
    summary = summarize_processes(storages, per_count)
    print(format_processes(storages, summary, args.n, args.rounds))
    wall = time.time() - started
    print('\nwall time %.1f s' % wall)
    if args.json:
        out = {'mode': 'processes', 'storages': storages,
               'reference': storages[0], 'counts': counts,
               'transactions_per_process': args.n, 'rounds': args.rounds,
               'python': sys.version, 'wall_seconds': wall,
               'summary': summary,
               'raw': {str(c): per_count[c] for c in counts}}
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=1)
    return 0


def _storages(parser, args, mode):
    """The storages to run, the mode's reference first, then zconfigs."""
    known = MODES[mode]
    storages = ([s.strip() for s in args.storages.split(',') if s.strip()]
                if args.storages else list(known))
    for s in storages:
        if s not in known:
            parser.error('unknown storage %r (this mode has %s)'
                         % (s, ', '.join(known)))
    storages = [known[0]] + [s for s in storages if s != known[0]]
    zconfigs = {}
    for path in args.zconfig:
        name = 'zconfig:' + os.path.splitext(os.path.basename(path))[0]
        while name in zconfigs:
            name += "'"
        zconfigs[name] = os.path.abspath(path)
        storages.append(name)
    return storages, zconfigs


def _client_counts(parser, args):
    if args.clients is None:
        return [1, 4] if args.zeo else [1]
    if not args.zeo:
        parser.error('--clients needs --zeo')
    try:
        counts = [int(c) for c in args.clients.split(',') if c.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        parser.error('--clients takes numbers >= 1, e.g. 1,4')
    return counts


def run(storages, zconfigs, args, clients=1):
    """Every round of one run; prints progress, returns the rounds."""
    started = time.time()
    rounds = []
    others = storages[1:]
    for r in range(args.rounds):
        k = r % len(others) if others else 0
        order = others[k:] + others[:k]
        rounds.append(run_round(order, args.n, zconfigs, args.repeat,
                                reference=storages[0], clients=clients,
                                txns=args.transactions))
        print('round %d/%d done (%s %s %s), %.0f s elapsed'
              % (r + 1, args.rounds, storages[0], ' '.join(order),
                 again(storages[0]), time.time() - started),
              file=sys.stderr)
    return rounds


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.n is None:
        args.n = WRITER_TXNS if (args.processes or args.writer) else 20000
    if args.rounds is None:
        args.rounds = 3 if args.processes else 5
    if args.quick:
        args.n, args.rounds, args.repeat = 200, 1, 1

    if args.writer:
        serve_writer(args.writer, args.config, args.proc, args.n)
        return 0
    if args.processes is not None:
        return main_processes(parser, args)

    if args.overlay:
        whole, overlaid, ratio = overlay_read_ratio(args.n)
        print('overlay reads: %d objects, stored whole %.1f us each, '
              'overlaid %.1f us each: %.2fx' % (
                  args.n, whole / args.n * 1e6, overlaid / args.n * 1e6,
                  ratio))
        return 0
    if (args.n < 2 or args.rounds < 1 or args.repeat < 1
            or args.transactions < 1):
        parser.error('need -n >= 2, --rounds >= 1, --repeat >= 1 and '
                     '--transactions >= 1')

    if args.profile:
        return profile(args.profile, args.n, args.zconfig)

    if args.worker:
        zconfig = os.path.abspath(args.zconfig[0]) if args.zconfig else None
        databases = args.databases.split(',') if args.databases else ()
        serve_worker(args.worker, args.n, zconfig, args.repeat,
                     args.transactions, databases=databases,
                     address=args.address,
                     client=args.client)
        return 0

    mode = ('postgresql' if args.postgresql else
            'zeo' if args.zeo else 'files')
    if args.zeo and args.zconfig:
        parser.error('--zconfig storages are not served: not with --zeo')
    counts = _client_counts(parser, args)
    storages, zconfigs = _storages(parser, args, mode)
    if mode == 'postgresql':
        missing = (backends.postgres_unavailable()
                   or backends.postgres_too_many(args.n))
        if missing:
            raise SystemExit('bench.py: ' + missing)

    started = time.time()
    runs = []
    for clients in counts:
        rounds = run(storages, zconfigs, args, clients)
        summary = summarize(storages, rounds)
        if runs:
            print()
        print(format_table(storages, summary, args.n, args.rounds,
                           args.repeat, clients))
        runs.append({'clients': clients, 'summary': summary, 'raw': rounds})
    wall = time.time() - started
    print('\nwall time %.1f s' % wall)
    if args.json:
        out = {'n': args.n, 'rounds': args.rounds, 'repeat': args.repeat,
               'mode': mode, 'storages': storages,
               'reference': storages[0],
               'workloads': list(WORKLOADS),
               'small_transactions': args.transactions,
               'python': sys.version, 'wall_seconds': wall,
               'zconfig': zconfigs, 'summary': runs[0]['summary'],
               'raw': runs[0]['raw'], 'runs': runs}
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
