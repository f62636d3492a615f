"""``check_with_hypothesis``: the battery on generated cases, shrunk on failure.

Every case drawn by the primitive's strategy (see ``strategies``) runs through
``check_rules``.  A failing report makes the hypothesis test function raise,
so hypothesis shrinks towards a minimal failing case (smaller dimensions,
float32, no bias, ...); that case's :class:`RuleConsistencyError` is raised
at the end, with a line saying it is the minimal example found, after how
many examples, and how to replay it (the seed, and the ``@reproduce_failure``
blob when hypothesis gives one).

When every example passes, a :class:`HypothesisSummary` aggregates them per
check: a check is ``skipped`` only when it was skipped in every example (with
the reasons), ``measured`` when any example measured it, else ``passed``; a
check skipped in some examples and passed in others is ``passed`` and keeps
the count of skips.  The worst errors over the examples are kept with the
index of the example they occurred in.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import random
import re
import time
from typing import Mapping, Optional

import numpy as np
from hypothesis import HealthCheck, Phase, given
from hypothesis import seed as hypothesis_seed
from hypothesis import settings as hypothesis_settings

from etp_testing._src import report as report_mod
from etp_testing._src import strategies
from etp_testing._src.checks import registry as check_registry
from etp_testing._src.context import array_text
from etp_testing._src.errors import (PREFIX, RuleConsistencyError,
                                     StrategyError)
from etp_testing._src.runner import (check_rules, recurrence_settings,
                                     require_etp_primitive)

# Compiling for a new shape easily exceeds hypothesis's speed limits; these
# health checks would fail the run for that, not for a rule.
_SUPPRESSED = (HealthCheck.too_slow, HealthCheck.data_too_large,
               HealthCheck.filter_too_much)
_BLOB = re.compile(r'@reproduce_failure\([^)]*\)')
# Hypothesis's explain phase re-runs a failing example with each part varied
# to annotate its own report (about 100 more runs of the battery, each new
# shape compiling); the error raised here is the harness's, which does not
# use those annotations.
_UNUSED_PHASES = tuple(p for p in (getattr(Phase, 'explain', None),) if p)


@dataclasses.dataclass
class CheckSummary:
  """One check over every example.

  Attributes:
    name: the check.
    status: ``passed``/``measured``/``skipped`` (``failed``/``error`` only
      appear on a summary attached to a raised error).
    examples: examples the check ran in.
    statuses: how many examples gave each status.
    skipped: examples in which it was skipped; ``skip_reasons`` says why
      (distinct reasons, in first-seen order).
    max_abs_err, max_rel_err: the worst errors over the examples (of the
      finding with the largest relative error), ``None`` when nothing was
      compared numerically; ``worst_example`` is that example's index.
    tolerance_used: the largest share of its bound a judged comparison took
      over the examples (see ``Finding.tolerance_used``: how close the
      check came to a false alarm); ``tightest_example`` is that example's
      index.
    duration_s: total time in this check.
  """
  name: str
  status: str = report_mod.SKIPPED
  examples: int = 0
  statuses: dict = dataclasses.field(default_factory=dict)
  skipped: int = 0
  skip_reasons: list = dataclasses.field(default_factory=list)
  max_abs_err: Optional[float] = None
  max_rel_err: Optional[float] = None
  worst_example: Optional[int] = None
  tolerance_used: Optional[float] = None
  tightest_example: Optional[int] = None
  duration_s: float = 0.0

  def add(self, outcome, example: int) -> None:
    """Folds ``outcome`` (a ``CheckOutcome`` of example ``example``) in."""
    self.examples += 1
    self.duration_s += outcome.duration_s
    self.statuses[outcome.status] = self.statuses.get(outcome.status, 0) + 1
    if outcome.status == report_mod.SKIPPED:
      self.skipped += 1
      if outcome.reason not in self.skip_reasons:
        self.skip_reasons.append(outcome.reason)
    self.status = self._aggregate()
    worst = outcome.worst()
    if worst is not None and (self.max_rel_err is None or
                              worst.max_rel_err > self.max_rel_err):
      self.max_rel_err = worst.max_rel_err
      self.max_abs_err = worst.max_abs_err
      self.worst_example = example
    used = outcome.tolerance_used()
    if used is not None and (self.tolerance_used is None or
                             used > self.tolerance_used):
      self.tolerance_used, self.tightest_example = used, example

  def _aggregate(self) -> str:
    for status in (report_mod.ERROR, report_mod.FAILED, report_mod.MEASURED,
                   report_mod.PASSED):
      if self.statuses.get(status):
        return status
    return report_mod.SKIPPED

  def to_dict(self) -> dict:
    """Plain data (JSON-serialisable), non-finite errors as ``None``."""
    d = dataclasses.asdict(self)
    for k in ('max_abs_err', 'max_rel_err', 'tolerance_used'):
      d[k] = report_mod._json_float(d[k])  # pylint: disable=protected-access
    d['duration_s'] = round(d['duration_s'], 6)
    return d


@dataclasses.dataclass
class HypothesisSummary:
  """What :func:`check_with_hypothesis` saw over all examples (JSON-able
  with ``to_dict``).

  Attributes:
    primitive: the primitive's name.
    examples: examples run.
    checks: check name -> :class:`CheckSummary`, in run order.
    seed: the hypothesis seed (pass it as ``seed=`` to replay the draws);
      ``None`` under a derandomized profile.
    duration_s: wall time of the whole run.
    distinct_shapes: distinct operand-shape signatures (shapes, dtypes and
      params) among the examples: each is at least one compilation.
  """
  primitive: str
  examples: int = 0
  checks: dict = dataclasses.field(default_factory=dict)
  seed: Optional[int] = None
  duration_s: float = 0.0
  distinct_shapes: int = 0

  @property
  def status(self) -> str:
    """``skipped`` when every check was skipped in every example (or no
    example ran), else ``passed`` (failures raise instead)."""
    return report_mod.overall_status(c.status for c in self.checks.values())

  @property
  def passed(self) -> bool:
    """Every check passed or was skipped, and at least one was run."""
    return self.status == report_mod.PASSED

  def __str__(self) -> str:
    """One line for the run, then one per check: its status, the examples
    it ran in (and was skipped in), its worst error and the largest share
    of its bound it took, with the examples where (or why it was
    skipped)."""
    seed = '' if self.seed is None else f'seed {self.seed}, '
    lines = [f'{self.primitive}: {self.status} over {self.examples} '
             f'examples ({seed}{self.distinct_shapes} distinct shapes, '
             f'{self.duration_s:.1f} s)']
    width = max((len(n) for n in self.checks), default=0)
    for name, c in self.checks.items():
      parts = [f'{c.examples} examples']
      if c.skipped:
        parts.append(f'{c.skipped} skipped')
      if c.max_rel_err is not None:
        parts.append(f'max rel err {c.max_rel_err:.2g} (example '
                     f'{c.worst_example})')
      if c.tolerance_used is not None:
        parts.append(f'{c.tolerance_used:.2g} of the bound (example '
                     f'{c.tightest_example})')
      if c.status == report_mod.SKIPPED and c.skip_reasons:
        parts.append(c.skip_reasons[0])
      lines.append(f'  {name:{width}}  {c.status:8}  ' + ', '.join(parts))
    return '\n'.join(lines)

  def to_dict(self) -> dict:
    """Plain data (JSON-serialisable), each check's summary included."""
    return {'primitive': self.primitive, 'examples': self.examples,
            'seed': self.seed, 'duration_s': round(self.duration_s, 6),
            'distinct_shapes': self.distinct_shapes, 'status': self.status,
            'passed': self.passed,
            'checks': {n: c.to_dict() for n, c in self.checks.items()}}


