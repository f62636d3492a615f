#!/usr/bin/env python
"""False-alarm soak: the correct built-ins over many generated examples.

Every built-in ETP primitive runs through ``check_with_hypothesis`` (all
checks) on examples drawn by its registered strategy, once with float32 cases
and once with float64 cases (the weights' dtype; the built-ins' ``x`` is now
and then in the other: mixed precision), for several seeds, until
``--examples`` examples have run in total (default 10,000).  A correct
primitive must pass every example: any failure is a false alarm of the
harness (or a real bug in a built-in), and the script exits 1.  Interrupted
(Ctrl-C, SIGTERM), it reports the runs that finished, marked INTERRUPTED,
and exits 2.

It prints the number of examples, failures and time, and, per check, the
worst error seen (relative and absolute, and where), so one can see how far
below its tolerance each check runs.

  python scripts/soak.py                       # 10,000 examples
  python scripts/soak.py --examples 200 --json soak.json
  python scripts/soak.py --primitives etp_mm,etp_conv --seeds 0,1
  python scripts/soak.py --host-devices 4      # also the device checks

``--primitives`` also takes mutant names (``mutant_dense_xy_sign``): they run
on their built-in's strategy, which is how the tests check that the soak does
report failures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time


def _parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='scripts/soak.py',
      description='Run the correct ETP built-ins over N hypothesis examples '
      '(float32 and float64, several seeds); exit 1 on any failure.')
  parser.add_argument('--examples', type=int, default=10_000,
                      help='examples in total (default 10000)')
  parser.add_argument('--seeds', default='0,1,2',
                      help='comma-separated hypothesis seeds (default 0,1,2)')
  parser.add_argument('--primitives', default='',
                      help='comma-separated primitive names (default: every '
                      'built-in)')
  parser.add_argument('--dtypes', default='float32,float64',
                      help='comma-separated dtypes (default float32,float64)')
  parser.add_argument('--checks', default='all',
                      help="checks to run (names, groups or globs; 'all')")
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--fast', action='store_true',
                      help='run every check in fast mode (random '
                      'projections, a sampled anchor): its false alarms')
  parser.add_argument('--host-devices', type=int, default=0, metavar='N',
                      help='force N XLA host (CPU) devices, so that '
                      'device.consistency has something to compare; must be '
                      'set before JAX starts (ignored if it already has)')
  parser.add_argument('--json', metavar='PATH', help='write the summary as '
                      'JSON')
  parser.add_argument('--quiet', action='store_true',
                      help='no per-run progress lines')
  args = parser.parse_args(argv)
  if args.examples < 1:
    parser.error('--examples must be at least 1')
  return args


def _force_host_devices(n: int) -> None:
  flag = '--xla_force_host_platform_device_count'
  if n and flag not in os.environ.get('XLA_FLAGS', '') and \
      'jax' not in sys.modules:
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' {flag}={n}').strip()


def _weight_dtype(prim, case) -> str:
  """The dtype of a case's weights: its first floating operand other than
  ``x`` (bfloat16 included, which NumPy does not count as floating)."""
  import jax.numpy as jnp
  import numpy as np
  operands, _ = case
  for i, o in enumerate(operands):
    a = np.asarray(o)
    if i != prim.x_invar_index and jnp.issubdtype(a.dtype, jnp.floating):
      return a.dtype.name
  return 'none'


def _targets(names, dtypes):
  """``[(label, primitive, draw)]`` for the built-ins or named prims;
  ``draw(dtype)`` is the strategy of that dtype's cases (see
  :func:`_drawer`)."""
  import etp
  from etp_testing import mutants, strategies
  if not names:
    prims = [p for p in strategies.registered_primitives()
             if not p.name.startswith(mutants.NAME_PREFIX)]
    return [(p.name, p, _drawer(p, dtypes)) for p in prims]
  out = []
  for name in names:
    if name.startswith(mutants.NAME_PREFIX):
      m = mutants.get(name)
      out.append((name, m.primitive(), _drawer(m.base_primitive(), dtypes)))
      continue
    prim = next((p for p in etp.primitives() if p.name == name), None)
    if prim is None or strategies.strategy_for(prim) is None:
      raise SystemExit(f'[etp_testing] soak: no primitive with a strategy '
                       f'named {name!r}')
    out.append((name, prim, _drawer(prim, dtypes)))
  return out


def _drawer(prim, dtypes=('float32', 'float64')):
  """``dtype -> strategy`` of ``prim``'s cases whose weights are in
  ``dtype``.  Where its registered strategy is its built-in default, they
  come from that family drawing ``dtypes`` (half precision included, which
  the default does not draw; ``x`` now and then in another of ``dtypes``:
  mixed precision); otherwise from the registered strategy's draws."""
  from etp_testing import strategies
  source = strategies.strategy_for(prim)
  if source is strategies.builtin_strategy(prim):
    source = strategies.builtin_strategy(prim, dtypes=tuple(dtypes))
  return lambda dtype: source.filter(
      lambda case: _weight_dtype(prim, case) == dtype)


