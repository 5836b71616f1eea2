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

Scanning uses the C unpickler's ``noload`` (no class is ever imported).
Rewriting works on opcodes, and only runs for records that need it.
"""
import io
import pickletools

from ZODB._compat import PersistentUnpickler

from compositestorage.errors import CorruptRecordError

#: The global that names the stub class, as it appears in a GLOBAL opcode.
STUB_MODULE = 'compositestorage.stubs'
STUB_NAME = 'PartitionStub'
STUB_GLOBAL = (STUB_MODULE, STUB_NAME)
#: Bytes that every record holding a stub reference contains.  Records
#: without them come back from a child byte for byte, unparsed.
STUB_MARK = ('%s\n%s\n' % STUB_GLOBAL).encode('ascii')


def _oid_bytes(oid):
    if isinstance(oid, str):  # Python 2 pickles
        return oid.encode('latin-1')
    return oid


def persistent_ids(data):
    """Return every persistent id in a record, in pickle order.

    Classes in tuple forms come back as ``None``: ``noload`` does not
    import anything.
    """
    refs = []
    u = PersistentUnpickler(None, refs.append, io.BytesIO(data))
    u.noload()
    u.noload()
    return refs


def crossing(data, prefix):
    """Scan a record that is to be stored in partition ``prefix``.

    Returns ``(foreign, hinted)``: the set of oids referenced from another
    partition (strong and weak alike, for each needs a stub in this
    partition), and whether any of them is referenced with a class hint,
    which is what makes the record need rewriting.  Both are empty/false
    for the common record, which is then stored as it is.
    """
    foreign = None
    hinted = False
    try:
        refs = persistent_ids(data)
    except Exception:
        # Not a ZODB pickle: storages accept any bytes, and such a record
        # holds no reference to rewrite.
        return (), False
    for ref in refs:
        if isinstance(ref, tuple):
            oid = ref[0]
            hint = True
        elif isinstance(ref, list):
            if len(ref) == 1:
                oid = ref[0]                # legacy weak reference
            elif ref[0] == 'w' and len(ref[1]) == 1:
                oid = ref[1][0]
            else:
                continue                    # another database's reference
            hint = False
        else:
            oid = ref
            hint = False
        oid = _oid_bytes(oid)
        if oid[0] != prefix:
            if foreign is None:
                foreign = set()
            foreign.add(oid)
            hinted = hinted or hint
    return foreign or (), hinted


def strong_and_weak_oids(data):
    """Every oid a record refers to in this database: ``(strong, weak)``."""
    strong = []
    weak = []
    try:
        refs = persistent_ids(data)
    except Exception:
        return strong, weak
    for ref in refs:
        if isinstance(ref, tuple):
            strong.append(_oid_bytes(ref[0]))
        elif isinstance(ref, list):
            if len(ref) == 1:
                weak.append(_oid_bytes(ref[0]))
            elif ref[0] == 'w' and len(ref[1]) == 1:
                weak.append(_oid_bytes(ref[1][0]))
        else:
            strong.append(_oid_bytes(ref))
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
    if not edits:
        return data
    out = []
    last = 0
    for start, end, new in edits:
        out.append(data[last:start])
        out.append(new)
        last = end
    out.append(data[last:])
    return b''.join(out)


def _edit(data, klass_op, new):
    """The edit that swaps the class op of a pid for ``new``'s GLOBAL."""
    start, end, put_end = klass_op
    if put_end is not None:
        # keep the memoized original, then swap it out
        return (start, put_end,
                data[start:put_end] + b'0' + _global_op(new))  # 0 is POP
    return (start, end, _global_op(new))


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
            if stack:
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
            if (pid is not None and pid.kind == 'tuple'
                    and len(pid.value) == 2
                    and pid.value[0].kind == 'bytes'
                    and pid.value[1].kind == 'global'):
                oid_e, klass_e = pid.value
                new = replace(oid_e.value, klass_e.value)
                if new is not None and tuple(new) != klass_e.value:
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

    ``None`` for a record whose class is itself a persistent object.
    """
    from ZODB.utils import get_pickle_metadata
    try:
        module, name = get_pickle_metadata(data)
    except Exception:
        return None
    if not module or not name:
        return None
    return module, name


# --- the quick scan -----------------------------------------------------------

def _arg_readers():
    """For each opcode byte: (name, how its argument is laid out)."""
    table = {}
    for op in pickletools.opcodes:
        arg = op.arg
        if arg is None:
            kind = 0
        elif arg.n >= 0:
            kind = ('fixed', arg.n)
        elif arg.n == pickletools.UP_TO_NEWLINE:
            kind = ('lines', 2 if arg.name == 'stringnl_noescape_pair'
                    else 1)
        elif arg.n == pickletools.TAKEN_FROM_ARGUMENT1:
            kind = ('counted', 1)
        elif arg.n in (pickletools.TAKEN_FROM_ARGUMENT4,
                       pickletools.TAKEN_FROM_ARGUMENT4U):
            kind = ('counted', 4)
        elif arg.n == pickletools.TAKEN_FROM_ARGUMENT8U:
            kind = ('counted', 8)
        else:  # pragma: no cover - no such opcode today
            continue
        table[ord(op.code)] = (op.name, kind)
    return table


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
                    value = (data[i:j].decode('utf-8'),
                             data[j + 1:k].decode('utf-8'))
                    j = k
                i = j + 1
        if i > end_of_data:
            return None
        if name in _BINARY_PUTS:
            key = int.from_bytes(value, 'little')
        elif name == 'MEMOIZE':
            key = len(memo)
        elif name in ('PUT', 'GET', 'LONG_BINGET', 'BINGET'):
            if name == 'GET':
                return None
            key = int.from_bytes(value, 'little')
            ops.append(('GET', start, i, memo.get(key)))
            continue
        else:
            key = None
            if name == 'PUT':
                return None
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
    new = replace(oid[1], klass[1])
    if new is None or tuple(new) == klass[1]:
        return None
    return _edit(data, (klass_start, klass_stop, put_end), new)
