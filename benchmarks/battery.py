"""The default battery: wall time, time per check, compilations per example.

Prints, for the built-in primitives:

1. the wall time of ``pytest --etp-check`` (the default battery, run as a
   user runs it, in a subprocess), cold and again with the compilation cache
   the first run filled (the next commit's run), then cold with ``-n auto``
   (the README's command: one worker per core), and, per primitive and
   check (cold run), the seconds
   it spent, as a ratio to the bare cost of one jitted forward plus one VJP
   of the same primitive on its first generated case (measured here);
2. XLA compilations per primitive per 100 examples of that battery
   (each example is one drawn case through every check): cold, and in the
   warm run (programs loaded from the persistent cache are counted apart:
   they are not compiled);
3. XLA compilations per primitive over ``--examples`` hypothesis examples
   of the full battery in one process (scaled to 100), the seconds XLA spent
   compiling them, and the number of distinct shape signatures among them;
   the same examples drawn again in that process (every signature seen:
   compile reuse leaves nothing to compile); and the same number of
   examples that all share one shape (the first example compiles, the rest
   reuse);
4. with ``--long N``: one hypothesis run of N examples per primitive, and
   the compilations and new shape signatures in each block of 100 of its
   examples: the strategies draw from finitely many signatures, so a long
   run compiles less and less.

    python benchmarks/battery.py                      # everything
    python benchmarks/battery.py --no-battery --examples 20 --primitives etp_mm
    python benchmarks/battery.py --no-battery --no-compilations --long 500

Targets (issue 6): battery <= 60 s on the 2-core machine; <= 10 compilations
per 100 examples per primitive.  Every new shape signature compiles the
checks' programs once (one or two per check); the target holds where
signatures repeat: a second run (the persistent cache), examples drawn
again, and examples of one shape.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import bare   # benchmarks/bare.py: the bare cost and how it is timed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _primitives(patterns):
  import etp
  from etp_testing._src import strategies
  return [p for p in strategies.registered_primitives()
          if not patterns or any(fnmatch.fnmatchcase(p.name, pat)
                                 for pat in patterns)]


def first_case(prim, strategy=None):
  """The first case hypothesis draws for ``prim`` with seed 0."""
  from hypothesis import given, seed, settings
  from etp_testing._src import strategies
  strategy = strategy or strategies.strategy_for(prim)
  found = []

  @seed(0)
  @settings(max_examples=1, database=None, deadline=None)
  @given(strategy)
  def draw(case):
    found.append(case)
  draw()
  return found[0]


def battery(prims, bare_s) -> bool:
  """Runs ``pytest --etp-check`` and prints its figures; True if it passed."""
  reports = {}
  with tempfile.TemporaryDirectory() as tmp:
    report_path = os.path.join(tmp, 'report.json')
    # Twice, sharing a fresh compilation cache: cold (everything compiled),
    # then warm (a second run, as on the next commit: programs from disk).
    for run in ('cold', 'warm'):
      start = time.perf_counter()
      proc = subprocess.run(
          [sys.executable, '-m', 'pytest', '--etp-check', '-q', '-p',
           'no:cacheprovider', '--etp-report', report_path,
           '--etp-compile-cache', os.path.join(tmp, 'xla'),
           '--etp-primitives', ','.join(p.name for p in prims)],
          cwd=ROOT, capture_output=True, text=True)
      wall = time.perf_counter() - start
      tail = proc.stdout.strip().splitlines()[-1] if proc.stdout else ''
      print(f'pytest --etp-check, {run} compilation cache: {wall:.1f} s wall '
            f'({tail})')
      if not os.path.exists(report_path):
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        return False
      with open(report_path) as f:
        reports[run] = json.load(f)
    # The README's command: the same battery over the machine's cores (a
    # cache of its own, so that it runs cold too).
    if importlib.util.find_spec('xdist') is not None:
      start = time.perf_counter()
      proc_n = subprocess.run(
          [sys.executable, '-m', 'pytest', '--etp-check', '-q', '-p',
           'no:cacheprovider', '-n', 'auto', '--etp-compile-cache',
           os.path.join(tmp, 'xla-n'),
           '--etp-primitives', ','.join(p.name for p in prims)],
          cwd=ROOT, capture_output=True, text=True)
      wall = time.perf_counter() - start
      lines = proc_n.stdout.strip().splitlines()
      print(f'pytest --etp-check -n auto, cold compilation cache: {wall:.1f} s '
            f'wall ({lines[-1] if lines else proc_n.stderr[-500:]}; '
            f'{next((l for l in lines if l.startswith("XLA programs")), "")})')
  report = reports['cold']   # per-check figures: the cold run
  checks = sorted({c for per in report['primitives'].values() for c in per})
  names = [p.name for p in prims]
  print('\nseconds per check over the battery\'s examples (ratio to one '
        'jitted forward + VJP of the first case)')
  print(f'{"check":24}' + ''.join(f'{n[4:]:>16}' for n in names))
  for c in checks:
    row = []
    for n in names:
      r = report['primitives'].get(n, {}).get(c)
      if r is None:
        row.append(f'{"-":>16}')
        continue
      s = r['duration_s']
      row.append(f'{s:7.2f}s {s / bare_s[n]:7.0e}'.rjust(16))
    print(f'{c:24}' + ''.join(row))
  print(f'{"bare fwd+VJP":24}' + ''.join(f'{bare_s[n] * 1e6:13.0f} us'
                                         for n in names))
  print('\nXLA programs per 100 examples of the battery: compiled (loaded '
        'from the persistent cache)')
  for run in ('cold', 'warm'):
    row = []
    for n in names:
      per = reports[run]['primitives'].get(n, {}).values()
      examples = max((c['examples'] or 0 for c in per), default=0)
      scale = 100 / examples if examples else 0
      compiled = sum(c.get('compiled') or 0 for c in per) * scale
      loaded = sum(c.get('loaded') or 0 for c in per) * scale
      row.append(f'{compiled:.0f} ({loaded:.0f})'.rjust(16))
    print(f'{run + " run":24}' + ''.join(row))
  return proc.returncode == 0


def _fixed_shape_strategy(case):
  """Cases with ``case``'s shapes, dtypes and params, fresh floating values."""
  import numpy as np
  from hypothesis import strategies as st
  from etp_testing._src import strategies
  operands, params = case
  parts = [strategies.arrays_of(np.shape(o), np.asarray(o).dtype)
           if np.issubdtype(np.asarray(o).dtype, np.floating) else st.just(o)
           for o in operands]
  return st.tuples(st.tuples(*parts), st.just(params))


