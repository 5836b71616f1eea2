"""Walking a record's pickle opcodes, with work bounded by the record's size.

Why this exists: the C unpickler behind ``noload`` trusts its input.  A
``LONG_BINPUT`` of index *n* makes it allocate and clear a memo of *2n*
slots, so five bytes can ask for gigabytes; a dict key made of tuples nested
a few hundred thousand deep overflows the C stack when the dict hashes it.
Both come from a client's record, or from a record that a byte-level edit
knocked out of alignment.  ZODB's own serializer writes neither: its memo
indices count up from 0, one per PUT, and its nesting stops at Python's
recursion limit.  So before the C unpickler sees a record, :func:`walk`
reads every opcode of its two pickles in order and refuses

* a record that is not two whole pickles of protocol 0 to 3 opcodes
  (``noload`` knows no others): :class:`NotAPickle`, which callers treat as
  "holds no reference", as ``noload`` failing always meant;
* two whole pickles with a memo index beyond what the record could fill
  (a PUT is at least two bytes) or tuples nested deeper than
  :data:`MAX_NESTING`: :class:`UnsafeRecordError`, a
  :class:`CorruptRecordError` that says so.  Bytes that merely look like
  such an opcode, in a record that is no pickle at all, are stored as they
  are, like any other bytes that are not a pickle.

The walk also tells where opcodes begin, which is what decides whether a
byte pattern that looks like a reference is one: a pattern that does not
begin at an opcode lies inside some other opcode's argument (a ``bytes``
value, say) and is user data.

Cost: runs of opcodes that need no check are matched by one regular
expression; Python looks only at counted arguments (strings, bytes, oids),
``STOP``, memo PUTs with a long index, and the opcodes where a reference
may begin.  Every step moves forward, so the walk is linear in the record.
"""
import os
import pickletools
import re

from compositestorage.errors import CorruptRecordError
from compositestorage.errors import oid_hex

#: Tuples nested deeper than this are refused: ZODB's pickler stops near
#: Python's recursion limit (1000), and hashing a key nested some 100 000
#: deep crashes the C unpickler.
MAX_NESTING = 5000


class NotAPickle(CorruptRecordError):
    """The bytes are not two whole pickles that ``noload`` could read."""


class UnreadableRecordError(CorruptRecordError):
    """A pickle with a reference to another partition that the exact parse
    cannot read, so its class hint cannot be rewritten."""

    def __init__(self, reason, oid=None, partition=None):
        CorruptRecordError.__init__(self, reason)
        self.reason = reason
        self.oid = oid
        self.partition = partition

    def naming(self, oid, partition):
        return UnreadableRecordError(self.reason, oid, partition)

    def __str__(self):
        return ('cannot store oid %s in partition %r: it refers to another '
                'partition, but its pickle cannot be parsed (%s); nothing '
                'was stored from it. Check the client that wrote it'
                % (oid_hex(self.oid) if self.oid is not None else '?',
                   self.partition, self.reason))


class UnsafeRecordError(CorruptRecordError):
    """A record that would make the unpickler use memory or time out of
    proportion to its size.  ZODB's serializer never writes one."""

    def __init__(self, reason, offset, size, oid=None, partition=None):
        CorruptRecordError.__init__(self, reason, offset, size)
        self.reason = reason
        self.offset = offset
        self.size = size
        self.oid = oid
        self.partition = partition

    def naming(self, oid, partition):
        """The same error, naming the record it is about."""
        return UnsafeRecordError(self.reason, self.offset, self.size,
                                 oid, partition)

    def __str__(self):
        where = ''
        if self.oid is not None:
            where = ' for oid %s' % oid_hex(self.oid)
        if self.partition is not None:
            where += ' in partition %r' % self.partition
        return ('refused the %d-byte record%s: %s (at byte %d), which '
                'ZODB never writes and which would make the unpickler use '
                'memory or time out of proportion to the record; nothing '
                'was stored from it. Check the client that wrote it'
                % (self.size, where, self.reason, self.offset))


def layouts(max_proto=3):
    """``{opcode byte: (name, kind, n)}`` for the opcodes of protocols up
    to ``max_proto`` (``noload`` knows 0 to 3): kind is ``None`` (no
    argument), ``'fixed'`` (n bytes), ``'counted'`` (an n-byte length, then
    that many bytes) or ``'lines'`` (n newline-terminated lines)."""
    counted = {pickletools.TAKEN_FROM_ARGUMENT1: 1,
               pickletools.TAKEN_FROM_ARGUMENT4: 4,
               pickletools.TAKEN_FROM_ARGUMENT4U: 4,
               pickletools.TAKEN_FROM_ARGUMENT8U: 8}
    table = {}
    for op in pickletools.opcodes:
        if op.proto > max_proto:
            continue
        arg = op.arg
        if arg is None:
            layout = (None, 0)
        elif arg.n >= 0:
            layout = ('fixed', arg.n)
        elif arg.n == pickletools.UP_TO_NEWLINE:
            layout = ('lines', 2 if arg.name == 'stringnl_noescape_pair'
                      else 1)
        elif arg.n in counted:
            layout = ('counted', counted[arg.n])
        else:  # pragma: no cover - no such opcode today
            continue
        table[ord(op.code)] = (op.name,) + layout
    return table


