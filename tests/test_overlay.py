"""Overlay partitions (issue 15): split on store, merge on load, a
read-only base, and concurrent changes to the two parts of one object."""
import threading

import pytest
import transaction
import ZODB
from ZODB.FileStorage import FileStorage
from ZODB.POSException import ConflictError
from ZODB.POSException import ReadOnlyError
from ZODB.utils import z64

from compositestorage.overlay import OverlayStateError
from conftest import child_records
from conftest import new_tm
from conftest import open_composite
from conftest import paths_for
from conftest import unpickle_record
from overlay_classes import Counter
from overlay_classes import Page
from overlay_classes import Slotted

PARTS = (('main', 0), ('local', 1))
RULES = 'hits last_seen workflow_* overlay_classes.Slotted:title'
OVERLAYS = {'local': ('main', RULES)}


def open_overlaid(tmp_path, closing, read_only_partitions=(), **kw):
    paths = paths_for(tmp_path, PARTS)
    storage = open_composite(paths, PARTS, overlays=OVERLAYS,
                             read_only_partitions=read_only_partitions, **kw)
    closing(storage)
    db = ZODB.DB(storage)
    closing(db)
    return db, storage, paths


def states(path):
    """``{oid: (class, state)}`` of every current record in a child file,
    read by a plain ZODB unpickler."""
    return {oid: unpickle_record(data)
            for oid, data in child_records(path).items()}


@pytest.fixture
def overlaid(tmp_path, closing):
    return open_overlaid(tmp_path, closing)


def add_page(db, **attrs):
    conn = db.open()
    page = Page()
    for name, value in attrs.items():
        setattr(page, name, value)
    conn.root()['page'] = page
    transaction.commit()
    oid = page._p_oid
    conn.close()
    return oid


def test_store_splits_and_load_merges(overlaid, closing, tmp_path):
    db, storage, paths = overlaid
    oid = add_page(db, title='Home', hits=3, workflow_state='draft')
    assert oid[0] == 0
    # each child holds its part
    main = FileStorage(paths['main'], read_only=True)
    local = FileStorage(paths['local'], read_only=True)
    try:
        from conftest import unpickle_record as read
        klass, state = read(main.load(oid)[0])
        assert state == {'title': 'Home'}
        odata = local.load(oid)[0]
        klass, ostate = read(odata)
        assert ostate['dict'] == {'hits': 3, 'workflow_state': 'draft'}
        assert ostate['home'] == 'main'
        assert (ostate['module'], ostate['name']) == ('overlay_classes',
                                                     'Page')
    finally:
        main.close()
        local.close()
    # a new connection (no cache) sees the merged object
    conn = db.open()
    page = conn.root()['page']
    assert (page.title, page.hits, page.workflow_state) == ('Home', 3,
                                                            'draft')
    conn.close()
    db.close()
    storage2 = open_composite(paths, PARTS, overlays=OVERLAYS)
    closing(storage2)
    db2 = ZODB.DB(storage2)
    closing(db2)
    page = db2.open().root()['page']
    assert page.__getstate__() == {'title': 'Home', 'hits': 3,
                                   'workflow_state': 'draft'}


def test_store_writes_only_the_part_that_changed(overlaid):
    db, storage, paths = overlaid
    oid = add_page(db, title='Home', hits=0)
    main_tid = storage.partition_named('main').storage.getTid(oid)
    local_tid = storage.partition_named('local').storage.getTid(oid)
    conn = db.open()
    page = conn.root()['page']
    page.hits += 1
    transaction.commit()
    assert storage.partition_named('main').storage.getTid(oid) == main_tid
    new_local = storage.partition_named('local').storage.getTid(oid)
    assert new_local > local_tid
    # the serial ZODB sees is the newer of the two records
    assert page._p_serial == new_local == storage.load(oid)[1]
    page.title = 'Start'
    transaction.commit()
    assert storage.partition_named('main').storage.getTid(oid) > new_local
    assert storage.partition_named('local').storage.getTid(oid) == new_local
    assert storage.load(oid)[1] == page._p_serial
    conn.close()


