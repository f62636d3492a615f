r"""Checks of ``xy_to_dw``: the weight gradient for a given output cotangent.

The rule must equal the vector-Jacobian product

.. math::  \mathrm{xy\_to\_dw}(x, g, w)_k = \mathrm{VJP}_{w_k}[P(x, \cdot)](g),

summed over the batch for batched primitives.  Three oracles, from the one that
shares the most machinery with JAX to the one that shares none:

* ``xy_to_dw.vjp``: ``jax.vjp`` of the primitive (whose JVP comes from ``impl``);
* ``xy_to_dw.jacrev``: the full Jacobian from ``jax.jacrev`` contracted with
  ``g``; in fast mode, or above ``JACREV_LIMIT`` entries, random projections
  ``<xy_to_dw, v> == <g, J v>`` with ``J v`` from ``jax.jvp`` instead;
* ``xy_to_dw.fd``: central finite differences of ``impl`` in float64 along
  random directions ``v`` per weight key:
  :math:`\langle \mathrm{xy\_to\_dw}_k, v \rangle \approx
  \langle g, (P(w_k + \epsilon v) - P(w_k - \epsilon v)) / 2\epsilon \rangle`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from etp._src.arrays import to_jax
from etp_testing._src import directions, executor, tolerances
from etp_testing._src.checks.registry import check
from etp_testing._src.context import (compiled, to_float64, x64_enabled,
                                      x64_scope)

# Largest Jacobian (output elements x weight elements) xy_to_dw.jacrev builds.
JACREV_LIMIT = 2_000_000
# Random directions per weight key for xy_to_dw.fd.
FD_DIRECTIONS = 3
# Random projections per weight key for xy_to_dw.jacrev in fast mode.
JVP_PROJECTIONS = 3


def _cotangent(ctx, tag='xy_to_dw.g'):
  y = ctx.y_aval()
  return ctx.normal(tag, y.shape, y.dtype)


def _rule_grads(ctx, x, g, weights):
  grads = ctx.call_rule('xy_to_dw', x, g, weights)
  ctx.check_keys('xy_to_dw', grads, weights.keys())
  return grads


def _weights_of(primitive, params, operands) -> dict:
  return {k: operands[i] for k, i in primitive.trainable_invars(params).items()}


def _y_of_weights(primitive, params, operands):
  return lambda w: executor.bind_y(
      primitive, executor.with_weights(primitive, operands, params, w), params)


@compiled
def vjp_oracle(primitive, params):
  """``(operands, g) -> {key: VJP_{w_k}(g)}`` through ``jax.vjp``."""
  def vjp(operands, g):
    y_of = _y_of_weights(primitive, params, operands)
    return jax.vjp(y_of, _weights_of(primitive, params, operands))[1](g)[0]
  return vjp


@compiled
def _jacrev_oracle(primitive, params):
  """``(operands, g) -> {key: g . J_k}`` with ``J_k`` from ``jax.jacrev``."""
  def contracted(operands, g):
    y_of = _y_of_weights(primitive, params, operands)
    jac = jax.jacrev(y_of)(_weights_of(primitive, params, operands))
    return {k: jnp.tensordot(g, j, axes=g.ndim) for k, j in jac.items()}
  return contracted


@compiled
def _projected(primitive, params, keys, n):
  """``(operands, grads, g, seeds) -> {key: (<grads[key], v>, <g, J_key v>)}``
  for ``n`` random directions ``v`` of each weight in ``keys``, drawn on the
  device from ``seeds[key]`` (``directions``), with ``J_key v`` from
  ``jax.jvp`` (the other weights' tangents zero).  One program for every key:
  one dispatch, and XLA shares the primal between the JVPs.

  Directions are drawn on the device, one at a time, because each is as big
  as the weight; the dot products accumulate in float64 (x64 for that part of
  the trace only), so only the operands' own rounding remains, not that of a
  long float32 reduction."""
  def dot64(a, b):   # products then sum: the casts fuse, no float64 copies
    with x64_scope():
      return jnp.sum(a.astype(jnp.float64) * b.astype(jnp.float64))

  def projected(operands, grads, g, seeds):
    y_of = _y_of_weights(primitive, params, operands)
    weights = _weights_of(primitive, params, operands)
    out = {}
    for key in keys:
      w = weights[key]
      if n * w.size >= 2**32:   # the directions' counters must not wrap
        raise ValueError(f'{n} directions of {w.size} elements exceed the '
                         '32-bit counter of directions.uniform')
      rule_dd, jvp_dd = [], []
      for d in range(n):   # unrolled: XLA's CPU loops run bodies slower
        v = directions.uniform(seeds[key], w.shape, w.dtype,
                               offset=d * w.size)
        tangents = {j: (v if j == key else jnp.zeros_like(u))
                    for j, u in weights.items()}
        y_dot = jax.jvp(y_of, (weights,), (tangents,))[1]
        rule_dd.append(dot64(grads[key], v))
        jvp_dd.append(dot64(g, y_dot))
      with x64_scope():
        out[key] = (jnp.stack(rule_dd), jnp.stack(jvp_dd))
    return out
  return projected


@compiled
def impl_y(primitive, params):
  """``operands -> y`` through ``impl`` alone (no JAX rule of the primitive)."""
  def y(operands):
    out = primitive.impl_fn(*operands, **params)
    return out[primitive.y_outvar_index] if primitive.multiple_results else out
  return y


def require_weights(ctx):
  if not ctx.weights:
    ctx.skip(f'{ctx.name} has no trainable operands')


@check('xy_to_dw.vjp')
def check_vjp(ctx):
  """``xy_to_dw`` equals ``jax.vjp`` of the primitive w.r.t. each weight, with
  each leaf of its weight's shape and dtype."""
  require_weights(ctx)
  g = _cotangent(ctx)
  expected = vjp_oracle(ctx)(list(ctx.operands), g)
  actual = _rule_grads(ctx, ctx.x, g, ctx.weights)
  for k, w in ctx.weights.items():
    ctx.compare(actual[k], expected[k], rule='xy_to_dw', key=k,
                what=f'xy_to_dw vs jax.vjp (weight {w.dtype}{list(w.shape)})',
                check_dtype=True)


@check('xy_to_dw.jacrev')
def check_jacrev(ctx):
  """``xy_to_dw`` equals the full Jacobian ``jax.jacrev`` contracted with ``g``.

  In fast mode (chosen automatically above ``FAST_MODE_THRESHOLD`` Jacobian
  entries) the Jacobian is never built: ``JVP_PROJECTIONS`` random directions
  ``v`` per key compare ``<xy_to_dw_k, v>`` with ``<g, J_k v>`` from
  ``jax.jvp`` (the dot-product test).  A rule that is off by ``d != 0`` passes
  one projection only if ``|<d, v>|`` falls under the tolerance ``tol``; for
  the unit-variance uniform directions of ``directions`` that has probability
  at most ``0.82 tol / |d|``, so ``n`` projections let it through with
  probability at most ``(0.82 tol / |d|)^n``.
  """
  require_weights(ctx)
  g = _cotangent(ctx)
  actual = _rule_grads(ctx, ctx.x, g, ctx.weights)
  y_size = int(np.prod(g.shape))
  if ctx.fast or any(y_size * w.size > JACREV_LIMIT
                     for w in ctx.weights.values()):
    keys = []
    for k, w in ctx.weights.items():
      if tuple(np.shape(actual[k])) == tuple(w.shape):
        keys.append(k)
        continue
      ctx.fail('xy_to_dw', key=k, message=(
          f'xy_to_dw returned shape {tuple(np.shape(actual[k]))} for weight '
          f'{k} of shape {tuple(w.shape)}'),
               actual_shape=tuple(np.shape(actual[k])),
               expected_shape=tuple(w.shape))
    dots = _projected(ctx, tuple(keys), JVP_PROJECTIONS)(
        list(ctx.operands), {k: actual[k] for k in keys}, g,
        {k: ctx.seed32(f'xy_to_dw.jacrev.v.{k}') for k in keys})
    for k in keys:
      ctx.compare(*dots[k], rule='xy_to_dw', key=k,
                  dtype=ctx.weights[k].dtype, what=(
                      'fast mode: <xy_to_dw, v> vs <g, J v> from jax.jvp '
                      f'along {JVP_PROJECTIONS} random directions'))
    return
  expected = _jacrev_oracle(ctx)(list(ctx.operands), g)
  for k in ctx.weights:
    ctx.compare(actual[k], expected[k], rule='xy_to_dw', key=k,
                what='xy_to_dw vs jax.jacrev contracted with g')


@check('xy_to_dw.fd')
def check_fd(ctx):
  """``xy_to_dw`` agrees with central finite differences of ``impl`` in float64
  along random directions, one weight key at a time (no JAX autodiff)."""
  require_weights(ctx)
  with x64_enabled(True):
    ops = to_float64(ctx.operands)
    x, weights, _ = ctx.primitive.split_operands(ops, ctx.params)
    g = np.asarray(_cotangent(ctx), np.float64)
    grads = _rule_grads(ctx, x, to_jax(g), weights)
    index_of = ctx.primitive.trainable_invars(ctx.params)
    impl = impl_y(ctx)
    eps = tolerances.FD_EPS
    for k, w in weights.items():
      grad_k = np.asarray(grads[k], np.float64)
      if grad_k.shape != w.shape:
        ctx.fail('xy_to_dw', key=k, message=(
            f'xy_to_dw returned shape {grad_k.shape} for weight {k} of shape '
            f'{tuple(w.shape)}'), actual_shape=grad_k.shape,
                 expected_shape=tuple(w.shape))
        continue
      rule_dd, fd_dd = [], []
      for d in range(FD_DIRECTIONS):
        v = np.asarray(ctx.normal(f'xy_to_dw.fd.v{d}.{k}', w.shape,
                                  jnp.float32), np.float64)
        v = v / np.sqrt(np.mean(v * v) + 1e-300)
        plus, minus = list(ops), list(ops)
        # On the host: eager JAX arithmetic would compile per shape.
        plus[index_of[k]] = np.asarray(w) + eps * v
        minus[index_of[k]] = np.asarray(w) - eps * v
        y_dot = (np.asarray(impl(plus)) - np.asarray(impl(minus))) / (2 * eps)
        rule_dd.append(np.vdot(grad_k, v))
        fd_dd.append(np.vdot(g, y_dot))
      ctx.compare(np.array(rule_dd), np.array(fd_dd), rule='xy_to_dw', key=k,
                  kind='fd', what=f'<xy_to_dw, v> vs finite differences of '
                  f'impl along {FD_DIRECTIONS} random directions (float64)')
