"""Overlay partitions: extra state of an object kept apart from its home.

A partition O configured with ``overlay-of B`` keeps, for objects whose
home is B, the attributes its rules name (``overlay-attributes``).  O's
child holds them at the object's own oid, as an :class:`OverlayRecord`:
B's records stay complete objects of their own class, and O's child,
opened alone, shows small objects of this package's class.  An overlay
record stands for its object as a stub does too (it names the home
partition and the class), because a stub for that object in O's child
would sit at the same oid.

A load merges B's state with O's part; a store splits the state by the
rules and writes only the part that changed, each part under the serial
its own child had when ZODB read the object.  So a change to only one
part never conflicts with a concurrent change to only the other: each
child checks, and resolves, conflicts in its own records.  The serial
ZODB sees is the newer of the two records.

Only dict states, and dict-plus-slots states (``(dict or None, slots)``),
can be split: any other state of an object that has overlay attributes
is refused with :class:`OverlayStateError`, never guessed at.  No class
is imported: records are read with stand-ins (:mod:`compositestorage.
opaque`).

An overlay record's state is written by this module in one fixed layout
with no memo, so a load can splice O's attributes into B's dict state as
opcodes (one ``SETITEMS`` before B's ``STOP``) without writing B's state
again; see :func:`overlay_record`.
"""
import fnmatch
import re
import struct

from ZODB.POSException import POSKeyError
from ZODB.POSException import ReadConflictError
from ZODB.POSException import ReadOnlyError
from ZODB.utils import p64
from ZODB.utils import u64
from ZODB.utils import z64
from zodbpickle.pickle import Pickler

from compositestorage.errors import CompositeStorageError
from compositestorage.errors import ConfigurationError
from compositestorage.errors import oid_hex
from compositestorage.opaque import dumps_items
from compositestorage.opaque import dumps_record
from compositestorage.opaque import loads_record
from compositestorage.references import class_of
from compositestorage.stubs import PartitionStub


class OverlayRecord(PartitionStub):
    """What a plain ZODB, opening an overlay's child alone, sees of an
    object whose home is another partition: a stub for it (``home``,
    ``module``, ``name``) that also holds the attributes kept here
    (``dict`` and ``slots``)."""

    def __repr__(self):
        text = PartitionStub.__repr__(self)
        try:
            names = sorted(self.dict) + sorted(self.slots)
        except Exception:
            names = '?'
        return text[:-1] + ' overlaying %s>' % (names,)


class OverlayStateError(CompositeStorageError):
    """A state an overlay cannot split or merge."""


def _class_pickle():
    import io
    f = io.BytesIO()
    Pickler(f, 3).dump(OverlayRecord)
    return f.getvalue()


#: Every overlay record begins with these bytes (its class pickle).
RECORD_CLASS = _class_pickle()
_HEAD = b'\x80\x03}(X\x06\x00\x00\x00layout'
_LENGTHS = struct.Struct('<xixixi')          # three BININTs
_DICT_KEY = b'X\x04\x00\x00\x00dict}('
_SLOTS_KEY = b'X\x05\x00\x00\x00slots}('


def is_overlay_record(data):
    return bool(data) and data.startswith(RECORD_CLASS)


def overlay_record(home, klass, attributes, slots, copies=None,
                   base_serial=None):
    """The record O's child holds for an object of class ``klass`` whose
    home is partition ``home``: ``attributes`` and ``slots`` are dicts of
    stand-ins.  With ``overlay-revalidate``, ``copies`` are the values of
    the home's attributes it names, as of the home's record
    ``base_serial``.

    Its state pickle has a fixed layout: ``layout`` (the lengths of the
    three parts that follow), the stub's fields, then ``dict`` and
    ``slots``, each written with no memo, so their opcodes can be cut out
    and spliced into another pickle (:func:`parts_of`).
    """
    module, name = klass if klass else (None, None)
    fields = [('home', home), ('module', module), ('name', name)]
    if copies is not None:
        fields += [('copies', copies), ('base_serial', base_serial)]
    meta = dumps_items(fields)
    d = dumps_items(attributes.items())
    s = dumps_items(slots.items())
    return b''.join((
        RECORD_CLASS, _HEAD,
        b'J' + struct.pack('<i', len(meta)), b'J' + struct.pack('<i', len(d)),
        b'J' + struct.pack('<i', len(s)), b'\x87',
        meta, _DICT_KEY, d, b'u', _SLOTS_KEY, s, b'uu.'))