def test_dict_plus_slots_round_trip(overlaid):
    db, storage, paths = overlaid
    conn = db.open()
    obj = Slotted()
    obj.hits = 5            # a slot, kept by the overlay (every class)
    obj.title = 'T'         # a slot, kept by the overlay (per class rule)
    obj.note = 'n'          # in __dict__, kept by the home
    conn.root()['s'] = obj
    transaction.commit()
    oid = obj._p_oid
    conn.close()
    main = storage.partition_named('main').storage
    from conftest import unpickle_record as read
    assert read(main.load(oid)[0])[1] == ({'note': 'n'}, {})
    conn = db.open()
    obj = conn.root()['s']
    assert (obj.hits, obj.title, obj.note) == (5, 'T', 'n')
    obj.hits = 6
    transaction.commit()
    conn.close()
    conn = db.open()
    assert conn.root()['s'].hits == 6
    conn.close()


def test_per_class_rule_applies_to_that_class_only(overlaid):
    db, storage, paths = overlaid
    oid = add_page(db, title='Home')
    main = storage.partition_named('main').storage
    from conftest import unpickle_record as read
    assert read(main.load(oid)[0])[1] == {'title': 'Home'}


def test_references_in_the_overlay_part(overlaid):
    """An overlay attribute referring to another object: the overlay's
    child keeps a stub for it, and the reference comes back."""
    db, storage, paths = overlaid
    conn = db.open()
    root = conn.root()
    page, other = Page(), Page()
    other.title = 'other'
    page.title = 'p'
    page.last_seen = other          # a reference from the overlay part
    root['page'], root['other'] = page, other
    transaction.commit()
    conn.close()
    conn = db.open()
    page = conn.root()['page']
    assert page.last_seen is conn.root()['other']
    assert page.last_seen.title == 'other'
    # both objects overlaid: the overlay record of one is the stub the
    # other's overlay record refers through
    other = conn.root()['other']
    other.hits = 9
    transaction.commit()
    conn.close()
    conn = db.open()
    assert conn.root()['page'].last_seen.hits == 9
    conn.close()


def test_a_state_that_is_not_a_dict_is_refused_by_name(tmp_path, closing):
    paths = paths_for(tmp_path, PARTS)
    storage = open_composite(paths, PARTS, overlays={
        'local': ('main', 'hits overlay_classes.Counter:value')})
    closing(storage)
    db = ZODB.DB(storage)
    closing(db)
    conn = db.open()
    conn.root()['c'] = Counter(1)
    with pytest.raises(OverlayStateError) as e:
        transaction.commit()
    transaction.abort()
    message = str(e.value)
    assert "'main'" in message and 'overlay_classes.Counter' in message
    assert 'list' in message and 'not a dict' in message


def test_a_state_that_is_not_a_dict_without_rules_is_stored_whole(
        overlaid):
    db, storage, paths = overlaid
    conn = db.open()
    conn.root()['c'] = Counter(7)
    transaction.commit()
    conn.close()
    conn = db.open()
    assert conn.root()['c'].value == 7
    conn.close()


# --- a read-only base ---------------------------------------------------------

@pytest.fixture
def vendor(tmp_path):
    """A base written once, as a vendor ships it: then opened read-only."""
    paths = paths_for(tmp_path, PARTS)
    storage = FileStorage(paths['main'])
    db = ZODB.DB(storage)
    conn = db.open()
    page = Page()
    page.title = 'Vendor page'
    page.hits = 100                 # shipped value of an overlay attribute
    conn.root()['page'] = page
    transaction.commit()
    db.close()
    return paths


def open_site(paths, closing):
    storage = open_composite(paths, PARTS, overlays=OVERLAYS,
                             read_only_children=('main',),
                             default_partition='local')
    closing(storage)
    db = ZODB.DB(storage)
    closing(db)
    return db, storage


def test_read_only_base_keeps_local_attributes(vendor, closing):
    db, storage = open_site(vendor, closing)
    with open(vendor['main'], 'rb') as f:
        before = f.read()
    conn = db.open()
    page = conn.root()['page']
    assert page.hits == 100         # the base's value, until changed here
    page.hits += 1
    page.workflow_state = 'published'
    transaction.commit()
    conn.close()
    conn = db.open()
    page = conn.root()['page']
    assert (page.title, page.hits, page.workflow_state) == (
        'Vendor page', 101, 'published')
    conn.close()
    with open(vendor['main'], 'rb') as f:
        assert f.read() == before


