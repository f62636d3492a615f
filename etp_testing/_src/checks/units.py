"""``units``: a user-facing function turns quantities into the right unit.

For a primitive with a registered unit case (:func:`etp_testing.
register_unit_case`; the built-ins have theirs in ``unit_cases``), each call
of the case runs the user-facing function (``matmul``, ``conv``, ...) on
``saiunit`` quantities whose mantissas are the case's operands, and:

* the result must carry the expected unit (the product of the operands'
  units) - a dimension mismatch is a failure;
* its mantissa, expressed in that unit, must equal the primitive bound on the
  mantissas (so a bias given in uA where the output is in mA must have been
  converted), in the bind's dtype;
* the call's result must come from a bind of this very primitive (in
  ``jax.make_jaxpr`` of it, the result depends on the primitive's output;
  for a ``gradient_enabled`` marker it is that output, since
  ``element_wise(w, fn)`` applies ``fn`` before the bind), so a wrapper that
  computes the right numbers in plain JAX, invisible to an ETP compiler,
  does not pass, nor one that binds and then returns something else.

A call that the function rejects with its own validation error (an
``[etp] ...`` ``ValueError``/``TypeError``: e.g. sparse indices that repeat a
pair, which the primitive itself accepts) does not apply to this case; when no
call applies the check is skipped with the reasons.  Other primitives are
skipped: 'no unit-aware user-facing function registered for <name>'.
"""

from __future__ import annotations

import jax
import saiunit as u

from etp._src.arrays import to_jax
from etp_testing._src import executor, unit_cases
from etp_testing._src.context import terms_or_none
from etp_testing._src.checks.registry import check
from etp_testing._src.errors import raised

_ETP_PREFIX = '[etp] '


def _binds(eqn, primitive) -> bool:
  """Whether ``eqn`` binds ``primitive``, or a jaxpr inside it does."""
  if eqn.primitive is primitive:
    return True
  inner = [getattr(item, 'jaxpr', item) for item in executor.param_items(eqn)]
  return any(e.primitive is primitive for j in inner if hasattr(j, 'eqns')
             for e in executor.all_eqns(j))


def _feeding(jaxpr, outvar) -> list:
  """The equations of ``jaxpr`` that ``outvar`` depends on, last first."""
  needed, fed = {outvar}, []
  for eqn in reversed(jaxpr.eqns):
    if any(v in needed for v in eqn.outvars):
      fed.append(eqn)
      needed.update(v for v in eqn.invars if not hasattr(v, 'val'))
  return fed


def _bound_into(jaxpr, primitive, last: bool) -> bool:
  """Whether the first output of ``jaxpr`` (the result's mantissa) depends
  on a bind of ``primitive``; ``last``: is made by it (nothing after)."""
  outvar = jaxpr.outvars[0]
  if hasattr(outvar, 'val'):
    return False   # a literal: nothing feeds it
  fed = _feeding(jaxpr, outvar)
  if last:
    return bool(fed) and _binds(fed[0], primitive)
  return any(_binds(eqn, primitive) for eqn in fed)


def _is_validation_error(e: Exception) -> bool:
  return (isinstance(e, (ValueError, TypeError)) and
          not isinstance(e, u.UnitMismatchError) and
          str(e).startswith(_ETP_PREFIX))


@check('units')
def check_units(ctx):
  """Quantities in give the product of their units out, the bind's values,
  and the call binds the primitive."""
  make_cases = unit_cases.unit_case_for(ctx.primitive)
  if make_cases is None:
    ctx.skip(f'no unit-aware user-facing function registered for {ctx.name} '
             '(etp_testing.register_unit_case)')
  try:
    cases = list(make_cases(ctx))
  except Exception as e:  # pylint: disable=broad-except
    ctx.fail('units', f'the unit case of {ctx.name} raised '
             f'{type(e).__name__}: {e}')
    return
  if not cases:
    # Nothing was called, so nothing is known: not a pass.
    ctx.skip(f'the unit case of {ctx.name} gave no calls for this case')
  y = ctx.y()
  # The bind on absolute values: the size of the terms y sums.  The
  # wrapper rounds a bias converted from another unit (uA to mA) relative
  # to the bias, and where y cancels (x . w close to -b), that rounding is
  # far larger than y: a half-precision dense layer took 2.6 of a bound
  # scaled by y alone (soak seed 73).
  terms = terms_or_none(ctx.bind, *ctx.magnitudes(ctx.operands))
  rejected = []
  for case in cases:
    description, call, expected_unit = case[:3]
    # A case's own expectation (not the bind) has no known term size.
    expected, term_scale = (case[3], None) if len(case) > 3 else (y, terms)
    try:
      out = call()
    except Exception as e:  # pylint: disable=broad-except
      if _is_validation_error(e):
        rejected.append(f'{description}: {e}')
      else:
        ctx.fail('units', raised(description, e))
      continue
    _check_call(ctx, description, call, out, expected_unit, expected,
                term_scale)
  if rejected and len(rejected) == len(cases):
    ctx.skip('the user-facing function rejects this case with its own '
             'validation: ' + '; '.join(rejected))
  for reason in rejected:
    ctx.fail('units', f'rejected, while other calls of the same case were '
             f'accepted: {reason}')


def _check_call(ctx, description, call, out, expected_unit, expected,
                term_scale):
  mantissa, unit = u.split_mantissa_unit(out)
  if not unit.has_same_dim(expected_unit):
    ctx.fail('units', f'{description} returned unit {unit}, expected '
             f'{expected_unit} (the product of the operand units)')
    return
  mantissa = to_jax(mantissa)
  expected = to_jax(expected)
  if mantissa.dtype != expected.dtype:
    ctx.fail('units', f'{description} returned a {mantissa.dtype} mantissa, '
             f'the bind on the mantissas gives {expected.dtype}',
             actual_shape=tuple(mantissa.shape),
             expected_shape=tuple(expected.shape), dtype=str(mantissa.dtype))
  # The same dimension at another scale (uA for mA) is right if the values
  # are scaled to match: compare in the expected unit.
  value = mantissa if unit == expected_unit else \
      u.Quantity(mantissa, unit=unit).to_decimal(expected_unit)
  # Operands are scaled to their units in their own dtypes (a bias in uA
  # is 1e3 times its mantissa): judged at the coarsest dtype among them.
  ctx.compare(value, expected, rule='units',
              dtype=ctx.bind_dtype(expected.dtype),
              term_scale=term_scale,
              what=f'{description}: result in {expected_unit} vs the bind on '
              'the mantissas')
  try:
    jaxpr = jax.make_jaxpr(call)().jaxpr
  except Exception as e:  # pylint: disable=broad-except
    ctx.fail('units', f'{description} cannot be traced by jax.make_jaxpr: '
             f'{type(e).__name__}: {e}')
    return
  marker = ctx.primitive.gradient_enabled
  if not _bound_into(jaxpr, ctx.primitive, last=marker):
    ctx.fail('units', f'{description}: its result '
             + ('is not the output of a bind of' if marker else
                'does not come from a bind of') + f' {ctx.name}: it is '
             'computed in plain JAX, where an ETP compiler cannot see the '
             'weights' + (' (element_wise(w, fn) applies fn before the bind)'
                          if marker else ''))
  else:
    ctx.record_pass('units', f'{description}: its result comes from a bind '
                    f'of {ctx.name}')