def _plan(n_examples: int, n_runs: int) -> list:
  """``n_examples`` split as evenly as possible over ``n_runs`` runs."""
  base, extra = divmod(n_examples, n_runs)
  return [base + (1 if i < extra else 0) for i in range(n_runs)]


class _Worst:
  """The worst error per check over every run."""

  def __init__(self):
    self.by_check = {}

  def add(self, label: str, dtype: str, summary) -> None:
    for name, c in summary.checks.items():
      w = self.by_check.setdefault(name, {
          'examples': 0, 'skipped': 0, 'max_rel_err': None,
          'max_abs_err': None, 'where': None, 'tolerance_used': None,
          'tolerance_where': None, 'statuses': set(), 'duration_s': 0.0})
      w['examples'] += c.examples
      w['duration_s'] += c.duration_s
      w['skipped'] += c.skipped
      w['statuses'].add(c.status)
      if c.max_rel_err is not None and (w['max_rel_err'] is None or
                                        c.max_rel_err > w['max_rel_err']):
        w['max_rel_err'] = c.max_rel_err
        w['max_abs_err'] = c.max_abs_err
        w['where'] = f'{label} {dtype}'
      if c.tolerance_used is not None and (
          w['tolerance_used'] is None or
          c.tolerance_used > w['tolerance_used']):
        w['tolerance_used'] = c.tolerance_used
        w['tolerance_where'] = f'{label} {dtype}'

  def lines(self, check_order) -> list:
    """The table: per check, the worst errors (and where), the largest
    share of its tolerance a comparison took ('of tol': the margin to a
    false alarm, 1 being the bound), then the closest call overall."""
    out = [f'{"check":<24} {"examples":>8} {"skipped":>8} '
           f'{"worst rel err":>13} {"worst abs err":>13} {"of tol":>8} '
           f'{"time":>8}  where (worst rel err)']
    fmt = lambda v: '-' if v is None else f'{v:.3g}'
    for name in check_order:
      w = self.by_check.get(name)
      if w is None:
        continue
      out.append(f'{name:<24} {w["examples"]:>8} {w["skipped"]:>8} '
                 f'{fmt(w["max_rel_err"]):>13} {fmt(w["max_abs_err"]):>13} '
                 f'{fmt(w["tolerance_used"]):>8} {w["duration_s"]:>7.1f}s  '
                 f'{w["where"] or ""}')
    judged = [(w['tolerance_used'], name, w['tolerance_where'])
              for name, w in self.by_check.items()
              if w['tolerance_used'] is not None]
    if judged:
      used, name, where = max(judged)
      out.append(f'closest to its tolerance: {name}, {used:.3g} of it '
                 f'({where})')
    return out

  def to_dict(self) -> dict:
    return {k: {**v, 'statuses': sorted(v['statuses'])}
            for k, v in self.by_check.items()}


