r"""Low-rank matmul: ``etp_lora_mv_p`` (one example) and ``etp_lora_mm_p``.

.. math::  y_o = \alpha \sum_{i, r} x_i B_{ir} A_{ro} \; (+\, b_o),
           \qquad B: (in, rank), \; A: (rank, out).

``A`` and the bias are anchored: ``A[r, o]`` reaches ``y[o]`` only, with
:math:`\partial y_o / \partial A_{ro} = \alpha (xB)_r`.  ``B`` is not:
``B[i, r]`` reaches every output,
:math:`\partial y_o / \partial B_{ir} = \alpha x_i A_{ro}`.  A ``B``-shaped
trace therefore cannot be exact; D-RTRL needs one entry per (output, ``B``
element) pair.  Traces (``lead`` = ``(B,)`` for ``etp_lora_mm_p``, ``()`` for
``etp_lora_mv_p``; ``init_drtrl`` appends the state axis ``S``):

* ``lora_b``: ``(*lead, out, in, rank)``; ``lora_a``: ``(*lead, rank, out)``
  (weight-shaped); ``bias``: ``(*lead, out)`` (weight-shaped);
* ``instant_drtrl`` (per example, the batch axis stays):
  :math:`T_B[\dots, o, i, r] = \alpha\, g_o\, x_i\, A_{ro}`,
  :math:`T_A[\dots, r, o] = \alpha\, (xB)_r\, g_o`, :math:`T_b = g`;
* ``yw_to_w`` picks ``g`` at each entry's output:
  :math:`T_B[\dots, o, i, r] \mapsto g_o T_B[\dots, o, i, r]`,
  :math:`T_A[\dots, r, o] \mapsto g_o T_A[\dots, r, o]`,
  :math:`T_b \mapsto g\, T_b`; extra leading axes broadcast;
* ``solve_drtrl``:
  :math:`\partial B_{ir} = \sum_{\dots, o} c_o T_B[\dots, o, i, r]`, and the
  anchored keys are ``c`` times their trace summed over the leading axes;
* ``xy_to_dw``: :math:`\partial B = \alpha\, x^\top (g A^\top)`,
  :math:`\partial A = \alpha\, (xB)^\top g`, :math:`\partial b = \sum g`,
  summed over the batch.

So ``solve_drtrl(c, instant_drtrl(x, g, w)) == xy_to_dw(x, c * g, w)``.

Memory price: ``B``'s trace holds ``out`` times ``B``'s size per example and
per hidden state (rank 16 on 4096 x 4096: 268M entries per state, 1.1 GB in
float32), against ``A``'s ``rank * out``.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp

from etp._src import rule_util
from etp._src import units
from etp._src import validation
from etp._src.primitive import register_primitive

__all__ = ['etp_lora_mv_p', 'etp_lora_mm_p', 'lora_matmul']


def _impl(x, lora_b, lora_a, *bias, alpha: float, has_bias: bool):
  y = alpha * ((x @ lora_b) @ lora_a)
  return y + bias[0] if has_bias else y


def _trainable(params) -> dict:
  keys = {'lora_b': 1, 'lora_a': 2}
  if params.get('has_bias'):
    keys['bias'] = 3
  return keys


def _xy_to_dw(x, g, weights, *, alpha: float, has_bias: bool):
  b, a = weights['lora_b'], weights['lora_a']
  out = {
      'lora_b': (alpha * jnp.einsum('...i,...o,ro->ir', x, g, a)
                 ).astype(b.dtype),
      'lora_a': (alpha * jnp.einsum('...r,...o->ro', x @ b, g)
                 ).astype(a.dtype),
  }
  if has_bias:
    out['bias'] = rule_util.sum_leading(g, 1).astype(weights['bias'].dtype)
  return out


def _instant_drtrl(x, g, weights, *, alpha: float, has_bias: bool):
  b, a = weights['lora_b'], weights['lora_a']
  out = {
      'lora_b': alpha * jnp.einsum('...o,...i,ro->...oir', g, x, a),
      'lora_a': alpha * jnp.einsum('...r,...o->...ro', x @ b, g),
  }
  if has_bias:
    out['bias'] = g
  return out


def _yw_to_w(g, trace, *, alpha: float, has_bias: bool):
  del alpha
  out = {'lora_b': g[..., :, None, None] * trace['lora_b'],
         'lora_a': g[..., None, :] * trace['lora_a']}
  if has_bias:
    out['bias'] = g * trace['bias']
  return out


def _solve_drtrl(c, trace, *, alpha: float, has_bias: bool):
  del alpha
  out = {'lora_b': jnp.einsum('...o,...oir->ir', c, trace['lora_b']),
         'lora_a': rule_util.sum_leading(c[..., None, :] * trace['lora_a'], 2)}
  if has_bias:
    out['bias'] = rule_util.sum_leading(c * trace['bias'], 1)
  return out


def _make_init(batched: bool):
  def init_drtrl(x_var, y_var, weight_vars, n_state):
    dtype = rule_util.trace_dtype(x_var, y_var, weight_vars)
    lead = rule_util.batch_lead(y_var, batched)
    n_out = rule_util.aval(y_var).shape[-1]
    shape_of = lambda k: tuple(rule_util.aval(weight_vars[k]).shape)
    # B reaches every output: one trace entry per (output, B element).
    shapes = {'lora_b': (n_out,) + shape_of('lora_b'),
              'lora_a': shape_of('lora_a')}
    if 'bias' in weight_vars:
      shapes['bias'] = (n_out,)
    return {k: jnp.zeros(lead + shape + (n_state,), dtype)
            for k, shape in shapes.items()}
  return init_drtrl


def _make(name: str, batched: bool):
  prim = register_primitive(name, _impl, batched=batched,
                            trainable_invars_fn=_trainable, x_invar_index=0)
  prim.register_etp_rules(
      yw_to_w=_yw_to_w, xy_to_dw=_xy_to_dw, init_drtrl=_make_init(batched),
      init_pp=rule_util.pp_trace, instant_drtrl=_instant_drtrl,
      solve_drtrl=_solve_drtrl)
  return prim


etp_lora_mv_p = _make('etp_lora_mv', batched=False)
etp_lora_mm_p = _make('etp_lora_mm', batched=True)
etp_lora_mv_p.set_batched_counterpart(etp_lora_mm_p)


def lora_matmul(x, lora_b, lora_a, bias=None, *, alpha=1.0):
  """``alpha * x @ lora_b @ lora_a (+ bias)``.

  Args:
    x: ``(in,)`` or ``(batch, in)``; array or ``saiunit`` quantity.
    lora_b: ``(in, rank)``.
    lora_a: ``(rank, out)``.
    bias: optional ``(out,)`` in the unit of ``x * lora_b * lora_a``.
    alpha: a Python number (a static scale).

  Returns:
    ``(out,)`` or ``(batch, out)`` with unit
    ``unit(x) * unit(lora_b) * unit(lora_a)``.

  Raises:
    ValueError: a wrong rank or a mismatched ``in``/``rank``/``out``.
    TypeError: ``alpha`` is not a Python number, or an operand is not floating.
    saiunit.UnitMismatchError: ``bias`` is not in the unit of the output.
  """
  fn = 'lora_matmul'
  if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool):
    validation.fail(fn, f'`alpha` must be a Python number (a static scale), '
                    f'got {type(alpha).__name__}.', TypeError)
  x_m, x_u = units.split(x)
  b_m, b_u = units.split(lora_b)
  a_m, a_u = units.split(lora_a)
  validation.check_ndim(fn, 'x', x_m, (1, 2), '(in,) or (batch, in)',
                        'For more leading axes, reshape x to (batch, in) or '
                        'use jax.vmap.')
  validation.check_ndim(fn, 'lora_b', b_m, (2,), '(in, rank)')
  validation.check_ndim(fn, 'lora_a', a_m, (2,), '(rank, out)')
  n_in, rank = b_m.shape
  n_out = a_m.shape[1]
  validation.check_dim(fn, 'x', x_m, -1, n_in, f'({n_in},) or (batch, {n_in})',
                       f'lora_b of shape {tuple(b_m.shape)}')
  validation.check_dim(fn, 'lora_a', a_m, 0, rank, f'({rank}, out)',
                       f'lora_b of shape {tuple(b_m.shape)}')
  for arg, m in (('x', x_m), ('lora_b', b_m), ('lora_a', a_m)):
    validation.check_floating(fn, arg, m)
  y_unit = x_u * b_u * a_u
  operands = [x_m, b_m, a_m]
  if bias is not None:
    operands.append(units.bias_mantissa(
        bias, y_unit, n_out, fn=fn,
        against=f'lora_a of shape {tuple(a_m.shape)}'))
  prim = etp_lora_mv_p if x_m.ndim == 1 else etp_lora_mm_p
  y = prim.bind(*operands, alpha=float(alpha), has_bias=bias is not None)
  return units.combine(y, y_unit)