def test_read_only_base_refuses_its_part_naming_attributes(vendor, closing):
    db, storage = open_site(vendor, closing)
    conn = db.open()
    page = conn.root()['page']
    page.title = 'Changed'
    page.author = 'me'
    page.hits = 5
    with pytest.raises(ReadOnlyError) as e:
        transaction.commit()
    transaction.abort()
    message = str(e.value)
    assert "'author', 'title'" in message
    assert "'hits'" not in message
    assert "partition 'main' is read-only" in message
    assert 'overlay-attributes' in message
    conn.close()
    conn = db.open()
    page = conn.root()['page']
    assert (page.title, page.hits) == ('Vendor page', 100)
    conn.close()


def test_deleting_a_base_attribute_in_a_read_only_base_is_refused(
        vendor, closing):
    db, storage = open_site(vendor, closing)
    conn = db.open()
    page = conn.root()['page']
    del page.hits       # an overlay attribute the base holds
    with pytest.raises(ReadOnlyError) as e:
        transaction.commit()
    transaction.abort()
    assert "'hits'" in str(e.value)


def test_unchanged_store_on_a_read_only_base_is_not_refused(vendor, closing):
    db, storage = open_site(vendor, closing)
    conn = db.open()
    page = conn.root()['page']
    page._p_changed = True
    transaction.commit()
    conn.close()


# --- concurrent changes -------------------------------------------------------

@pytest.mark.parametrize('newer', ['home', 'overlay'])
@pytest.mark.parametrize('first', ['home', 'overlay'])
def test_two_connections_change_the_two_parts_at_once(overlaid, newer,
                                                      first):
    """Whichever part holds the newer record (the serial ZODB sees) and
    whichever commits first, both changes are kept."""
    db, storage, paths = overlaid
    add_page(db, title='Home', hits=0)
    conn = db.open()
    if newer == 'home':
        conn.root()['page'].title = 'Home2'
    else:
        conn.root()['page'].hits = 1
    transaction.commit()
    oid = conn.root()['page']._p_oid
    conn.close()
    tids = {name: storage.partition_named(name).storage.getTid(oid)
            for name in ('main', 'local')}
    assert (tids['main'] > tids['local']) == (newer == 'home')
    tm1, tm2 = new_tm(), new_tm()
    c1, c2 = db.open(tm1), db.open(tm2)
    p1, p2 = c1.root()['page'], c2.root()['page']
    assert p1.title == p2.title
    p1.title = 'Changed by one'     # the home's part
    p2.hits = 42                    # the overlay's part
    for tm in ((tm1, tm2) if first == 'home' else (tm2, tm1)):
        tm.commit()                 # no ConflictError: both are kept
    for tm, page in ((tm1, p1), (tm2, p2)):
        # the committer's own copy does not keep the part it read
        tm.begin()
        assert (page.title, page.hits) == ('Changed by one', 42)
    c1.close()
    c2.close()
    conn = db.open()
    page = conn.root()['page']
    assert (page.title, page.hits) == ('Changed by one', 42)
    conn.close()


