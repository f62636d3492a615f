"""LoRA: B's per-output trace, exact D-RTRL, transformations, errors, units."""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u

import etp
from etp_testing._src import executor

TOL = {jnp.float32: 2e-5, jnp.float64: 1e-10}


@pytest.fixture
def x64():
  old = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  yield
  jax.config.update('jax_enable_x64', old)


def rules():
  return etp.rules_of(etp.etp_lora_mv_p)


class TestHandComputed:
  x = jnp.array([1., 2.])                 # in = 2
  b = jnp.array([[1.], [1.]])             # (in, rank=1)
  a = jnp.array([[1., -1., 2.]])          # (rank, out=3)
  w = {'lora_b': b, 'lora_a': a}

  def test_forward(self):
    # alpha * (x B) A = 0.5 * 3 * [1, -1, 2]
    np.testing.assert_allclose(etp.lora_matmul(self.x, self.b, self.a,
                                               alpha=0.5), [1.5, -1.5, 3.])

  def test_xy_to_dw(self):
    g = jnp.array([1., 0., 1.])
    dw = rules().xy_to_dw(self.x, g, self.w, alpha=0.5, has_bias=False)
    # dB = alpha x^T (g A^T) = 0.5 * [1, 2]^T * 3
    np.testing.assert_allclose(dw['lora_b'], [[1.5], [3.]])
    # dA = alpha (x B)^T g = 0.5 * 3 * g
    np.testing.assert_allclose(dw['lora_a'], [[1.5, 0., 1.5]])

  def test_instant_keeps_outputs_for_b(self):
    g = jnp.array([1., 2., 0.])
    inst = rules().instant_drtrl(self.x, g, self.w, alpha=1.0, has_bias=False)
    assert inst['lora_b'].shape == (3, 2, 1)      # (out, in, rank)
    # T_B[o, i, r] = g_o x_i A[r, o]
    np.testing.assert_allclose(inst['lora_b'][:, :, 0],
                               [[1., 2.], [-2., -4.], [0., 0.]])
    assert inst['lora_a'].shape == (1, 3)

  def test_solve_contracts_outputs(self):
    trace = {'lora_b': jnp.ones((3, 2, 1)), 'lora_a': jnp.ones((1, 3))}
    c = jnp.array([1., 2., 3.])
    out = rules().solve_drtrl(c, trace, alpha=1.0, has_bias=False)
    np.testing.assert_allclose(out['lora_b'], [[6.], [6.]])
    np.testing.assert_allclose(out['lora_a'], [[1., 2., 3.]])


def _case(prim, batch, dtype, n_state, bias, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 8)
  steps, n_in, rank, n_out = 3, 4, 2, 3
  lead = (batch,) if prim.batched else ()
  xs = jax.random.normal(keys[0], (steps,) + lead + (n_in,), dtype)
  ops = [xs[0], jax.random.normal(keys[1], (n_in, rank), dtype),
         jax.random.normal(keys[2], (rank, n_out), dtype)]
  if bias:
    ops.append(jax.random.normal(keys[3], (n_out,), dtype))
  y = lead + (n_out,)
  A = 0.5 * jax.random.normal(keys[4], (steps,) + y + (n_state, n_state), dtype)
  Bf = jax.random.normal(keys[5], (steps,) + y + (n_state,), dtype)
  C = jax.random.normal(keys[6], (steps,) + y + (n_state,), dtype)
  return ops, {'alpha': 0.7, 'has_bias': bias}, xs, A, Bf, C


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.float64])
@pytest.mark.parametrize('prim,batch', [(etp.etp_lora_mv_p, None),
                                        (etp.etp_lora_mm_p, 1),
                                        (etp.etp_lora_mm_p, 3)])
@pytest.mark.parametrize('n_state', [1, 2])
@pytest.mark.parametrize('bias', [False, True])
def test_drtrl_exact(x64, dtype, prim, batch, n_state, bias):
  ops, params, xs, A, Bf, C = _case(prim, batch, dtype, n_state, bias)
  want = executor.autodiff_gradient(prim, ops, params, xs, A, Bf, C)
  got = executor.drtrl_gradient(prim, ops, params, xs, A, Bf, C)
  assert set(got) == set(want)
  for k in want:
    err = jnp.max(jnp.abs(got[k] - want[k])) / jnp.max(jnp.abs(want[k]))
    assert err < TOL[dtype], (k, float(err))


