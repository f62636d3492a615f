"""``units``: a user-facing function turns quantities into the right unit.

For a primitive with a registered unit case (``etp_testing.register_unit_case``;
the built-ins have theirs), the function is called on ``saiunit`` quantities
made from the case's operands: the result must carry the product of the
operands' units, and its mantissa must equal the primitive bound on the
mantissas.  Other primitives are skipped, with the reason.
"""

from __future__ import annotations

import saiunit as u

from etp_testing._src import unit_cases
from etp_testing._src.checks.registry import check


@check('units')
def check_units(ctx):
  """Quantities in give the product of their units out, and the same values."""
  case = unit_cases.unit_case_for(ctx.primitive)
  if case is None:
    ctx.skip(f'no unit-aware user-facing function registered for {ctx.name} '
             '(etp_testing.register_unit_case)')
  description, call, expected_unit = case(ctx.operands, ctx.params)
  try:
    out = call()
  except Exception as e:  # pylint: disable=broad-except
    ctx.fail('units', f'{description} raised {type(e).__name__}: {e}')
    return
  mantissa, unit = u.split_mantissa_unit(out)
  expected = u.Quantity(1.0, unit=expected_unit)
  if not unit.has_same_dim(expected_unit):
    ctx.fail('units', f'{description} returned unit {unit}, expected '
             f'{expected_unit}')
    return
  # The same dimension at another scale (uA for mA) is right if the values
  # are scaled to match: compare in the expected unit.
  value = u.Quantity(mantissa, unit=unit).to_decimal(expected_unit)
  ctx.compare(value, ctx.y(), rule='units', what=(
      f'{description}: mantissa in {expected_unit} vs the bind on mantissas'))
  del expected
