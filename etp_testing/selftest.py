"""``python -m etp_testing.selftest``: does the harness kill every mutant?

Runs the check battery (:func:`etp_testing.check_rules`) against every
deliberately broken primitive of :mod:`etp_testing.mutants` on the case that
exposes its bug, and against the correct built-in it was made from on the same
case.  Prints the kill matrix (one row per mutant, one column per check) and
ends with ``K/M mutants killed``.

A mutant is *killed* when a check that matches its ``expected_checks`` (the
checks that name the real cause) reports ``failed``.  The run fails (exit 1)
when a mutant

* survives (no check failed),
* is caught only by checks that do not match ``expected_checks`` (the harness
  blamed the wrong thing), or
* only crashed a check (status ``error``: a crash is not a diagnosis),

or when a correct built-in is flagged on any case (a false alarm).

Options::

  --mutants GLOB   only mutants whose name matches (with or without 'mutant_')
  --reduced        reduced form: each mutant's expected checks plus a cheap
                   subset, steps=2 (what the test suite runs)
  --fast           fast mode for every check (random projections instead of
                   full Jacobians, sampled anchors): it must kill the same
                   mutants
  --examples N     also run N hypothesis examples per mutant and per built-in
                   (etp_testing check_with_hypothesis, when available)
  --json PATH      write the results as JSON
  --no-builtins    skip the correct built-ins (not for CI)
  --quiet          no progress line per mutant
  --compile-cache DIR|auto|off
                   the persistent XLA compilation cache, as ``etp-check``
                   takes it (by default the same directory): the mutants'
                   oracles are their bases', so even a first run loads some
                   programs, and a second compiles none

The output ends with the XLA programs compiled and loaded, the time, and the
summary line.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import json
import sys
import time
from typing import Optional, Sequence

import numpy as np

from etp_testing import mutants as mutants_lib
from etp_testing._src import cli, compilations
from etp_testing._src.checks import registry as check_registry
from etp_testing._src.errors import RuleConsistencyError
from etp_testing._src.report import ERROR, FAILED, MEASURED, PASSED, SKIPPED
from etp_testing._src.runner import check_names, check_rules

__all__ = ['main', 'run', 'run_mutant', 'run_builtin', 'checks_for',
           'MutantResult', 'BuiltinResult', 'SelftestResult']

# Checks every reduced (--reduced) run adds to a mutant's expected checks: cheap
# ones that see most bugs, so the matrix still shows more than the target.
CHEAP_CHECKS = ('xy_to_dw.vjp', 'init.pp', 'primitive.abstract_eval')

# Verdicts.
KILLED = 'killed'               # a matching check failed
MISATTRIBUTED = 'misattributed'  # only non-matching checks failed
CRASHED = 'crashed'             # only errors
SURVIVED = 'survived'           # nothing noticed
BUILD_ERROR = 'build-error'     # the mutant itself could not be made

_MARK = {FAILED: 'x', ERROR: 'E', PASSED: '.', SKIPPED: '-', MEASURED: 'm'}
_SHORT = {
    'xy_to_dw.vjp': 'vjp', 'xy_to_dw.jacrev': 'jac', 'xy_to_dw.fd': 'fd',
    'yw_to_w.anchor': 'anc', 'yw_to_w.linear': 'lin', 'yw_to_w.vmap': 'ywv',
    'init.drtrl': 'iD', 'init.pp': 'iP', 'drtrl.exact': 'dX',
    'drtrl.instant': 'dI', 'pp.exact': 'pp', 'primitive.jit': 'jit',
    'primitive.abstract_eval': 'abs', 'primitive.jvp': 'jvp',
    'primitive.vmap': 'vm', 'device.consistency': 'dev', 'units': 'un',
}


@dataclasses.dataclass
class MutantResult:
  """What the harness said about one mutant."""

  name: str
  family: str
  bug_class: str
  description: str
  expected_checks: tuple
  statuses: dict = dataclasses.field(default_factory=dict)
  reasons: dict = dataclasses.field(default_factory=dict)
  durations: dict = dataclasses.field(default_factory=dict)
  verdict: str = SURVIVED
  duration_s: float = 0.0
  hypothesis: Optional[dict] = None

  @property
  def caught_by(self) -> list:
    return [c for c, s in self.statuses.items() if s == FAILED]

  @property
  def matched(self) -> list:
    return [c for c in self.caught_by
            if any(fnmatch.fnmatchcase(c, p) for p in self.expected_checks)]

  @property
  def killed(self) -> bool:
    return self.verdict == KILLED

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(expected_checks=list(self.expected_checks),
             caught_by=self.caught_by, matched=self.matched)
    return d


@dataclasses.dataclass
class BuiltinResult:
  """A correct built-in on one mutant's case (or on strategy draws)."""

  primitive: str
  case_of: str
  statuses: dict = dataclasses.field(default_factory=dict)
  reasons: dict = dataclasses.field(default_factory=dict)
  duration_s: float = 0.0
  examples: int = 0

  @property
  def flagged(self) -> list:
    return [c for c, s in self.statuses.items() if s in (FAILED, ERROR)]

  @property
  def passed(self) -> bool:
    return not self.flagged

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(flagged=self.flagged, passed=self.passed)
    return d


