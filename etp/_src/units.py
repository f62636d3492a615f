"""Unit handling for the user-facing functions.

Rules and primitives see mantissas only.  A wrapper splits each ``saiunit``
quantity into ``(mantissa, unit)``, binds the primitive on mantissas, and
recombines with the product of the operands' units.
"""

from __future__ import annotations

import jax.numpy as jnp
import saiunit as u

from etp._src.registry import ERROR_PREFIX


def split(value):
  """``(mantissa, unit)`` of a quantity or a plain array (unit: ``UNITLESS``)."""
  return u.split_mantissa_unit(value)


def mantissa_in(value, unit, *, fn: str, arg: str):
  """The mantissa of ``value`` expressed in ``unit``.

  Raises:
    saiunit.UnitMismatchError: ``value``'s dimension is not ``unit``'s; the
      message names the function and the argument.
  """
  mantissa, own = split(value)
  if own.has_same_dim(unit):
    if own == unit:
      return mantissa
    # Scaled as a JAX array: NumPy would promote a bfloat16 mantissa times
    # the (Python float) scale to float32; JAX keeps the mantissa's dtype.
    return u.Quantity(jnp.asarray(mantissa), unit=own).to_decimal(unit)
  raise u.UnitMismatchError(
      f'{ERROR_PREFIX}{fn}: `{arg}` has unit {own}, but must have the '
      f'dimension of {unit} (the unit of the output).')


def combine(mantissa, unit):
  """A quantity with ``unit``, or the bare array when ``unit`` is unitless."""
  return u.maybe_decimal(u.Quantity(mantissa, unit=unit))


def bias_mantissa(bias, unit, n_out: int, *, fn: str, against: str):
  """The mantissa of an optional ``(n_out,)`` bias in the output ``unit``.

  Raises:
    saiunit.UnitMismatchError / ValueError: wrong dimension, rank or length;
      the message names ``fn``, ``bias`` and what it must match.
  """
  from etp._src import validation  # validation imports nothing from here
  mantissa = mantissa_in(bias, unit, fn=fn, arg='bias')
  validation.check_ndim(fn, 'bias', mantissa, (1,), f'({n_out},)')
  validation.check_dim(fn, 'bias', mantissa, 0, n_out, f'({n_out},)', against)
  return mantissa
