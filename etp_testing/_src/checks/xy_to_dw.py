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

from etp_testing._src import tolerances
from etp_testing._src.checks.registry import check
from etp_testing._src.context import to_float64, x64_enabled

# Largest Jacobian (output elements x weight elements) xy_to_dw.jacrev builds.
JACREV_LIMIT = 2_000_000
# Random directions per weight key for xy_to_dw.fd.
FD_DIRECTIONS = 3
# Random projections per weight key for xy_to_dw.jacrev in fast mode.
JVP_PROJECTIONS = 3


def _cotangent(ctx, tag='xy_to_dw.g'):
  y = ctx.y()
  return ctx.normal(tag, y.shape, y.dtype)


def _rule_grads(ctx, x, g, weights):
  grads = ctx.call_rule('xy_to_dw', x, g, weights)
  ctx.check_keys('xy_to_dw', grads, weights.keys())
  return grads


def _y_of_weights(ctx, operands=None):
  ops = operands if operands is not None else ctx.operands

  def f(weights):
    new = list(ops)
    for k, i in ctx.primitive.trainable_invars(ctx.params).items():
      new[i] = weights[k]
    return ctx.bind(*new)
  return f


def require_weights(ctx):
  if not ctx.weights:
    ctx.skip(f'{ctx.name} has no trainable operands')


@check('xy_to_dw.vjp')
def check_vjp(ctx):
  """``xy_to_dw`` equals ``jax.vjp`` of the primitive w.r.t. each weight, with
  each leaf of its weight's shape and dtype."""
  require_weights(ctx)
  g = _cotangent(ctx)
  _, vjp = jax.vjp(_y_of_weights(ctx), ctx.weights)
  expected = vjp(g)[0]
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
  one projection only if ``|<d, v>|`` falls under the tolerance; for Gaussian
  ``v`` that has probability about ``0.8 tol / |d|``, so ``n`` projections let
  it through with probability ``(0.8 tol / |d|)^n``.
  """
  require_weights(ctx)
  g = _cotangent(ctx)
  actual = _rule_grads(ctx, ctx.x, g, ctx.weights)
  y_of = _y_of_weights(ctx)
  y = ctx.y()
  if ctx.fast or any(y.size * w.size > JACREV_LIMIT
                     for w in ctx.weights.values()):
    for k, w in ctx.weights.items():
      rule_dd, jvp_dd = [], []
      for d in range(JVP_PROJECTIONS):
        v = ctx.normal(f'xy_to_dw.jacrev.v{d}.{k}', w.shape, w.dtype)
        tangents = {j: (v if j == k else jnp.zeros_like(u))
                    for j, u in ctx.weights.items()}
        _, y_dot = jax.jvp(y_of, (ctx.weights,), (tangents,))
        # Dot products on the host in float64: only the operands' rounding
        # remains, not that of a long float32 reduction.
        rule_dd.append(_dot64(actual[k], v))
        jvp_dd.append(_dot64(g, y_dot))
      ctx.compare(np.array(rule_dd), np.array(jvp_dd), rule='xy_to_dw',
                  key=k, dtype=w.dtype, what=f'fast mode: <xy_to_dw, v> vs <g, J v> from '
                  f'jax.jvp along {JVP_PROJECTIONS} random directions')
    return
  jac = jax.jacrev(y_of)(ctx.weights)
  for k in ctx.weights:
    expected = jnp.tensordot(g, jac[k], axes=g.ndim)
    ctx.compare(actual[k], expected, rule='xy_to_dw', key=k,
                what='xy_to_dw vs jax.jacrev contracted with g')


def _dot64(a, b) -> float:
  return float(np.vdot(np.asarray(a, np.float64), np.asarray(b, np.float64)))


def directional_fd(f, w, v, eps):
  """``(f(w + eps v) - f(w - eps v)) / (2 eps)``."""
  return (f(w + eps * v) - f(w - eps * v)) / (2 * eps)


@check('xy_to_dw.fd')
def check_fd(ctx):
  """``xy_to_dw`` agrees with central finite differences of ``impl`` in float64
  along random directions, one weight key at a time (no JAX autodiff)."""
  require_weights(ctx)
  with x64_enabled(True):
    ops = to_float64(ctx.operands)
    x, weights, _ = ctx.primitive.split_operands(ops, ctx.params)
    impl = ctx.primitive.impl_fn
    g = jnp.asarray(_cotangent(ctx), jnp.float64)
    grads = _rule_grads(ctx, x, g, weights)
    index_of = ctx.primitive.trainable_invars(ctx.params)
    for k, w in weights.items():
      def y_of(wk, k=k):
        new = list(ops)
        new[index_of[k]] = wk
        out = impl(*new, **ctx.params)
        return out[ctx.primitive.y_outvar_index] \
            if ctx.primitive.multiple_results else out
      rule_dd, fd_dd = [], []
      for d in range(FD_DIRECTIONS):
        v = jnp.asarray(ctx.normal(f'xy_to_dw.fd.v{d}.{k}', w.shape,
                                   jnp.float32), jnp.float64)
        v = v / jnp.sqrt(jnp.mean(v * v) + 1e-300)
        rule_dd.append(jnp.vdot(jnp.asarray(grads[k], jnp.float64), v))
        fd_dd.append(jnp.vdot(g, directional_fd(y_of, w, v,
                                                tolerances.FD_EPS)))
      ctx.compare(jnp.stack(rule_dd), jnp.stack(fd_dd), rule='xy_to_dw', key=k,
                  kind='fd', what=f'<xy_to_dw, v> vs finite differences of '
                  f'impl along {FD_DIRECTIONS} random directions (float64)')
