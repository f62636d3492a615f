r"""Convolution: ``etp_conv_p`` (batched; 1-D, 2-D and 3-D).

``y = conv_general_dilated(x, K) (+ b)`` with ``jax.lax`` conventions and
layouts (the batch axis ``N`` leads ``x`` and ``y``).  Write ``F`` for the
output feature axis of ``y`` and ``κ`` for a kernel index without its
output-feature axis ``O`` (input channel and window position, in the kernel's
layout order).  With :math:`P[n, p, κ]` the input patch value that kernel
entry ``κ`` multiplies at output position ``p``,

.. math::  y[n, p, o] = \sum_κ P[n, p, κ]\, K[κ, o] + b_o,
           \qquad \frac{\partial y[n, p, o]}{\partial K[κ, o']} = δ_{oo'} P[n, p, κ].

The kernel and the bias are shared across positions: ``K[κ, o]`` reaches
``y[n, p, o]`` at *every* ``p``, so neither is anchored and a kernel-shaped
trace cannot be exact.  The traces keep the output positions (one entry per
(weight element, hidden position) pair, as D-RTRL needs):

* ``init_drtrl``: kernel trace ``(*y_shape, *κ_shape, S)`` with
  ``T[n, p, o, κ] = ∂h[n, p, o]/∂K[κ, o]`` (``y``'s own layout first, then
  the kernel's axes without ``O``); bias trace ``(*y_shape, S)``;
* ``instant_drtrl``: :math:`T[n, p, o, κ] = g[n, p, o]\, P[n, p, κ]`,
  :math:`T_b = g` (per example: the batch axis stays);
* ``yw_to_w``: :math:`T[\dots, κ] \mapsto g[\dots]\, T[\dots, κ]` and
  :math:`T_b \mapsto g\, T_b` (each trace entry has exactly one output
  position); extra leading axes broadcast;
* ``solve_drtrl``: :math:`\partial K[κ, o] = \sum_{\dots, n, p}
  c[\dots, n, p, o]\, T[\dots, n, p, o, κ]` (the feature axis goes back to
  ``O``'s place), :math:`\partial b_o = \sum_{\dots, n, p}
  c[\dots, n, p, o]\, T_b[\dots, n, p, o]`;
* ``xy_to_dw``: JAX's VJP of the same convolution in the kernel, and
  :math:`\partial b_o = \sum_{n, p} g[n, p, o]`, summed over the batch.

So ``solve_drtrl(c, instant_drtrl(x, g, w)) == xy_to_dw(x, c * g, w)``.
``P`` is computed by the same convolution applied to ``x`` with an identity
kernel (``I * prod(window)`` output channels), so strides, padding, dilation
and layouts cannot drift from ``impl``.

Memory price: the kernel trace holds ``prod(y_shape) * K.size / C_out``
entries per hidden state, i.e. ``B * prod(spatial_out) * S`` times the
kernel's size for ``S`` states (64 -> 64 channels, 3 x 3 window, 32 x 32
output, batch 8: 302M entries per state, 1.2 GB in float32).
"""

from __future__ import annotations

import numbers
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from etp._src import rule_util
from etp._src import units
from etp._src import validation
from etp._src.primitive import register_primitive

__all__ = ['etp_conv_p', 'conv']


def _dimension_numbers(rank: int, dimension_numbers):
  ones = (1,) * rank
  return lax.conv_dimension_numbers(ones, ones, dimension_numbers)


def _impl(x, kernel, *bias, window_strides, padding, rhs_dilation,
          dimension_numbers, has_bias: bool):
  # lax.conv takes one dtype; mixed precision (bfloat16 activations, float32
  # kernels) computes in the common one, as ``@`` does for dense layers.
  dtype = jnp.result_type(x, kernel)
  x, kernel = jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)
  y = lax.conv_general_dilated(x, kernel, window_strides, padding,
                               rhs_dilation=rhs_dilation,
                               dimension_numbers=dimension_numbers)
  if not has_bias:
    return y
  feature = _dimension_numbers(x.ndim, dimension_numbers).out_spec[1]
  shape = [1] * y.ndim
  shape[feature] = -1
  return y + bias[0].reshape(shape)


def _trainable(params) -> dict:
  return {'weight': 1, 'bias': 2} if params.get('has_bias') else {'weight': 1}


def _patches(x, kernel, *, window_strides, padding, rhs_dilation,
             dimension_numbers):
  """Patches ``P`` with ``F`` moved last and split: ``(*y_without_F, *κ)``."""
  dn = _dimension_numbers(x.ndim, dimension_numbers)
  o_axis = dn.rhs_spec[0]
  kappa_shape = tuple(np.delete(np.array(kernel.shape), o_axis))
  n_kappa = int(np.prod(kappa_shape))
  identity = jnp.eye(n_kappa, dtype=x.dtype).reshape((n_kappa,) + kappa_shape)
  identity = jnp.moveaxis(identity, 0, o_axis)
  # HIGHEST: the patches are a copy of x; TF32 on GPUs must not round them.
  p = lax.conv_general_dilated(x, identity, window_strides, padding,
                               rhs_dilation=rhs_dilation,
                               dimension_numbers=dimension_numbers,
                               precision=lax.Precision.HIGHEST)
  p = jnp.moveaxis(p, dn.out_spec[1], -1)
  return p.reshape(p.shape[:-1] + kappa_shape), dn