@dataclasses.dataclass
class SelftestResult:
  mutants: list
  builtins: list
  duration_s: float = 0.0

  @property
  def killed(self) -> int:
    return sum(m.killed for m in self.mutants)

  @property
  def ok(self) -> bool:
    return (all(m.killed for m in self.mutants) and
            all(b.passed for b in self.builtins))

  @property
  def exit_code(self) -> int:
    return 0 if self.ok else 1

  def summary_line(self) -> str:
    return f'{self.killed}/{len(self.mutants)} mutants killed'

  def to_dict(self) -> dict:
    return {'killed': self.killed, 'total': len(self.mutants), 'ok': self.ok,
            'duration_s': round(self.duration_s, 3),
            'mutants': [m.to_dict() for m in self.mutants],
            'builtins': [b.to_dict() for b in self.builtins]}


# ------------------------------------------------------------------ running
def _select(patterns) -> list:
  out = []
  for p in patterns:
    try:
      out.extend(check_registry.select([p]))
    except ValueError:
      pass  # an expected check this harness does not have: matches nothing
  return out


def checks_for(mutant, reduced: bool = False) -> list:
  """The checks to run on ``mutant``: all of them, or (``reduced``) its
  expected checks plus :data:`CHEAP_CHECKS`, in run order."""
  if not reduced:
    return list(check_names())
  chosen = set(_select(mutant.expected_checks)) | set(_select(CHEAP_CHECKS))
  return [c for c in check_names() if c in chosen]


def _verdict(statuses: dict, expected) -> str:
  failed = [c for c, s in statuses.items() if s == FAILED]
  if any(fnmatch.fnmatchcase(c, p) for c in failed for p in expected):
    return KILLED
  if failed:
    return MISATTRIBUTED
  if any(s == ERROR for s in statuses.values()):
    return CRASHED
  return SURVIVED


def _statuses(report) -> tuple:
  statuses, reasons = {}, {}
  for o in report.outcomes:
    statuses[o.name] = o.status
    if o.status in (FAILED, ERROR):
      bad = [f.describe() for f in o.findings if not f.passed][:2]
      reasons[o.name] = (o.reason + (' | ' if o.reason and bad else '') +
                         ' | '.join(bad))[:400]
  return statuses, reasons


def _hypothesis_runner():
  try:
    from etp_testing._src.hypothesis_runner import check_with_hypothesis
  except ImportError:
    return None
  return check_with_hypothesis