def compilations(prims, examples: int) -> None:
  """Prints compilations per primitive over ``examples`` generated
  examples (with the seconds XLA spent in them: a program's compile time
  grows with what it holds, so the count alone does not say what compiling
  cost), and over as many examples of one shape."""
  from etp_testing._src.compilations import counting, release
  from etp_testing._src.hypothesis_runner import check_with_hypothesis
  print(f'\nXLA compilations of the full battery over {examples} hypothesis '
        'examples (per 100 in brackets)')
  print(f'{"primitive":16}{"generated":>20}{"XLA s":>8}{"shapes":>8}'
        f'{"s":>8}{"drawn again":>14}{"one shape":>20}{"s":>8}')
  for prim in prims:
    # Each primitive from an empty cache: its figures do not depend on the
    # others', and the harness's release of every program when the process
    # holds too many (compilations.release_if_over) does not fall inside
    # its rows (it did, once, after about 2,000 programs).
    release()
    with counting() as varied:
      t = time.perf_counter()
      summary = check_with_hypothesis(prim, max_examples=examples, seed=0)
      varied_s = time.perf_counter() - t
    with counting() as again:   # the same draws: every signature seen
      check_with_hypothesis(prim, max_examples=examples, seed=0)
    fixed = _fixed_shape_strategy(first_case(prim))
    # One warm-up example of that shape, with the counted run's seed (the
    # harness seed of a run, which picks primitive.vmap's axes).
    check_with_hypothesis(prim, max_examples=1, seed=2, strategy=fixed)
    with counting() as same:
      t = time.perf_counter()
      check_with_hypothesis(prim, max_examples=examples, seed=2,
                            strategy=fixed)
      same_s = time.perf_counter() - t
    per100 = lambda n: f'{n} ({100 * n / examples:.0f})'
    print(f'{prim.name:16}{per100(varied.count):>20}{varied.seconds:8.1f}'
          f'{summary.distinct_shapes:>8}{varied_s:8.1f}'
          f'{again.count:>14}{per100(same.count):>20}{same_s:8.1f}')


