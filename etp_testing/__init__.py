"""etp_testing: the harness that proves ETP rules right.

``assert_rule_consistent(primitive, *operands, **params)`` runs the check
battery on one case and raises :class:`RuleConsistencyError` on any failure
(:class:`NothingCheckedError` when every check was skipped);
``check_with_hypothesis`` runs it on generated cases; ``strategies`` draws
cases for the built-in primitive families.
"""

from etp_testing._src.errors import NothingCheckedError, RuleConsistencyError
from etp_testing._src.report import (CheckOutcome, ConsistencyReport, Finding)
from etp_testing._src.runner import (assert_rule_consistent, check_names,
                                     check_rules)
from etp_testing._src import tolerances
from etp_testing._src.unit_cases import register_unit_case
from etp_testing._src.strategies import register_strategy, strategy_for
from etp_testing._src.hypothesis_runner import (HypothesisSummary,
                                                check_with_hypothesis)
from etp_testing import strategies

__all__ = [
    'assert_rule_consistent', 'check_rules', 'check_names',
    'RuleConsistencyError', 'NothingCheckedError', 'ConsistencyReport',
    'CheckOutcome', 'Finding',
    'tolerances', 'register_unit_case', 'strategies', 'register_strategy',
    'strategy_for', 'check_with_hypothesis', 'HypothesisSummary',
]