def test_b_shaped_trace_is_wrong(x64):
  """A B-shaped trace passed through unchanged cannot be exact."""
  ops, params, xs, A, Bf, C = _case(etp.etp_lora_mv_p, None, jnp.float64, 1,
                                    False)
  r = rules()

  def init(x, y, w, n, **unused):
    return {k: jnp.zeros(v.aval.shape + (n,)) for k, v in w.items()}

  def link(g, trace, **unused):
    return {'lora_b': trace['lora_b'],                 # passed through
            'lora_a': g[..., None, :] * trace['lora_a']}

  naive = dataclasses.replace(r, instant_drtrl=None, solve_drtrl=None,
                              init_drtrl=init, yw_to_w=link)
  got = executor.drtrl_gradient(etp.etp_lora_mv_p, ops, params, xs, A, Bf, C,
                                rules=naive)
  want = executor.autodiff_gradient(etp.etp_lora_mv_p, ops, params, xs, A,
                                    Bf, C)
  err = jnp.max(jnp.abs(got['lora_b'] - want['lora_b'])) / jnp.max(
      jnp.abs(want['lora_b']))
  assert err > 0.1
  np.testing.assert_allclose(got['lora_a'], want['lora_a'], rtol=1e-10)


class TestTransformations:
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(5, 4), jnp.float32)
  b = jnp.asarray(rng.randn(4, 2), jnp.float32)
  a = jnp.asarray(rng.randn(2, 3), jnp.float32)
  bias = jnp.asarray(rng.randn(3), jnp.float32)

  @staticmethod
  def plain(x, b, a, bias):
    return 0.5 * ((x @ b) @ a) + bias

  @staticmethod
  def ours(x, b, a, bias):
    return etp.lora_matmul(x, b, a, bias, alpha=0.5)

  def test_jit_grad_jvp(self):
    args = (self.x, self.b, self.a, self.bias)
    np.testing.assert_allclose(jax.jit(self.ours)(*args), self.plain(*args),
                               rtol=1e-5)
    loss = lambda f: lambda *w: jnp.sum(jnp.tanh(f(self.x, *w)))
    for got, want in zip(jax.grad(loss(self.ours), (0, 1, 2))(*args[1:]),
                         jax.grad(loss(self.plain), (0, 1, 2))(*args[1:])):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jvp(self.ours, args, args)[1],
                               jax.jvp(self.plain, args, args)[1], rtol=1e-5)

  @pytest.mark.parametrize('in_axes', [(0, None, None, None),
                                       (1, None, None, None),
                                       (None, 0, None, None), (0, 0, 0, 0),
                                       (-1, None, 1, None)])
  def test_vmap(self, in_axes):
    args = [self.x, self.b, self.a, self.bias]
    batched = [a if ax is None else jnp.moveaxis(jnp.stack([a, 2 * a]), 0, ax)
               for a, ax in zip(args, in_axes)]
    np.testing.assert_allclose(jax.vmap(self.ours, in_axes)(*batched),
                               jax.vmap(self.plain, in_axes)(*batched),
                               rtol=1e-5, atol=1e-6)

  def test_vmap_binds_batched_counterpart(self):
    jaxpr = jax.make_jaxpr(jax.vmap(lambda x: self.ours(x, self.b, self.a,
                                                        self.bias)))(self.x)
    assert etp.etp_lora_mm_p in [e.primitive for e in jaxpr.jaxpr.eqns]

  def test_lowers_to_the_same_operations(self):
    def ops(f):
      text = jax.jit(f).lower(self.x, self.b, self.a, self.bias).as_text()
      return collections.Counter(t.split('(')[0] for t in text.split()
                                 if t.startswith('stablehlo.'))
    assert ops(self.ours) == ops(self.plain)


class TestErrorsAndUnits:

  def test_inner_dims(self):
    with pytest.raises(ValueError, match=r'`x` must have shape \(\.\.\., 4\)'):
      etp.lora_matmul(jnp.ones(3), jnp.ones((4, 2)), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r'`lora_a` must have shape \(2, out\)'):
      etp.lora_matmul(jnp.ones(4), jnp.ones((4, 2)), jnp.ones((3, 3)))

  def test_rank(self):
    with pytest.raises(ValueError, match=r'`lora_b` must have shape \(in, rank\)'):
      etp.lora_matmul(jnp.ones(4), jnp.ones(4), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match='reshape x'):
      etp.lora_matmul(jnp.ones((2, 2, 4)), jnp.ones((4, 2)), jnp.ones((2, 3)))

  def test_alpha_must_be_static(self):
    with pytest.raises(TypeError, match='`alpha` must be a Python number'):
      etp.lora_matmul(jnp.ones(4), jnp.ones((4, 2)), jnp.ones((2, 3)),
                      alpha=jnp.array(1.0))

  def test_units(self):
    y = etp.lora_matmul(jnp.ones(4) * u.mV, jnp.ones((4, 2)) * u.siemens,
                        jnp.ones((2, 3)), jnp.ones(3) * u.uA)
    assert u.get_unit(y) == u.mA
    with pytest.raises(u.UnitMismatchError, match='`bias` has unit'):
      etp.lora_matmul(jnp.ones(4) * u.mV, jnp.ones((4, 2)), jnp.ones((2, 3)),
                      jnp.ones(3) * u.mA)
