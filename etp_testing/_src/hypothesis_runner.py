"""``check_with_hypothesis``: the battery on generated cases, shrunk on failure.

Every example drawn by the primitive's strategy runs through
``check_rules``; a failing report makes hypothesis shrink towards a minimal
failing case, whose ``RuleConsistencyError`` is raised at the end with a line
saying how many examples ran and how to replay.  The summary aggregates every
example per check: worst errors, and a status that is ``skipped`` only when
the check was skipped in every example (with the reasons), never ``passed``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

from hypothesis import HealthCheck, given, settings as hsettings
from hypothesis import seed as hseed

from etp_testing._src import report as report_mod
from etp_testing._src import strategies
from etp_testing._src.errors import PREFIX, RuleConsistencyError
from etp_testing._src.runner import check_rules


@dataclasses.dataclass
class CheckSummary:
  """One check over all examples."""
  name: str
  status: str = report_mod.SKIPPED
  examples: int = 0
  skipped: int = 0
  skip_reasons: list = dataclasses.field(default_factory=list)
  max_abs_err: Optional[float] = None
  max_rel_err: Optional[float] = None
  worst_example: Optional[int] = None
  duration_s: float = 0.0

  def add(self, outcome, example: int) -> None:
    self.examples += 1
    self.duration_s += outcome.duration_s
    if outcome.status == report_mod.SKIPPED:
      self.skipped += 1
      if outcome.reason not in self.skip_reasons:
        self.skip_reasons.append(outcome.reason)
    elif outcome.failed:
      self.status = outcome.status
    elif self.status == report_mod.SKIPPED or (
        outcome.status == report_mod.MEASURED and
        self.status == report_mod.PASSED):
      self.status = outcome.status
    worst = outcome.worst()
    if worst is not None and not worst.approximate and (
        self.max_rel_err is None or worst.max_rel_err > self.max_rel_err):
      self.max_rel_err = worst.max_rel_err
      self.max_abs_err = worst.max_abs_err
      self.worst_example = example

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    for k in ('max_abs_err', 'max_rel_err'):
      d[k] = report_mod._json_float(d[k])  # pylint: disable=protected-access
    return d


@dataclasses.dataclass
class HypothesisSummary:
  """What ``check_with_hypothesis`` saw over all examples."""
  primitive: str
  examples: int = 0
  checks: dict = dataclasses.field(default_factory=dict)
  seed: Optional[int] = None
  duration_s: float = 0.0

  @property
  def passed(self) -> bool:
    return not any(c.status in report_mod.BAD_STATUSES
                   for c in self.checks.values())

  def to_dict(self) -> dict:
    return {'primitive': self.primitive, 'examples': self.examples,
            'seed': self.seed, 'duration_s': round(self.duration_s, 6),
            'passed': self.passed,
            'checks': {n: c.to_dict() for n, c in self.checks.items()}}


class _ExampleFailed(AssertionError):

  def __init__(self, report):
    super().__init__(report.failure_message())
    self.report = report


def check_with_hypothesis(primitive, *, max_examples: int = 20, checks='all',
                          strategy=None, seed: Optional[int] = None,
                          settings=None, steps: int = 3, n_state=(1, 2),
                          devices='all', fast=None, rtol=None,
                          atol=None) -> HypothesisSummary:
  """Runs the battery on ``max_examples`` generated cases of ``primitive``.

  Args:
    primitive: an ETP primitive with a registered strategy (or ``strategy``).
    max_examples: examples to draw.
    checks, steps, n_state, devices, fast, rtol, atol: as for
      ``assert_rule_consistent``.
    strategy: draws ``(operands, params)``; default: the registered one.
    seed: hypothesis's seed (reproducible draws); also the harness's seed.
    settings: a ``hypothesis.settings`` to start from (the active profile
      otherwise); ``max_examples`` and ``deadline=None`` are applied on top.

  Returns:
    A :class:`HypothesisSummary`.

  Raises:
    RuleConsistencyError: for the minimal failing case hypothesis found.
  """
  strategy = strategy or strategies.strategy_for(primitive)
  if strategy is None:
    raise ValueError(f'{PREFIX}no strategy registered for '
                     f'{getattr(primitive, "name", primitive)}; use '
                     'etp_testing.register_strategy(primitive, strategy)')
  summary = HypothesisSummary(primitive=primitive.name, seed=seed)
  harness_seed = 0 if seed is None else int(seed)
  start = time.perf_counter()
  last_failure = {}

  base = settings if settings is not None else hsettings()
  run_settings = hsettings(
      base, max_examples=max_examples, deadline=None,
      suppress_health_check=list(base.suppress_health_check) + [
          HealthCheck.too_slow, HealthCheck.data_too_large,
          HealthCheck.filter_too_much])

  @run_settings
  @given(strategy)
  def run(case):
    operands, params = case
    report = check_rules(primitive, *operands, checks=checks, seed=harness_seed,
                         steps=steps, n_state=n_state, devices=devices,
                         fast=fast, rtol=rtol, atol=atol, **params)
    if not report.passed:
      last_failure['report'] = report
      raise _ExampleFailed(report)
    example = summary.examples
    summary.examples += 1
    for outcome in report.outcomes:
      summary.checks.setdefault(outcome.name,
                                CheckSummary(outcome.name)).add(outcome,
                                                                example)

  if seed is not None:
    run = hseed(seed)(run)
  try:
    run()
  except _ExampleFailed as e:
    report = e.report
    summary.duration_s = time.perf_counter() - start
    replay = (f'hypothesis seed {seed}' if seed is not None else
              'rerun with the same --hypothesis-seed / seed= to replay')
    message = (f'{report.failure_message()}\n(the minimal failing example '
               f'hypothesis found after {summary.examples} passing examples; '
               f'{replay})')
    raise RuleConsistencyError(message, report) from None
  summary.duration_s = time.perf_counter() - start
  return summary
