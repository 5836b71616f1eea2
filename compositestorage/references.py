"""Finding and rewriting persistent references in ZODB records.

A ZODB record is two pickles (the class metadata, then the state) written by
one pickler, so they share one memo.  Persistent references appear in them as
persistent ids, in these forms (see ``ZODB.serialize``):

* ``oid``                   -- plain reference (persistent classes)
* ``(oid, klass)``          -- reference with a class hint
* ``['w', (oid,)]``, ``[oid]`` -- weak references (current and legacy)
* ``['w', (oid, db)]``, ``['m', (db, oid, klass)]``, ``['n', (db, oid)]``
  -- references into another database, which we leave alone.

The stub for target ``T`` in partition ``A`` lives at oid ``T`` itself, so a
cross-partition reference never changes its oid.  Only the class hint of the
``(oid, klass)`` form changes: in the child it names
:class:`~compositestorage.stubs.PartitionStub`, so a plain ZODB opening the
child alone sees a stub rather than an object of the wrong class.

In a child, a class hint also says how to give back the bytes it
replaced, and where those were not a GET, names the class it stands for:
``compositestorage.stubs`` ``PartitionStub:module:name[:how]`` or
``PartitionStub:::how`` (see :func:`stub_hint`).  A hint used more than
once in a record is written once and memoized (:func:`_memoized`).  The
stubs module resolves every such name to the stub class, so a plain ZODB
still sees a stub; the composite gives ZODB back the exact bytes ZODB
stored, without loading the stub.

Most records need no parsing at all.  On store, :func:`quick_check` finds
the records that cannot hold an oid of another partition (a protocol 3
pickle spells every oid ``C\\x08`` and its eight bytes), and those are
stored as they are.  The others are first walked opcode by opcode
(:func:`compositestorage.opcodes.walk`, linear in the record's size): the
walk refuses a pickle that would make the C unpickler use memory or time
out of proportion to it, and tries one regular expression for ZODB's
layout of a class-hinted reference only where an opcode begins, so the same
bytes inside a ``bytes`` value are user data.  ``noload`` of the original
must then report every such reference where a match ends; anything else
goes through an opcode scan, and that failing, an exact stack-tracking
parse.  No class is ever imported, and the C unpickler never sees bytes
the walk has not checked.  On load, a record without the stub
class's name comes back byte for byte, and one with it is split at its
hints and put back together.  That is exact because of how records are
stored: a record whose own bytes already hold a hint's spelling (user data
that looks like a hint) is stored with :data:`EXACT_TAG` appended, and such
records take the opcode-level path instead.  A pickle ignores bytes after
its STOP, so a plain ZODB reads tagged records as usual.
"""
import io
import pickletools
import re

from zodbpickle.pickle import Unpickler

from compositestorage.errors import CorruptRecordError
from compositestorage.opcodes import NotAPickle
from compositestorage.opcodes import UnreadableRecordError
from compositestorage.opcodes import UnsafeRecordError
from compositestorage.opcodes import walk
from compositestorage.opcodes import layouts

#: The global that names the stub class, as it appears in a GLOBAL opcode.
STUB_MODULE = 'compositestorage.stubs'
STUB_NAME = 'PartitionStub'
STUB_GLOBAL = (STUB_MODULE, STUB_NAME)
#: Bytes that every record holding a stub reference contains.  Records
#: without them come back from a child byte for byte, unparsed.
STUB_MARK = ('%s\n%s' % STUB_GLOBAL).encode('ascii')
#: A stub hint that names no class (the class was not known, or cannot be
#: spelled in a name): the composite reads the class from the stub record.
PLAIN_MARK = STUB_MARK + b'\n'
#: Hints that name their class: ``PartitionStub:module:name``.
HINT_PREFIX = STUB_NAME + ':'
HINT_MARK = ('c%s\n%s' % (STUB_MODULE, HINT_PREFIX)).encode('ascii')
#: Appended to a child record whose original bytes hold ``HINT_MARK``.
#: It holds ``STUB_MARK`` (so a load looks at the record) and neither of
#: the hint spellings.
EXACT_TAG = b'\x00' + STUB_MARK + b'\x00exact\x00'



def stub_hint(klass, how=''):
    """The hint a child stores for a reference to a ``klass`` object that
    lives in another partition.

    ``how`` tells a load how to give back the exact bytes it replaced:
    ``''`` a GLOBAL of the class, ``'-'`` nothing (the original GLOBAL and
    its PUT stay just before, followed by a POP), ``'hXX'``/``'jXXXXXXXX'``
    a BINGET/LONG_BINGET with that argument in hex.  A hint that replaced
    a GET leaves the class out (``PartitionStub:::hXX``): the GET is all a
    load needs, the stub record names the class, and most references are
    GETs of a class the record named before, each of which would otherwise
    spell it again.
    """
    if klass and not is_stub_hint(klass):
        if how[:1] in ('h', 'j'):
            return (STUB_MODULE, HINT_PREFIX + '::' + how)
        module, name = klass
        if module and name and ':' not in module and ':' not in name \
                and '\n' not in module and '\n' not in name:
            return (STUB_MODULE, HINT_PREFIX + module + ':' + name
                    + (':' + how if how else ''))
    return STUB_GLOBAL