class _ExampleFailed(AssertionError):
  """Raised inside the hypothesis test for a failing report."""

  def __init__(self, report):
    super().__init__(report.failure_message())
    self.report = report


def signature(operands, params) -> tuple:
  """A case's shape signature: each operand's shape and dtype, and the
  params.  Examples of one signature share every compiled program (the
  runner counts them as ``distinct_shapes``; ``benchmarks/battery.py``
  counts compilations per new one)."""
  ops = tuple((tuple(np.shape(o)), str(getattr(o, 'dtype', type(o).__name__)))
              for o in operands)
  return ops, tuple(sorted((k, repr(v)) for k, v in params.items()))


def _described(value) -> str:
  """A drawn value, briefly: an array as ``float32[2, 1]``, anything else
  by its type; a tuple or list by its first few entries."""
  if isinstance(value, (tuple, list)):
    shown = ', '.join(_described(v) for v in value[:4])
    more = ', ...' if len(value) > 4 else ''
    return f'{type(value).__name__} of {len(value)} ({shown}{more})'
  if hasattr(value, 'shape') and hasattr(value, 'dtype'):
    return array_text(value)
  return type(value).__name__


def _case_parts(case, name: str) -> tuple:
  """``(operands, params)`` of a case a strategy drew for primitive
  ``name``; a :class:`StrategyError` (a ``TypeError``) saying what a
  strategy draws where it drew anything else, instead of an error from deep
  inside the checks."""
  if (isinstance(case, tuple) and len(case) == 2
      and isinstance(case[0], (tuple, list)) and isinstance(case[1], Mapping)):
    return tuple(case[0]), dict(case[1])
  raise StrategyError(
      f'{PREFIX}the strategy for {name} drew a {_described(case)}; a '
      'strategy draws (operands, params): a tuple of the operands and a '
      'dict of the bind params ({} where there are none)')


