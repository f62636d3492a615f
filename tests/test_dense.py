"""Dense matmul: hand-computed rules, exact D-RTRL, JAX transformations, errors."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u

import etp
from etp_testing._src import executor

TOL = {jnp.float32: 2e-5, jnp.float64: 1e-10}


def rules():
  return etp.rules_of(etp.etp_mm_p)


class TestHandComputedRules:
  x = jnp.array([[1., 2.], [3., -1.]])           # (B=2, in=2)
  g = jnp.array([[1., 0., 2.], [-1., 1., 0.]])   # (B=2, out=3)
  w = {'weight': jnp.zeros((2, 3)), 'bias': jnp.zeros(3)}

  def test_xy_to_dw_sums_batch(self):
    dw = rules().xy_to_dw(self.x, self.g, self.w, has_bias=True)
    # x^T g = [[1*1 + 3*-1, 0 + 3, 2 + 0], [2*1 + -1*-1, 0 - 1, 4 + 0]]
    np.testing.assert_allclose(dw['weight'], [[-2., 3., 2.], [3., -1., 4.]])
    np.testing.assert_allclose(dw['bias'], [0., 1., 2.])

  def test_xy_to_dw_unbatched(self):
    dw = etp.rules_of(etp.etp_mv_p).xy_to_dw(self.x[0], self.g[0], self.w,
                                             has_bias=False)
    assert set(dw) == {'weight'}
    np.testing.assert_allclose(dw['weight'], [[1., 0., 2.], [2., 0., 4.]])

  def test_yw_to_w_picks_g_at_output_column(self):
    trace = {'weight': jnp.ones((2, 2, 3)) * 2., 'bias': jnp.ones((2, 3))}
    out = rules().yw_to_w(self.g, trace, has_bias=True)
    np.testing.assert_allclose(out['weight'][0], [[2., 0., 4.], [2., 0., 4.]])
    np.testing.assert_allclose(out['weight'][1], [[-2., 2., 0.], [-2., 2., 0.]])
    np.testing.assert_allclose(out['bias'], self.g)

  def test_init_shapes_and_dtype(self, x64):
    x = jnp.ones((4, 2), jnp.float32)
    w = jnp.ones((2, 3), jnp.float32)
    b = jnp.ones(3, jnp.float32)
    x_var, y_var, w_vars = executor.jaxpr_vars(etp.etp_mm_p, (x, w, b),
                                               {'has_bias': True})
    tr = rules().init_drtrl(x_var, y_var, w_vars, 2)
    assert tr['weight'].shape == (4, 2, 3, 2) and tr['bias'].shape == (4, 3, 2)
    # float32 operands give float32 traces even with x64 on.
    assert tr['weight'].dtype == jnp.float32
    assert not jnp.any(tr['weight'])
    pp = rules().init_pp(x_var, y_var, w_vars, 1)
    assert pp.shape == (4, 3, 1) and pp.dtype == jnp.float32


def _case(prim, batch, n_in, n_out, steps, n_state, dtype, bias, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 6)
  lead = (batch,) if prim.batched else ()
  y = lead + (n_out,)
  xs = jax.random.normal(keys[0], (steps,) + lead + (n_in,), dtype)
  ops = [xs[0], jax.random.normal(keys[1], (n_in, n_out), dtype)]
  if bias:
    ops.append(jax.random.normal(keys[2], (n_out,), dtype))
  A = 0.5 * jax.random.normal(keys[3], (steps,) + y + (n_state, n_state), dtype)
  Bf = jax.random.normal(keys[4], (steps,) + y + (n_state,), dtype)
  C = jax.random.normal(keys[5], (steps,) + y + (n_state,), dtype)
  return ops, {'has_bias': bias}, xs, A, Bf, C


# Each dtype, layout, number of states and bias, and every pair of dtype,
# states and bias (all 24 combinations took a tenth of the suite; the
# harness's drtrl.exact covers the rest on generated cases).
@pytest.mark.parametrize('dtype,prim,batch,n_state,bias', [
    (jnp.float32, etp.etp_mv_p, None, 1, False),
    (jnp.float64, etp.etp_mv_p, None, 2, True),
    (jnp.float64, etp.etp_mm_p, 1, 1, True),
    (jnp.float32, etp.etp_mm_p, 1, 2, False),
    (jnp.float32, etp.etp_mm_p, 3, 1, True),
    (jnp.float64, etp.etp_mm_p, 3, 2, False),
    (jnp.float32, etp.etp_mm_p, 3, 2, True),
    (jnp.float64, etp.etp_mm_p, 3, 1, False)])
def test_drtrl_matches_autodiff(x64, dtype, prim, batch, n_state, bias):
  ops, params, xs, A, Bf, C = _case(prim, batch, 3, 5, 4, n_state, dtype, bias)
  want = executor.autodiff_gradient(prim, ops, params, xs, A, Bf, C)
  got = executor.drtrl_gradient(prim, ops, params, xs, A, Bf, C)
  assert set(got) == set(want)
  for k in want:
    err = jnp.max(jnp.abs(got[k] - want[k])) / jnp.max(jnp.abs(want[k]))
    assert err < TOL[dtype], (k, float(err))


@pytest.mark.parametrize('prim,batch', [(etp.etp_mv_p, None), (etp.etp_mm_p, 2)])
def test_pp_prop_exact_for_weight(x64, prim, batch):
  ops, params, xs, _, _, C = _case(prim, batch, 4, 2, 5, 1, jnp.float64, False)
  C = C[..., 0]
  want = jax.grad(lambda w: executor.pp_loss(prim, ops, params, w, xs, C, 0.7))(
      {'weight': ops[1]})
  got = executor.pp_gradient(prim, ops, params, xs, C, 0.7)
  np.testing.assert_allclose(got['weight'], want['weight'], rtol=1e-10)


class TestTransformations:
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(4, 3), jnp.float32)
  w = jnp.asarray(rng.randn(3, 2), jnp.float32)
  b = jnp.asarray(rng.randn(2), jnp.float32)

  @staticmethod
  def plain(x, w, b):
    return x @ w + b

  def test_jit(self):
    np.testing.assert_allclose(jax.jit(etp.matmul)(self.x, self.w, self.b),
                               self.plain(self.x, self.w, self.b), rtol=1e-6)

  @pytest.mark.parametrize('in_axes', [(0, None, None), (1, None, None),
                                       (-1, None, None), (None, 0, None),
                                       (0, 0, 0), (None, None, 0)])
  def test_vmap(self, in_axes):
    args = [self.x, self.w, self.b]
    batched = []
    for a, ax in zip(args, in_axes):
      if ax is None:
        batched.append(a)
      else:
        batched.append(jnp.moveaxis(jnp.stack([a, 2 * a, -a]), 0, ax))
    np.testing.assert_allclose(
        jax.vmap(etp.matmul, in_axes=in_axes)(*batched),
        jax.vmap(self.plain, in_axes=in_axes)(*batched), rtol=1e-5)

  def test_grad_and_jvp(self):
    loss = lambda f: lambda w, b: jnp.sum(jnp.tanh(f(self.x, w, b)))
    for got, want in zip(jax.grad(loss(etp.matmul), (0, 1))(self.w, self.b),
                         jax.grad(loss(self.plain), (0, 1))(self.w, self.b)):
      np.testing.assert_allclose(got, want, rtol=1e-5)
    t = (jnp.ones_like(self.x), jnp.ones_like(self.w), jnp.ones_like(self.b))
    _, got = jax.jvp(etp.matmul, (self.x, self.w, self.b), t)
    _, want = jax.jvp(self.plain, (self.x, self.w, self.b), t)
    np.testing.assert_allclose(got, want, rtol=1e-5)

  def test_lowers_to_the_same_operations(self):
    def ops(f):
      text = jax.jit(f).lower(self.x, self.w, self.b).as_text()
      return collections.Counter(
          tok.split('(')[0] for tok in text.split() if tok.startswith('stablehlo.'))
    ours, plain = ops(etp.matmul), ops(self.plain)
    assert ours == plain, (ours, plain)


class TestErrors:

  def test_rank_too_high(self):
    with pytest.raises(ValueError, match=r"matmul: `x` must have shape \(in,\) or "
                       r"\(batch, in\).*reshape"):
      etp.matmul(jnp.ones((2, 3, 4)), jnp.ones((4, 5)))

  def test_weight_rank(self):
    with pytest.raises(ValueError, match=r"`weight` must have shape \(in, out\)"):
      etp.matmul(jnp.ones(3), jnp.ones(3))

  def test_inner_mismatch(self):
    with pytest.raises(ValueError, match=r"`x` must have shape.*in=4.*weight of "
                       r"shape \(4, 5\), got shape \(2, 3\)"):
      etp.matmul(jnp.ones((2, 3)), jnp.ones((4, 5)))

  def test_bias_shape(self):
    with pytest.raises(ValueError, match=r"`bias` must have shape \(5,\)"):
      etp.matmul(jnp.ones(4), jnp.ones((4, 5)), jnp.ones(4))

  def test_bias_unit_mismatch(self):
    with pytest.raises(u.UnitMismatchError, match='`bias` has unit'):
      etp.matmul(jnp.ones(4) * u.mV, jnp.ones((4, 5)) * u.siemens,
                 jnp.ones(5) * u.mV)

  def test_integer_x(self):
    with pytest.raises(TypeError, match='`x` must be floating point'):
      etp.matmul(jnp.ones(4, jnp.int32), jnp.ones((4, 5)))


class TestUnits:

  def test_units_multiply(self):
    y = etp.matmul(jnp.ones(4) * u.mV, jnp.ones((4, 2)) * u.siemens,
                   jnp.ones(2) * u.uA)
    assert u.get_unit(y) == u.mA
    np.testing.assert_allclose(u.get_mantissa(y), [4.001, 4.001], rtol=1e-6)

  @pytest.mark.parametrize('dtype', [jnp.bfloat16, np.float16])
  def test_a_bias_converted_to_the_output_unit_keeps_its_dtype(self, dtype):
    # NumPy makes a bfloat16 array times the unit's scale float32; the
    # conversion scales a JAX array, which keeps it.
    b = np.ones(2, dtype) * u.uA
    y = etp.matmul(np.ones(4, dtype) * u.mV, np.ones((4, 2), dtype) * u.siemens,
                   b)
    assert u.get_mantissa(y).dtype == dtype

  def test_unitless_returns_array(self):
    y = etp.matmul(jnp.ones(4), jnp.ones((4, 2)))
    assert isinstance(y, jax.Array)