def hinted_class(klass):
    """The ``(module, name)`` a child's stub hint names, else ``None``."""
    if klass and klass[0] == STUB_MODULE and \
            klass[1].startswith(HINT_PREFIX):
        module, _, rest = klass[1][len(HINT_PREFIX):].partition(':')
        name = rest.partition(':')[0]
        if module and name:
            return module, name
    return None


def is_stub_hint(klass):
    return bool(klass) and klass[0] == STUB_MODULE and (
        klass[1] == STUB_NAME or klass[1].startswith(HINT_PREFIX))


def _oid_bytes(oid):
    """``oid`` as bytes, or ``None`` for anything that is not an oid (a
    client's pickle can put any object where an oid belongs; one that is
    not eight bytes must never reach a set, a hash or a child)."""
    if isinstance(oid, str):  # Python 2 pickles
        try:
            oid = oid.encode('latin-1')
        except UnicodeEncodeError:
            return None
    if type(oid) is bytes and len(oid) == 8:
        return oid
    return None


def persistent_ids(data):
    """Return every persistent id in a record, in pickle order.

    Classes in tuple forms come back as ``None``: ``noload`` does not
    import anything.
    """
    return [pid for pid, _ in pids_and_ends(data)[0]]


def pids_and_ends(data, walked=False):
    """``([(pid, end)], consumed)``: each persistent id of a record with the
    offset where its BINPERSID ends, and how many bytes the two pickles
    took.  Raises whatever the unpickler raises on a bad pickle.

    The C unpickler runs only on a record that :func:`~compositestorage.
    opcodes.walk` found within bounds (``walked`` says the caller has
    walked it already): otherwise it raises
    :class:`~compositestorage.opcodes.NotAPickle` or
    :class:`~compositestorage.opcodes.UnsafeRecordError`.
    """
    if not walked:
        walk(data)
    f = io.BytesIO(data)
    tell = f.tell
    pids = []
    append = pids.append
    # The C unpickler itself, not ZODB's subclass of it: building that one
    # costs as much as scanning a small record.
    u = Unpickler(f)
    u.persistent_load = lambda pid: append((pid, tell()))
    noload = u.noload
    noload()
    noload()
    return pids, tell()


_quick_checks = {}
_SHORT = 512


def quick_check(prefix):
    """A ``check(data)`` that is false for a protocol 3 record, to be stored
    in partition ``prefix``, which can be stored as it is: no oid outside
    ``prefix`` (a protocol 3 pickle spells every oid ``C\\x08`` and its
    eight bytes) and nothing that would need :data:`EXACT_TAG`.

    A regular expression is quickest on short records, counting on long
    ones (a bucket full of references).
    """
    try:
        return _quick_checks[prefix]
    except KeyError:
        pass
    own = b'C\x08' + bytes([prefix])
    # Two searches that each start with a literal byte are much quicker
    # than one search for either.
    oid_search = re.compile(
        b'\\x08(?:(?<=C\\x08)[^\\x%02x]|(?<=U\\x08)|(?<=B\\x08)\\x00\\x00\\x00)'
        % prefix, re.DOTALL).search
    hint_search = re.compile(
        b':(?<=%s)' % re.escape(HINT_MARK), re.DOTALL).search

    def check(data):
        if len(data) < _SHORT:
            return (oid_search(data) is not None
                    or hint_search(data) is not None
                    or data.endswith(EXACT_TAG))
        return (data.count(b'C\x08') != data.count(own)
                or b'U\x08' in data or b'B\x08\x00\x00\x00' in data
                or HINT_MARK in data or data.endswith(EXACT_TAG))

    return _quick_checks.setdefault(prefix, check)


def scan(data, prefix):
    """Scan a record that is to be stored in partition ``prefix``.

    Returns ``(foreign, hinted)``: the set of oids referenced from another
    partition (strong and weak alike, for each needs a stub in this
    partition), and whether any of them is referenced with a class hint,
    which is what makes the record need rewriting.  The common record,
    with no reference outside its partition, is recognised by the quick
    check and comes back as ``((), False)`` unparsed.
    """
    if data[:2] == b'\x80\x03' and not quick_check(prefix)(data):
        return (), False
    try:
        refs = persistent_ids(data)
    except UnsafeRecordError:
        raise
    except Exception:
        # Not a ZODB pickle: storages accept any bytes, and such a record
        # holds no reference to rewrite.
        return (), False
    foreign = None
    hinted = False
    for ref in refs:
        oid = _ref_oid(ref)
        if oid is not None and oid[0] != prefix:
            if foreign is None:
                foreign = set()
            foreign.add(oid)
            hinted = hinted or isinstance(ref, tuple)
    return foreign or (), hinted


def _ref_oid(ref):
    """The oid a persistent id refers to in this database, else ``None``."""
    if isinstance(ref, tuple):
        if not ref:
            return None
        oid = ref[0]
    elif isinstance(ref, list):
        if len(ref) == 1:
            oid = ref[0]                # legacy weak reference
        elif (len(ref) == 2 and ref[0] == 'w'
              and isinstance(ref[1], tuple) and len(ref[1]) == 1):
            oid = ref[1][0]
        else:
            return None                 # another database's reference
    else:
        oid = ref
    return _oid_bytes(oid)