def _xy_to_dw(x, g, weights, *, window_strides, padding, rhs_dilation,
              dimension_numbers, has_bias: bool):
  kernel = weights['weight']
  # JAX's own VJP of the same convolution (its transposes), in the common
  # dtype so a float64 g is not rounded through a float32 x.
  dtype = jnp.result_type(x, g, kernel)
  conv_of = lambda k: lax.conv_general_dilated(
      x.astype(dtype), k, window_strides, padding, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers)
  _, vjp = jax.vjp(conv_of, kernel.astype(dtype))
  out = {'weight': vjp(g.astype(dtype))[0].astype(kernel.dtype)}
  if has_bias:
    feature = _dimension_numbers(x.ndim, dimension_numbers).out_spec[1]
    summed = tuple(a for a in range(g.ndim) if a != feature)
    out['bias'] = g.sum(axis=summed).astype(weights['bias'].dtype)
  return out


def _instant_drtrl(x, g, weights, *, window_strides, padding, rhs_dilation,
                   dimension_numbers, has_bias: bool):
  kernel = weights['weight']
  p, dn = _patches(x, kernel, window_strides=window_strides, padding=padding,
                   rhs_dilation=rhs_dilation,
                   dimension_numbers=dimension_numbers)
  n_kappa = kernel.ndim - 1
  # Re-insert F (size 1) so P broadcasts against g over the output feature.
  p = jnp.expand_dims(p, dn.out_spec[1])
  out = {'weight': g.reshape(g.shape + (1,) * n_kappa) * p}
  if has_bias:
    out['bias'] = g
  return out


def _yw_to_w(g, trace, *, window_strides, has_bias: bool, **unused):
  del unused
  n_kappa = len(window_strides) + 1
  out = {'weight': g.reshape(g.shape + (1,) * n_kappa) * trace['weight']}
  if has_bias:
    out['bias'] = g * trace['bias']
  return out


def _solve_drtrl(c, trace, *, window_strides, dimension_numbers,
                 has_bias: bool, **unused):
  del unused
  rank = len(window_strides) + 2
  dn = _dimension_numbers(rank, dimension_numbers)
  feature = c.ndim - rank + dn.out_spec[1]   # F, counting extra leading axes
  summed = tuple(a for a in range(c.ndim) if a != feature)
  n_kappa = rank - 1
  prod = c.reshape(c.shape + (1,) * n_kappa) * trace['weight']
  dk = jnp.moveaxis(prod, feature, 0).sum(axis=tuple(range(1, c.ndim)))
  out = {'weight': jnp.moveaxis(dk, 0, dn.rhs_spec[0])}
  if has_bias:
    out['bias'] = (c * trace['bias']).sum(axis=summed)
  return out


def _init_drtrl(x_var, y_var, weight_vars, n_state, *, window_strides,
               dimension_numbers, **unused):
  del unused
  dtype = rule_util.trace_dtype(x_var, y_var, weight_vars)
  y_shape = tuple(rule_util.aval(y_var).shape)
  kernel_shape = tuple(rule_util.aval(weight_vars['weight']).shape)
  dn = _dimension_numbers(len(kernel_shape), dimension_numbers)
  kappa = tuple(np.delete(np.array(kernel_shape), dn.rhs_spec[0]))
  out = {'weight': jnp.zeros(y_shape + kappa + (n_state,), dtype)}
  if 'bias' in weight_vars:
    out['bias'] = jnp.zeros(y_shape + (n_state,), dtype)
  return out


etp_conv_p = register_primitive('etp_conv', _impl, batched=True,
                                trainable_invars_fn=_trainable, x_invar_index=0)
etp_conv_p.register_etp_rules(
    yw_to_w=_yw_to_w, xy_to_dw=_xy_to_dw, init_drtrl=_init_drtrl,
    init_pp=rule_util.pp_trace, instant_drtrl=_instant_drtrl,
    solve_drtrl=_solve_drtrl)


def _as_tuple(fn, arg, value, n):
  """An int or ``n`` positive ints -> a hashable tuple of ``n`` ints."""
  expected = f'`{arg}` must be a positive int or {n} positive ints (one per ' \
             f'spatial dimension), got {value!r}.'
  try:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
      value = (operator.index(value),) * n
    else:
      value = tuple(operator.index(v) for v in value)
  except TypeError:
    validation.fail(fn, expected, TypeError)
  if len(value) != n or any(v < 1 for v in value):
    validation.fail(fn, expected)
  return value


