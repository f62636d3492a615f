"""Primitives whose operands have a domain: integer indices, boolean spikes,
``log(x)``, ``sqrt(W)``, ``relu(x)``.

The harness draws inputs of its own (a recurrence's steps, the points of a
Jacobian).  Drawn from a normal distribution they left the domain: correct
rules failed (an embedding's indices -2 to 2, ``log`` of a negative input),
and a wrong rule passed on no measured element (``sqrt(W)``).  Each test pairs
a correct primitive that passes with a broken one that is caught.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etp
import etp_testing
from etp import rule_util
from etp_testing._src.context import CheckContext

_ids = itertools.count()
RNG = np.random.default_rng(0)


def _register(name, impl, xy_to_dw, yw_to_w, **kwargs):
  prim = etp.register_primitive(
      f'{name}_{next(_ids)}', impl, batched=True, x_invar_index=0,
      trainable_invars_fn=lambda params: {'weight': 1}, **kwargs)
  prim.register_etp_rules(
      xy_to_dw=xy_to_dw, yw_to_w=yw_to_w, init_pp=rule_util.pp_trace,
      init_drtrl=lambda x, y, w, n: rule_util.weight_shaped_traces(
          x, y, w, n, batched=True))
  return prim


def _outcome(prim, check, *operands, **kwargs):
  return etp_testing.check_rules(prim, *operands, checks=[check],
                                 **kwargs).outcome(check)


def _failed_on(outcome, rule):
  return outcome.status == 'failed' and any(
      f.rule == rule for f in outcome.findings if not f.passed)


# ------------------------------------------ an embedding: integer x
def _embedding(yw_to_w):
  """``y[b] = W[idx[b]]``; ``xy_to_dw`` by one-hot rows, exact for indices
  in ``[0, V)`` only (a negative index wraps in ``W[idx]``, not here)."""
  def xy_to_dw(x, g, weights):
    w = weights['weight']
    onehot = jax.nn.one_hot(x, w.shape[0], dtype=g.dtype)
    return {'weight': jnp.einsum('bv,bd->vd', onehot, g).astype(w.dtype)}
  return _register('embedding', lambda idx, w: w[idx], xy_to_dw, yw_to_w)


def _row_yw(g, t):
  return {'weight': g[..., None, :] * t['weight']}


def _row_summed_yw(g, t):   # wrong: the whole of g's row for every column
  return {'weight': g.sum(-1)[..., None, None] * t['weight']}


@pytest.mark.parametrize('vocabulary', [1, 2, 5])
def test_an_embedding_s_steps_draw_indices_in_range(vocabulary):
  idx = np.arange(4, dtype=np.int32) % vocabulary
  table = RNG.standard_normal((vocabulary, 3)).astype(np.float32)
  correct = _outcome(_embedding(_row_yw), 'drtrl.exact', idx, table)
  assert correct.status == 'passed', [f.describe() for f in correct.findings]
  assert _failed_on(_outcome(_embedding(_row_summed_yw), 'drtrl.exact', idx,
                             table), 'drtrl')


# ---------------------------------------------- log(x) @ W: x > 0
def _log_input(xy_to_dw):
  return _register('log_input', lambda x, w: jnp.log(x) @ w, xy_to_dw,
                   _row_yw)


def _log_xy(x, g, weights):
  return {'weight': jnp.einsum('bi,bo->io', jnp.log(x), g).astype(
      weights['weight'].dtype)}


def _linear_xy(x, g, weights):   # wrong: x where log(x) enters
  return {'weight': jnp.einsum('bi,bo->io', x, g).astype(
      weights['weight'].dtype)}


def test_a_recurrence_keeps_log_s_input_positive():
  x = (0.5 + RNG.random((2, 3))).astype(np.float32)
  w = RNG.standard_normal((3, 4)).astype(np.float32)
  correct = _outcome(_log_input(_log_xy), 'drtrl.exact', x, w)
  assert correct.status == 'passed', [f.describe() for f in correct.findings]
  assert _failed_on(_outcome(_log_input(_linear_xy), 'drtrl.exact', x, w),
                    'drtrl')


# ------------------------------------------ sqrt(W): W > 0
def _sqrt_weight(yw_to_w):
  def xy_to_dw(x, g, weights):
    w = weights['weight']
    return {'weight': (jnp.einsum('bi,bo->io', x, g) * 0.5 / jnp.sqrt(w)
                       ).astype(w.dtype)}
  return _register('sqrt_weight', lambda x, w: x @ jnp.sqrt(w), xy_to_dw,
                   yw_to_w)


def _wrong_axis_yw(g, t):   # right only where in == out and g is symmetric
  return {'weight': g[..., :, None] * t['weight']}


@pytest.mark.parametrize('seed', [0, 1])
def test_the_anchor_is_measured_where_sqrt_s_weight_is_positive(seed):
  x = RNG.standard_normal((2, 3)).astype(np.float32)
  w = (0.5 + RNG.random((3, 3))).astype(np.float32)
  correct = _outcome(_sqrt_weight(_row_yw), 'yw_to_w.anchor', x, w, seed=seed)
  assert correct.status == 'passed', [f.describe() for f in correct.findings]
  # Every element measured, not "0 measured elements" (nan columns).
  assert any('on 9 measured elements' in f.message for f in correct.findings)
  assert _failed_on(_outcome(_sqrt_weight(_wrong_axis_yw), 'yw_to_w.anchor',
                             x, w, seed=seed), 'yw_to_w')


# ------------------------------------------ the draws themselves
def _context(*operands, prim=None):
  return CheckContext(prim or etp.etp_mm_p, list(operands),
                      {} if prim else {'has_bias': False})


def test_values_like_keeps_a_domain_and_varies_with_the_step():
  ctx = _context(np.array([[3, 1], [0, 2], [1, 1]], np.int32),
                 np.ones((2, 2), np.float32))
  steps = ctx.values_like('t', 0, (4,))
  assert steps.shape == (4, 3, 2) and steps.dtype == np.int32
  rows = sorted(map(tuple, ctx.operands[0].tolist()))
  assert all(sorted(map(tuple, s.tolist())) == rows for s in steps)
  assert len({s.tobytes() for s in steps}) > 1       # they differ
  positive = np.array([[0.5, 2.0, 0.0]], np.float32)
  scaled = ctx.rescaled('r', positive, (3,))
  assert scaled.shape == (3, 1, 3)
  assert np.all(scaled[..., :2] >= 0.25) and np.all(scaled[..., 2] == 0)
  assert np.all(scaled[..., :2] <= 3.0)


def test_values_like_draws_a_normal_for_an_affine_operand():
  # Unchanged for the operands of every built-in: the same numbers as before.
  x = np.ones((2, 3), np.float32)
  ctx = _context(x, np.ones((3, 2), np.float32))
  np.testing.assert_array_equal(np.asarray(ctx.values_like('t', 0, (2,))),
                                np.asarray(ctx.normal('t', (2, 2, 3))))