def to_child_record(data, prefix, oid=None, partition=None):
    """``(record, foreign, hints)`` for ``data`` to be stored in partition
    ``prefix``: the record its child stores, the oids of other partitions
    it refers to (each needs a stub in this partition), and the class each
    rewritten hint named, by oid.

    A record whose parse would take memory or time out of proportion to
    it raises :class:`~compositestorage.opcodes.UnsafeRecordError`, and
    one with a reference to rewrite that the exact parse cannot read
    :class:`~compositestorage.opcodes.UnreadableRecordError`, naming
    ``oid`` and ``partition`` when given.
    """
    tag = needs_tag(data)
    try:
        done = (_rewrite_zodb_layout(data, prefix, memoize=not tag)
                if data[:2] == b'\x80\x03' else None)
        if done is None:
            foreign, hinted = scan(data, prefix)
            try:
                record, hints = (classes_to_hints(data, prefix) if hinted
                                 else (data, {}))
            except UnsafeRecordError:
                raise
            except CorruptRecordError as e:
                raise UnreadableRecordError(str(e))
        else:
            record, foreign, hints = done
    except (UnsafeRecordError, UnreadableRecordError) as e:
        raise e.naming(oid, partition) from None
    if tag:
        record += EXACT_TAG
    return record, foreign, hints


def classes_to_hints(data, prefix):
    """The record a child of partition ``prefix`` stores for ``data``.

    Every class hint of a reference to another partition becomes a stub
    hint naming that class.  Returns ``(record, hints)`` where ``hints``
    maps each such oid to the ``(module, name)`` its hint named.  Works on
    any pickle: the quick opcode scan, then the exact parse.  The tag rule
    is :func:`to_child_record`'s.
    """
    hints = {}

    def replace(oid, klass):
        if oid[0] == prefix or is_stub_hint(klass):
            return None
        hints[oid] = klass
        return Hint(klass)

    edits = _quick_edits(data, replace)
    if edits is None:
        hints.clear()
        edits = _exact_edits(data, replace)
    return _apply(data, edits), hints


def needs_tag(data):
    """Whether a child must store ``data`` with :data:`EXACT_TAG`: its own
    bytes could be read as stub hints, or end as if tagged."""
    # find, not ``in``: ``in`` first tries its argument as an integer
    return data.find(HINT_MARK) >= 0 or data.endswith(EXACT_TAG)


def resolver_keeping_tags(resolve):
    """A child's conflict resolver whose records follow the tag rule.

    A child resolves conflicts in its own records and stores the result
    without the composite seeing it, so the rule is applied here.
    """
    resolve = getattr(resolve, 'resolve', resolve)   # never wrap twice

    def tryToResolveConflict(*args, **kw):
        data = resolve(*args, **kw)
        if data and needs_tag(data):
            data += EXACT_TAG
        return data

    tryToResolveConflict.resolve = resolve
    return tryToResolveConflict


def hints_to_classes(data, prefix, lookup):
    """The record ZODB sees for a child's record ``data`` in ``prefix``.

    ``lookup(oid)`` gives the ``(module, name)`` for a stub hint that names
    no class, or ``None``.
    """
    restored = restore_hints(data)
    if restored is not None:
        return restored
    if data.endswith(EXACT_TAG):
        data = data[:-len(EXACT_TAG)]

    def original(oid, klass):
        if oid[0] == prefix or not is_stub_hint(klass):
            return None
        how = _hint_how(klass)
        if how is not None:
            return how
        return hinted_class(klass) or lookup(oid)

    try:
        return rewrite_class_hints(data, original)
    except CorruptRecordError:
        return data     # not a pickle: storages store any bytes


_restorations = {}
_HINT_LEN = len(HINT_MARK)
#: What a ``'-'`` hint replaced: nothing (and the POP before it goes too).
_POP = b''


def restore_hints(data):
    """The bytes each stub hint of an untagged record replaced, put back
    (every hint there is ours); ``None`` for records that need the exact
    parse: tagged ones, hints that name no class, anything not well formed.
    """
    if data.endswith(EXACT_TAG) or data.find(PLAIN_MARK) >= 0:
        return None
    start = data.find(HINT_MARK)
    end = data.find(b'\n', start + _HINT_LEN)
    if start >= 0 and end >= 0 and data.find(HINT_MARK, end) < 0:
        # one hint, the common case
        original = _restorations.get(data[start + _HINT_LEN:end])
        if original is not None and original is not _POP:
            return data[:start] + original + data[end + 1:]
    parts = data.split(HINT_MARK)
    out = [parts[0]]
    for part in parts[1:]:
        end = part.find(b'\n')
        header = part[:end]
        original = _cached_restoration(header) if end > 0 else None
        if original is None:
            if end > 0 and _memo_restoration(header) is not None:
                return _restore_memoized(data, parts)
            return None
        if original is _POP:
            if not out[-1].endswith(b'0'):
                return None
            out[-1] = out[-1][:-1]
        else:
            out.append(original)
        out.append(part[end + 1:])
    return b''.join(out)