def soak(*, examples: int = 10_000, seeds=(0, 1, 2), primitives=(),
         dtypes=('float32', 'float64'), checks='all', steps: int = 3,
         fast: bool = False, log=print) -> dict:
  """Runs the soak and returns its summary (``failures`` lists false alarms).
  ``fast=True`` runs every example in fast mode; otherwise each chooses by
  its size, as the battery does (the generated cases are small: full mode)."""
  from hypothesis import settings
  from etp_testing import check_names

  targets = _targets(list(primitives), dtypes)
  runs = [(t, d, s) for s in seeds for t in targets for d in dtypes]
  plan = _plan(examples, len(runs))
  # No example database: a soak must not leave files behind or replay old
  # failures of other runs; each seed gives reproducible draws.
  base_settings = settings(database=None, print_blob=False)
  worst, failures, per_run = _Worst(), [], []
  total, start = 0, time.perf_counter()
  interrupted = False
  try:
    total = _run_all(runs, plan, checks, steps, fast or None, base_settings,
                     worst, failures, per_run, log)
  except KeyboardInterrupt:
    # Ctrl-C or SIGTERM: what finished is kept and reported, marked as such.
    interrupted = True
    total = sum(r['examples'] for r in per_run)
  return {'examples': total, 'requested': examples, 'fast': fast,
          'failures': failures, 'runs': per_run, 'interrupted': interrupted,
          'duration_s': round(time.perf_counter() - start, 3),
          'worst': worst, 'check_order': list(check_names())}


def _run_all(runs, plan, checks, steps, fast, base_settings, worst, failures,
             per_run, log) -> int:
  """Runs every (target, dtype, seed) run; returns the examples run."""
  from etp_testing import RuleConsistencyError
  from etp_testing._src.hypothesis_runner import check_with_hypothesis
  total = 0
  for ((label, prim, draw), dtype, seed), n in zip(runs, plan):
    if n == 0:
      continue
    strat = draw(dtype)
    t0 = time.perf_counter()
    try:
      summary = check_with_hypothesis(prim, max_examples=n, checks=checks,
                                      strategy=strat, seed=seed,
                                      settings=base_settings, steps=steps,
                                      fast=fast)
    except RuleConsistencyError as e:
      # The examples that passed before the failing one still count.
      passed = getattr(getattr(e, 'summary', None), 'examples', 0) or 0
      total += passed
      failures.append({'primitive': label, 'dtype': dtype, 'seed': seed,
                       'message': str(e)})
      per_run.append({'primitive': label, 'dtype': dtype, 'seed': seed,
                      'examples': passed, 'failed': True,
                      'duration_s': round(time.perf_counter() - t0, 3)})
      if log:
        log(f'  FAILED  {label} {dtype} seed {seed}: '
            + str(e).splitlines()[0])
      continue
    total += summary.examples
    worst.add(label, dtype, summary)
    per_run.append({'primitive': label, 'dtype': dtype, 'seed': seed,
                    'examples': summary.examples, 'failed': False,
                    'distinct_shapes': getattr(summary, 'distinct_shapes',
                                               None),
                    'duration_s': round(summary.duration_s, 3)})
    if log:
      log(f'  passed  {label} {dtype} seed {seed}: {summary.examples} '
          f'examples in {summary.duration_s:.1f}s')
  return total


def main(argv=None) -> int:
  args = _parse_args(argv)
  _force_host_devices(args.host_devices)
  seeds = tuple(int(s) for s in args.seeds.split(',') if s.strip())
  names = tuple(n.strip() for n in args.primitives.split(',') if n.strip())
  dtypes = tuple(d.strip() for d in args.dtypes.split(',') if d.strip())
  log = None if args.quiet else (lambda s: print(s, flush=True))
  signal.signal(signal.SIGTERM, _interrupt)
  result = soak(examples=args.examples, seeds=seeds, primitives=names,
                dtypes=dtypes, checks=args.checks, steps=args.steps,
                fast=args.fast, log=log)
  worst = result.pop('worst')
  order = result.pop('check_order')
  print('Worst error per check (over every passing example):')
  print('\n'.join('  ' + l for l in worst.lines(order)))
  for f in result['failures']:
    print(f'\nFAILURE {f["primitive"]} {f["dtype"]} seed {f["seed"]}:')
    print('\n'.join('  ' + l for l in f['message'].splitlines()[:30]))
  print(f'\nexamples: {result["examples"]} (requested {result["requested"]})'
        + (', fast mode' if result['fast'] else '') + ', '
        f'failures: {len(result["failures"])}, '
        f'time: {result["duration_s"]:.1f}s'
        + (' - INTERRUPTED: the completed runs above only'
           if result['interrupted'] else ''))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({**result, 'worst': worst.to_dict()}, f, indent=1,
                default=str)
  if result['failures']:
    return 1
  return 2 if result['interrupted'] else 0


def _interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt


if __name__ == '__main__':
  sys.exit(main())
