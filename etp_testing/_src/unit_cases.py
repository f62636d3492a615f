"""Unit cases: how to call a primitive's unit-aware user-facing function.

The ``units`` check needs to know, for a primitive, which user-facing function
binds it and how to call that function on ``saiunit`` quantities.  A *unit
case* says so::

  register_unit_case(primitive, fn)

where ``fn(ctx) -> [(description, call, expected_unit[, expected]), ...]``
builds, from the case under test (``ctx.operands``, ``ctx.params``), calls of
the user-facing function on quantities whose mantissas are the case's
operands: ``call()`` returns the output quantity, which must carry
``expected_unit`` (the product of the operands' units) and, expressed in that
unit, equal ``expected`` (default: the bind on the case's mantissas,
``ctx.y()``).  Operands may be given in another unit of the right dimension
(a bias in uA where the output is in mA) with their mantissa scaled to match,
so a wrapper that forgets to convert is caught.

The built-ins' cases are registered here: ``element_wise``, ``matmul``,
``sparse_matmul``, ``conv`` and ``lora_matmul``.
"""

from __future__ import annotations

from typing import Callable

import saiunit as u

import etp
from etp_testing._src.errors import PREFIX

_CASES: dict = {}


def register_unit_case(primitive, fn: Callable) -> None:
  """Registers (or replaces) the unit case of ``primitive``.

  Args:
    primitive: an ETP primitive.
    fn: ``fn(ctx) -> list of (description, call, expected_unit)`` or
      ``(description, call, expected_unit, expected_mantissa)``; ``call()``
      runs the user-facing function on quantities made from ``ctx.operands``.

  Raises:
    TypeError: ``fn`` is not callable, or ``primitive`` is not an ETP
      primitive.
  """
  if not callable(fn):
    raise TypeError(f'{PREFIX}register_unit_case: fn must be callable '
                    f'(ctx -> list of cases), got {type(fn).__name__}.')
  if not etp.is_etp_primitive(primitive):
    raise TypeError(f'{PREFIX}register_unit_case: {primitive!r} is not an ETP '
                    'primitive (create it with etp.register_primitive).')
  _CASES[primitive] = fn


def unit_case_for(primitive):
  """The registered ``fn(ctx)`` of ``primitive``, or ``None``."""
  return _CASES.get(primitive)


def _scaled(mantissa, unit, factor: float):
  """The quantity ``mantissa`` (in the output unit) written in ``unit``,
  ``factor`` of which make one output unit (1e3 uA per mA), in the
  mantissa's dtype (NumPy makes a bfloat16 array times a float float32)."""
  return (mantissa * factor).astype(mantissa.dtype) * unit


def _bias(ctx, index, unit, factor):
  if not ctx.params.get('has_bias'):
    return None
  return _scaled(ctx.operands[index], unit, factor)


def _plain_bias(ctx, index):
  return ctx.operands[index] if ctx.params.get('has_bias') else None


# Every case is called with units on every operand (a bias in a smaller
# unit of the output's dimension), with a plain-array input and a
# nano-scaled weight (the unit of y is then the weight's alone), with a
# plain-array weight (y in the input's unit), and with plain arrays alone:
# a wrapper that rejects every quantity is then a failure (other calls of
# the case accepted), not a skip.
def _elemwise(ctx):
  (w,) = ctx.operands
  return [
      ('element_wise(w [mV])', lambda: etp.element_wise(w * u.mV), u.mV),
      ('element_wise(w [mV], fn=square)',
       lambda: etp.element_wise(w * u.mV, lambda q: q * q), u.mV ** 2,
       ctx.bind(w * w)),
      ('element_wise(w [1])', lambda: etp.element_wise(w), u.UNITLESS),
  ]


def _dense(ctx):
  x, w = ctx.operands[:2]
  return [
      ('matmul(x [mV], weight [S], bias [uA])',
       lambda: etp.matmul(x * u.mV, w * u.siemens,
                          _bias(ctx, 2, u.uA, 1e3)), u.mV * u.siemens),
      ('matmul(x [1], weight [nS], bias [pS])',
       lambda: etp.matmul(x, w * u.nS, _bias(ctx, 2, u.psiemens, 1e3)),
       u.nS),
      ('matmul(x [mV], weight [1], bias [uV])',
       lambda: etp.matmul(x * u.mV, w, _bias(ctx, 2, u.uvolt, 1e3)), u.mV),
      ('matmul(x [1], weight [1], bias [1])',
       lambda: etp.matmul(x, w, _plain_bias(ctx, 2)), u.UNITLESS),
  ]