def _cached_restoration(header):
    """:func:`_restoration`, cached: most hints replace the same few
    bytes."""
    try:
        return _restorations[header]
    except KeyError:
        original = _restoration(header)
        if original is not None and len(_restorations) < 10000:
            _restorations[header] = original
        return original


def _memo_restoration(header):
    """``(original, k)`` for a memoized hint's ``module:name:how:mK``: what
    it and every GET of memo index ``k`` replaced; else ``None``."""
    head, sep, k = header.rpartition(b':m')
    if not sep or not k or k.strip(b'0123456789abcdef'):
        return None
    original = _restoration(head)
    if original is None or original is _POP or original[:1] == b'c':
        return None
    return original, int(k, 16)


def _restore_memoized(data, parts):
    """:func:`restore_hints` for a record with memoized hints (see
    :func:`_memoized`), split at its hints (``parts``): each hint and the
    PUT after it, and each GET of its memo index, found by walking the
    record's opcodes, give back the bytes they replaced.  ``None`` if the
    record is not as stored."""
    try:
        _, matches = walk(data, refs=_PID_RE)
    except CorruptRecordError:
        return None
    edits = []
    memo = {}
    at = len(parts[0])
    for part in parts[1:]:
        end = part.find(b'\n')
        if end <= 0:
            return None
        header = part[:end]
        op_end = at + _HINT_LEN + end + 1
        found = _memo_restoration(header)
        if found is not None:
            original, k = found
            put = _memo_ops(k)[0]
            if data[op_end:op_end + len(put)] != put or k in memo:
                return None
            memo[k] = original
            edits.append((at, op_end + len(put), original))
        else:
            original = _cached_restoration(header)
            if original is None:
                return None
            if original is _POP:
                if not at or data[at - 1] != _POP_OP:
                    return None
                edits.append((at - 1, op_end, b''))
            else:
                edits.append((at, op_end, original))
        at += _HINT_LEN + len(part)
    for m in matches:
        k = _index(m.group(11), m.group(12))
        if k is not None and k in memo:
            edits.append((m.start(6), m.end(6), memo[k]))
    edits.sort()
    return _apply(data, edits)


class Replaced(bytes):
    """The bytes a stub hint replaced (empty for a ``'-'`` hint, whose
    POP goes too); what a ``replace`` callback returns to put them back."""

    #: a memoized hint's: the PUT after it goes too
    memoized = False


def _hint_how(klass):
    """The :class:`Replaced` bytes a hint that says how names, else
    ``None`` (a hint that names a GLOBAL of its class, or none)."""
    fields = klass[1].split(':')
    if len(fields) not in (4, 5):
        return None
    try:
        header = ':'.join(fields[1:]).encode('utf-8')
    except UnicodeEncodeError:
        return None
    memo = _memo_restoration(header) if len(fields) == 5 else None
    original = memo[0] if memo is not None else _restoration(header)
    if original is None:
        return None
    replaced = Replaced(original)
    replaced.klass = (fields[1], fields[2])
    replaced.memoized = memo is not None
    return replaced


def _restoration(header):
    """What a hint's ``module:name[:how]`` replaced: a GLOBAL, a GET, or
    ``_POP``; ``None`` if it is not well formed."""
    fields = header.split(b':')
    if len(fields) == 2:
        return b'c' + fields[0] + b'\n' + fields[1] + b'\n'
    if len(fields) != 3:
        return None
    how = fields[2]
    try:
        if how == b'-':
            return _POP
        if how[:1] == b'h' and len(how) == 3 or \
                how[:1] == b'j' and len(how) == 9:
            return how[:1] + bytes.fromhex(how[1:].decode('ascii'))
    except ValueError:
        pass
    return None


def strong_and_weak_oids(data, strict=False):
    """Every oid a record refers to in this database: ``(strong, weak)``.

    A record that cannot be read refers to nothing, unless ``strict``:
    then the unpickler's error is raised.
    """
    strong = []
    weak = []
    try:
        refs = persistent_ids(data)
    except Exception:
        if strict:
            raise
        return strong, weak
    for ref in refs:
        oid = _ref_oid(ref)
        if oid is not None:
            (weak if isinstance(ref, list) else strong).append(oid)
    return strong, weak


# --- opcode-level rewriting -------------------------------------------------

_MARK = object()
_GETS = frozenset(('GET', 'BINGET', 'LONG_BINGET'))
_PUTS = frozenset(('PUT', 'BINPUT', 'LONG_BINPUT', 'MEMOIZE'))
_TUPLES = {'TUPLE1': 1, 'TUPLE2': 2, 'TUPLE3': 3}
_BYTES = frozenset(('SHORT_BINBYTES', 'BINBYTES', 'BINBYTES8',
                    'SHORT_BINSTRING', 'BINSTRING', 'STRING'))


class _Entry:
    """What the rewriter knows of one stack item."""
    __slots__ = ('kind', 'value', 'start', 'end', 'put_end')

    def __init__(self, kind, value=None, start=0, end=0):
        self.kind = kind          # 'bytes', 'global', 'tuple' or None
        self.value = value
        self.start = start        # span of the op that pushed it
        self.end = end
        self.put_end = None       # end of a PUT right after a GLOBAL