LAYOUTS = layouts()


#: Counted arguments up to this long are matched by the regular expression.
_SHORT = 48


def _run_pattern(stop_at_refs):
    """A regular expression for a run of opcodes that need no look from
    Python: every opcode but STOP, PUT, a LONG_BINPUT beyond memo index
    255 and a counted one longer than :data:`_SHORT`.  With
    ``stop_at_refs``, an opcode where a class-hinted reference may begin
    ends a run too: a SHORT_BINBYTES of eight bytes (an oid), and a BINGET
    or LONG_BINGET followed by a GLOBAL or a GET."""
    plain = []
    alternatives = []
    for code, (name, kind, n) in LAYOUTS.items():
        c = re.escape(bytes([code]))
        if name in ('STOP', 'PUT'):
            continue
        if kind is None:
            plain.append(c)
        elif name == 'LONG_BINPUT':
            alternatives.append(c + rb'.\x00\x00\x00')
        elif kind == 'fixed':
            tail = rb'(?![chj])' if stop_at_refs and name in (
                'BINGET', 'LONG_BINGET') else b''
            alternatives.append(c + b'.{%d}' % n + tail)
        elif kind == 'counted':
            lengths = [length for length in range(_SHORT + 1)
                       if not (stop_at_refs and name == 'SHORT_BINBYTES'
                               and length == 8)]
            alternatives.append(c + b'(?:' + b'|'.join(
                re.escape(length.to_bytes(n, 'little')) + b'.{%d}' % length
                for length in lengths) + b')')
        else:
            alternatives.append(c + rb'[^\n]*+\n' * n)
    # the commonest first: each alternative is tried in turn
    alternatives.sort(key=lambda a: a[:1] not in b'XCqhK')
    alternatives.insert(0, b'[' + b''.join(plain) + b']')
    return re.compile(b'(?:' + b'|'.join(alternatives) + b')*+', re.DOTALL)


_RUN = _run_pattern(False)
_RUN_TO_GETS = _run_pattern(True)
_STOP = ord('.')
_LONG_BINPUT = ord('r')
_PUT = ord('p')
_REF_STARTS = frozenset((ord('C'), ord('h'), ord('j')))
_TUPLE_BYTES = (b't', b'\x85', b'\x86', b'\x87')


def _layout_bytes():
    """:data:`LAYOUTS` as the C walk reads it: for each opcode byte, its
    kind (0 unknown, 1 no argument, 2 fixed, 3 counted, 4 lines) and n."""
    kinds = {None: 1, 'fixed': 2, 'counted': 3, 'lines': 4}
    table = bytearray(512)
    for code, (_, kind, n) in LAYOUTS.items():
        table[2 * code] = kinds[kind]
        table[2 * code + 1] = n
    return bytes(table)


_LAYOUT_BYTES = _layout_bytes()
if os.environ.get('COMPOSITESTORAGE_PURE_PYTHON'):
    _accelerated = None
else:
    try:
        from compositestorage._opcodes import walk as _accelerated
    except ImportError:     # not built: no compiler where it was installed
        _accelerated = None