def test_two_connections_in_threads_many_times(overlaid):
    """Each thread changes only its part, many times, in parallel."""
    db, storage, paths = overlaid
    add_page(db, title='t0', hits=0)
    errors = []

    def work(change):
        tm = new_tm()
        conn = db.open(tm)
        try:
            for i in range(30):
                tm.begin()
                change(conn.root()['page'], i)
                tm.commit()
        except Exception as e:
            errors.append(e)
        finally:
            conn.close()

    def title(page, i):
        page.title = 't%d' % (i + 1)

    def hits(page, i):
        page.hits = page.hits + 1

    threads = [threading.Thread(target=work, args=(f,))
               for f in (title, hits)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    conn = db.open()
    page = conn.root()['page']
    assert (page.title, page.hits) == ('t30', 30)
    conn.close()


def test_two_connections_changing_the_same_part_still_conflict(overlaid):
    db, storage, paths = overlaid
    add_page(db, title='Home', hits=0)
    tm1, tm2 = new_tm(), new_tm()
    c1, c2 = db.open(tm1), db.open(tm2)
    c1.root()['page'].hits = 1
    c2.root()['page'].hits = 2
    tm1.commit()
    with pytest.raises(ConflictError):
        tm2.commit()
    tm2.abort()
    tm1.begin()
    c1.root()['page'].title = 'a'
    tm2.begin()
    c2.root()['page'].title = 'b'
    tm1.commit()
    with pytest.raises(ConflictError):
        tm2.commit()
    tm2.abort()


def test_history_of_a_merged_object_is_consistent(overlaid):
    """loadBefore at every tid gives the state committed then."""
    db, storage, paths = overlaid
    oid = add_page(db, title='a', hits=0)
    conn = db.open()
    page = conn.root()['page']
    seen = []
    for change in ({'hits': 1}, {'title': 'b'}, {'hits': 2},
                   {'title': 'c', 'hits': 3}):
        for k, v in change.items():
            setattr(page, k, v)
        transaction.commit()
        seen.append((page._p_serial, page.title, page.hits))
    conn.close()
    from ZODB.utils import p64, u64
    for tid, title, hits in seen:
        data, start, end = storage.loadBefore(oid, p64(u64(tid) + 1))
        assert start == tid
        state = unpickle_record(data)[1]
        assert (state['title'], state.get('hits')) == (title, hits)
        assert unpickle_record(storage.loadSerial(oid, tid))[1] == state


# --- pack, iteration, undo, history -------------------------------------------

def _held(path):
    return set(child_records(path))


def test_pack_removes_overlay_records_with_their_base_object(overlaid):
    import time
    db, storage, paths = overlaid
    conn = db.open()
    root = conn.root()
    kept, dropped, target = Page(), Page(), Page()
    kept.hits, dropped.hits = 1, 2
    dropped.last_seen = target      # only the overlay part refers to it
    kept.last_seen = None
    root['kept'], root['dropped'] = kept, dropped
    transaction.commit()
    oids = kept._p_oid, dropped._p_oid, target._p_oid
    assert {oids[0], oids[1]} <= _held(paths['local'])
    # the target lives as long as the overlay part that refers to it
    storage.pack(time.time(), None)
    assert set(oids) <= _held(paths['main'])
    assert {oids[0], oids[1]} <= _held(paths['local'])
    del root['dropped']
    transaction.commit()
    time.sleep(0.01)
    storage.pack(time.time(), None)
    main, local = _held(paths['main']), _held(paths['local'])
    assert oids[0] in main and oids[0] in local
    assert oids[1] not in main and oids[1] not in local
    assert oids[2] not in main          # only the dropped overlay held it
    conn.close()
    conn = db.open()
    assert conn.root()['kept'].hits == 1
    conn.close()


def test_iteration_shows_overlaid_objects_merged_once(overlaid, closing):
    db, storage, paths = overlaid
    oid = add_page(db, title='a', hits=1)
    conn = db.open()
    page = conn.root()['page']
    page.hits = 2                   # the overlay's part only
    transaction.commit()
    page.title = 'b'                # the home's part only
    transaction.commit()
    conn.close()
    seen = []
    for txn in storage.iterator():
        for r in txn:
            if r.oid == oid:
                state = unpickle_record(r.data)[1]
                seen.append((state['title'], state['hits']))
    assert seen == [('a', 1), ('a', 2), ('b', 2)]
    # and a plain copy of the composite holds whole objects
    copy = FileStorage(paths['main'] + '.copy')
    copy.copyTransactionsFrom(storage)
    closing(copy)
    assert unpickle_record(copy.load(oid)[0])[1] == {'title': 'b',
                                                      'hits': 2}
    # record_iternext gives the merged current state too
    found, nxt = {}, None
    while True:
        o, tid, data, nxt = storage.record_iternext(nxt)
        found[o] = data
        if nxt is None:
            break
    assert unpickle_record(found[oid])[1] == {'title': 'b', 'hits': 2}


def test_undo_of_an_overlay_only_change(overlaid):
    db, storage, paths = overlaid
    oid = add_page(db, title='a', hits=1)
    conn = db.open()
    conn.root()['page'].hits = 2
    transaction.commit()
    undo_id = storage.undoLog(0, 1)[0]['id']
    conn.close()
    db.undo(undo_id)
    transaction.commit()
    conn = db.open()
    assert conn.root()['page'].hits == 1
    conn.close()


def test_history_of_an_overlaid_object_has_both_parts(overlaid):
    db, storage, paths = overlaid
    oid = add_page(db, title='a', hits=1)
    conn = db.open()
    page = conn.root()['page']
    tids = [page._p_serial]
    for change in ('hits', 'title'):
        setattr(page, change, 5)
        transaction.commit()
        tids.append(page._p_serial)
    conn.close()
    assert [e['tid'] for e in storage.history(oid, 10)] == tids[::-1]


def test_verify_counts_overlay_records_and_finds_no_problem(overlaid):
    from compositestorage.verify import verify
    db, storage, paths = overlaid
    conn = db.open()
    root = conn.root()
    root['a'], root['b'] = Page(), Page()
    root['a'].hits = root['b'].hits = 1
    root['b'].last_seen = Page()    # a stub in the overlay's child
    transaction.commit()
    conn.close()
    problems, counts = verify(storage)
    assert [str(p) for p in problems] == []
    assert counts['local'] == {'objects': 0, 'stubs': 2, 'overlays': 2}


# --- copies and re-validation (overlay-revalidate) --------------------------

COPIED = {'local': ('main', RULES, 'title uid')}


def _copies(path, oid):
    """``(copies, base_serial, dict)`` of the overlay record at ``oid`` in
    the child file at ``path``, read by a plain ZODB unpickler."""
    state = unpickle_record(child_records(path)[oid])[1]
    return state.get('copies'), state.get('base_serial'), state['dict']


def _main_tid(paths, oid):
    fs = FileStorage(paths['main'], read_only=True)
    try:
        return fs.getTid(oid)
    finally:
        fs.close()


def test_copies_follow_a_change_of_the_home(tmp_path, closing):
    """A change to a copied attribute writes the home and refreshes the
    overlay record's copy in the same transaction; a concurrent change to
    the overlay's own attributes is kept, not a conflict."""
    db, storage, paths = open_overlaid(tmp_path, closing)
    db.close()
    storage.close()
    storage = open_composite(paths, PARTS, overlays=COPIED)
    closing(storage)
    db = ZODB.DB(storage)
    closing(db)
    oid = add_page(db, title='Home', uid='u1', hits=1)
    copies, at, own = _copies(paths['local'], oid)
    assert copies == {'title': 'Home', 'uid': 'u1'} and own == {'hits': 1}
    assert at == _main_tid(paths, oid)
    tm1, tm2 = new_tm(), new_tm()
    c1, c2 = db.open(tm1), db.open(tm2)
    c1.root()['page'].uid = 'u2'        # the home's part, copied
    c2.root()['page'].hits = 2          # the overlay's own part
    tm1.commit()
    copies, at, own = _copies(paths['local'], oid)
    assert copies == {'title': 'Home', 'uid': 'u2'} and own == {'hits': 1}
    assert at == _main_tid(paths, oid)
    tm2.commit()                        # no ConflictError
    c1.close()
    c2.close()
    copies, at, own = _copies(paths['local'], oid)
    assert copies == {'title': 'Home', 'uid': 'u2'} and own == {'hits': 2}
    # the home keeps the copied attributes: they are its own
    klass, state = unpickle_record(child_records(paths['main'])[oid])
    assert state == {'title': 'Home', 'uid': 'u2'}
    conn = db.open()
    page = conn.root()['page']
    assert (page.title, page.uid, page.hits) == ('Home', 'u2', 2)
    conn.close()


def test_copies_are_revalidated_when_the_home_moved_elsewhere(
        tmp_path, closing):
    """The home changed behind the composite (a vendor ships a new base):
    a load shows the home's value; the next commit that writes the
    overlay's part finds the home's serial moved, checks the copies and
    updates them."""
    paths = paths_for(tmp_path, PARTS)
    storage = open_composite(paths, PARTS, overlays=COPIED)
    db = ZODB.DB(storage)
    oid = add_page(db, title='Home', uid='u1', hits=1)
    db.close()
    # the base changes on its own, its serial moves
    fs = FileStorage(paths['main'])
    base_db = ZODB.DB(fs)
    conn = base_db.open()
    conn.root()['page'].uid = 'u9'
    transaction.commit()
    base_db.close()
    copies, at, own = _copies(paths['local'], oid)
    assert copies['uid'] == 'u1' and at != _main_tid(paths, oid)
    storage = open_composite(paths, PARTS, overlays=COPIED,
                             read_only_children=('main',))
    closing(storage)
    db = ZODB.DB(storage)
    closing(db)
    conn = db.open()
    page = conn.root()['page']
    assert (page.uid, page.hits) == ('u9', 1)     # the home's value
    page.hits += 1
    transaction.commit()
    conn.close()
    copies, at, own = _copies(paths['local'], oid)
    assert copies == {'title': 'Home', 'uid': 'u9'} and own == {'hits': 2}
    assert at == _main_tid(paths, oid)


def test_a_commit_begun_before_the_home_moved_revalidates(overlaid, closing,
                                                          tmp_path):
    """A connection that read the object before a change to a copied
    attribute, and changes only the overlay's part, writes the home's
    current copies, not the ones it read."""
    db, storage, paths = overlaid
    db.close()
    storage.close()
    storage = open_composite(paths, PARTS, overlays=COPIED)
    closing(storage)
    db = ZODB.DB(storage)
    closing(db)
    oid = add_page(db, title='Home', uid='u1', hits=1)
    tm1, tm2 = new_tm(), new_tm()
    c1, c2 = db.open(tm1), db.open(tm2)
    c2.root()['page'].hits = 5          # read before the home moved
    fs_main = storage.partition_named('main').storage
    c1.root()['page'].title = 'New'
    tm1.commit()
    tm2.commit()
    copies, at, own = _copies(paths['local'], oid)
    assert copies == {'title': 'New', 'uid': 'u1'} and own == {'hits': 5}
    assert at == fs_main.getTid(oid)
    c1.close()
    c2.close()


def test_overlay_revalidate_in_a_config(tmp_path):
    from compositestorage.errors import ConfigurationError
    from conftest import composite_xml
    from conftest import partition_xml
    import ZODB.config
    main = partition_xml('main', 0, str(tmp_path / 'main.fs'))
    local = partition_xml(
        'local', 1, str(tmp_path / 'local.fs'),
        'overlay-of main\n    overlay-attributes hits\n'
        '    overlay-revalidate title')
    storage = ZODB.config.storageFromString(composite_xml([main, local]))
    try:
        assert storage.overlay_of(b'\0' * 8).copies.spec == 'title'
    finally:
        storage.close()
    lone = partition_xml('local', 1, str(tmp_path / 'l2.fs'),
                         'overlay-revalidate title')
    with pytest.raises(ConfigurationError) as e:
        ZODB.config.storageFromString(composite_xml([main, lone]))
    assert 'overlay-revalidate' in str(e.value) and "'local'" in str(e.value)


def test_stats_counts_overlay_records_apart_from_stubs(tmp_path, closing):
    import json
    import subprocess
    import sys
    from compositestorage.stats import format_stats
    from compositestorage.stats import stats
    from conftest import composite_xml
    from conftest import partition_xml
    paths = paths_for(tmp_path, PARTS)
    config = tmp_path / 'overlaid.conf'
    config.write_text(composite_xml([
        partition_xml('main', 0, paths['main']),
        partition_xml('local', 1, paths['local'],
                      'overlay-of main\n    overlay-attributes %s' % RULES)]))
    import ZODB.config
    storage = ZODB.config.storageFromFile(open(str(config)))
    db = ZODB.DB(storage)
    conn = db.open()
    root = conn.root()
    root['a'], root['b'], root['c'] = Page(), Page(), Page()
    root['a'].hits = root['b'].hits = 1
    root['b'].last_seen = Page()    # a stub in the overlay's child
    transaction.commit()
    report = stats(storage)
    db.close()
    local, main = report['partitions']['local'], report['partitions']['main']
    assert (local['overlays'], local['stubs'], local['objects']) == (2, 2, 0)
    assert local['overlay_of'] == 'main'
    assert (main['overlays'], main['overlay_of']) == (0, None)
    assert main['objects'] == 5
    text = format_stats(report)
    assert 'local (prefix 1): 0 objects, 0 bytes, 2 stubs, 2 overlay ' \
        'records (overlay of main)' in text
    assert 'main (prefix 0): 5 objects' in text and 'overlay of' not in \
        text.split('\n')[0]
    proc = subprocess.run(
        [sys.executable, '-m', 'compositestorage', 'stats', str(config),
         '--json'], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)['partitions']['local']
    assert (shown['overlays'], shown['stubs']) == (2, 2)
    proc = subprocess.run(
        [sys.executable, '-m', 'compositestorage', 'stats', str(config)],
        capture_output=True, text=True, timeout=120)
    assert '2 stubs, 2 overlay records (overlay of main)' in proc.stdout


# --- readCurrent (checkCurrentSerialInTransaction) ------------------------

@pytest.mark.parametrize('changed', ['home', 'overlay', None])
@pytest.mark.parametrize('newer', ['home', 'overlay'])
def test_read_current_of_an_overlaid_object(overlaid, changed, newer):
    """A reader that depended on an overlaid object (``readCurrent``)
    conflicts with a concurrent change to either part, and with none
    when nothing changed, whichever part holds the newer record."""
    from ZODB.POSException import ReadConflictError
    db, storage, paths = overlaid
    add_page(db, title='Home', hits=0)
    conn = db.open()
    setattr(conn.root()['page'], 'title' if newer == 'home' else 'hits', 1)
    transaction.commit()
    conn.close()
    tm1, tm2 = new_tm(), new_tm()
    c1, c2 = db.open(tm1), db.open(tm2)
    page = c1.root()['page']
    page.title                      # loaded by the reader
    c1.readCurrent(page)
    c1.root()['other'] = Page()     # the reader writes something else
    if changed is not None:
        setattr(c2.root()['page'], 'title' if changed == 'home' else 'hits',
                2)
        tm2.commit()
    if changed is None:
        tm1.commit()
    else:
        with pytest.raises(ReadConflictError) as e:
            tm1.commit()
        assert e.value.oid == page._p_oid
        tm1.abort()
    c1.close()
    c2.close()


# --- through ZEO ------------------------------------------------------------

def _serve_overlaid(tmp_path, base_extra='', child_extra=''):
    """A ZEO server of a composite whose ``local`` partition is the
    overlay of ``main``: ``(address, stop)``."""
    import ZEO
    from conftest import composite_xml
    main = '''
  <partition main>
    prefix 0
    %s
    <filestorage>
      path %s
      %s
    </filestorage>
  </partition>''' % (base_extra, tmp_path / 'main.fs', child_extra)
    local = '''
  <partition local>
    prefix 1
    overlay-of main
    overlay-attributes %s
    <filestorage>
      path %s
    </filestorage>
  </partition>''' % (RULES, tmp_path / 'local.fs')
    top = 'default-partition local' if child_extra else ''
    return ZEO.server(storage_conf=composite_xml([main, local], top,
                                                 section_name='1'))


def test_two_zeo_clients_change_the_two_parts_at_once(tmp_path):
    import ZEO
    addr, stop = _serve_overlaid(tmp_path)
    try:
        dbs = [ZEO.DB(addr, server_sync=True) for _ in range(2)]
        try:
            add_page(dbs[0], title='Home', hits=0)
            for round in range(3):
                tm1, tm2 = new_tm(), new_tm()
                c1, c2 = dbs[0].open(tm1), dbs[1].open(tm2)
                tm1.begin()     # server_sync: each sees the last commit
                tm2.begin()
                p1, p2 = c1.root()['page'], c2.root()['page']
                assert (p1.title, p1.hits) == (p2.title, p2.hits)
                p1.title = 'Title %d' % round       # the home's part
                p2.hits = p2.hits + 1               # the overlay's part
                for tm in ((tm1, tm2) if round % 2 else (tm2, tm1)):
                    tm.commit()                     # both are kept
                for tm, page in ((tm1, p1), (tm2, p2)):
                    # neither client's cache keeps the part it read
                    tm.begin()
                    assert (page.title, page.hits) == ('Title %d' % round,
                                                       round + 1)
                c1.close()
                c2.close()
            for db in dbs:
                tm = new_tm()
                conn = db.open(tm)
                tm.begin()
                page = conn.root()['page']
                assert (page.title, page.hits) == ('Title 2', 3)
                conn.close()
        finally:
            for db in dbs:
                db.close()
    finally:
        stop()
    local = states(str(tmp_path / 'local.fs'))
    oid = [o for o, (k, s) in local.items()
           if isinstance(s, dict) and s.get('dict')][0]
    assert local[oid][1]['dict'] == {'hits': 3}
    assert states(str(tmp_path / 'main.fs'))[oid][1] == {'title': 'Title 2'}


def test_read_only_base_refusal_reaches_a_zeo_client(tmp_path):
    import ZEO
    paths = {'main': str(tmp_path / 'main.fs')}
    storage = FileStorage(paths['main'])
    db = ZODB.DB(storage)
    add_page(db, title='Vendor page', hits=100)
    db.close()
    addr, stop = _serve_overlaid(tmp_path, child_extra='read-only true')
    try:
        db = ZEO.DB(addr, server_sync=True)
        try:
            conn = db.open()
            page = conn.root()['page']
            page.hits += 1              # the overlay's: kept
            transaction.commit()
            page.title = 'Changed'
            page.author = 'me'
            with pytest.raises(ReadOnlyError) as e:
                transaction.commit()
            transaction.abort()
            message = str(e.value)
            assert "'author', 'title'" in message
            assert "partition 'main' is read-only" in message
            conn.close()
            conn = db.open()
            page = conn.root()['page']
            assert (page.title, page.hits) == ('Vendor page', 101)
            conn.close()
        finally:
            db.close()
    finally:
        stop()


def test_history_shows_no_stub_revision_of_the_overlay_child(overlaid):
    """The overlay's child held a plain stub of the object (something
    there referred to it) before its overlay record: that stub is not a
    revision of the object."""
    from persistent.mapping import PersistentMapping
    from compositestorage import placement
    db, storage, paths = overlaid
    oid = add_page(db, title='a')
    conn = db.open()
    root = conn.root()
    page = root['page']
    created = page._p_serial
    with placement(conn, 'local'):
        holder = PersistentMapping()
        conn.add(holder)
    holder['page'] = page           # a stub of page in the local child
    root['holder'] = holder
    transaction.commit()
    stub_tid = storage.partition_named('local').storage.getTid(oid)
    assert stub_tid > created
    assert [e['tid'] for e in storage.history(oid, 10)] == [created]
    page.hits = 1                   # now an overlay record replaces it
    transaction.commit()
    assert [e['tid'] for e in storage.history(oid, 10)] == [
        page._p_serial, created]
    assert storage.getTid(oid) == page._p_serial
    conn.close()


def test_each_child_opened_alone_is_a_valid_zodb(overlaid, tmp_path):
    """Invariant 2 with an overlay: the base's records are whole objects
    of their class, the overlay's are small objects of this package's
    class naming their home, and every reference resolves inside each
    child."""
    from compositestorage.overlay import OverlayRecord
    from conftest import check_child_self_contained
    db, storage, paths = overlaid
    conn = db.open()
    root = conn.root()
    for i in range(3):
        page = Page()
        page.title = 'page %d' % i
        page.hits = i
        page.workflow_state = 'draft'
        root['page%d' % i] = page
    transaction.commit()
    oids = [root['page%d' % i]._p_oid for i in range(3)]
    root['page1'].hits += 10
    transaction.commit()
    conn.close()
    db.close()
    names = {0: 'main', 1: 'local'}
    base = check_child_self_contained(paths['main'], 0, names)
    overlay = check_child_self_contained(paths['local'], 1, names)
    for oid in oids:
        assert base[oid] is Page
        assert overlay[oid] is OverlayRecord
    # a plain ZODB on the base sees whole pages, without the local part
    fs = FileStorage(paths['main'], read_only=True)
    plain = ZODB.DB(fs)
    try:
        page = plain.open().get(oids[1])
        assert page.title == 'page 1'
        assert 'hits' not in page.__dict__
    finally:
        plain.close()