def _global_op(klass):
    return ('c%s\n%s\n' % klass).encode('utf-8')


def rewrite_class_hints(data, replace):
    """Rewrite the class hints of ``(oid, klass)`` persistent ids.

    ``replace(oid, klass)`` gets the oid and the ``(module, name)`` of each
    hint and returns a new ``(module, name)``, or ``None`` to keep it.
    Returns ``data`` itself when nothing changed.

    A GLOBAL that the pickle memoizes for later use keeps its memo slot: it
    is written, memoized and popped, and the new global follows, so every
    later GET still finds the original class.

    The common pickles go through a quick opcode scan; anything it does not
    recognise exactly goes through the full stack-tracking parse.
    """
    edits = _quick_edits(data, replace)
    if edits is None:
        edits = _exact_edits(data, replace)
    return _apply(data, edits)


def _apply(data, edits):
    """``data`` with each ``(start, end, replacement)`` edit made."""
    if not edits:
        return data
    if len(edits) == 1:
        start, end, new = edits[0]
        return b''.join((data[:start], new, data[end:]))
    out = []
    last = 0
    for start, end, new in edits:
        out.append(data[last:start])
        out.append(new)
        last = end
    out.append(data[last:])
    return b''.join(out)


_H = ord('h')
_POP_OP = ord('0')
_J = ord('j')


class Hint(tuple):
    """``(module, name)`` of a class whose hint a rewrite makes a stub hint;
    what a ``replace`` callback returns for that."""


def _edit(data, klass_op, new):
    """The edit that swaps the class op of a pid for ``new``'s GLOBAL, or
    for a stub hint when ``new`` is a :class:`Hint`."""
    start, end, put_end = klass_op
    if isinstance(new, Hint):
        return _hint_edit(data, klass_op, tuple(new))
    if isinstance(new, Replaced):
        if new:
            if new.memoized and put_end is not None:
                return (start, put_end, bytes(new))   # the hint's PUT too
            return (start, end, bytes(new))
        if start and data[start - 1] == _POP_OP:
            return (start - 1, end, b'')        # the POP and the hint
        return (start, end, _global_op(new.klass))
    if put_end is not None:
        # keep the memoized original, then swap it out
        return (start, put_end,
                data[start:put_end] + b'0' + _global_op(new))  # 0 is POP
    return (start, end, _global_op(new))


def _hint_edit(data, klass_op, klass):
    """The edit that swaps a class op for the stub hint of ``klass``, saying
    how to give the replaced bytes back (see :func:`stub_hint`)."""
    start, end, put_end = klass_op
    if put_end is not None:
        # keep the memoized original, then pop it and push the hint
        return (start, put_end, data[start:put_end] + b'0'
                + _hint_op(klass, '-'))
    op = data[start]
    if op == _H and end - start == 2:
        how = 'h%02x' % data[start + 1]
    elif op == _J and end - start == 5:
        how = 'j' + data[start + 1:end].hex()
    else:
        how = ''
    return (start, end, _hint_op(klass, how))


def _exact_edits(data, replace):
    """Edits found by tracking every opcode's effect on the stack."""
    ops = []
    f = io.BytesIO(data)
    try:
        while f.tell() < len(data):
            ops.extend(pickletools.genops(f))
    except Exception as e:
        raise CorruptRecordError('cannot parse pickle: %s' % e)
    ends = [pos for _, _, pos in ops[1:]] + [len(data)]

    edits = []                 # (start, end, replacement bytes)
    memo = {}
    stack = []
    for i, (op, arg, pos) in enumerate(ops):
        end = ends[i]
        name = op.name
        if name == 'STOP':
            stack = []
            continue
        if name in _PUTS:
            key = len(memo) if name == 'MEMOIZE' else arg
            if stack and stack[-1] is not _MARK:
                top = stack[-1]
                memo[key] = top
                if top.kind == 'global' and top.end == pos:
                    top.put_end = end
            continue
        if name in _GETS:
            src = memo.get(arg)
            e = _Entry(src.kind if src else None,
                       src.value if src else None, pos, end)
            stack.append(e)
            continue
        if name in _BYTES:
            stack.append(_Entry('bytes', _oid_bytes(arg), pos, end))
            continue
        if name == 'GLOBAL':
            module, _, gname = arg.partition(' ')
            stack.append(_Entry('global', (module, gname), pos, end))
            continue
        if name in _TUPLES:
            n = _TUPLES[name]
            items = stack[-n:]
            del stack[-n:]
            stack.append(_Entry('tuple', items, pos, end))
            continue
        if name == 'TUPLE':
            items = []
            while stack and stack[-1] is not _MARK:
                items.append(stack.pop())
            if stack:
                stack.pop()
            items.reverse()
            stack.append(_Entry('tuple', items, pos, end))
            continue
        if name == 'BINPERSID':
            pid = stack.pop() if stack else None
            if (isinstance(pid, _Entry) and pid.kind == 'tuple'
                    and len(pid.value) == 2
                    and _MARK not in pid.value
                    and pid.value[0].kind == 'bytes'
                    and pid.value[0].value is not None
                    and pid.value[1].kind == 'global'):
                oid_e, klass_e = pid.value
                new = replace(oid_e.value, klass_e.value)
                if new is not None and (isinstance(new, Hint)
                                        or tuple(new) != klass_e.value):
                    edits.append(_edit(
                        data, (klass_e.start, klass_e.end, klass_e.put_end),
                        new))
            stack.append(_Entry(None, None, pos, end))
            continue
        # Any other opcode: apply its stack effect generically.
        before = op.stack_before
        if pickletools.markobject in before or (
                name == 'POP' and stack and stack[-1] is _MARK):
            while stack and stack[-1] is not _MARK:
                stack.pop()
            if stack:
                stack.pop()
            try:
                numtopop = before.index(pickletools.markobject)
            except ValueError:
                numtopop = 0
        else:
            numtopop = len(before)
        if numtopop:
            del stack[-numtopop:]
        for item in op.stack_after:
            stack.append(_MARK if item is pickletools.markobject
                         else _Entry(None, None, pos, end))

    return edits


