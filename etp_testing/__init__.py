"""etp_testing: the harness that proves ETP rules right.

``assert_rule_consistent(primitive, *operands, **params)`` runs the check
battery on one case and raises :class:`RuleConsistencyError` on any failure
(:class:`NothingCheckedError` when every check was skipped);
``check_with_hypothesis`` runs it on generated cases; ``strategies`` draws
cases for the built-in primitive families.

The names below load on first use: pytest imports this package for its
``etp`` plugin (``etp_testing.pytest_plugin``) in every run, and a run
without ``--etp-check`` must not pay for importing JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module that defines it (a module itself where equal).
_EXPORTS = {
    'NothingCheckedError': 'etp_testing._src.errors',
    'RuleConsistencyError': 'etp_testing._src.errors',
    'VacuousCaseWarning': 'etp_testing._src.errors',
    'ApproximateGradientWarning': 'etp_testing._src.errors',
    'CheckOutcome': 'etp_testing._src.report',
    'ConsistencyReport': 'etp_testing._src.report',
    'Finding': 'etp_testing._src.report',
    'assert_rule_consistent': 'etp_testing._src.runner',
    'check_names': 'etp_testing._src.runner',
    'check_rules': 'etp_testing._src.runner',
    'tolerances': 'etp_testing._src.tolerances',
    'register_unit_case': 'etp_testing._src.unit_cases',
    'register_strategy': 'etp_testing._src.strategies',
    'strategy_for': 'etp_testing._src.strategies',
    'HypothesisSummary': 'etp_testing._src.hypothesis_runner',
    'CheckSummary': 'etp_testing._src.hypothesis_runner',
    'check_with_hypothesis': 'etp_testing._src.hypothesis_runner',
    'strategies': 'etp_testing.strategies',
}

__all__ = [
    'assert_rule_consistent', 'check_rules', 'check_names',
    'RuleConsistencyError', 'NothingCheckedError', 'VacuousCaseWarning',
    'ApproximateGradientWarning',
    'ConsistencyReport',
    'CheckOutcome', 'Finding',
    'tolerances', 'register_unit_case', 'strategies', 'register_strategy',
    'strategy_for', 'check_with_hypothesis', 'HypothesisSummary',
    'CheckSummary',
]

if TYPE_CHECKING:   # what static tools see; at run time, __getattr__ below
  from etp_testing import strategies
  from etp_testing._src import tolerances
  from etp_testing._src.errors import (ApproximateGradientWarning,
                                       NothingCheckedError,
                                       RuleConsistencyError,
                                       VacuousCaseWarning)
  from etp_testing._src.hypothesis_runner import (CheckSummary,
                                                  HypothesisSummary,
                                                  check_with_hypothesis)
  from etp_testing._src.report import CheckOutcome, ConsistencyReport, Finding
  from etp_testing._src.runner import (assert_rule_consistent, check_names,
                                       check_rules)
  from etp_testing._src.strategies import register_strategy, strategy_for
  from etp_testing._src.unit_cases import register_unit_case


def __getattr__(name: str):
  source = _EXPORTS.get(name)
  if source is None:
    raise AttributeError(f"module 'etp_testing' has no attribute {name!r}")
  module = importlib.import_module(source)
  value = module if source.rsplit('.', 1)[-1] == name else getattr(module,
                                                                    name)
  globals()[name] = value   # later lookups skip __getattr__
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