def _sparse(ctx):
  x, data, indices = ctx.operands[:3]
  shape = ctx.params['shape']
  return [
      ('sparse_matmul(x [mV], data [S], indices, shape, bias [uA])',
       lambda: etp.sparse_matmul(x * u.mV, data * u.siemens, indices, shape,
                                 _bias(ctx, 3, u.uA, 1e3)),
       u.mV * u.siemens),
      ('sparse_matmul(x [1], data [nS], indices, shape, bias [pS])',
       lambda: etp.sparse_matmul(x, data * u.nS, indices, shape,
                                 _bias(ctx, 3, u.psiemens, 1e3)), u.nS),
      ('sparse_matmul(x [mV], data [1], indices, shape, bias [uV])',
       lambda: etp.sparse_matmul(x * u.mV, data, indices, shape,
                                 _bias(ctx, 3, u.uvolt, 1e3)), u.mV),
      ('sparse_matmul(x [1], data [1], indices, shape, bias [1])',
       lambda: etp.sparse_matmul(x, data, indices, shape,
                                 _plain_bias(ctx, 3)), u.UNITLESS),
  ]


def _conv(ctx):
  x, kernel = ctx.operands[:2]
  p = ctx.params
  layout = dict(strides=p['window_strides'], padding=p['padding'],
                rhs_dilation=p['rhs_dilation'],
                dimension_numbers=p['dimension_numbers'])
  return [
      ('conv(x [mV], kernel [S], bias [uA])',
       lambda: etp.conv(x * u.mV, kernel * u.siemens,
                        _bias(ctx, 2, u.uA, 1e3), **layout),
       u.mV * u.siemens),
      ('conv(x [1], kernel [nS], bias [pS])',
       lambda: etp.conv(x, kernel * u.nS, _bias(ctx, 2, u.psiemens, 1e3),
                        **layout), u.nS),
      ('conv(x [mV], kernel [1], bias [uV])',
       lambda: etp.conv(x * u.mV, kernel, _bias(ctx, 2, u.uvolt, 1e3),
                        **layout), u.mV),
      ('conv(x [1], kernel [1], bias [1])',
       lambda: etp.conv(x, kernel, _plain_bias(ctx, 2), **layout),
       u.UNITLESS),
  ]


def _lora(ctx):
  x, b, a = ctx.operands[:3]
  alpha = ctx.params['alpha']
  return [
      ('lora_matmul(x [mV], lora_b [S], lora_a [ms], bias [nC])',
       lambda: etp.lora_matmul(x * u.mV, b * u.siemens, a * u.ms,
                               _bias(ctx, 3, u.ncoulomb, 1e3), alpha=alpha),
       u.mV * u.siemens * u.ms),
      ('lora_matmul(x [1], lora_b [1], lora_a [nS], bias [pS])',
       lambda: etp.lora_matmul(x, b, a * u.nS, _bias(ctx, 3, u.psiemens, 1e3),
                               alpha=alpha), u.nS),
      ('lora_matmul(x [1], lora_b [1], lora_a [1], bias [1])',
       lambda: etp.lora_matmul(x, b, a, _plain_bias(ctx, 3), alpha=alpha),
       u.UNITLESS),
  ]


_BUILTINS = (
    ('etp_elemwise_p', _elemwise), ('etp_mv_p', _dense),
    ('etp_mm_p', _dense), ('etp_sp_mv_p', _sparse), ('etp_sp_mm_p', _sparse),
    ('etp_conv_p', _conv), ('etp_lora_mv_p', _lora),
    ('etp_lora_mm_p', _lora),
)
for _attr, _fn in _BUILTINS:
  # A family that is not importable (yet) simply has no unit case.
  if getattr(etp, _attr, None) is not None:
    register_unit_case(getattr(etp, _attr), _fn)
del _attr, _fn
