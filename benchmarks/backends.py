"""What a benchmarked storage needs outside its worker process.

``bench.py --postgresql`` runs storages whose data lives in PostgreSQL:
each worker gets databases made fresh for it and dropped after it, with
the helpers the tests use (``tests/relstorage_engines.py``), so that the
benchmark and the tests make, configure and drop databases one way.
``bench.py --zeo`` runs storages served by ZEO: each contender gets its
own ``runzeo`` process on a free port of 127.0.0.1, on fresh files, and
its client workers connect to it.  The driver makes these backings; the
workers only open what they are told to.
"""
import contextlib
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Storages on PostgreSQL, the reference first: plain RelStorage on one
#: database; a composite of a FileStorage primary and a PostgreSQL
#: secondary; a composite of two PostgreSQL children (its journal a file).
#: Each maps to the number of databases it needs.
POSTGRES = {'pg': 1, 'fs+pg': 1, 'pg+pg': 2}

#: Storages of ``--processes`` (many writer processes, each opening the
#: storage itself from a configuration), the reference first: plain
#: RelStorage on one database; a *shared* composite of two PostgreSQL
#: children (no journal key, so ``shared auto`` makes it an
#: ``IMVCCStorage`` that every process opens directly).
WRITERS = {'pg': 1, 'pg-shared': 2}

#: Storages served by ZEO, the reference first: FileStorage; a composite
#: of two FileStorages with everything in the primary; the same with
#: round-robin placement, so that about half of all references cross.
ZEO = ('zeo-fs', 'zeo-composite', 'zeo-roundrobin')


def engines():
    """``tests/relstorage_engines.py``, the one place that makes, sizes
    and drops PostgreSQL databases and writes ``<relstorage>`` sections."""
    tests = os.path.join(ROOT, 'tests')
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import relstorage_engines
    return relstorage_engines


def postgres_unavailable():
    """``None`` when a PostgreSQL server answers, else a message that says
    what is missing and how to point the benchmark at a server."""
    eng = engines()
    reason = eng.postgres_available()
    if reason is None:
        return None
    return ('--postgresql needs a PostgreSQL server: %s.  Start one, or '
            'set COMPOSITE_PG_HOST, COMPOSITE_PG_PORT and COMPOSITE_PG_USER '
            '(trust authentication; the user must be allowed to create '
            'databases).' % reason.rstrip('.'))


