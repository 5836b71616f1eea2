"""A mixed composite behind ZEO: a FileStorage primary, a PostgreSQL
secondary and an SQLite one, served by ``compositestorage serve`` (ZEO's
own runzeo server, in a process of its own).

Two ZEO clients, each with its own ``ClientStorage`` and ``DB``, move
amounts between counters that live in different partitions, at the same
time, retrying on conflicts.  Each transaction touches two partitions.
Afterwards every counter holds exactly what the committed moves say, both
clients read the same values, and ``verify`` on the config, with the
server stopped, is clean.
"""
import random
import threading

import BTrees.Length
import persistent.mapping
import pytest
import transaction
import ZEO
import ZODB
from ZODB.POSException import ConflictError

from compositestorage import placement
from compositestorage.cli import main as cli_main

from relstorage_engines import child_section
from relstorage_engines import composite_config
from relstorage_engines import open_config
from relstorage_engines import postgres_database

#: partition name -> (prefix, child kind); main is a FileStorage
PARTS = {'main': 0, 'pg': 1, 'lite': 2}
PER_PARTITION = 2           # counters in each partition
START = 1000                # each counter's first value
MOVES = 25                  # committed moves per client
CLIENTS = 2


def counter_names():
    return ['%s%d' % (name, i) for name in PARTS
            for i in range(PER_PARTITION)]


@pytest.fixture
def config(tmp_path):
    """``(zeo.conf, composite config)`` of the mixed composite, seeded with
    the counters, each in its partition (placement is the coordinator's:
    a ZEO client cannot choose it)."""
    with postgres_database() as dbname:
        children = [
            ('pg', PARTS['pg'], child_section('postgresql', dbname, True)),
            ('lite', PARTS['lite'],
             child_section('sqlite', str(tmp_path / 'lite-sqlite'), True))]
        text = composite_config(tmp_path, children)
        local = tmp_path / 'composite.conf'
        local.write_text(text)
        storage = open_config(text)
        db = ZODB.DB(storage)
        conn = db.open()
        root = conn.root()
        root['counters'] = counters = persistent.mapping.PersistentMapping()
        root['lengths'] = lengths = persistent.mapping.PersistentMapping()
        for name in PARTS:
            with placement(conn, name):
                for i in range(PER_PARTITION):
                    counters['%s%d' % (name, i)] = \
                        persistent.mapping.PersistentMapping(n=START)
                lengths[name] = BTrees.Length.Length()
                transaction.commit()
        assert {lengths[name]._p_oid[0] for name in PARTS} == set(
            PARTS.values())
        homes = {key: counters[key]._p_oid[0] for key in counters}
        db.close()
        assert homes == {key: PARTS[key[:-1]] for key in counter_names()}
        zeo = tmp_path / 'zeo.conf'
        zeo.write_text(text.replace(
            '<compositestorage>',
            '<zeo>\n  address 127.0.0.1:0\n</zeo>\n<compositestorage 1>', 1))
        yield zeo, local


def mover(address, seed, committed, conflicts, errors):
    """Commit MOVES moves between counters of two partitions, each
    retried until it commits; record each committed one, and count the
    conflicts."""
    rnd = random.Random(seed)
    db = ZEO.DB(address, wait_timeout=30)
    tm = transaction.TransactionManager()
    conn = db.open(tm)
    names = counter_names()
    try:
        while len(committed) < MOVES:
            src = rnd.choice(names)
            dst = rnd.choice([n for n in names if n[:-1] != src[:-1]])
            amount = rnd.randint(1, 9)
            while True:
                try:
                    tm.begin()
                    counters = conn.root()['counters']
                    counters[src]['n'] -= amount
                    counters[dst]['n'] += amount
                    tm.commit()
                    break
                except ConflictError:
                    tm.abort()
                    conflicts.append(src)
            committed.append((src, dst, amount))
    except Exception as e:     # pragma: no cover - reported by the test
        errors.append(e)
        tm.abort()
    finally:
        db.close()