def _run_settings(settings, max_examples):
  """The settings of the run: the user's (or the active profile's), with
  ``deadline=None``, the speed health checks off and, without a user
  ``settings``, no example database (a library call must not write
  ``.hypothesis/`` or replay stale failures) and ``print_blob`` on; never
  the explain phase (see ``_UNUSED_PHASES``)."""
  base = settings if settings is not None else hypothesis_settings()
  extra = {'phases': [p for p in base.phases if p not in _UNUSED_PHASES]}
  if settings is None:
    extra.update(database=None, print_blob=True)
  if max_examples is not None:
    extra['max_examples'] = int(max_examples)
  suppressed = list(base.suppress_health_check)
  suppressed += [h for h in _SUPPRESSED if h not in suppressed]
  return hypothesis_settings(base, deadline=None,
                             suppress_health_check=suppressed, **extra)


# The cases of recent passing runs, by what decides hypothesis's draws (see
# _draws_key).  A run with the same key (the pytest plugin's next check of
# the same primitive) replays them without hypothesis's engine, which cost
# about 17 ms a run: 2 s of the default battery's 136 runs.  A replayed case
# that fails sends the run to hypothesis, which draws the same cases and
# shrinks the failure.
_DRAWN: 'collections.OrderedDict' = collections.OrderedDict()
DRAWN_RUNS = 64                # runs kept (the least recently used go)
DRAWN_BYTES = 64 << 20         # a run whose cases hold more is not kept


def _draws_key(strategy, seed, run_settings) -> Optional[tuple]:
  """What hypothesis's draws depend on when every example passes: the
  strategy, the seed (or derandomized draws), the number of examples, the
  phases and the backend.  ``None`` (never replayed) for a random seed, or
  where an example database may add its saved examples."""
  if run_settings.database is not None:
    return None
  if seed is None and not run_settings.derandomize:
    return None
  key = (strategy, seed, run_settings.derandomize,
         run_settings.max_examples, tuple(run_settings.phases),
         getattr(run_settings, 'backend', None))
  try:
    hash(key)
  except TypeError:   # a strategy class that defines __eq__ alone
    return None
  return key


def _keep_draws(key, cases) -> None:
  if key is None:
    return
  held = sum(getattr(o, 'nbytes', 0) for operands, _ in cases
             for o in operands)
  if held > DRAWN_BYTES:
    return
  _DRAWN[key] = tuple(cases)
  while len(_DRAWN) > DRAWN_RUNS:
    _DRAWN.popitem(last=False)


def _replayed(key, run) -> tuple:
  """Runs the cases kept under ``key`` through ``run``: ``(passed,
  failure)``, whether every one passed (``False`` where none are kept, or
  one failed), and the ``_ExampleFailed`` of the one that failed."""
  if key not in _DRAWN:
    return False, None
  try:
    for case in _DRAWN[key]:
      run(_copied(case))
  except _ExampleFailed as failure:
    return False, failure
  _DRAWN.move_to_end(key)
  return True, None


# Where a kept case failed and hypothesis, drawing again, found nothing.
LOST_REPLAY_NOTE = (
    'This case was drawn by an earlier check of {name} (same strategy and '
    'seed) and kept; replayed here, it failed, but hypothesis, drawing '
    'again, did not draw it: the strategy\'s values do not follow from '
    'hypothesis\'s draws alone (its own random numbers, a counter).  The '
    'failure stands; the \'Reproduce with\' snippet re-runs this case.')


def _copied(case):
  """A fresh copy of a kept case's NumPy operands, so that nothing a
  check does to one run's arrays reaches the next."""
  operands, params = case
  return (tuple(np.array(o) if isinstance(o, np.ndarray) else o
                for o in operands), params)