def parts_of(data):
    """``(meta, dict_items, slot_items)``: the opcodes of an overlay
    record's three parts, as :func:`overlay_record` laid them out."""
    at = len(RECORD_CLASS)
    if data[at:at + len(_HEAD)] != _HEAD:
        raise OverlayStateError('not an overlay record of this layout')
    at += len(_HEAD)
    lm, ld, ls = _LENGTHS.unpack_from(data, at)
    at += _LENGTHS.size + 1
    meta = data[at:at + lm]
    at += lm + len(_DICT_KEY)
    d = data[at:at + ld]
    at += ld + 1 + len(_SLOTS_KEY)
    return meta, d, data[at:at + ls]


def read_overlay_meta(data):
    """``(home, (module, name) or None)`` of an overlay record, as a stub
    names them; only the stub's own fields are unpickled."""
    import io
    from zodbpickle.pickle import Unpickler
    meta = parts_of(data)[0]
    u = Unpickler(io.BytesIO(b'\x80\x03}(' + meta + b'u.'))
    fields = u.load()
    name = fields.get('name')
    return fields['home'], ((fields.get('module'), name) if name else None)


def _attributes_of(data):
    """``(attributes, slots)`` dicts of stand-ins in an overlay record."""
    state = loads_record(data)[1]
    return state['dict'], state['slots']


def copies_of(data):
    """``(copies, base_serial)`` of an overlay record: the home's values
    it holds copies of, and the home's serial they were taken at
    (``({}, None)`` for a record written without ``overlay-revalidate``)."""
    state = loads_record(data)[1]
    return state.get('copies') or {}, state.get('base_serial')


class Rules:
    """Which attributes an overlay keeps: ``overlay-attributes``.

    Each word is a pattern (``fnmatch``: ``*``, ``?``, ``[...]``) for every
    class, or ``dotted.Class:pattern`` for objects of that class only.
    Classes are compared by the dotted name their records give, never
    imported.
    """

    def __init__(self, spec, key='overlay-attributes'):
        words = spec.split() if isinstance(spec, str) else list(spec)
        if not words:
            raise ConfigurationError(
                '%s names no attribute; give names or patterns, such as '
                '"hits last_seen workflow_*"' % key)
        self.spec = ' '.join(words)
        self._every = []
        self._per_class = {}
        for word in words:
            klass, sep, pattern = word.rpartition(':')
            if sep and (not klass or not pattern):
                raise ConfigurationError(
                    '%s: %r is neither a pattern nor '
                    'dotted.Class:pattern' % (key, word))
            (self._per_class.setdefault(klass, []) if sep
             else self._every).append(pattern)
        self._matchers = {}
        #: a name of no pattern at all is in no record: such records
        #: are stored whole without being read
        self._literals = [re.escape(p.split('*')[0].split('?')[0]
                                    .split('[')[0]).encode('utf-8')
                          for p in self._every + sum(
                              self._per_class.values(), [])]
        # a class a rule names is refused if it cannot be split
        self._literals += [('%s\n%s' % tuple(k.rsplit('.', 1))).encode(
            'utf-8') for k in self._per_class if '.' in k]

    def names_class(self, dotted):
        return dotted in self._per_class

    def matcher(self, dotted):
        """``match(name)`` for objects of class ``dotted``."""
        found = self._matchers.get(dotted)
        if found is None:
            patterns = self._every + self._per_class.get(dotted, [])
            regex = re.compile('|'.join(
                '(?:%s)' % fnmatch.translate(p) for p in patterns))
            found = self._matchers[dotted] = regex.match
        return found

    def may_match(self, data):
        """Whether ``data`` could hold an attribute these rules keep."""
        return any(literal in data for literal in self._literals)

    def split(self, dotted, attributes):
        """``(kept in the home, kept in the overlay)`` of a dict."""
        match = self.matcher(dotted)
        home, overlay = {}, {}
        for name, value in attributes.items():
            (overlay if isinstance(name, str) and match(name)
             else home)[name] = value
        return home, overlay

    def pick(self, dotted, *dicts):
        """The items of ``dicts`` whose names these rules match."""
        match = self.matcher(dotted)
        return {name: value for d in dicts for name, value in d.items()
                if isinstance(name, str) and match(name)}