def postgres_too_many(n):
    """``None`` when a commit of ``n`` changed objects fits in the
    server's lock table (RelStorage takes a lock per changed object, and
    ``update`` changes N objects in one commit), else what to do."""
    slots = engines().postgres_lock_slots()
    if n <= slots * 3 // 4:    # other sessions of the server lock too
        return None
    return ('-n %d is too many for this PostgreSQL server: RelStorage '
            'takes a lock per object a commit changes, and the server\'s '
            'lock table holds %d (max_locks_per_transaction x '
            '(max_connections + max_prepared_transactions)).  Use -n %d '
            'or less, or raise max_locks_per_transaction.'
            % (n, slots, slots * 3 // 4))


def postgres_config(kind, directory, databases):
    """The ZConfig text of a PostgreSQL storage ``kind`` whose databases
    are ``databases`` and whose files (a FileStorage primary, the
    journal) go in ``directory``."""
    eng = engines()
    child = [eng.child_section('postgresql', name) for name in databases]
    if kind == 'pg':
        return '%import relstorage\n' + child[0]
    if kind == 'fs+pg':
        return eng.composite_config(pathlib.Path(directory),
                                    [('other', 1, child[0])])
    if kind in ('pg+pg', 'pg-shared'):
        return eng.composite_config(
            pathlib.Path(directory),
            [('main', 0, child[0]), ('other', 1, child[1])],
            primary_file=False, journal=(kind == 'pg+pg'))
    raise ValueError('not a PostgreSQL storage: %r' % kind)


class NoBacking:
    """A storage whose worker makes all it needs in its own directory."""

    def worker_args(self):
        return []

    def describe(self):
        """What was made for the storage, for the JSON report."""
        return {}

    def disk_bytes(self):
        return None

    def close(self):
        pass


class Databases(NoBacking):
    """Fresh PostgreSQL databases for one worker, dropped on close."""

    def __init__(self, kind):
        self._stack = contextlib.ExitStack()
        eng = engines()
        count = POSTGRES[kind] if kind in POSTGRES else WRITERS[kind]
        self.names = [self._stack.enter_context(eng.postgres_database())
                      for _ in range(count)]

    def worker_args(self):
        return ['--databases', ','.join(self.names)]

    def describe(self):
        return {'databases': list(self.names)}

    def disk_bytes(self):
        size = engines().postgres_database_size
        return sum(size(name) for name in self.names)

    def close(self):
        self._stack.close()


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def zeo_conf(kind, directory, port):
    """A ``runzeo`` configuration serving ``kind`` from ``directory``."""
    head = '<zeo>\n  address 127.0.0.1:%d\n</zeo>\n' % port
    if kind == 'zeo-fs':
        return head + ('<filestorage 1>\n  path %s\n</filestorage>\n'
                       % os.path.join(directory, 'main.fs'))
    parts = ''.join(
        '  <partition %s>\n    prefix %d\n    <filestorage>\n'
        '      path %s\n    </filestorage>\n  </partition>\n'
        % (name, prefix, os.path.join(directory, name + '.fs'))
        for name, prefix in (('main', 0), ('other', 1)))
    placement = {'zeo-composite': 'default',
                 'zeo-roundrobin': 'round-robin'}[kind]
    return ('%%import compositestorage\n%s<compositestorage 1>\n'
            '  placement %s\n%s</compositestorage>\n'
            % (head, placement, parts))


class ZEOServer(NoBacking):
    """A ``runzeo`` process serving one storage on fresh files.

    Before any client runs, the root gets one ``PersistentMapping`` per
    client (``client0`` ...), so that concurrent clients never change
    the same object and never conflict.
    """

    def __init__(self, kind, clients, timeout=60):
        self.dir = tempfile.mkdtemp(prefix='csbench-zeo-')
        self.port = free_port()
        conf = os.path.join(self.dir, 'zeo.conf')
        with open(conf, 'w') as f:
            f.write(zeo_conf(kind, self.dir, self.port))
        self.log = open(os.path.join(self.dir, 'server.log'), 'w+')
        self.proc = subprocess.Popen(
            [sys.executable, '-m', 'ZEO.runzeo', '-C', conf],
            cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait(timeout)
            self._make_homes(clients)
        except BaseException:
            self.close()
            raise

    @property
    def address(self):
        return '127.0.0.1:%d' % self.port

    def _wait(self, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit('the ZEO server (%s) exited:\n%s'
                                 % (self.dir, self.log.read()))
            try:
                socket.create_connection(('127.0.0.1', self.port),
                                         0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit('the ZEO server did not listen on %s within %d s'
                         % (self.address, timeout))

    def _make_homes(self, clients):
        import transaction
        import ZEO
        from persistent.mapping import PersistentMapping
        db = ZEO.DB(('127.0.0.1', self.port))
        try:
            tm = transaction.TransactionManager(explicit=True)
            conn = db.open(tm)
            tm.begin()
            for i in range(clients):
                conn.root()[client_home(i)] = PersistentMapping()
            tm.commit()
            conn.close()
        finally:
            db.close()

    def worker_args(self):
        return ['--address', self.address]

    def describe(self):
        return {'address': self.address}

    def disk_bytes(self):
        total = 0
        for name in os.listdir(self.dir):
            if name.endswith('.fs'):
                total += os.path.getsize(os.path.join(self.dir, name))
        return total

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def client_home(i):
    """The root key of served client ``i``'s own mapping."""
    return 'client%d' % i


def backing(kind, clients=1):
    """What ``kind`` needs outside its workers, made fresh."""
    if kind in POSTGRES:
        return Databases(kind)
    if kind in ZEO:
        return ZEOServer(kind, clients)
    return NoBacking()