def _find_failure(error) -> Optional[_ExampleFailed]:
  """The ``_ExampleFailed`` in ``error`` (possibly inside an exception group,
  as for flaky or multiple failures), or ``None``."""
  if isinstance(error, _ExampleFailed):
    return error
  for sub in getattr(error, 'exceptions', ()) or ():
    found = _find_failure(sub)
    if found is not None:
      return found
  return None


def _replay_line(error, seed, calls, passed, derandomized=False) -> str:
  notes = '\n'.join(getattr(error, '__notes__', ()) or ())
  blob = _BLOB.search(notes)
  how = []
  if seed is not None:
    how.append(f'check_with_hypothesis(..., seed={seed}) replays the same '
               'draws')
  elif derandomized:
    how.append('the settings are derandomized (as in hypothesis\'s ci '
               'profile), so running it again replays the same draws')
  if blob:
    how.append(f'{blob.group(0)} on a test decorated with '
               '@given(<the same strategy>) replays this example')
  how.append("the 'Reproduce with' snippet re-runs this case alone")
  return (f'This is the minimal failing example found by hypothesis after '
          f'{calls} runs of the battery ({passed} passed; they count '
          "hypothesis's draws and its shrinking of the failure); to replay: "
          + '; '.join(how) + '.')


def check_with_hypothesis(primitive, *, max_examples: Optional[int] = 20,
                          checks='all', strategy=None,
                          seed: Optional[int] = None, settings=None,
                          steps: int = 3, n_state=(1, 2), devices='all',
                          fast: Optional[bool] = None, rtol=None,
                          atol=None) -> HypothesisSummary:
  """Runs the check battery on ``max_examples`` generated cases.

  Args:
    primitive: an ETP primitive with a registered strategy (see
      ``etp_testing.register_strategy``), or any ETP primitive with
      ``strategy`` given.
    max_examples: examples to run (``None``: from ``settings`` or the
      active hypothesis profile): the fixed cases registered with the
      primitive's strategy first (``strategies.fixed_cases_for``; a
      built-in's rich case), then as many drawn cases as are left.
    checks, steps, n_state, devices, fast, rtol, atol: as for
      ``assert_rule_consistent`` (``fast=None`` chooses fast mode by the
      Jacobian size, which stays off for the default small draws).
    strategy: draws ``(operands, params)``; default: the registered one
      (with its fixed cases; a strategy given here runs alone).
    seed: hypothesis's seed, so the draws are reproducible; also the
      harness's seed for every example.  ``None``: a random seed, reported
      in the summary and in a failure's message (none under a derandomized
      profile, whose draws are reproducible anyway; the harness seed is 0).
    settings: a ``hypothesis.settings`` to start from; without one, the
      active profile's, with ``database=None`` and ``print_blob=True``.
      Either way ``deadline=None``, the ``too_slow``, ``data_too_large``
      and ``filter_too_much`` health checks are off (compiling a new shape
      is slow, not wrong), and so is the explain phase (a hundred more runs
      of a failing battery for annotations the raised error does not show).

  A run whose draws repeat an earlier passing run's (same strategy, fixed
  seed or derandomized settings, same number of examples, no example
  database) replays that run's cases without hypothesis's engine, as the
  pytest plugin's checks of one primitive do; if a replayed case fails,
  hypothesis draws the same cases and shrinks as usual.  (A strategy whose
  draws do not follow from hypothesis's seed alone gets the kept cases.)

  Returns:
    A :class:`HypothesisSummary` of the examples (all passed, measured or
    skipped).

  Raises:
    ValueError: no strategy for ``primitive``, an unknown check name, or
      ``steps`` / ``n_state`` that check nothing (``steps < 2``, an empty
      ``n_state``).
    TypeError: ``primitive`` is not an ETP primitive.
    RuleConsistencyError: a check failed or errored on some example; the
      error is the minimal failing case hypothesis shrank to, with a line
      saying so, the number of examples run and how to replay.  Its
      ``.summary`` holds the examples seen before.
  """
  require_etp_primitive(primitive)
  recurrence_settings(steps, n_state)   # a usage error before any draw
  # The registered strategy's fixed cases run first (a strategy passed in
  # runs alone: it is the caller's whole choice of cases).
  fixed = strategies.fixed_cases_for(primitive) if strategy is None else ()
  strategy = strategy if strategy is not None else (
      strategies.strategy_for(primitive))
  name = getattr(primitive, 'name', repr(primitive))
  if strategy is None:
    raise ValueError(f'{PREFIX}no strategy registered for {name}; use '
                     'etp_testing.register_strategy(primitive, strategy) or '
                     'pass strategy=')
  check_registry.select(checks)   # an unknown name fails now, not per example
  run_settings = _run_settings(settings, max_examples)
  # Fixed cases count among the examples: N examples are the fixed cases
  # and N - len(fixed) drawn ones (none where the fixed fill them).
  fixed = fixed[:run_settings.max_examples]
  to_draw = run_settings.max_examples - len(fixed)
  if fixed and to_draw:
    run_settings = hypothesis_settings(run_settings, max_examples=to_draw)
  if seed is None and not run_settings.derandomize:
    seed = random.SystemRandom().getrandbits(31)
  harness_seed = 0 if seed is None else int(seed)
  summary = HypothesisSummary(primitive=name, seed=seed)
  signatures = set()
  calls = [0]
  drawn = []
  start = time.perf_counter()

  def run(case):
    operands, params = _case_parts(case, name)
    calls[0] += 1
    drawn.append(case)
    report = check_rules(primitive, *operands, checks=checks,
                         seed=harness_seed, steps=steps, n_state=n_state,
                         devices=devices, fast=fast, rtol=rtol, atol=atol,
                         params=params)
    if report.failures:
      raise _ExampleFailed(report)
    example = summary.examples
    summary.examples += 1
    signatures.add(signature(operands, params))
    for outcome in report.outcomes:
      summary.checks.setdefault(
          outcome.name, CheckSummary(outcome.name)).add(outcome, example)

  try:
    _run_fixed_cases(fixed, run, name)
  except RuleConsistencyError as error:
    error.summary = summary
    raise
  finally:
    summary.duration_s = time.perf_counter() - start
    summary.distinct_shapes = len(signatures)
  if not to_draw:
    return summary
  # What a failed replay (below) starts again from; the kept draws are the
  # drawn cases alone.
  after_fixed = (copy.deepcopy(summary), set(signatures), calls[0])
  drawn.clear()

  key = _draws_key(strategy, seed, run_settings)
  replayed, replay_failure = _replayed(key, run)
  if not replayed and calls[0] > after_fixed[2]:
    # A kept case failed: hypothesis draws the same cases again, and
    # shrinks the failure, in a run of its own (after the fixed cases).
    summary = copy.deepcopy(after_fixed[0])
    signatures.clear()
    signatures.update(after_fixed[1])
    calls[0] = after_fixed[2]
    drawn.clear()
  try:
    if not replayed:
      test = run_settings(given(strategy)(run))
      if seed is not None:
        test = hypothesis_seed(seed)(test)
      test()
      _keep_draws(key, drawn)
  except BaseException as e:  # pylint: disable=broad-except
    failure = _find_failure(e)
    if failure is None:
      raise
    message = failure.report.failure_message(note=_replay_line(
        e, seed, calls[0], summary.examples, run_settings.derandomize))
    error = RuleConsistencyError(message, failure.report)
    error.summary = summary
    raise error from None
  finally:   # also the summary an error raised above carries
    summary.duration_s = time.perf_counter() - start
    summary.distinct_shapes = len(signatures)
  if replay_failure is not None:
    # A failure is never lost to a pass: hypothesis's draws passing says
    # nothing of the kept case that failed.
    error = RuleConsistencyError(replay_failure.report.failure_message(
        note=LOST_REPLAY_NOTE.format(name=name)), replay_failure.report)
    error.summary = summary
    raise error
  return summary


def _run_fixed_cases(fixed, run, name: str) -> None:
  """Runs each fixed case through ``run``; the first that fails raises a
  :class:`RuleConsistencyError` saying which fixed case it was (not
  hypothesis's: it is not shrunk)."""
  for i, case in enumerate(fixed):
    try:
      run(_copied(_case_parts(case, name)))
    except _ExampleFailed as failure:
      message = failure.report.failure_message(note=(
          f'This is fixed case {i + 1} of {len(fixed)} registered with the '
          f'strategy for {name} (etp_testing.strategies.fixed_cases_for'
          '); it runs before any draw.  The \'Reproduce with\' snippet '
          're-runs it.'))
      raise RuleConsistencyError(message, failure.report) from None
