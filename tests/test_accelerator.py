"""The C walk (``compositestorage._opcodes``) answers exactly as the Python
walk does, or leaves the record to it.

The fuzz of ``test_hostile_records.py`` compares the two walks, and the
records made with each, on every record it makes; these tests pin the
cases by name.  Under CI the accelerator must be built (``CI=true``),
unless ``COMPOSITESTORAGE_PURE_PYTHON`` switches it off.
"""
import os
import subprocess
import sys

import pytest

from compositestorage import opcodes
from compositestorage.references import _PID_RE
from compositestorage.references import to_child_record
from conftest import accelerator_built

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import hostile_records  # noqa: E402
from hostile_records import walk_outcome  # noqa: E402

HEAD = b'\x80\x03' + hostile_records.GLOBAL + b'q\x00.\x80\x03'
REF = (b'C\x08' + hostile_records.FOREIGN + b'q\x02' + hostile_records.GLOBAL
       + b'q\x03\x86q\x04Q')

needs_accelerator = pytest.mark.skipif(
    not accelerator_built(), reason='compositestorage._opcodes not built '
    '(no C compiler at install, or COMPOSITESTORAGE_PURE_PYTHON set)')


def c_walk(data, refs=False):
    return opcodes._accelerated(data, 2, max(256, len(data) // 2),
                                opcodes._LAYOUT_BYTES, refs)


@needs_accelerator
def test_zodbs_records_take_the_c_walk(tmp_path):
    records = hostile_records.zodb_records(tmp_path)
    assert len(records) > 10
    for prefix, data in records:
        assert c_walk(data) is not None, data
        for refs in (None, _PID_RE):
            assert walk_outcome(opcodes.walk, data, refs) == \
                walk_outcome(opcodes.walk_python, data, refs)


@needs_accelerator
def test_a_reference_is_found_by_both_walks():
    data = HEAD + b'}q\x01(X\x01\x00\x00\x00a' + REF + b'u.'
    end, starts = c_walk(data, True)
    assert end == len(data)
    assert starts == [data.index(b'C\x08')]
    fast = walk_outcome(opcodes.walk, data, _PID_RE)
    assert fast == walk_outcome(opcodes.walk_python, data, _PID_RE)
    assert len(fast[1]) == 1
    record, foreign, _ = to_child_record(data, 0)
    assert foreign == {hostile_records.FOREIGN}
    assert b'PartitionStub:persistent.mapping:PersistentMapping' in record


@needs_accelerator
@pytest.mark.parametrize('data', [
    HEAD + b'}q\x01Np5\n0.',                         # text PUT
    HEAD + b'}q\x01Nr\x00\x00\x00\x100.',            # LONG_BINPUT 2**28
    HEAD + b'}q\x01X\xff\xff\xff\xffab.',            # counted beyond end
    HEAD + b'}q\x01c__main__\nNo newline',           # GLOBAL cut short
    HEAD + b'\x95\x00\x00\x00\x00\x00\x00\x00\x00.',  # FRAME: protocol 4
    HEAD + b'}q\x01',                                 # one pickle only
    b'',
])
def test_the_c_walk_leaves_the_rest_to_python(data):
    assert c_walk(data) is None
    assert c_walk(data, True) is None
    for refs in (None, _PID_RE):
        assert walk_outcome(opcodes.walk, data, refs) == \
            walk_outcome(opcodes.walk_python, data, refs)


OID = hostile_records.FOREIGN
PID = b'C\x08' + OID + b'q\x02h\x00\x86q\x03Q'


@pytest.mark.parametrize('data, census', [
    # one BINPERSID; memo indices 0 to 3
    (HEAD + b']q\x01' + PID + b'a.', (1, 4)),
    # a GET beyond every PUT counts too (noload would refuse it)
    (HEAD + b']q\x01h\x07a.', (0, 8)),
    # LONG_BINPUT and LONG_BINGET
    (HEAD + b']r\x00\x01\x00\x00j\x01\x01\x00\x00a.', (0, 258)),
    # a text PERSID: no persistent id can be vouched for
    (HEAD + b']q\x01Pabc\na.', (-1, 1 << 32)),
    # a text GET: the Python walk counts it
    (HEAD + b']q\x01g9\na.', (0, 10)),
])
def test_both_walks_take_the_same_census(data, census):
    python = hostile_records.python_census(data, _PID_RE)
    assert python[2:] == census
    assert walk_outcome(opcodes.walk, data, _PID_RE, census=True) == \
        walk_outcome(hostile_records.python_census, data, _PID_RE)
    if accelerator_built() and b'g9' not in data:
        assert opcodes._accelerated(
            data, 2, max(256, len(data) // 2), opcodes._LAYOUT_BYTES,
            True, True)[2:] == census


def test_pure_python_can_be_chosen():
    code = ('from compositestorage import opcodes; '
            'print(opcodes._accelerated is None)')
    env = dict(os.environ, COMPOSITESTORAGE_PURE_PYTHON='1')
    done = subprocess.run([sys.executable, '-c', code], env=env,
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == 'True'
