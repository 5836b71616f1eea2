#!/usr/bin/env python
"""How the composite's offline commands scale: verify, stats and pack.

``python benchmarks/scale.py --dir DIR [--generate N] [--repeat 2]
[--json FILE]`` times, on the composite that ``benchmarks/generate.py``
built in ``DIR`` (``--generate N`` builds it first, with ``--plain
DIR/plain.fs``):

``verify``
    ``compositestorage verify CONFIG``
``stats``
    ``compositestorage stats CONFIG``
``pack``
    ``compositestorage pack CONFIG`` (the global pack of every partition)
``fs-pack``
    ``FileStorage(path).pack(time.time(), referencesf)`` of the plain
    FileStorage holding the same objects (generate.py's ``--plain``)

Every command runs in a fresh subprocess (``python -m compositestorage``),
on copies of the generated files in a scratch directory (``--scratch``,
default ``DIR/scratch``), made afresh before every pack; copying is not
timed.  For each run the script records the wall time and the child's own
peak RSS, from ``os.wait4`` (``ru_maxrss``, kB on Linux): each figure is that
one process's peak.  The packs of the composite and of the plain FileStorage
run alternately, ``--repeat`` times each, in alternating order, because
machines are noisy.  The table gives the best and the median wall time and
the largest peak RSS of each command, and the ratios composite pack /
FileStorage pack.

Each run's stdout and stderr (the commands' progress lines) are kept in
``SCRATCH/logs`` with ``--keep``, and their tails in the ``--json`` file.

``verify`` exits 1 on the generated composite until it is packed: the
generator takes documents out of the catalog's ``featured`` index, which
leaves stubs that nothing refers to until a pack (``orphan-stub``).  The
script accepts that exit status for verify (the table shows it), and fails
on any other non-zero exit status.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GENERATE = os.path.join(HERE, 'generate.py')

#: The plain FileStorage pack, run as ``python -c FS_PACK PATH``.
FS_PACK = '''\
import sys, time
from ZODB.FileStorage import FileStorage
from ZODB.serialize import referencesf
fs = FileStorage(sys.argv[1])
try:
    before, size = len(fs), fs.getSize()
    started = time.time()
    fs.pack(time.time(), referencesf)
    print('packed in %.1f s: removed %d objects, %d bytes' % (
        time.time() - started, before - len(fs), size - fs.getSize()))
finally:
    fs.close()
'''

COMMANDS = ('generate', 'verify', 'stats', 'pack', 'fs-pack')
LABELS = {'generate': 'generate.py (composite + plain)',
          'verify': 'compositestorage verify',
          'stats': 'compositestorage stats',
          'pack': 'compositestorage pack',
          'fs-pack': 'FileStorage pack (plain)'}


def run_child(argv, log_path):
    """Run ``argv``; ``{'wall', 'rss_kb', 'rc', 'output', 'errors'}`` of
    that one process.  Its stdout goes to ``log_path``, its stderr (the
    commands' progress lines) to ``log_path + '.err'``; their tails are
    kept."""
    with open(log_path, 'wb') as log, open(log_path + '.err', 'wb') as err:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc        # reaped here: Popen must not wait again
    tails = []
    for path in (log_path, log_path + '.err'):
        with open(path, errors='replace') as f:
            tails.append(f.read()[-4000:])
    return {'wall': wall, 'rss_kb': usage.ru_maxrss, 'rc': rc,
            'output': tails[0], 'errors': tails[1]}


def fs_files(path):
    """The files of a FileStorage worth copying: data, index, journal."""
    return [path + s for s in ('', '.index', '.journal')
            if os.path.exists(path + s)]


def clear(directory):
    if os.path.isdir(directory):
        shutil.rmtree(directory)
    os.makedirs(directory)


def copy_composite(generated, scratch):
    """Copy the partitions into ``scratch`` and write a config for the
    copies; returns ``(config, {name: path})``."""
    sys.path.insert(0, HERE)
    from generate import config_text
    paths = {}
    for name, info in generated['composite']['partitions'].items():
        dest = paths[name] = os.path.join(scratch, '%s.fs' % name)
        for src in fs_files(info['path']):
            shutil.copyfile(src, dest + src[len(info['path']):])
    config = os.path.join(scratch, 'composite.conf')
    with open(config, 'w') as f:
        f.write(config_text(paths))
    return config, paths


def copy_plain(generated, scratch):
    src = generated['plain']['path']
    dest = os.path.join(scratch, 'plain.fs')
    for path in fs_files(src):
        shutil.copyfile(path, dest + path[len(src):])
    return dest


def sizes(paths):
    return sum(os.path.getsize(p) for p in paths if os.path.exists(p))


def check(name, result, allowed=(0,)):
    if result['rc'] not in allowed:
        raise SystemExit('scale.py: %s exited with %d:\n%s%s' % (
            name, result['rc'], result['output'], result['errors']))


def summarize(runs):
    out = {}
    for name, results in runs.items():
        if not results:
            continue
        walls = [r['wall'] for r in results]
        rss = [r['rss_kb'] for r in results]
        out[name] = {'runs': len(results), 'best_wall': min(walls),
                     'median_wall': statistics.median(walls),
                     'peak_rss_kb': max(rss),
                     'median_rss_kb': statistics.median(rss),
                     'exit_status': sorted({r['rc'] for r in results})}
    ratio = {}
    if 'pack' in out and 'fs-pack' in out:
        c, p = out['pack'], out['fs-pack']
        ratio = {'best_wall': c['best_wall'] / p['best_wall'],
                 'median_wall': c['median_wall'] / p['median_wall'],
                 'peak_rss': c['peak_rss_kb'] / p['peak_rss_kb']}
    return out, ratio


def format_table(summary, ratio):
    lines = ['%-33s %4s %10s %10s %10s %5s' % (
        'command', 'runs', 'best s', 'median s', 'peak MB', 'exit')]
    for name in COMMANDS:
        s = summary.get(name)
        if s is None:
            continue
        lines.append('%-33s %4d %10.2f %10.2f %10.1f %5s' % (
            LABELS[name], s['runs'], s['best_wall'], s['median_wall'],
            s['peak_rss_kb'] / 1024.0,
            ','.join(str(rc) for rc in s['exit_status'])))
    if ratio:
        lines.append('ratio composite pack / FileStorage pack: wall %.2f '
                     '(best), %.2f (median); peak RSS %.2f' % (
                         ratio['best_wall'], ratio['median_wall'],
                         ratio['peak_rss']))
    return '\n'.join(lines)


def make_parser():
    parser = argparse.ArgumentParser(
        prog='scale.py',
        description='Time compositestorage verify, stats and pack on a '
        'generated composite, and the pack of the same objects in one '
        'plain FileStorage, each in its own process.')
    parser.add_argument('--dir', required=True, metavar='DIR',
                        help='the directory generate.py built into')
    parser.add_argument('--generate', type=int, metavar='N',
                        help='first build N objects into DIR (with '
                        '--plain DIR/plain.fs), replacing what is there')
    parser.add_argument('--repeat', type=int, default=2, metavar='R',
                        help='runs of each command (default: %(default)s)')
    parser.add_argument('--scratch', metavar='DIR',
                        help='where the copies go (default: DIR/scratch); '
                        'emptied first')
    parser.add_argument('--keep', action='store_true',
                        help='keep the scratch directory')
    parser.add_argument('--json', metavar='FILE',
                        help='write every figure to FILE')
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    if args.repeat < 1:
        raise SystemExit('scale.py: --repeat must be at least 1')
    directory = os.path.abspath(args.dir)
    scratch = os.path.abspath(args.scratch or os.path.join(directory,
                                                           'scratch'))
    runs = {name: [] for name in COMMANDS}
    started = time.time()

    def log(text):
        print(text, file=sys.stderr, flush=True)

    os.makedirs(directory, exist_ok=True)
    if args.generate:
        log('generating %d objects in %s ...' % (args.generate, directory))
        result = run_child(
            [sys.executable, GENERATE, '--objects', str(args.generate),
             '--dir', directory, '--plain',
             os.path.join(directory, 'plain.fs'), '--force'],
            os.path.join(directory, 'generate.log'))
        check('generate.py', result)
        runs['generate'].append(result)
    with open(os.path.join(directory, 'generated.json')) as f:
        generated = json.load(f)
    if not generated.get('plain'):
        raise SystemExit('scale.py: %s was generated without --plain'
                         % directory)
    clear(scratch)
    logs = os.path.join(scratch, 'logs')
    os.makedirs(logs)
    data = os.path.join(scratch, 'data')
    python = [sys.executable, '-m', 'compositestorage']
    packed = {}

    def pack_composite(r):
        clear(data)
        config, paths = copy_composite(generated, data)
        before = sizes(paths.values())
        result = run_child(python + ['pack', config],
                           os.path.join(logs, 'pack-%d.log' % r))
        check('compositestorage pack', result)
        packed['pack'] = {'before_bytes': before,
                          'after_bytes': sizes(paths.values())}
        runs['pack'].append(result)

    def pack_plain(r):
        clear(data)
        path = copy_plain(generated, data)
        before = sizes([path])
        result = run_child([sys.executable, '-c', FS_PACK, path],
                           os.path.join(logs, 'fs-pack-%d.log' % r))
        check('FileStorage pack', result)
        packed['fs-pack'] = {'before_bytes': before,
                             'after_bytes': sizes([path])}
        runs['fs-pack'].append(result)

    for r in range(args.repeat):
        clear(data)
        config, _ = copy_composite(generated, data)
        for name in ('verify', 'stats'):
            result = run_child(python + [name, config],
                               os.path.join(logs, '%s-%d.log' % (name, r)))
            # verify exits 1 on the orphan stubs the generator leaves
            check('compositestorage ' + name, result,
                  (0, 1) if name == 'verify' else (0,))
            runs[name].append(result)
        packs = (pack_composite, pack_plain)
        for pack in packs if r % 2 == 0 else packs[::-1]:
            pack(r)
        log('round %d/%d done, %.0f s elapsed'
            % (r + 1, args.repeat, time.time() - started))

    summary, ratio = summarize(runs)
    c = generated['composite']
    print('%d objects generated in %s: %s; plain FileStorage %d objects'
          % (generated['objects'], directory, ', '.join(
              '%s %d' % (name, p['objects']) for name, p in sorted(
                  c['partitions'].items(), key=lambda i: i[1]['prefix'])),
             generated['plain']['objects']))
    print(format_table(summary, ratio))
    for name in ('pack', 'fs-pack'):
        p = packed[name]
        print('%s: %.1f MB -> %.1f MB' % (LABELS[name], p['before_bytes']
                                          / 1e6, p['after_bytes'] / 1e6))
    last_verify = runs['verify'][-1]['output'].strip().splitlines()
    print('verify said: %s' % (last_verify[-1] if last_verify else '-'))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'directory': directory, 'repeat': args.repeat,
                       'python': sys.version, 'generated': generated,
                       'runs': runs, 'summary': summary, 'ratio': ratio,
                       'sizes': packed,
                       'wall_seconds': time.time() - started},
                      f, indent=1, sort_keys=True)
    if not args.keep:
        shutil.rmtree(scratch)
    return 0


if __name__ == '__main__':
    sys.exit(main())