def class_of(data):
    """The ``(module, name)`` of a record's class, without importing it.

    ``None`` for a record whose class is itself a persistent object, or
    that is not a ZODB record.  Only the first few opcodes are read:
    ZODB's ``get_pickle_metadata`` loads any other layout with the full
    unpickler, which imports and calls what a client's record names.
    """
    try:
        module, name = _class_names(data)
    except Exception:
        return None
    if not module or not name:
        return None
    return module, name


#: Opcodes that push a str (or, from Python 2, bytes) as they are.
_STRINGS = frozenset(('STRING', 'BINSTRING', 'SHORT_BINSTRING', 'UNICODE',
                      'BINUNICODE', 'SHORT_BINUNICODE'))


def _class_names(data):
    """``(module, name)`` from the class pickle's first opcodes: a GLOBAL
    (ZODB's layouts, with or without ``__getnewargs__``), or two strings
    (ZODB 3's ``((module, name), args)``)."""
    names = []
    f = io.BytesIO(data)
    for count, (op, arg, _) in enumerate(pickletools.genops(f)):
        if count > 8:
            break
        name = op.name
        if name in ('PROTO', 'MARK') or name in _PUTS:
            continue
        if name == 'GLOBAL' and not names:
            module, _, klass = arg.partition(' ')
            return module, klass
        if name not in _STRINGS:
            break
        names.append(arg.decode() if isinstance(arg, bytes) else arg)
        if len(names) == 2:
            return tuple(names)
    return None, None


# --- the quick scan -----------------------------------------------------------

def _arg_readers():
    """For each opcode byte: (name, how its argument is laid out)."""
    return {code: (name, (kind, n) if kind else 0)
            for code, (name, kind, n) in layouts(max_proto=5).items()}


_READERS = _arg_readers()
_BINARY_BYTES = frozenset(('SHORT_BINBYTES', 'BINBYTES', 'BINBYTES8',
                           'SHORT_BINSTRING', 'BINSTRING'))
_BINARY_GETS = {'BINGET': 1, 'LONG_BINGET': 4}
_BINARY_PUTS = {'BINPUT': 1, 'LONG_BINPUT': 4}


def _quick_edits(data, replace):
    """Edits for pickles whose class-hinted pids are laid out as ZODB's
    picklers lay them out: ``oid [PUT] klass [PUT] TUPLE2 [PUT] BINPERSID``
    with the oid a bytes op or a GET, and the class a GLOBAL or a GET.

    Returns ``None`` for anything else (text-mode memo ops, a tuple pid of
    another shape), which the exact parse then handles.
    """
    readers = _READERS
    memo = {}
    ops = []            # (name, start, end, value) of every op
    edits = []
    i = 0
    end_of_data = len(data)
    while i < end_of_data:
        try:
            name, kind = readers[data[i]]
        except KeyError:
            return None
        start = i
        i += 1
        value = None
        if kind:
            how, n = kind
            if how == 'fixed':
                value = data[i:i + n]
                i += n
            elif how == 'counted':
                size = int.from_bytes(data[i:i + n], 'little')
                i += n
                value = data[i:i + size]
                i += size
            else:
                j = data.find(b'\n', i)
                if j < 0:
                    return None
                if n == 2:
                    k = data.find(b'\n', j + 1)
                    if k < 0:
                        return None
                    value = _spelled(data[i:j], data[j + 1:k])
                    if value is None:
                        return None
                    j = k
                i = j + 1
        if i > end_of_data:
            return None
        if name in _BINARY_PUTS:
            key = int.from_bytes(value, 'little')
        elif name == 'MEMOIZE':
            key = len(memo)
        elif name in ('PUT', 'GET'):
            return None                 # text memo ops: the exact parse
        elif name in _BINARY_GETS:
            key = int.from_bytes(value, 'little')
            ops.append(('GET', start, i, memo.get(key)))
            continue
        else:
            key = None
        if key is not None:
            # memo[key] = what the previous op pushed, if we know it
            prev = ops[-1] if ops else None
            known = prev[3] if prev and prev[0] in ('BYTES', 'GLOBAL',
                                                    'GET') else None
            memo[key] = known
            ops.append(('PUT', start, i, None))
            continue
        if name in _BINARY_BYTES:
            ops.append(('BYTES', start, i, ('bytes', value)))
        elif name == 'GLOBAL':
            ops.append(('GLOBAL', start, i, ('global', value)))
        elif name == 'BINPERSID':
            edit = _pid_edit(data, ops, replace)
            if edit is False:
                return None
            if edit is not None:
                edits.append(edit)
            ops.append((name, start, i, None))
        else:
            ops.append((name, start, i, None))
    return edits