def read_counters(address):
    db = ZEO.DB(address, wait_timeout=30, server_sync=True)
    try:
        conn = db.open()
        conn.sync()
        return {name: c['n'] for name, c in conn.root()['counters'].items()}
    finally:
        db.close()


def test_two_clients_move_counters_between_partitions(config, serving,
                                                      capsys, tmp_path):
    zeo, local = config
    served = serving(['--config', zeo], tmp_path, len(PARTS))
    address = (served.host, served.port)
    committed = [[] for _ in range(CLIENTS)]
    conflicts = []
    errors = []
    threads = [threading.Thread(target=mover,
                                args=(address, seed, committed[seed],
                                      conflicts, errors))
               for seed in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert [len(c) for c in committed] == [MOVES] * CLIENTS
    # two clients over six counters collide, about 20 times a run: the
    # retried conflicts were ConflictErrors, from every kind of child
    assert conflicts

    expected = dict.fromkeys(counter_names(), START)
    for moves in committed:
        for src, dst, amount in moves:
            expected[src] -= amount
            expected[dst] += amount
    assert expected != dict.fromkeys(counter_names(), START)
    seen = [read_counters(address) for _ in range(CLIENTS)]
    assert seen[0] == seen[1] == expected
    assert sum(seen[0].values()) == START * len(expected)

    assert served.stop() == 0
    capsys.readouterr()
    assert cli_main(['verify', '--strict', '-q', str(zeo)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == 'ok'
    for name in PARTS:
        # its counters and Length; main: the root and two mappings too
        assert '%s: %d objects' % (name, PER_PARTITION + 1 + (
            3 if name == 'main' else 0)) in out
    # the children agree with the clients, opened here
    storage = open_config(local.read_text())
    db = ZODB.DB(storage)
    try:
        counters = db.open().root()['counters']
        assert {k: c['n'] for k, c in counters.items()} == expected
    finally:
        db.close()


def test_a_stale_write_conflicts_and_a_resolvable_one_resolves(
        config, serving, tmp_path):
    """Client B writes what it read before client A's commit: in every
    partition that is a ``ConflictError`` (not RelStorage's
    ``CacheConsistencyError``), and B's retry commits; two concurrent
    increments of a ``BTrees.Length`` are resolved by the server, in
    every partition, to both increments."""
    zeo, _ = config
    served = serving(['--config', zeo], tmp_path, len(PARTS))
    address = (served.host, served.port)
    dbs = [ZEO.DB(address, wait_timeout=30, server_sync=True)
           for _ in range(2)]
    try:
        (tm_a, tm_b) = tms = [transaction.TransactionManager() for _ in dbs]
        conn_a, conn_b = [db.open(tm) for db, tm in zip(dbs, tms)]
        for name in PARTS:
            key = name + '0'
            # a stale write to an object without a resolver
            tm_a.begin()
            tm_b.begin()                    # B's snapshot: before A's
            b = conn_b.root()['counters'][key]
            assert b['n'] == START
            conn_a.root()['counters'][key]['n'] += 1
            tm_a.commit()
            b['n'] += 10
            with pytest.raises(ConflictError) as caught:
                tm_b.commit()
            assert caught.value.oid == b._p_oid, name
            tm_b.abort()
            conn_b.root()['counters'][key]['n'] += 10
            tm_b.commit()
            # a stale write that the Length's resolver merges
            tm_a.begin()
            tm_b.begin()
            length = conn_b.root()['lengths'][name]
            assert length() == 0
            conn_a.root()['lengths'][name].change(1)
            tm_a.commit()
            length.change(1)
            tm_b.commit()                   # resolved by the server
            for tm, conn in zip(tms, (conn_a, conn_b)):
                tm.begin()
                assert conn.root()['counters'][key]['n'] == START + 11
                assert conn.root()['lengths'][name]() == 2
    finally:
        for db in dbs:
            db.close()