def run_mutant(mutant, *, reduced: bool = False, checks=None, seed: int = 0,
               steps: Optional[int] = None, n_state=(1, 2), devices='all',
               examples: int = 0, fast: Optional[bool] = None) -> MutantResult:
  """Runs the harness on ``mutant``'s case and judges the outcome."""
  result = MutantResult(name=mutant.name, family=mutant.family,
                        bug_class=mutant.bug_class,
                        description=mutant.description,
                        expected_checks=tuple(mutant.expected_checks))
  start = time.perf_counter()
  try:
    prim = mutant.primitive()
    operands, params = mutant.case()
  except Exception as e:  # pylint: disable=broad-except
    result.verdict = BUILD_ERROR
    result.reasons['build'] = f'{type(e).__name__}: {e}'
    result.duration_s = time.perf_counter() - start
    return result
  names = checks if checks is not None else checks_for(mutant, reduced)
  report = check_rules(prim, *operands, checks=names, seed=seed,
                       steps=steps or (2 if reduced else 3), n_state=n_state,
                       devices=devices, fast=fast, params=params)
  result.statuses, result.reasons = _statuses(report)
  result.durations = {o.name: round(o.duration_s, 3) for o in report.outcomes}
  result.verdict = _verdict(result.statuses, mutant.expected_checks)
  if examples:
    result.hypothesis = _hypothesis_on(prim, examples, names, seed,
                                       mutant.expected_checks,
                                       base=mutant.base_primitive())
  result.duration_s = time.perf_counter() - start
  return result


def _hypothesis_on(prim, examples, names, seed, expected=None,
                   base=None) -> dict:
  """Runs ``examples`` generated cases (drawn by the strategy of ``base``,
  the built-in a mutant breaks, or of ``prim``); for a mutant, whether they
  kill it."""
  runner = _hypothesis_runner()
  if runner is None:
    return {'status': 'unavailable'}
  from hypothesis import settings
  from etp_testing._src import strategies
  strategy = strategies.strategy_for(base if base is not None else prim)
  if strategy is None:
    return {'status': 'unavailable'}
  start = time.perf_counter()
  try:
    summary = runner(prim, max_examples=examples, checks=names, seed=seed,
                     strategy=strategy,
                     settings=settings(database=None, print_blob=False))
  except RuleConsistencyError as e:
    statuses, reasons = _statuses(e.report)
    out = {'status': 'failed', 'statuses': statuses, 'reasons': reasons}
    if expected is not None:
      out['verdict'] = _verdict(statuses, expected)
    out['duration_s'] = time.perf_counter() - start
    return out
  except Exception as e:  # pylint: disable=broad-except
    return {'status': 'error', 'reason': f'{type(e).__name__}: {e}'[:400],
            'duration_s': time.perf_counter() - start}
  n = getattr(summary, 'examples', None)
  return {'status': 'passed', 'examples': n,
          'duration_s': time.perf_counter() - start,
          **({'verdict': SURVIVED} if expected is not None else {})}


def run_builtin(primitive, operands, params, *, checks='all', case_of='',
                seed: int = 0, steps: int = 3, n_state=(1, 2),
                devices='all', fast: Optional[bool] = None) -> BuiltinResult:
  """Runs the harness on a correct built-in; every check must pass."""
  start = time.perf_counter()
  report = check_rules(primitive, *operands, checks=checks, seed=seed,
                       steps=steps, n_state=n_state, devices=devices,
                       fast=fast, params=params)
  statuses, reasons = _statuses(report)
  return BuiltinResult(primitive=primitive.name, case_of=case_of,
                       statuses=statuses, reasons=reasons,
                       duration_s=time.perf_counter() - start)


def _case_key(base: str, operands, params) -> tuple:
  """Identifies a case: the built-in, the operands' bytes, the params."""
  arrays = [np.asarray(o) for o in operands]
  digest = hashlib.sha1(b''.join(
      f'{a.dtype}{a.shape}'.encode() + a.tobytes() for a in arrays))
  return (base, digest.hexdigest(),
          tuple(sorted((k, repr(v)) for k, v in params.items())))


@dataclasses.dataclass
class BuiltinCase:
  """One distinct case of the chosen mutants, for their correct built-in."""

  base: str
  operands: list
  params: dict
  checks: list
  mutants: list

  @property
  def label(self) -> str:
    more = len(self.mutants) - 1
    return self.mutants[0] + (f' (+{more} more)' if more else '')


def builtin_cases(chosen, *, reduced: bool = False) -> list:
  """The distinct cases of ``chosen`` mutants, each with its built-in and
  the union of the checks run on its mutants (all checks unless ``reduced``)."""
  groups: dict = {}
  for m in chosen:
    operands, params = m.case()
    key = _case_key(m.base, operands, params)
    if key not in groups:
      groups[key] = BuiltinCase(base=m.base, operands=operands, params=params,
                                checks=[], mutants=[])
    group = groups[key]
    group.mutants.append(m.name)
    wanted = set(group.checks) | set(checks_for(m, reduced))
    group.checks = [c for c in check_names() if c in wanted]
  return list(groups.values())