def long_run(prims, examples: int, block: int = 100) -> None:
  """Prints, per primitive, the compilations and the new shape signatures
  in each block of ``block`` examples of one ``examples``-long run."""
  from etp_testing._src import compilations as comp
  from etp_testing._src import strategies
  from etp_testing._src.hypothesis_runner import signature, \
      check_with_hypothesis
  blocks = -(-examples // block)
  print(f'\nOne run of {examples} examples per primitive: XLA compilations '
        f'(new shape signatures) per block of {block}')
  print(f'{"primitive":16}' + ''.join(
      f'{f"{i * block + 1}-{min((i + 1) * block, examples)}":>14}'
      for i in range(blocks)) + f'{"s":>8}')
  for prim in prims:
    comp.release()
    # Marks taken as each example is drawn, just before it runs: the
    # compilations so far, and whether its signature is new.
    marks, seen = [], set()

    def mark(case, count):
      sig = signature(*case)
      marks.append((count.count, sig not in seen))
      seen.add(sig)
      return case
    releases = comp.releases
    with comp.counting() as count:
      strategy = strategies.strategy_for(prim).map(lambda c: mark(c, count))
      t = time.perf_counter()
      check_with_hypothesis(prim, max_examples=examples, seed=0,
                            strategy=strategy)
      seconds = time.perf_counter() - t
    marks.append((count.count, False))
    row = []
    for i in range(blocks):
      lo, hi = i * block, min((i + 1) * block, len(marks) - 1)
      if lo >= hi:
        row.append(f'{"-":>14}')
        continue
      new = sum(is_new for _, is_new in marks[lo:hi])
      before = marks[lo][0] if i else 0   # the first block from the start
      row.append(f'{marks[hi][0] - before} ({new})'.rjust(14))
    dropped = comp.releases - releases
    print(f'{prim.name:16}' + ''.join(row) + f'{seconds:8.1f}'
          + (f'  ({dropped} release(s) of every program inside)'
             if dropped else ''))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--primitives', default='',
                      help='comma list of names or globs (default: all)')
  parser.add_argument('--examples', type=int, default=100)
  parser.add_argument('--no-battery', action='store_true')
  parser.add_argument('--no-compilations', action='store_true')
  parser.add_argument('--long', type=int, default=0, metavar='N',
                      help='also one run of N examples per primitive, '
                      'compilations per block of 100')
  args = parser.parse_args(argv)
  prims = _primitives([p for p in args.primitives.split(',') if p])
  import jax
  from etp_testing._src.compilations import options_in_effect
  print(f'jax {jax.__version__} on {jax.default_backend()}; the harness '
        f'compiles with {options_in_effect() or "XLA defaults"}')
  ok = True
  if not args.no_battery:
    bare_s = {p.name: bare.seconds(p, *first_case(p)) for p in prims}
    ok = battery(prims, bare_s)
  if not args.no_compilations:
    compilations(prims, args.examples)
  if args.long:
    long_run(prims, args.long)
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