def _dotted(klass):
    return '%s.%s' % klass if klass else '?'


def state_parts(state):
    """``(dict, slots, kind)`` of a state that can be split, or ``None``."""
    if type(state) is dict:
        return state, {}, 'dict'
    if type(state) is tuple and len(state) == 2 and \
            (state[0] is None or type(state[0]) is dict) and \
            type(state[1]) is dict:
        return state[0] or {}, state[1], 'slots'
    return None


def build_state(kind, attributes, slots):
    if kind == 'dict' and not slots:
        return attributes
    return attributes or None, slots


def _changed(new, old):
    """The names whose values differ between two dicts."""
    names = set(new) ^ set(old)
    for name in set(new) & set(old):
        try:
            same = new[name] == old[name]
        except RecursionError:
            same = False
        if not same:
            names.add(name)
    return names


class Overlay:
    """Partition ``part`` keeping, by ``rules``, part of the state of the
    objects whose home is ``base``."""

    def __init__(self, storage, part, base, rules, copies=None):
        self.storage = storage
        self.part = part
        self.base = base
        self.rules = rules
        #: ``overlay-revalidate``: which of the home's attributes the
        #: overlay's records keep copies of, or ``None``
        self.copies = copies

    def __repr__(self):
        return '<Overlay %s of %s: %s>' % (self.part.name, self.base.name,
                                           self.rules.spec)

    # --- reading ------------------------------------------------------------

    def _before(self, part, oid, tid):
        try:
            return part.storage.loadBefore(oid, tid)
        except POSKeyError:
            return None

    def load_before(self, oid, tid):
        """``loadBefore`` of the merged object, in composite form."""
        found = self.base.storage.loadBefore(oid, tid)
        if found is None:
            return None
        data, start, end = found
        from_child = self.storage.from_child
        data = from_child(self.base, data)
        over = self._before(self.part, oid, tid)
        if over is None:
            if self.part.current_serial(oid) is not None:
                # O's first record of it comes later: the merged state is
                # B's only until then, at least until ``tid``.
                end = tid if end is None else min(end, tid)
            return data, start, end
        odata, ostart, oend = over
        if oend is not None:
            end = oend if end is None else min(end, oend)
        if not is_overlay_record(odata):
            return data, start, end       # a plain stub: nothing to add
        return (self.merge(oid, data, from_child(self.part, odata)),
                max(start, ostart), end)

    def shows(self, oid, data):
        """Whether a record of this overlay's child is ZODB's to see (as
        the overlaid object): an overlay record, or its deletion."""
        return oid[0] == self.base.prefix and (
            not data or is_overlay_record(data))

    def data_at(self, oid, tid):
        """The merged state of ``oid`` written by transaction ``tid``."""
        found = self.load_before(oid, p64(u64(tid) + 1))
        return None if found is None else found[0]

    def is_revision(self, oid, tid):
        """Whether ``tid`` wrote an overlay record of ``oid`` in this
        overlay's child (a revision of the object, ZODB's to hear of in
        its history and undo), not a stub."""
        if oid[0] != self.base.prefix:
            return False
        try:
            return is_overlay_record(self.part.storage.loadSerial(oid, tid))
        except POSKeyError:
            return False

    def history(self, oid, size, visible):
        """Both children's histories of ``oid``, newest first, one entry
        a tid.  The overlay child's plain stub of the object (written when
        a record there first referred to it) is no revision of it."""
        entries = {}
        for part in (self.part, self.base):
            try:
                found = part.storage.history(oid, size=size)
            except (POSKeyError, KeyError):
                if part is self.base:
                    raise
                continue
            for entry in found:
                if entry['tid'] <= visible and (
                        part is self.base or
                        self.is_revision(oid, entry['tid'])):
                    entries.setdefault(entry['tid'], entry)
        if not entries:
            raise POSKeyError(oid)
        return [entries[tid] for tid in sorted(entries, reverse=True)][:size]

    def load_serial(self, oid, serial):
        found = self.load_before(oid, p64(u64(serial) + 1))
        if found is None or found[1] != serial:
            raise POSKeyError(oid, serial)
        return found[0]

    def merge(self, oid, data, odata):
        """B's record ``data`` with the attributes of overlay record
        ``odata``, both in composite form."""
        _, d, s = parts_of(odata)
        if not d and not s:
            return data
        try:
            meta, state, _, end = loads_record(data)
        except Exception as e:
            raise OverlayStateError(
                'partition %r: cannot read oid %s to merge partition %r\'s '
                'attributes into it (%s: %s); run "compositestorage verify"'
                % (self.base.name, oid_hex(oid), self.part.name,
                   type(e).__name__, e)) from e
        if type(state) is dict and not s and data[end - 1:end] == b'.':
            # Splice O's items into B's dict: no state written again.
            return data[:end - 1] + b'(' + d + b'u.'
        parts = state_parts(state)
        if parts is None:
            raise self._unsplittable(oid, class_of(data), state)
        attributes, slots, kind = parts
        over_d, over_s = _attributes_of(odata)
        return dumps_record(meta, build_state(
            'slots', {**attributes, **over_d}, {**slots, **over_s})
            if over_s or kind == 'slots' else {**attributes, **over_d})

    def _unsplittable(self, oid, klass, state):
        return OverlayStateError(
            'partition %r: oid %s (%s) has a state of type %s, not a dict '
            'or (dict, slots); overlay %r can only split and merge those. '
            'Leave its class out of overlay-attributes, or give the class '
            'a dict state' % (self.base.name, oid_hex(oid), _dotted(klass),
                              type(state).__name__, self.part.name))

    # --- writing ------------------------------------------------------------

    def store(self, oid, serial, data, transaction):
        storage = self.storage
        if storage._read_only:
            raise ReadOnlyError()
        state = storage._coordinator.current(transaction)
        new_object = serial is None or serial == z64
        if new_object:
            state.new_data[oid] = data
        base, part = self.base, self.part
        if not base.read_only and not self.rules.may_match(data) and \
                part.current_serial(oid) is None:
            # No overlay attribute and no overlay record: B's alone.
            self._store_child(state, base, oid, serial or z64, data)
            return
        klass = class_of(data)
        dotted = _dotted(klass)
        meta, new_state, _, _ = self._read(base, oid, data)
        parts = state_parts(new_state)
        if parts is None:
            if self.rules.names_class(dotted) or \
                    part.current_serial(oid) is not None:
                raise self._unsplittable(oid, klass, new_state)
            self._check_writable_base(oid, klass, ['(its whole state)'])
            self._store_child(state, base, oid, serial or z64, data)
            return
        attributes, slots, kind = parts
        new_bd, new_od = self.rules.split(dotted, attributes)
        new_bs, new_os = self.rules.split(dotted, slots)

        old = self._old_parts(oid, None if new_object else serial, dotted)
        (old_kind, old_bd, old_bs, base_over_d, base_over_s,
         old_od, old_os, base_serial, over_serial) = old
        read_over_serial = state_over = over_serial
        b_changed = _changed(new_bd, old_bd) | _changed(new_bs, old_bs)
        if old_kind is not None and old_kind != kind:
            b_changed.add('(its state layout)')
        # An overlay attribute the home still holds can only be removed
        # there.
        b_changed |= (set(base_over_d) - set(new_od) - set(old_od))
        b_changed |= (set(base_over_s) - set(new_os) - set(old_os))
        o_changed = (new_od != {**base_over_d, **old_od}
                     or new_os != {**base_over_s, **old_os}
                     or set(old_od) - set(new_od)
                     or set(old_os) - set(new_os))
        if b_changed:
            self._check_writable_base(oid, klass, sorted(b_changed))
        # A new object always gets its home record: it exists there.
        write_base = b_changed or old_kind is None or (
            not o_changed and not base.read_only)
        if write_base:
            record = data if not new_od and not new_os else dumps_record(
                meta, build_state(kind, new_bd, new_bs))
            self._store_child(state, base, oid, base_serial, record)
        write_over = o_changed or not write_base
        copies = copied_at = None
        if self.copies is not None:
            copies = self.copies.pick(dotted, new_bd, new_bs)
            copied_at = state.tid if write_base else base_serial
            if not write_base:
                copies, copied_at = self._revalidated(
                    oid, dotted, copies, copied_at)
            if not write_over:
                # The home's part changed: refresh the copies of an
                # overlay record that holds other ones, on top of its
                # current record (a concurrent change to the overlay's own
                # attributes is kept, see _old_parts).
                current = self._current_record(oid)
                if current is not None and copies_of(current[0])[0] != \
                        copies:
                    write_over = True
                    over_serial = state_over = current[1]
                    new_od, new_os = _attributes_of(current[0])
        if write_over:
            record = overlay_record(base.name, klass, new_od, new_os,
                                    copies, copied_at)
            state.overlay_records.add((part.prefix, oid))
            self._store_child(state, part, oid, over_serial, record)
        if not new_object and self._moved(
                oid, None if write_base else base_serial,
                None if write_over and state_over == read_over_serial
                else read_over_serial):
            # What ZODB holds of the object is not what it will load: a
            # part it did not write changed since it read it.  Told as a
            # resolved conflict, ZODB (and a ZEO client's cache) drops it.
            state.resolved.add(oid)

    def check_current(self, oid, serial, state):
        """``checkCurrentSerialInTransaction`` of an overlaid object.

        ``serial`` is the newer of the two records ZODB read, and the
        reader depended on both: each child is checked against its own
        record as of ``serial``, so a change to either part since raises
        ``ReadConflictError``, and an unchanged object passes whichever
        part is newer."""
        limit = p64(u64(serial) + 1)
        for part in (self.base, self.part):
            found = self._before(part, oid, limit)
            if found is None:
                current = part.current_serial(oid)
                if current is not None:     # written since ZODB read
                    raise ReadConflictError(oid=oid,
                                            serials=(current, serial))
                continue
            if part.read_only:
                part.check_current_serial(oid, found[1])
                continue
            txn = self.storage._coordinator.begin(state, part)
            part.storage.checkCurrentSerialInTransaction(oid, found[1], txn)

    def _read(self, part, oid, data):
        try:
            return loads_record(data)
        except Exception as e:
            raise OverlayStateError(
                'partition %r: cannot read the record of oid %s to split '
                'it for overlay %r (%s: %s); nothing was written'
                % (part.name, oid_hex(oid), self.part.name,
                   type(e).__name__, e)) from e

    def _old_parts(self, oid, serial, dotted):
        """What each part held when ZODB read the object at ``serial``:
        ``(kind, home's own dict, home's own slots, overlay attributes the
        home holds (dict, slots), overlay's dict, overlay's slots, the
        home's serial, the overlay's serial)``.  The serials are what each
        child is given to check the store against."""
        base, part = self.base, self.part
        current = part.current_serial(oid)
        if serial is None:
            return (None, {}, {}, {}, {}, {}, {}, z64, current or z64)
        limit = p64(u64(serial) + 1)
        kind, bd, bs, over_d, over_s = None, {}, {}, {}, {}
        base_serial = z64
        found = self._before(base, oid, limit)
        if found is not None and found[0]:
            base_serial = found[1]
            parts = state_parts(self._read(
                base, oid, self.storage.from_child(base, found[0]))[1])
            if parts is not None:
                attributes, slots, kind = parts
                bd, over_d = self.rules.split(dotted, attributes)
                bs, over_s = self.rules.split(dotted, slots)
        od, os_ = {}, {}
        over_serial = z64
        found = self._before(part, oid, limit)
        if found is not None:
            over_serial = found[1]
            if is_overlay_record(found[0]):
                od, os_ = _attributes_of(
                    self.storage.from_child(part, found[0]))
        if current is not None and current != over_serial:
            try:
                data = part.storage.load(oid)[0]
            except POSKeyError:
                data = None
            if not is_overlay_record(data):
                # a stub written since: an overlay record replaces it
                over_serial = current
            elif self.copies is not None and _attributes_of(
                    self.storage.from_child(part, data)) == (od, os_):
                # only the copies were refreshed since: not a conflict
                # with a change to the overlay's own attributes
                over_serial = current
        return (kind, bd, bs, over_d, over_s, od, os_, base_serial,
                over_serial)

    def _moved(self, oid, base_serial, over_serial):
        """Whether the home's record is no longer ``base_serial`` or the
        overlay's no longer ``over_serial`` (``None``: not asked)."""
        for part, serial in ((self.base, base_serial),
                             (self.part, over_serial)):
            if serial is not None and \
                    (part.current_serial(oid) or z64) != serial:
                return True
        return False

    def _current_record(self, oid):
        """``(data in composite form, serial)`` of ``oid``'s current
        overlay record, or ``None``."""
        try:
            data, serial = self.part.storage.load(oid)
        except POSKeyError:
            return None
        if not is_overlay_record(data):
            return None
        return self.storage.from_child(self.part, data), serial

    def _revalidated(self, oid, dotted, copies, copied_at):
        """``copies`` taken from the home's record ``copied_at`` (as ZODB
        read it), checked against the home's current record: when the
        home's serial moved since, its current values, and its serial."""
        now = self.base.current_serial(oid)
        if now is None or now == copied_at:
            return copies, copied_at
        try:
            data = self.base.storage.load(oid)[0]
        except POSKeyError:
            return copies, copied_at
        parts = state_parts(self._read(
            self.base, oid, self.storage.from_child(self.base, data))[1])
        if parts is None:
            return copies, copied_at
        return self.copies.pick(dotted, parts[0], parts[1]), now

    def _check_writable_base(self, oid, klass, names):
        base = self.base
        if not base.read_only:
            return
        # ZODB's own class: a ZEO client rebuilds only those, and would
        # see a subclass as a ServerException
        raise ReadOnlyError(
            'partition %r is read-only: oid %s (%s) changes %s, which '
            'overlay %r does not keep (overlay-attributes %s); nothing was '
            'written.  Add %s to overlay-attributes of %r, or open %r '
            'read-write' % (
                base.name, oid_hex(oid), _dotted(klass),
                ', '.join(repr(n) for n in names), self.part.name,
                self.rules.spec, 'them' if len(names) > 1 else 'it',
                self.part.name, base.name))

    def _store_child(self, state, part, oid, serial, record):
        storage = self.storage
        record = storage.to_child(part, oid, record, state)
        txn = state.child_txn.get(part.prefix)
        if txn is None:
            txn = storage._coordinator.begin(state, part)
        part.storage.store(oid, serial, record, '', txn)
        if part is self.base:
            part.saw_oid(oid)


