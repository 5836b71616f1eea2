"""A longer crash soak than the test suite's (CI does not run it).

``python tests/soak.py [--kills N] [--seed S] [--power-loss]`` kills the
crash writer (``crash_writer.py``) with SIGKILL at N random instants (1000
by default), reopening the composite after each kill and checking that
every transaction is in all three partitions or in none, that the counters
agree and that nothing acknowledged was lost.  With ``--power-loss`` every
kill is also followed by cutting each file back to its last fsync.  It
prints one line per 50 kills and exits non-zero at the first violation.
"""
import argparse
import os
import random
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from test_atomic import _durable_state  # noqa: E402
from test_atomic import _power_loss  # noqa: E402
from test_atomic import check_invariant  # noqa: E402
from test_atomic import run_writer  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--kills', type=int, default=1000)
    parser.add_argument('--seed', type=int, default=int(time.time()))
    parser.add_argument('--power-loss', action='store_true')
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix='cs-soak-') as directory:
        code, acked_all = run_writer(directory, 2)
        assert code == 0
        log_path = os.path.join(directory, 'fsync.log')
        for kill in range(1, args.kills + 1):
            env = {'FSYNC_LOG': log_path} if args.power_loss else None
            baseline = _durable_state(directory)
            code, acked = run_writer(directory, 10 ** 6, env,
                                     kill_after=rng.uniform(0.0, 0.3))
            if args.power_loss:
                _power_loss(directory, log_path, baseline)
            acked_all.extend(acked)
            try:
                check_invariant(directory, acked_all)
            except AssertionError:
                print('violation after kill %d (seed %d)'
                      % (kill, args.seed), file=sys.stderr)
                raise
            if kill % 50 == 0:
                print('%d kills, %d transactions acknowledged, %.0f s'
                      % (kill, len(acked_all), time.time() - started),
                      flush=True)
    print('ok: %d kills (seed %d)' % (args.kills, args.seed))
    return 0


if __name__ == '__main__':
    sys.exit(main())