def _normalise_padding(fn, padding, n):
  """A padding string or ``n`` (low, high) pairs -> a hashable value."""
  expected = (f"`padding` must be 'SAME', 'VALID', 'SAME_LOWER' or {n} "
              f'(low, high) int pairs (one per spatial dimension), got '
              f'{padding!r}.')
  if isinstance(padding, str):
    if padding.upper() not in ('SAME', 'VALID', 'SAME_LOWER'):
      validation.fail(fn, expected)
    return padding.upper()
  try:
    pairs = tuple((operator.index(lo), operator.index(hi))
                  for lo, hi in padding)
  except (TypeError, ValueError):
    validation.fail(fn, expected, TypeError)
  if len(pairs) != n:
    validation.fail(fn, expected)
  return pairs


def conv(x, kernel, bias=None, *, strides=1, padding='SAME', rhs_dilation=1,
         dimension_numbers=None):
  """A batched 1-D/2-D/3-D convolution (``lax.conv_general_dilated``) + bias.

  Args:
    x: ``(batch, C_in, *spatial)`` by default, or per ``dimension_numbers``.
    kernel: ``(C_out, C_in, *window)`` by default, or per ``dimension_numbers``.
    bias: optional ``(C_out,)``, added on the output feature axis, in the unit
      of ``x * kernel``.
    strides, rhs_dilation: an int or one int per spatial dimension.
    padding: ``'SAME'``, ``'VALID'``, ``'SAME_LOWER'`` or ``(low, high)`` pairs.
    dimension_numbers: ``None`` or ``(lhs, rhs, out)`` layout strings such as
      ``('NHWC', 'HWIO', 'NHWC')``; the batch axis must lead ``lhs`` and
      ``out``.

  Returns:
    The convolution with unit ``unit(x) * unit(kernel)``, in the promoted
    dtype of ``x`` and ``kernel``.

  Raises:
    ValueError: a wrong rank, a channel mismatch (one feature group only), a
      bias that is not ``(C_out,)``, a layout without a leading batch axis, or
      strides/padding/dilation that do not fit the spatial rank.
    TypeError: a non-floating operand or a malformed parameter.
    saiunit.UnitMismatchError: ``bias`` is not in the unit of the output.
  """
  fn = 'conv'
  x_m, x_u = units.split(x)
  k_m, k_u = units.split(kernel)
  validation.check_ndim(fn, 'x', x_m, (3, 4, 5),
                        '(batch, C_in, *spatial) with 1 to 3 spatial dims')
  validation.check_ndim(fn, 'kernel', k_m, (x_m.ndim,),
                        f'rank {x_m.ndim} like x (C_out, C_in, *window)')
  validation.check_floating(fn, 'x', x_m)
  validation.check_floating(fn, 'kernel', k_m)
  if dimension_numbers is not None:
    if not (isinstance(dimension_numbers, (tuple, list)) and
            len(dimension_numbers) == 3 and
            all(isinstance(s, str) for s in dimension_numbers)):
      validation.fail(fn, '`dimension_numbers` must be None or three layout '
                      f"strings like ('NHWC', 'HWIO', 'NHWC'), got "
                      f'{dimension_numbers!r}.', TypeError)
    dimension_numbers = tuple(dimension_numbers)
  try:
    dn = lax.conv_dimension_numbers(x_m.shape, k_m.shape, dimension_numbers)
  except Exception as e:  # pylint: disable=broad-except
    validation.fail(fn, f'`dimension_numbers` {dimension_numbers!r} do not fit '
                    f'x of rank {x_m.ndim}: {e}')
  if dn.lhs_spec[0] != 0 or dn.out_spec[0] != 0:
    validation.fail(fn, 'the batch axis must come first in the input and '
                    f'output layouts, got {dimension_numbers!r}.')
  n_spatial = x_m.ndim - 2
  c_in = x_m.shape[dn.lhs_spec[1]]
  if k_m.shape[dn.rhs_spec[1]] != c_in:
    validation.fail(fn, f'`kernel` has {k_m.shape[dn.rhs_spec[1]]} input '
                    f'channels (axis {dn.rhs_spec[1]} of shape '
                    f'{tuple(k_m.shape)}) but x has {c_in} (axis '
                    f'{dn.lhs_spec[1]} of shape {tuple(x_m.shape)}); '
                    'feature groups are not supported.')
  c_out = k_m.shape[dn.rhs_spec[0]]
  # lax.conv_general_dilated wants one dtype; promote like jnp.matmul does.
  dtype = jnp.result_type(x_m, k_m)
  x_m = x_m if x_m.dtype == dtype else x_m.astype(dtype)
  k_m = k_m if k_m.dtype == dtype else k_m.astype(dtype)
  params = dict(
      window_strides=_as_tuple(fn, 'strides', strides, n_spatial),
      padding=_normalise_padding(fn, padding, n_spatial),
      rhs_dilation=_as_tuple(fn, 'rhs_dilation', rhs_dilation, n_spatial),
      dimension_numbers=dimension_numbers)
  y_unit = x_u * k_u
  operands = [x_m, k_m]
  if bias is not None:
    operands.append(units.bias_mantissa(
        bias, y_unit, c_out, fn=fn,
        against=f'kernel of shape {tuple(k_m.shape)}'))
  y = etp_conv_p.bind(*operands, **params, has_bias=bias is not None)
  return units.combine(y, y_unit)