def run(pattern: str = '*', *, reduced: bool = False, seed: int = 0,
        examples: int = 0, builtins: bool = True, devices='all',
        log=None, fast: Optional[bool] = None) -> SelftestResult:
  """Runs every mutant matching ``pattern``, then each correct built-in on
  every distinct case of those mutants (with the union of their checks);
  ``fast=True`` runs everything in fast mode (random projections)."""
  start = time.perf_counter()
  chosen = mutants_lib.catalog(pattern=pattern)
  built_before = {m.name for m in mutants_lib.built()}
  try:
    return _run(chosen, reduced=reduced, seed=seed, examples=examples,
                builtins=builtins, devices=devices, log=log, start=start,
                fast=fast)
  finally:
    # Leave etp.primitives() as found: no broken primitive lingers.
    for m in chosen:
      if m.name not in built_before:
        m.forget()


def _run(chosen, *, reduced, seed, examples, builtins, devices, log,
         start, fast) -> SelftestResult:
  results, base_results = [], []
  steps = 2 if reduced else 3
  for m in chosen:
    r = run_mutant(m, reduced=reduced, seed=seed, steps=steps, devices=devices,
                   examples=examples, fast=fast)
    results.append(r)
    if log:
      log(f'  {r.verdict:>13}  {m.name}  ({r.duration_s:.1f}s)'
          + (f'  caught by {", ".join(r.caught_by)}' if r.caught_by else ''))
  if builtins:
    built_ok = {r.name for r in results if r.verdict != BUILD_ERROR}
    for case in builtin_cases([m for m in chosen if m.name in built_ok],
                              reduced=reduced):
      b = run_builtin(mutants_lib.builtin(case.base), case.operands,
                      case.params, checks=case.checks, case_of=case.label,
                      seed=seed, steps=steps, devices=devices, fast=fast)
      base_results.append(b)
      if log:
        log(f'  {"passed" if b.passed else "FALSE ALARM":>13}  {b.primitive} '
            f'on the case of {b.case_of}  ({b.duration_s:.1f}s)'
            + ('' if b.passed else f': {", ".join(b.flagged)}'))
  if builtins and examples:
    for base in dict.fromkeys(m.base for m in chosen):
      prim = mutants_lib.builtin(base)
      t0 = time.perf_counter()
      h = _hypothesis_on(prim, examples, 'all', seed)
      b = BuiltinResult(primitive=prim.name, case_of='hypothesis',
                        examples=h.get('examples') or 0,
                        duration_s=time.perf_counter() - t0)
      if h['status'] == 'failed':
        b.statuses, b.reasons = h['statuses'], h['reasons']
      elif h['status'] == 'error':
        b.statuses, b.reasons = {'hypothesis': ERROR}, {'hypothesis':
                                                        h['reason']}
      base_results.append(b)
  return SelftestResult(mutants=results, builtins=base_results,
                        duration_s=time.perf_counter() - start)


# ---------------------------------------------------------------- reporting
def _mark(result: MutantResult, check: str) -> str:
  status = result.statuses.get(check)
  if status is None:
    return ' '
  if status == FAILED and check in result.matched:
    return 'K'
  return _MARK.get(status, '?')