def walk(data, pickles=2, refs=None, census=False):
    """Check that ``data`` begins with ``pickles`` whole pickles that the C
    unpickler can read within bounds set by ``len(data)``; return where the
    last one ends.

    ``refs``, a compiled pattern, is tried at every opcode where a
    class-hinted reference may begin (a SHORT_BINBYTES of eight bytes, a
    BINGET or a LONG_BINGET before a class); the list of its matches is
    returned too, as ``(end, matches)``.  Each match begins at an opcode,
    and its bytes are walked like any others.

    With ``census`` (and ``refs``), two more: ``(end, matches, persids,
    top)``, where ``persids`` counts the BINPERSID opcodes (``-1`` if there
    is a text PERSID, or anything the count cannot vouch for) and ``top``
    is one more than the highest memo index any PUT or GET names (0 for
    none): what lets :mod:`compositestorage.references` know every
    persistent id of a record, and a memo index it never uses, without
    unpickling it.

    Raises :class:`NotAPickle` or :class:`UnsafeRecordError`.

    The C accelerator (``compositestorage._opcodes``, built where a
    compiler exists) answers for the records it can vouch for, with the
    very answer of :func:`walk_python`; everything else (errors, text
    PUTs and GETs, long memo indices) goes to :func:`walk_python`.
    """
    if _accelerated is not None and type(data) is bytes:
        found = _accelerated(data, pickles, max(256, len(data) // 2),
                             _LAYOUT_BYTES, refs is not None,
                             census and refs is not None)
        if found is not None:
            if refs is None:
                _check_nesting(data, found)
                return found
            end, starts = found[:2]
            _check_nesting(data, end)
            match = refs.match
            matches = []
            for start in starts:
                m = match(data, start)
                if m is not None:
                    matches.append(m)
            if census:
                return end, matches, found[2], found[3]
            return end, matches
    found = walk_python(data, pickles, refs)
    if census and refs is not None:
        return found + _census(data, found[0])
    return found


#: What :func:`_census` answers when it cannot vouch for a record: no
#: persistent id known, no memo index free.
_NO_CENSUS = (-1, 1 << 32)
_PERSID = ord('P')
_BINPERSID = ord('Q')
_SHORT_MEMO = frozenset(map(ord, 'qh'))
_LONG_MEMO = frozenset(map(ord, 'rj'))
_TEXT_MEMO = frozenset(map(ord, 'pg'))


def _opcodes(data, end):
    """``(code, start, arg, next)`` of each opcode in ``data[:end]``, which
    a walk found well formed: where it begins, where its argument begins,
    where the next one begins."""
    pos = 0
    while pos < end:
        code = data[pos]
        start = pos
        _, kind, n = LAYOUTS[code]
        pos += 1
        arg = pos
        if kind == 'fixed':
            pos += n
        elif kind == 'counted':
            pos += n + int.from_bytes(data[pos:pos + n], 'little')
        elif kind == 'lines':
            for _ in range(n):
                pos = data.index(b'\n', pos) + 1
        yield code, start, arg, pos


def _census(data, end):
    """``(persids, top)`` of the pickles in ``data[:end]``, which
    :func:`walk_python` found well formed: see :func:`walk`."""
    persids = 0
    top = 0
    for code, _, arg, pos in _opcodes(data, end):
        if code == _BINPERSID:
            persids += 1
        elif code == _PERSID:
            return _NO_CENSUS
        elif code in _SHORT_MEMO or code in _LONG_MEMO:
            top = max(top, int.from_bytes(data[arg:pos], 'little') + 1)
        elif code in _TEXT_MEMO:
            digits = data[arg:pos - 1]
            if not digits.isdigit() or len(digits) > 20:
                return _NO_CENSUS
            top = max(top, int(digits) + 1)
    return persids, top


def walk_python(data, pickles=2, refs=None):
    """Check that ``data`` begins with ``pickles`` whole pickles that the C
    unpickler can read within bounds set by ``len(data)``; return where the
    last one ends.

    ``refs``, a compiled pattern, is tried at every opcode where a
    class-hinted reference may begin (a SHORT_BINBYTES, a BINGET or a
    LONG_BINGET); the list of its matches is returned too, as
    ``(end, matches)``.  Each match begins at an opcode, and its bytes are
    walked like any others.

    Raises :class:`NotAPickle` or :class:`UnsafeRecordError`.  This is
    the walk itself; :func:`walk` gives the same answers, through the C
    accelerator where it is built.
    """
    size = len(data)
    memo_limit = max(256, size // 2)
    run = (_RUN if refs is None else _RUN_TO_GETS).match
    matches = []
    unsafe = None           # raised once the bytes prove to be pickles
    stops = 0
    pos = 0
    while True:
        pos = run(data, pos).end()
        if pos >= size:
            raise NotAPickle('pickle data was truncated')
        code = data[pos]
        try:
            name, kind, n = LAYOUTS[code]
        except KeyError:
            raise NotAPickle('opcode %r at byte %d is not one noload reads'
                             % (bytes([code]), pos))
        if refs is not None and code in _REF_STARTS:
            found = refs.match(data, pos)
            if found is not None:
                matches.append(found)
        start = pos
        pos += 1
        if kind is None:            # only STOP gets here
            stops += 1
            if stops == pickles:
                break
        elif kind == 'counted':
            length = int.from_bytes(data[pos:pos + n], 'little')
            pos += n + length
        elif kind == 'fixed':
            if code == _LONG_BINPUT:
                index = int.from_bytes(data[pos:pos + n], 'little')
                if index > memo_limit and unsafe is None:
                    unsafe = UnsafeRecordError(
                        'LONG_BINPUT of memo index %d' % index, start, size)
            pos += n
        else:
            end = pos
            for _ in range(n):
                end = data.find(b'\n', end) + 1
                if not end:
                    raise NotAPickle('pickle data was truncated')
            if code == _PUT and unsafe is None:
                unsafe = _check_put(data[pos:end - 1], memo_limit, start,
                                    size)
            pos = end
        if pos > size:
            raise NotAPickle('pickle data was truncated')
    if unsafe is not None:
        raise unsafe
    _check_nesting(data, pos)
    return pos if refs is None else (pos, matches)


def _check_put(digits, memo_limit, offset, size):
    """The error for a text PUT whose index is beyond ``memo_limit``."""
    if len(digits) > 20:
        return UnsafeRecordError('PUT of memo index %r...' % digits[:20],
                                 offset, size)
    try:
        index = int(digits)
    except ValueError:
        raise NotAPickle('PUT of %r at byte %d' % (digits, offset))
    if index < 0:
        raise NotAPickle('negative PUT at byte %d' % offset)
    if index > memo_limit:
        return UnsafeRecordError('PUT of memo index %d' % index, offset, size)
    return None


def _check_nesting(data, end):
    """Refuse tuples nested deeper than :data:`MAX_NESTING`.  Counting the
    bytes that could be tuple opcodes settles nearly every record; only
    one with more of them than the limit gets the exact walk.  A record
    no longer than the limit cannot hold more, and is not counted."""
    if end <= MAX_NESTING:
        return
    if sum(data.count(b, 0, end) for b in _TUPLE_BYTES) <= MAX_NESTING:
        return
    deepest, offset = _deepest_tuple(data, end)
    if deepest > MAX_NESTING:
        raise UnsafeRecordError(
            'tuples nested %d deep' % deepest, offset, len(data))


def _stack_effects():
    """``{opcode byte: (pops, pushes, to_mark, marks)}`` from pickletools:
    items popped, items pushed, whether it pops down to a MARK, whether it
    pushes one."""
    mark = pickletools.markobject
    table = {}
    for op in pickletools.opcodes:
        if op.proto > 3:
            continue
        before, after = op.stack_before, op.stack_after
        to_mark = mark in before
        pops = before.index(mark) if to_mark else len(before)
        table[ord(op.code)] = (pops, len(after) - (mark in after), to_mark,
                               mark in after)
    return table


_EFFECTS = _stack_effects()
_TUPLE_OPS = {ord('t'): 0, 0x85: 1, 0x86: 2, 0x87: 3}
_MEMO_PUTS = frozenset(map(ord, 'pqr'))
_MEMO_GETS = frozenset(map(ord, 'ghj'))


def _deepest_tuple(data, end):
    """``(depth, offset)`` of the most deeply nested tuple in the pickles
    of ``data[:end]``, which :func:`walk` found well formed, by each
    opcode's effect on the stack (only nesting through tuples counts: a
    dict hashes its keys, and only a tuple hashes what it holds)."""
    stack = []          # nesting depth of each item, or None for a MARK
    memo = {}
    deepest = (0, 0)
    pos = 0
    # the loop of _opcodes, inline: a generator step per opcode makes this,
    # which a hostile record can make long, half as slow again
    while pos < end:
        code = data[pos]
        start = pos
        _, kind, n = LAYOUTS[code]
        pos += 1
        arg = pos
        if kind == 'fixed':
            pos += n
        elif kind == 'counted':
            pos += n + int.from_bytes(data[pos:pos + n], 'little')
        elif kind == 'lines':
            for _ in range(n):
                pos = data.index(b'\n', pos) + 1
        if code in _TUPLE_OPS:
            count = _TUPLE_OPS[code]
            depth = 0
            if count:
                for _ in range(min(count, len(stack))):
                    depth = max(depth, stack.pop() or 0)
            else:
                while stack and stack[-1] is not None:
                    depth = max(depth, stack.pop())
                if stack:
                    stack.pop()
            depth += 1
            stack.append(depth)
            if depth > deepest[0]:
                deepest = (depth, start)
        elif code in _MEMO_PUTS:
            if stack:
                memo[data[arg:pos]] = stack[-1]
        elif code in _MEMO_GETS:
            stack.append(memo.get(data[arg:pos], 0))
        elif code == 0x32:                  # DUP
            stack.append(stack[-1] if stack else 0)
        else:
            pops, pushes, to_mark, marks = _EFFECTS[code]
            if to_mark:
                while stack and stack[-1] is not None:
                    stack.pop()
                if stack:
                    stack.pop()
            if pops:
                del stack[-pops:]
            if marks:
                stack.append(None)
            stack.extend([0] * pushes)
    return deepest