def _pid_edit(data, ops, replace):
    """The edit for the pid just before a BINPERSID, ``None`` when it
    needs none, ``False`` when the quick scan cannot tell."""
    j = len(ops) - 1
    while j >= 0 and ops[j][0] == 'PUT':
        j -= 1
    if j < 0 or ops[j][0] not in ('TUPLE2', 'TUPLE'):
        return None                         # not a tuple pid: no hint
    tuple_op = ops[j][0]
    j -= 1
    klass_end = j
    while j >= 0 and ops[j][0] == 'PUT':
        j -= 1
    if j < 0 or ops[j][0] not in ('GLOBAL', 'GET'):
        return False
    klass_name, klass_start, klass_stop, klass = ops[j]
    put_end = ops[j + 1][2] if (klass_name == 'GLOBAL' and j < klass_end
                                and ops[j + 1][1] == klass_stop) else None
    j -= 1
    while j >= 0 and ops[j][0] == 'PUT':
        j -= 1
    if j >= 0 and ops[j][0] == 'POP':
        # our own store-side form: GLOBAL original, PUT, POP, GLOBAL stub
        j -= 1
        while j >= 0 and ops[j][0] == 'PUT':
            j -= 1
        if j < 0 or ops[j][0] != 'GLOBAL':
            return False
        j -= 1
        while j >= 0 and ops[j][0] == 'PUT':
            j -= 1
    if j < 0 or ops[j][0] not in ('BYTES', 'GET'):
        return False
    oid = ops[j][3]
    if tuple_op == 'TUPLE' and (j < 1 or ops[j - 1][0] != 'MARK'):
        return False
    if not klass or klass[0] != 'global' or not oid or oid[0] != 'bytes':
        return False
    if len(oid[1]) != 8:
        return None                         # not an oid: user data
    new = replace(oid[1], klass[1])
    if new is None or not isinstance(new, Hint) and tuple(new) == klass[1]:
        return None
    return _edit(data, (klass_start, klass_stop, put_end), new)


# --- ZODB's own layout, by one regular expression -------------------------------
#
# ZODB's pickler (protocol 3, memo on) writes a class-hinted reference as
#
#     oid [PUT] klass [PUT] TUPLE2 [PUT] BINPERSID
#
# with the oid ``C\x08`` and its eight bytes, or a GET of them, and the class
# a GLOBAL or a GET.  The walk of the record's opcodes (``opcodes.walk``)
# tries one regular expression at each opcode where such a reference may
# begin, and only there: the same bytes inside user data (a bytes value
# holding a pickle) do not begin at an opcode and are never matched.  The
# walk also bounds the record, so ``noload`` of the original may then run:
# it must report every class-hinted reference exactly where a match ends,
# with the same oid, or the record goes the exact way instead.  Each edit
# replaces one whole opcode found by the walk (the class's GLOBAL or GET),
# so the rewritten record is as well formed as the original.

_PID_RE = re.compile(
    rb'(?:C\x08(.{8})(?:q(.)|r(..)\x00\x00)?|h(.)|j(..)\x00\x00)'
    rb'(c([^\n]*)\n([^\n]*)\n(?:q(.)|r(..)\x00\x00)?|h(.)|j(..)\x00\x00)'
    rb'\x86(?:q.|r..\x00\x00)?Q', re.DOTALL)
_META_RE = re.compile(rb'\x80\x03c([^\n]*)\n([^\n]*)\nq\x00\.')


def _index(short, long):
    """The memo index of a ``q``/``h`` (one byte) or ``r``/``j`` argument."""
    if short is not None:
        return short[0]
    if long is not None:
        return long[0] | long[1] << 8
    return None


