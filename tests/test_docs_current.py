"""The README and docs state what is true of the code today."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(*path):
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


def test_the_one_tid_paragraph_knows_the_journal():
    readme = read('README.rst')
    start = readme.index('- **One tid.**')
    paragraph = readme[start:readme.index('- **', start + 4)]
    assert 'not yet here' not in paragraph
    assert 'journal' in paragraph and 'crash' in paragraph
    assert os.path.exists(os.path.join(ROOT, 'compositestorage',
                                       'journal.py'))


def test_bench_quick_is_described_alike_and_runs():
    """The README and docs/performance.rst give one figure in seconds for
    ``--quick`` (measured, on the machine they name), and ``--quick`` runs
    to its end.  Its time here is not asserted: speed is the benchmark's
    to measure, not a test's, and CI's machine may be busy."""
    readme = read('README.rst')
    performance = read('docs', 'performance.rst')
    said = re.search(r'``--quick`` for a\s+run of about (\d+) seconds',
                     readme)
    assert said, 'README gives no time for --quick'
    assert re.search(r'--quick\s+# about %s s' % said.group(1), performance)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'benchmarks', 'bench.py'),
         '--quick'], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r'wall time ([\d.]+) s', proc.stdout), proc.stdout
