"""Unit cases: how to call a primitive's unit-aware user-facing function.

``register_unit_case(primitive, case)`` where ``case(operands, params)``
returns ``(description, call, expected_unit)``: ``call()`` runs the
user-facing function on ``saiunit`` quantities built from the operands, and
its result must carry ``expected_unit`` with the bind's value as mantissa.
The built-ins' cases are registered here.
"""

from __future__ import annotations

import saiunit as u

import etp

_CASES: dict = {}


def register_unit_case(primitive, case) -> None:
  """Registers (or replaces) the unit case of ``primitive``."""
  _CASES[primitive] = case


def unit_case_for(primitive):
  return _CASES.get(primitive)


def _bias(ops, params, index, unit):
  return ops[index] * unit if params.get('has_bias') else None


def _elemwise(ops, params):
  return ('element_wise(w [mV])', lambda: etp.element_wise(ops[0] * u.mV),
          u.mV)


def _dense(ops, params):
  return ('matmul(x [mV], w [S], b [mA])',
          lambda: etp.matmul(ops[0] * u.mV, ops[1] * u.siemens,
                             _bias(ops, params, 2, u.mA)), u.mA)


def _sparse(ops, params):
  return ('sparse_matmul(x [mV], data [S], indices, shape, b [mA])',
          lambda: etp.sparse_matmul(ops[0] * u.mV, ops[1] * u.siemens, ops[2],
                                    params['shape'],
                                    _bias(ops, params, 3, u.mA)), u.mA)


def _conv(ops, params):
  return ('conv(x [mV], kernel [S], b [mA])',
          lambda: etp.conv(ops[0] * u.mV, ops[1] * u.siemens,
                           _bias(ops, params, 2, u.mA),
                           strides=params['window_strides'],
                           padding=params['padding'],
                           rhs_dilation=params['rhs_dilation'],
                           dimension_numbers=params['dimension_numbers']),
          u.mA)


def _lora(ops, params):
  return ('lora_matmul(x [mV], lora_b [S], lora_a [ms], b [mA*ms])',
          lambda: etp.lora_matmul(ops[0] * u.mV, ops[1] * u.siemens,
                                  ops[2] * u.ms,
                                  _bias(ops, params, 3, u.mA * u.ms),
                                  alpha=params['alpha']),
          u.mV * u.siemens * u.ms)


for _p, _c in ((etp.etp_elemwise_p, _elemwise), (etp.etp_mv_p, _dense),
               (etp.etp_mm_p, _dense), (etp.etp_sp_mv_p, _sparse),
               (etp.etp_sp_mm_p, _sparse), (etp.etp_conv_p, _conv),
               (etp.etp_lora_mv_p, _lora), (etp.etp_lora_mm_p, _lora)):
  register_unit_case(_p, _c)