def _rewrite_zodb_layout(data, prefix, memoize=True):
    """``(record, foreign, hints)``, or ``None`` when ``data`` is not laid
    out exactly as ZODB lays records out.  Raises
    :class:`~compositestorage.opcodes.UnsafeRecordError` for a record out
    of bounds.  ``memoize`` lets a hint used more than once be written
    once (see :func:`_memoized`); a record that will be tagged is not."""
    try:
        consumed, matches, persids, top = walk(data, refs=_PID_RE,
                                               census=True)
    except NotAPickle:
        return None
    if consumed != len(data):
        return None
    literal = True
    memo = {}
    meta = _META_RE.match(data)
    if meta is not None:
        memo[0] = _spelled(*meta.groups())
    edits = []
    hints = {}
    expected = []               # (oid, where its BINPERSID ends)
    for m in matches:
        (oid, oid_q, oid_r, oid_h, oid_j, _, module, name,
         k_q, k_r, k_h, k_j) = m.groups()
        if oid is None:
            literal = False
            oid = memo.get(_index(oid_h, oid_j))
            if not isinstance(oid, bytes):
                return None
        elif oid_q is not None or oid_r is not None:
            memo[_index(oid_q, oid_r)] = oid
        if module is not None:
            klass = _spelled(module, name)
            if klass is None:
                return None
            put = _index(k_q, k_r)
            if put is not None:
                memo[put] = klass
            start = m.start(6)
            span = (start, start + len(module) + len(name) + 3,
                    m.end(6) if put is not None else None)
        else:
            klass = memo.get(_index(k_h, k_j))
            if not isinstance(klass, tuple):
                return None
            span = (m.start(6), m.end(6), None)
        if oid[0] != prefix and not is_stub_hint(klass):
            hints[oid] = klass
            edits.append(_cached_hint_edit(data, span, klass))
        expected.append((oid, m.end()))
    if literal and persids == len(expected):
        # Every BINPERSID ends a match, whose opcodes push its oid and
        # class, pair them and hand the pair over: these are the record's
        # persistent ids, exactly, and noload would report no others.
        foreign = {oid for oid, _ in expected if oid[0] != prefix}
    else:
        foreign = _foreign_by_noload(data, prefix, expected)
        if foreign is None:
            return None
    if memoize and len(edits) > 1:
        edits = _memoized(data, edits, top)
    return _apply(data, edits), foreign, hints


def _foreign_by_noload(data, prefix, expected):
    """The oids of other partitions among the persistent ids ``noload``
    reports, or ``None`` unless it reports every ``(oid, end)`` of
    ``expected`` as a class-hinted one, and no other."""
    try:
        pids, _ = pids_and_ends(data, walked=True)
    except Exception:
        return None
    found = [(pid[0], end) for pid, end in pids
             if isinstance(pid, tuple) and pid]
    if found != expected:
        return None
    foreign = set()
    for ref, _ in pids:
        # a tuple's oid is one of ``expected``: eight bytes already
        oid = (ref[0] if type(ref) is tuple and ref
               else _ref_oid(ref))
        if oid is not None and oid[0] != prefix:
            foreign.add(oid)
    return foreign


_hint_edits = {}


def _cached_hint_edit(data, span, klass):
    """:func:`_hint_edit`, cached by what it depends on: the class and the
    bytes replaced.  Most hints of a commit replace the same few bytes (a
    GET of the record's own class)."""
    start, end, put_end = span
    if put_end is not None:
        end = put_end
    key = klass, data[start:end], put_end is None
    try:
        return start, end, _hint_edits[key]
    except KeyError:
        pass
    edit = _hint_edit(data, span, klass)
    if len(_hint_edits) < 10000:
        _hint_edits[key] = edit[2]
    return edit


def _memo_ops(k):
    """The PUT and the GET of memo index ``k``."""
    if k < 256:
        return b'q' + bytes((k,)), b'h' + bytes((k,))
    k = k.to_bytes(4, 'little')
    return b'r' + k, b'j' + k


def _memoized(data, edits, top):
    """``edits`` with each stub hint that replaces a GET and is used more
    than once written in full only the first time, then memoized.

    A container full of references to one class in another partition
    would otherwise spell the same 44-byte hint for every entry, where
    ZODB's own pickle spends a 2-byte GET.  The first use becomes the
    hint, with ``:m`` and a memo index in hex added to its name, followed
    by a PUT of that index; every later use becomes a GET of it.  The
    indices are ``top`` and up, beyond every index a PUT or a GET of the
    record names (the walk's census), so every GET of them in the child's
    record is one of these hints, which is what lets a load find them
    (:func:`_restore_memoized`).
    """
    uses = {}
    for i, (start, end, op) in enumerate(edits):
        if end - start in (2, 5) and data[start] in (_H, _J) \
                and op.startswith(HINT_MARK):
            uses.setdefault(op, []).append(i)
    # within what the walk allows a PUT of the child's (longer) record, and
    # what _PID_RE reads back as a GET
    limit = min(0xFFFF, max(256, len(data) // 2))
    k = top
    for op, where in uses.items():
        if len(where) < 2 or k > limit:
            continue
        put, get = _memo_ops(k)
        start, end, _ = edits[where[0]]
        edits[where[0]] = (start, end, b'%s:m%x\n%s' % (op[:-1], k, put))
        for i in where[1:]:
            start, end, _ = edits[i]
            edits[i] = (start, end, get)
        k += 1
    return edits


_spellings = {}
_hint_ops = {}


def _hint_op(klass, how=''):
    """The GLOBAL op of ``stub_hint(klass, how)``."""
    key = klass, how
    try:
        return _hint_ops[key]
    except KeyError:
        op = _global_op(stub_hint(klass, how))
        if len(_hint_ops) < 10000:
            _hint_ops[key] = op
        return op


def _spelled(module, name):
    """The ``(module, name)`` a GLOBAL's module and name bytes spell, or
    ``None`` for bytes that are not UTF-8."""
    key = module, name
    try:
        return _spellings[key]
    except KeyError:
        pass
    try:
        klass = (module.decode('utf-8'), name.decode('utf-8'))
    except UnicodeDecodeError:
        return None
    if len(_spellings) < 10000:
        _spellings[key] = klass
    return klass