def make_overlays(storage, overlays):
    """``{base prefix: Overlay}`` for ``overlays``, ``{overlay partition
    name: (base partition name, attribute rules[, revalidate rules])}``,
    checked against the storage's partitions."""
    found = {}
    for name, spec in sorted((overlays or {}).items()):
        base_name, spec, copies = (tuple(spec) + (None,))[:3]
        part = storage.partition_named(name)
        base = storage.partition_named(base_name)
        if base is part:
            raise ConfigurationError(
                'partition %r is configured as an overlay of itself' % name)
        if base.prefix in found:
            raise ConfigurationError(
                'partitions %r and %r are both overlays of %r; a partition '
                'has at most one overlay' % (found[base.prefix].part.name,
                                             name, base_name))
        if base.name in (overlays or {}) or part.prefix in found:
            raise ConfigurationError(
                'partition %r is an overlay of %r, which is an overlay '
                'itself; overlays do not chain' % (name, base_name))
        if part.read_only and not base.read_only:
            raise ConfigurationError(
                'partition %r is read-only, but it is the overlay of %r, '
                'which is not: the overlay is where changes go'
                % (name, base_name))
        try:
            rules = Rules(spec)
            if copies is not None:
                copies = Rules(copies, 'overlay-revalidate')
        except ConfigurationError as e:
            raise ConfigurationError('partition %r: %s' % (name, e))
        found[base.prefix] = Overlay(storage, part, base, rules, copies)
    return found