def format_matrix(result: SelftestResult, notes: Sequence[str] = ()) -> str:
  """The kill matrix, the built-ins' verdicts, ``notes`` (lines) and the
  summary line."""
  cols = [c for c in check_names()
          if any(c in m.statuses for m in result.mutants)]
  heads = [_SHORT.get(c, c.split('.')[-1][:4]) for c in cols]
  width = max([len(m.name) for m in result.mutants] + [6])
  lines = ['Kill matrix: K = failed and names the real cause (matches '
           'expected_checks), x = failed, E = error, . = passed, '
           '- = skipped, m = measured, blank = not run.',
           '  ' + ', '.join(f'{h}={c}' for h, c in zip(heads, cols)), '',
           f'{"mutant":<{width}}  ' + ' '.join(f'{h:>3}' for h in heads)
           + '  verdict']
  for m in result.mutants:
    row = ' '.join(f'{_mark(m, c):>3}' for c in cols)
    extra = ''
    h = m.hypothesis or {}
    if h.get('status') not in (None, 'unavailable'):
      extra = f'  [hypothesis: {h.get("verdict", h["status"])}]'
    lines.append(f'{m.name:<{width}}  {row}  {m.verdict}{extra}')
  lines.append('')
  for what, key in (('family', lambda m: m.family),
                    ('bug class', lambda m: m.bug_class)):
    groups: dict = {}
    for m in result.mutants:
      killed, total = groups.get(key(m), (0, 0))
      groups[key(m)] = (killed + m.killed, total + 1)
    lines.append(f'By {what}: ' + ', '.join(
        f'{k} {a}/{b}' for k, (a, b) in groups.items()))
  bad = [m for m in result.mutants if not m.killed]
  if bad:
    lines.append('')
    lines.append('Not killed:')
    for m in bad:
      lines.append(f'  {m.name} ({m.verdict}): {m.description}; expected '
                   f'{", ".join(m.expected_checks)}; caught by '
                   f'{", ".join(m.caught_by) or "nothing"}')
      for c, why in m.reasons.items():
        lines.append(f'      {c}: {why}')
  if result.builtins:
    lines.append('')
    flagged = [b for b in result.builtins if not b.passed]
    lines.append(f'Correct built-ins: {len(result.builtins) - len(flagged)}/'
                 f'{len(result.builtins)} runs passed')
    for b in flagged:
      lines.append(f'  FALSE ALARM {b.primitive} on {b.case_of}: '
                   f'{", ".join(b.flagged)}')
      for c, why in b.reasons.items():
        lines.append(f'      {c}: {why}')
  lines.append('')
  lines.extend(notes)
  lines.append(f'time {result.duration_s:.1f}s')
  lines.append(result.summary_line())
  return '\n'.join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m etp_testing.selftest',
      description='Run the harness against the mutant catalog; exit 1 if any '
      'mutant survives or any correct built-in is flagged.')
  parser.add_argument('--mutants', default='*', metavar='GLOB',
                      help="only mutants matching GLOB (e.g. 'dense_*')")
  parser.add_argument('--reduced', action='store_true',
                      help='reduced form: expected checks + a cheap subset, '
                      'steps=2')
  parser.add_argument('--fast', action='store_true',
                      help='fast mode (random projections, sampled anchors) '
                      'for every check, as above the size threshold')
  parser.add_argument('--examples', type=int, default=0, metavar='N',
                      help='also run N hypothesis examples per primitive')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', metavar='PATH', help='write results as JSON')
  parser.add_argument('--no-builtins', action='store_true',
                      help='do not run the correct built-ins')
  parser.add_argument('--quiet', action='store_true',
                      help='no per-mutant progress lines')
  cli.add_compile_cache_option(parser)
  args = parser.parse_args(argv)
  chosen = mutants_lib.catalog(pattern=args.mutants)
  if not chosen:
    print(f'{parser.prog}: no mutant matches {args.mutants!r}', file=sys.stderr)
    return 2
  ok, cache = cli.open_compile_cache(args.compile_cache, parser.prog)
  if not ok:
    return 2
  log = None if args.quiet else (lambda s: print(s, flush=True))
  if log:
    log(f'Running the harness on {len(chosen)} mutants'
        + (' (reduced form)' if args.reduced else '')
        + (' (fast mode)' if args.fast else ''))
  with compilations.counting() as programs:
    result = run(args.mutants, reduced=args.reduced, seed=args.seed,
                 fast=True if args.fast else None, examples=args.examples,
                 builtins=not args.no_builtins, log=log)
  print(format_matrix(result, [compilations.programs_line(
      programs.count, programs.loaded, cache)]))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(result.to_dict(), compilations={
          'compiled': programs.count, 'loaded': programs.loaded,
          'compile_cache': cache}), f, indent=1, default=str)
  return result.exit_code


if __name__ == '__main__':
  sys.exit(main())
