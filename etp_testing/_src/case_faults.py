"""What a failed case may owe to its operands rather than to the rules.

A comparison with NaN or inf always fails, so a case whose operands hold
them fails every check that compares, each blaming a right rule; and finite
operands whose product overflows the dtype do much the same.  Once a case
has failed, :func:`blame_the_case` looks for both and says so in its report
(a passing case, a large layer's included, is never scanned).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax.numpy as jnp
import numpy as np

from etp_testing._src import compilations, executor, strategies
from etp_testing._src.context import array_text, jitted_bind
from etp_testing._src.report import ERROR, CheckOutcome, Finding


@functools.lru_cache(maxsize=2)
def _non_finite_counter(small: bool):
  """A jitted ``a -> (non-finite count, flat index of the first)``, for
  operands already on a device (not copied to the host for it)."""
  def count(a):
    finite = jnp.isfinite(a).ravel()
    return jnp.sum(~finite), jnp.argmin(finite)
  return compilations.jit(count, small=small)


def non_finite(operand, small: bool) -> Optional[tuple]:
  """``(count, index)`` of an inexact operand's NaN and inf values (the
  first one's index), or ``None`` where it has none."""
  if not jnp.issubdtype(operand.dtype, jnp.inexact) or not np.size(operand):
    return None
  if isinstance(operand, np.ndarray):
    finite = np.isfinite(operand).ravel()
    count, first = int(finite.size - finite.sum()), int(np.argmin(finite))
  else:
    count, first = (int(v) for v in _non_finite_counter(small)(operand))
  if not count:
    return None
  return count, tuple(int(i) for i in np.unravel_index(first,
                                                        np.shape(operand)))


def _non_finite_text(label: str, value, bad: tuple) -> str:
  """``'<label> (<dtype>[shape]) holds <n> NaN or inf value(s), the first
  at index <i>'`` for ``bad``, what :func:`non_finite` found in it."""
  return (f'{label} ({array_text(value)}) holds {bad[0]} NaN or inf '
          f'value(s), the first at index {bad[1]}')


def _non_finite_operands(ctx) -> Optional[str]:
  """Why a failed case says nothing about the rules: an operand holds NaN
  or inf (``hypothesis.extra.numpy.arrays`` draws them unless told not to),
  so the gradients are not finite and every check blames a right rule; or
  ``None``.  Asked only once a check has failed (a comparison with a
  non-finite value always fails), so a passing case, a large layer's
  included, pays nothing for it."""
  for i, o in enumerate(ctx.device_operands):
    bad = non_finite(o, ctx.small)
    if bad is not None:
      return (_non_finite_text(f'operand {i} of {ctx.name}', o, bad) +
              ': gradients there are not finite, so the checks cannot judge '
              'the rules; draw finite operands '
              '(etp_testing.strategies.arrays_of does; hypothesis.extra.'
              'numpy.arrays needs elements=st.floats(..., allow_nan=False, '
              'allow_infinity=False))')
  return None


def _overflow(ctx) -> Optional[str]:
  """Why a failed case may say nothing about the rules: its ``y`` holds NaN
  or inf (finite operands whose product overflows the dtype), or ``None``.
  Asked only once a check has failed, through the jitted bind the checks
  compile (``primitive.jit`` has, where it ran)."""
  try:   # on the operands where they are: no host copy for this
    y = executor.y_of_outputs(ctx.primitive,
                              jitted_bind(ctx)(list(ctx.device_operands)))
  except Exception:  # pylint: disable=broad-except
    return None   # the checks have said what the bind raises
  bad = non_finite(y, ctx.small)
  if bad is None:
    return None
  return (_non_finite_text(f'y = {ctx.name}(operands)', y, bad) + ': the '
          'case overflows its dtype, so the failures below may say nothing '
          'about the rules; draw operands of moderate size '
          '(etp_testing.strategies.arrays_of draws magnitudes in '
          f'[{strategies.MIN_MAGNITUDE}, {strategies.MAX_MAGNITUDE}])')


def blame_the_case(ctx, report) -> None:
  """Where a failed case's operands are not finite, its outcomes are only
  that (none of the checks' failures says anything about the rules); where
  its ``y`` overflows, that comes first, before the failures it may
  explain."""
  problem = _non_finite_operands(ctx)
  if problem is not None:
    report.outcomes[:] = [case_error('operands', problem)]
    return
  overflow = _overflow(ctx)
  if overflow is not None:
    report.outcomes.insert(0, case_error('y', overflow))


def case_error(rule: str, problem: str) -> CheckOutcome:
  """The ``operands`` outcome of a case that cannot be judged."""
  return CheckOutcome(name='operands', status=ERROR, reason=problem,
                      findings=[Finding(rule=rule, passed=False,
                                        message=problem)])
