r"""Dense matmul: ``etp_mv_p`` (one example) and ``etp_mm_p`` (a batch).

.. math::  y_j = \sum_i x_i W_{ij} + b_j

Every weight is anchored: ``W[i, j]`` and ``b[j]`` reach ``y[j]`` only, so the
D-RTRL trace has the weight's shape and

* ``xy_to_dw``: :math:`\partial W = x^\top g`, :math:`\partial b = \sum g`
  (summed over the batch for ``etp_mm_p``);
* ``yw_to_w``: :math:`T_W[\dots, i, j] \mapsto g[\dots, j]\, T_W[\dots, i, j]`,
  :math:`T_b[\dots, j] \mapsto g[\dots, j]\, T_b[\dots, j]`; leading axes
  (batch, extra axes) broadcast, and ``W`` may be any ``(in, out)``.
"""

from __future__ import annotations

import jax.numpy as jnp

from etp._src import rule_util
from etp._src import units
from etp._src import validation
from etp._src.primitive import register_primitive

__all__ = ['etp_mv_p', 'etp_mm_p', 'matmul']


def _impl(x, weight, *bias, has_bias: bool):
  y = jnp.matmul(x, weight)
  return y + bias[0] if has_bias else y


def _trainable(params) -> dict:
  return {'weight': 1, 'bias': 2} if params.get('has_bias') else {'weight': 1}


def _xy_to_dw(x, g, weights, *, has_bias: bool):
  w = weights['weight']
  out = {'weight': jnp.einsum('...i,...o->io', x, g).astype(w.dtype)}
  if has_bias:
    out['bias'] = rule_util.sum_leading(g, 1).astype(weights['bias'].dtype)
  return out


def _yw_to_w(g, trace, *, has_bias: bool):
  out = {'weight': g[..., None, :] * trace['weight']}
  if has_bias:
    out['bias'] = g * trace['bias']
  return out


def _make(name: str, batched: bool):
  prim = register_primitive(name, _impl, batched=batched,
                            trainable_invars_fn=_trainable, x_invar_index=0)
  prim.register_etp_rules(
      yw_to_w=_yw_to_w, xy_to_dw=_xy_to_dw,
      init_drtrl=lambda x, y, w, n: rule_util.weight_shaped_traces(
          x, y, w, n, batched),
      init_pp=rule_util.pp_trace)
  return prim


etp_mv_p = _make('etp_mv', batched=False)
etp_mm_p = _make('etp_mm', batched=True)
etp_mv_p.set_batched_counterpart(etp_mm_p)


def matmul(x, weight, bias=None):
  """``x @ weight (+ bias)`` through ``etp_mv_p`` (``x`` rank 1) or ``etp_mm_p``.

  Args:
    x: ``(in,)`` or ``(batch, in)``; array or ``saiunit`` quantity.
    weight: ``(in, out)``, any ``in`` and ``out``.
    bias: optional ``(out,)``, in the unit of ``x * weight``.

  Returns:
    ``(out,)`` or ``(batch, out)`` with unit ``unit(x) * unit(weight)``.
  """
  fn = 'matmul'
  x_m, x_u = units.split(x)
  w_m, w_u = units.split(weight)
  validation.check_ndim(fn, 'x', x_m, (1, 2), '(in,) or (batch, in)',
                        'For more leading axes, reshape x to (batch, in) or '
                        'use jax.vmap.')
  validation.check_ndim(fn, 'weight', w_m, (2,), '(in, out)')
  n_in, n_out = w_m.shape
  validation.check_dim(fn, 'x', x_m, -1, n_in,
                       '(in,) or (batch, in) with in=%d' % n_in,
                       f'weight of shape {tuple(w_m.shape)}')
  validation.check_floating(fn, 'x', x_m)
  validation.check_floating(fn, 'weight', w_m)
  y_unit = x_u * w_u
  operands = [x_m, w_m]
  if bias is not None:
    operands.append(units.bias_mantissa(
        bias, y_unit, n_out, fn=fn,
        against=f'weight of shape {tuple(w_m.shape)}'))
  prim = etp_mv_p if x_m.ndim == 1 else etp_mm_p
  y = prim.bind(*operands, has_bias=bias is not None)
  return units.combine(y, y_unit)
