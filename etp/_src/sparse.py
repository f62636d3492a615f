r"""Sparse matmul with a fixed pattern: ``etp_sp_mv_p`` and ``etp_sp_mm_p``.

``etp_sp_mv_p`` takes one example ``x`` of shape ``(in,)``; ``etp_sp_mm_p`` a
batch ``(B, in)`` of independent examples.

The matrix :math:`M` of ``shape = (in, out)`` holds ``nnz`` stored values
``data[e]`` at ``indices[e] = (r_e, c_e)`` and zeros elsewhere; the pattern is
fixed and only the stored values are trained:

.. math::  y_j = \sum_{e:\, c_e = j} x_{r_e}\, \mathrm{data}_e + b_j .

The product is ``jax.experimental.sparse``'s own ``x @ BCOO((data, indices),
shape=shape)`` (``bcoo_dot_general``), so the primitive lowers to exactly what
that expression lowers to.

Operands: ``(x, data, indices[, bias])``; params: ``shape`` (a tuple of two
Python ints) and ``has_bias``.  The trainable keys are ``'weight'`` (the stored
values ``data``, operand 1) and ``'bias'`` (operand 3); ``indices`` (operand 2)
is an auxiliary operand: every rule receives it as the keyword ``indices``.

Every stored value is anchored at its column: ``data[e]`` reaches ``y[c_e]``
only (and ``b[j]`` reaches ``y[j]``), so the D-RTRL trace has the weight's
shape ``(nnz,)`` (with a leading batch axis for ``etp_sp_mm_p``) and

* ``xy_to_dw``:
  :math:`\partial\,\mathrm{data}_e = \sum x_{\dots, r_e}\, g_{\dots, c_e}`,
  :math:`\partial b = \sum g`, summed over all leading axes (the batch);
* ``yw_to_w``: :math:`T[\dots, e] \mapsto g[\dots, c_e]\, T[\dots, e]`,
  :math:`T_b[\dots, j] \mapsto g[\dots, j]\, T_b[\dots, j]`; leading axes
  (batch, extra axes) broadcast.

Patterns: any density, empty rows and columns, and ``nnz = 0`` (``y`` is then
the bias, or zeros) work.  :func:`sparse_matmul` rejects concrete ``indices``
with duplicate entries; traced ``indices`` cannot be checked, and duplicates
there are summed (``BCOO`` semantics), for which the rules above stay exact.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

from etp._src import rule_util
from etp._src import units
from etp._src import validation
from etp._src.primitive import register_primitive

__all__ = ['etp_sp_mv_p', 'etp_sp_mm_p', 'sparse_matmul']


def _impl(x, data, indices, *bias, shape: tuple, has_bias: bool):
  # Both in their common dtype first: BCOO's own transpose gives a
  # bfloat16 weight a float32 cotangent next to a float32 x, where a
  # cotangent must have its primal's dtype; through the cast, JAX's
  # transpose casts it back.  jnp.asarray: a NumPy x (a constant closed
  # over by a traced function) would make ``@`` NumPy's, which iterates the
  # BCOO matrix row by row.
  dtype = jnp.result_type(x, data)
  y = jnp.asarray(x, dtype) @ jsparse.BCOO((data.astype(dtype), indices),
                                           shape=shape)
  return y + bias[0] if has_bias else y


def _trainable(params) -> dict:
  return ({'weight': 1, 'bias': 3} if params.get('has_bias')
          else {'weight': 1})


def _aux(params) -> dict:
  del params
  return {'indices': 2}


def _xy_to_dw(x, g, weights, *, indices, shape: tuple, has_bias: bool):
  del shape
  w = weights['weight']
  rows, cols = indices[:, 0], indices[:, 1]
  out = {'weight': jnp.einsum('...k,...k->k', x[..., rows],
                              g[..., cols]).astype(w.dtype)}
  if has_bias:
    out['bias'] = rule_util.sum_leading(g, 1).astype(weights['bias'].dtype)
  return out


def _yw_to_w(g, trace, *, indices, shape: tuple, has_bias: bool):
  del shape
  out = {'weight': g[..., indices[:, 1]] * trace['weight']}
  if has_bias:
    out['bias'] = g * trace['bias']
  return out


def _make(name: str, batched: bool):
  prim = register_primitive(name, _impl, batched=batched,
                            trainable_invars_fn=_trainable, x_invar_index=0,
                            aux_invars_fn=_aux)
  prim.register_etp_rules(
      yw_to_w=_yw_to_w, xy_to_dw=_xy_to_dw,
      init_drtrl=lambda x, y, w, n: rule_util.weight_shaped_traces(
          x, y, w, n, batched),
      init_pp=rule_util.pp_trace)
  return prim


etp_sp_mv_p = _make('etp_sp_mv', batched=False)
etp_sp_mm_p = _make('etp_sp_mm', batched=True)
etp_sp_mv_p.set_batched_counterpart(etp_sp_mm_p)


def _check_shape(fn: str, shape) -> tuple:
  try:
    out = tuple(shape)
  except TypeError:
    out = None
  if (out is None or len(out) != 2 or
      not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
              and s > 0 for s in out)):
    validation.fail(fn, '`shape` must be a pair of positive Python ints '
                    f'(in, out), got {shape!r}.', TypeError)
  return tuple(int(s) for s in out)


def _check_pattern(fn: str, indices, shape: tuple) -> None:
  """Range and duplicate checks, only when ``indices`` holds data."""
  if not validation.is_concrete(indices):
    return
  idx = np.asarray(indices)
  if idx.shape[0] == 0:
    return
  bad = np.nonzero((idx < 0).any(axis=1) | (idx[:, 0] >= shape[0]) |
                   (idx[:, 1] >= shape[1]))[0]
  if bad.size:
    e = int(bad[0])
    validation.fail(
        fn, f'`indices` must hold (row, col) pairs with 0 <= row < '
        f'{shape[0]} and 0 <= col < {shape[1]} for `shape` {shape}, but entry '
        f'{e} is {tuple(int(i) for i in idx[e])} ({bad.size} out of range).')
  flat = idx[:, 0].astype(np.int64) * shape[1] + idx[:, 1]
  _, first, counts = np.unique(flat, return_index=True, return_counts=True)
  if (counts > 1).any():
    dup = int(np.sort(first[counts > 1])[0])
    validation.fail(
        fn, f'`indices` must not repeat a (row, col) pair, but '
        f'{tuple(int(i) for i in idx[dup])} (entry {dup}) appears '
        f'{int(counts[first == dup][0])} times; sum the duplicates into one '
        'stored value.')


def sparse_matmul(x, data, indices, shape, bias=None):
  """``x @ M (+ bias)`` for a sparse ``M`` with a fixed pattern.

  Binds ``etp_sp_mv_p`` (``x`` rank 1) or ``etp_sp_mm_p`` (``x`` rank 2); the
  product is ``x @ jax.experimental.sparse.BCOO((data, indices), shape=shape)``.

  Args:
    x: ``(in,)`` or ``(batch, in)``; array or ``saiunit`` quantity.
    data: ``(nnz,)``, the trainable stored values of ``M``.
    indices: ``(nnz, 2)`` integers, the ``(row, col)`` of each stored value;
      no pair may repeat.  ``nnz = 0`` is allowed.
    shape: ``(in, out)``, Python ints, the shape of ``M``.
    bias: optional ``(out,)``, in the unit of ``x * data``.

  Returns:
    ``(out,)`` or ``(batch, out)`` with unit ``unit(x) * unit(data)``.

  Raises:
    TypeError: ``indices`` is not an integer array, ``shape`` is not a pair
      of ints, or ``x``/``data`` are not floating point.
    ValueError: a shape does not match, or concrete ``indices`` are out of
      range for ``shape`` or repeat a pair.
  """
  fn = 'sparse_matmul'
  shape = _check_shape(fn, shape)
  n_in, n_out = shape
  x_m, x_u = units.split(x)
  d_m, d_u = units.split(data)
  i_m, i_u = units.split(indices)
  if not i_u.is_unitless:
    validation.fail(fn, f'`indices` must be a plain integer array, got a '
                    f'quantity with unit {i_u}.', TypeError)
  validation.check_ndim(fn, 'x', x_m, (1, 2), '(in,) or (batch, in)',
                        'For more leading axes, reshape x to (batch, in) or '
                        'use jax.vmap.')
  validation.check_dim(fn, 'x', x_m, -1, n_in,
                       '(in,) or (batch, in) with in=%d' % n_in,
                       f'shape {shape}')
  validation.check_ndim(fn, 'data', d_m, (1,), '(nnz,)')
  validation.check_ndim(fn, 'indices', i_m, (2,), '(nnz, 2)')
  validation.check_dim(fn, 'indices', i_m, 1, 2, '(nnz, 2)',
                       'the (row, col) of each stored value')
  nnz = np.shape(i_m)[0]
  validation.check_dim(fn, 'data', d_m, 0, nnz, f'({nnz},)',
                       f'indices of shape {tuple(np.shape(i_m))}')
  validation.check_floating(fn, 'x', x_m)
  validation.check_floating(fn, 'data', d_m)
  i_dtype = jnp.result_type(i_m)
  if not jnp.issubdtype(i_dtype, jnp.integer):
    validation.fail(fn, f'`indices` must be an integer array of shape '
                    f'(nnz, 2), got dtype {i_dtype}.', TypeError)
  _check_pattern(fn, i_m, shape)
  y_unit = x_u * d_u
  operands = [x_m, d_m, i_m]
  if bias is not None:
    operands.append(units.bias_mantissa(bias, y_unit, n_out, fn=fn,
                                        against=f'shape {shape}'))
  prim = etp_sp_mv_p if np.ndim(x_m) == 1 else etp_sp_mm_p
  y = prim.bind(*operands, shape=shape, has_bias=bias is not None)
  return units.combine(y, y_unit)
