"""LoRA: B's per-output trace, exact D-RTRL, transformations, errors, units."""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u

import etp
from etp._src import lora as lora_mod
from etp_testing._src import executor

TOL = {jnp.float32: 2e-5, jnp.float64: 1e-10}
f32, f64 = jnp.float32, jnp.float64


def rules(prim=None):
  return etp.rules_of(prim or etp.etp_lora_mv_p)


def _normal(rng, shape, dtype):
  # numpy draws: jax.random would compile a kernel for every new shape.
  return jnp.asarray(rng.standard_normal(shape), dtype)


def _rel_err(got, want):
  return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


class TestHandComputed:
  x = jnp.array([1., 2.])                 # in = 2
  b = jnp.array([[1.], [1.]])             # (in, rank=1)
  a = jnp.array([[1., -1., 2.]])          # (rank, out=3)
  bias = jnp.array([0., 1., 0.])
  w = {'lora_b': b, 'lora_a': a, 'bias': bias}
  params = dict(alpha=0.5, has_bias=True)

  def test_forward(self):
    # alpha * (x B) A = 0.5 * 3 * [1, -1, 2]
    np.testing.assert_allclose(
        etp.lora_matmul(self.x, self.b, self.a, alpha=0.5), [1.5, -1.5, 3.])
    np.testing.assert_allclose(
        etp.lora_matmul(self.x, self.b, self.a, self.bias, alpha=0.5),
        [1.5, -0.5, 3.])

  def test_xy_to_dw(self):
    g = jnp.array([1., 0., 1.])
    dw = rules().xy_to_dw(self.x, g, self.w, **self.params)
    # dB = alpha x^T (g A^T) = 0.5 * [1, 2]^T * 3
    np.testing.assert_allclose(dw['lora_b'], [[1.5], [3.]])
    # dA = alpha (x B)^T g = 0.5 * 3 * g
    np.testing.assert_allclose(dw['lora_a'], [[1.5, 0., 1.5]])
    np.testing.assert_allclose(dw['bias'], g)
    # Batched: summed over the batch.
    dw2 = rules(etp.etp_lora_mm_p).xy_to_dw(
        jnp.stack([self.x, self.x]), jnp.stack([g, g]), self.w, **self.params)
    np.testing.assert_allclose(dw2['lora_b'], [[3.], [6.]])
    np.testing.assert_allclose(dw2['bias'], 2 * g)

  def test_instant_keeps_outputs_for_b(self):
    g = jnp.array([1., 2., 0.])
    inst = rules().instant_drtrl(self.x, g, self.w, alpha=1.0, has_bias=True)
    assert inst['lora_b'].shape == (3, 2, 1)      # (out, in, rank)
    # T_B[o, i, r] = g_o x_i A[r, o]
    np.testing.assert_allclose(inst['lora_b'][:, :, 0],
                               [[1., 2.], [-2., -4.], [0., 0.]])
    # T_A[r, o] = (x B)_r g_o = 3 g
    np.testing.assert_allclose(inst['lora_a'], [[3., 6., 0.]])
    np.testing.assert_allclose(inst['bias'], g)
    # The batched primitive keeps the batch axis.
    inst2 = rules(etp.etp_lora_mm_p).instant_drtrl(
        jnp.stack([self.x, -self.x]), jnp.stack([g, g]), self.w, alpha=1.0,
        has_bias=True)
    assert inst2['lora_b'].shape == (2, 3, 2, 1)
    np.testing.assert_allclose(inst2['lora_b'][1], -inst['lora_b'])

  def test_yw_to_w_picks_g_at_each_entry_output(self):
    trace = {'lora_b': jnp.ones((3, 2, 1)), 'lora_a': jnp.ones((1, 3)),
             'bias': jnp.ones(3)}
    g = jnp.array([1., 2., 3.])
    out = rules().yw_to_w(g, trace, **self.params)
    np.testing.assert_allclose(out['lora_b'][:, :, 0],
                               [[1., 1.], [2., 2.], [3., 3.]])
    np.testing.assert_allclose(out['lora_a'], [[1., 2., 3.]])
    np.testing.assert_allclose(out['bias'], g)
    # Extra leading axes broadcast.
    out2 = rules().yw_to_w(jnp.stack([g, -g]),
                           jax.tree.map(lambda t: jnp.stack([t, 2 * t]), trace),
                           **self.params)
    for k in out:
      np.testing.assert_allclose(out2[k][1], -2 * out[k])

  def test_solve_contracts_outputs(self):
    trace = {'lora_b': jnp.ones((3, 2, 1)), 'lora_a': jnp.ones((1, 3)),
             'bias': jnp.ones(3)}
    c = jnp.array([1., 2., 3.])
    out = rules().solve_drtrl(c, trace, **self.params)
    np.testing.assert_allclose(out['lora_b'], [[6.], [6.]])
    np.testing.assert_allclose(out['lora_a'], [[1., 2., 3.]])
    np.testing.assert_allclose(out['bias'], c)
    # Leading axes (batch, anything) are summed.
    lead = rules().solve_drtrl(jnp.stack([c, c]),
                               jax.tree.map(lambda t: jnp.stack([t, t]), trace),
                               **self.params)
    for k in out:
      np.testing.assert_allclose(lead[k], 2 * out[k])

  @pytest.mark.parametrize('batch', [None, 4])
  def test_init_rules(self, batch):
    prim = etp.etp_lora_mv_p if batch is None else etp.etp_lora_mm_p
    x = self.x if batch is None else jnp.ones((batch, 2))
    lead = () if batch is None else (batch,)
    x_var, y_var, w_vars = executor.jaxpr_vars(
        prim, [x, self.b, self.a, self.bias], self.params)
    init = rules(prim).init_drtrl(x_var, y_var, w_vars, 2)
    assert {k: v.shape for k, v in init.items()} == {
        'lora_b': lead + (3, 2, 1, 2), 'lora_a': lead + (1, 3, 2),
        'bias': lead + (3, 2)}
    assert all(v.dtype == f32 and not v.any() for v in init.values())
    pp = rules(prim).init_pp(x_var, y_var, w_vars, 1)
    assert pp.shape == lead + (3, 1) and pp.dtype == f32

  def test_init_dtype_follows_operands(self, x64):
    x_var, y_var, w_vars = executor.jaxpr_vars(
        etp.etp_lora_mv_p, [self.x.astype(f32), self.b.astype(f64),
                            self.a.astype(f32)], dict(alpha=1., has_bias=False))
    init = rules().init_drtrl(x_var, y_var, w_vars, 1)
    assert all(v.dtype == f64 for v in init.values())


def _case(prim, batch, dtype, n_state, bias, shape=(4, 2, 3), seed=0):
  rng = np.random.RandomState(seed)
  steps = 3
  n_in, rank, n_out = shape
  lead = (batch,) if prim.batched else ()
  xs = _normal(rng, (steps,) + lead + (n_in,), dtype)
  ops = [xs[0], _normal(rng, (n_in, rank), dtype),
         _normal(rng, (rank, n_out), dtype)]
  if bias:
    ops.append(_normal(rng, (n_out,), dtype))
  y = lead + (n_out,)
  A = 0.5 * _normal(rng, (steps,) + y + (n_state, n_state), dtype)
  Bf = _normal(rng, (steps,) + y + (n_state,), dtype)
  C = _normal(rng, (steps,) + y + (n_state,), dtype)
  return ops, {'alpha': 0.7, 'has_bias': bias}, xs, A, Bf, C


MV, MM_B1, MM_B3 = ((etp.etp_lora_mv_p, None, (4, 2, 3)),
                    (etp.etp_lora_mm_p, 1, (3, 1, 5)),
                    (etp.etp_lora_mm_p, 3, (4, 2, 3)))


# Each dtype, layout, number of states and bias, and every pair of dtype,
# states and bias (all 24 combinations took about 3 % of the suite on 2
# cores; the harness's drtrl.exact covers the rest on generated cases).
@pytest.mark.parametrize('dtype,prim,batch,shape,n_state,bias', [
    (f32, *MV, 1, False), (f64, *MV, 2, True),
    (f64, *MM_B1, 1, True), (f32, *MM_B1, 2, False),
    (f32, *MM_B3, 1, True), (f64, *MM_B3, 2, False),
    (f32, *MM_B3, 2, True), (f64, *MM_B3, 1, False)])
def test_drtrl_exact(x64, dtype, prim, batch, shape, n_state, bias):
  ops, params, xs, A, Bf, C = _case(prim, batch, dtype, n_state, bias, shape)
  run = jax.jit(lambda ops, xs, A, Bf, C: (
      executor.drtrl_gradient(prim, ops, params, xs, A, Bf, C),
      executor.autodiff_gradient(prim, ops, params, xs, A, Bf, C)))
  got, want = run(ops, xs, A, Bf, C)
  assert set(got) == set(want) == (
      {'lora_b', 'lora_a', 'bias'} if bias else {'lora_b', 'lora_a'})
  for k in want:
    assert got[k].shape == want[k].shape and got[k].dtype == dtype
    assert _rel_err(got[k], want[k]) < TOL[dtype], k


@pytest.mark.parametrize('prim,batch', [(etp.etp_lora_mv_p, None),
                                        (etp.etp_lora_mm_p, 3)])
def test_instant_solve_consistent_with_xy_to_dw(x64, prim, batch):
  """``solve(c, instant(x, g, w)) == xy_to_dw(x, c*g, w) == VJP``."""
  ops, params, _, _, Bf, C = _case(prim, batch, f64, 1, True, seed=5)
  x, weights, rule_params = prim.split_operands(ops, params)
  g, c = Bf[0, ..., 0], C[0, ..., 0]
  r = rules(prim)
  inst = r.instant_drtrl(x, g, weights, **rule_params)
  solved = r.solve_drtrl(c, inst, **rule_params)
  dw = r.xy_to_dw(x, c * g, weights, **rule_params)
  plain = lambda w: 0.7 * ((x @ w['lora_b']) @ w['lora_a']) + w['bias']
  vjp = jax.vjp(plain, weights)[1](c * g)[0]
  init = r.init_drtrl(*executor.jaxpr_vars(prim, ops, params), 1)
  for k in weights:
    assert inst[k].shape == init[k].shape[:-1]
    np.testing.assert_allclose(solved[k], dw[k], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw[k], vjp[k], rtol=1e-12, atol=1e-12)


def _b_shaped_init(x, y, w, n, **unused):
  return {k: jnp.zeros(v.aval.shape + (n,), v.aval.dtype) for k, v in w.items()}


@pytest.mark.parametrize('b_link', ['unchanged', 'g-summed'])
def test_b_shaped_trace_is_wrong(x64, b_link):
  """A ``B``-shaped trace cannot be exact: ``B[i, r]`` reaches every output,
  so no single ``g`` per element is right (passed through unchanged, or
  scaled by the sum of ``g`` over the outputs)."""
  ops, params, xs, A, Bf, C = _case(etp.etp_lora_mv_p, None, f64, 1, False)

  def link(g, trace, **unused):
    scale = 1. if b_link == 'unchanged' else g.sum(-1)[..., None, None]
    return {'lora_b': scale * trace['lora_b'],
            'lora_a': g[..., None, :] * trace['lora_a']}

  naive = dataclasses.replace(rules(), instant_drtrl=None, solve_drtrl=None,
                              init_drtrl=_b_shaped_init, yw_to_w=link)
  got = executor.drtrl_gradient(etp.etp_lora_mv_p, ops, params, xs, A, Bf, C,
                                rules=naive)
  want = executor.autodiff_gradient(etp.etp_lora_mv_p, ops, params, xs, A,
                                    Bf, C)
  assert _rel_err(got['lora_b'], want['lora_b']) > 0.1
  # A is anchored: its weight-shaped trace stays exact.
  np.testing.assert_allclose(got['lora_a'], want['lora_a'], rtol=1e-10)


class TestTransformations:
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(5, 4), f32)
  b = jnp.asarray(rng.randn(4, 2), f32)
  a = jnp.asarray(rng.randn(2, 3), f32)
  bias = jnp.asarray(rng.randn(3), f32)

  @staticmethod
  def plain(x, b, a, bias):
    return 0.5 * (x @ b) @ a + bias

  @staticmethod
  def ours(x, b, a, bias):
    return etp.lora_matmul(x, b, a, bias, alpha=0.5)

  def test_jit_grad_jvp(self):
    args = (self.x, self.b, self.a, self.bias)
    np.testing.assert_allclose(jax.jit(self.ours)(*args), self.plain(*args),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(self.ours(self.x[0], *args[1:]),
                               self.plain(self.x[0], *args[1:]), rtol=1e-5,
                               atol=1e-6)
    loss = lambda f: lambda *w: jnp.sum(jnp.tanh(f(*w)))
    for got, want in zip(jax.grad(loss(self.ours), (0, 1, 2, 3))(*args),
                         jax.grad(loss(self.plain), (0, 1, 2, 3))(*args)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jvp(self.ours, args, args)[1],
                               jax.jvp(self.plain, args, args)[1], rtol=1e-5,
                               atol=1e-5)

  @pytest.mark.parametrize('in_axes', [(0, None, None, None),
                                       (1, None, None, None),
                                       (-1, None, None, None),
                                       (None, 0, None, None), (0, 0, 0, 0),
                                       (-1, None, 1, None),
                                       (None, -1, None, 0)])
  def test_vmap(self, in_axes):
    args = [self.x, self.b, self.a, self.bias]
    batched = [a if ax is None else jnp.moveaxis(jnp.stack([a, 2 * a]), 0, ax)
               for a, ax in zip(args, in_axes)]
    np.testing.assert_allclose(jax.vmap(self.ours, in_axes)(*batched),
                               jax.vmap(self.plain, in_axes)(*batched),
                               rtol=1e-5, atol=1e-5)

  def test_vmap_binds_batched_counterpart(self):
    jaxpr = jax.make_jaxpr(jax.vmap(lambda x: self.ours(x, self.b, self.a,
                                                        self.bias)))(self.x)
    assert etp.etp_lora_mm_p in [e.primitive for e in jaxpr.jaxpr.eqns]

  @pytest.mark.parametrize('one_example', [False, True])
  def test_lowers_to_the_same_operations(self, one_example):
    x = self.x[0] if one_example else self.x

    def ops(f):
      text = jax.jit(f).lower(x, self.b, self.a, self.bias).as_text()
      return collections.Counter(t.split('(')[0] for t in text.split()
                                 if t.startswith('stablehlo.'))
    assert ops(self.ours) == ops(self.plain)


class TestErrorsAndUnits:
  b, a = jnp.ones((4, 2)), jnp.ones((2, 3))

  def test_inner_dims(self):
    with pytest.raises(ValueError,
                       match=r'`x` must have shape \(4,\) or \(batch, 4\)'):
      etp.lora_matmul(jnp.ones(3), self.b, self.a)
    with pytest.raises(ValueError,
                       match=r'`lora_a` must have shape \(2, out\)'):
      etp.lora_matmul(jnp.ones(4), self.b, jnp.ones((3, 3)))
    with pytest.raises(ValueError, match=r'`bias` must have shape \(3,\)'):
      etp.lora_matmul(jnp.ones(4), self.b, self.a, jnp.ones(2))

  def test_rank(self):
    with pytest.raises(ValueError,
                       match=r'`lora_b` must have shape \(in, rank\)'):
      etp.lora_matmul(jnp.ones(4), jnp.ones(4), self.a)
    with pytest.raises(ValueError,
                       match=r'`lora_a` must have shape \(rank, out\)'):
      etp.lora_matmul(jnp.ones(4), self.b, jnp.ones((2, 3, 1)))
    with pytest.raises(ValueError, match='reshape x'):
      etp.lora_matmul(jnp.ones((2, 2, 4)), self.b, self.a)
    with pytest.raises(ValueError, match=r'`bias` must have shape \(3,\)'):
      etp.lora_matmul(jnp.ones(4), self.b, self.a, jnp.ones((1, 3)))

  def test_alpha_must_be_static(self):
    for bad in (jnp.array(1.0), '1', True):
      with pytest.raises(TypeError, match='`alpha` must be a Python number'):
        etp.lora_matmul(jnp.ones(4), self.b, self.a, alpha=bad)
    # numpy scalars are numbers; the bind param is a hashable float.
    jaxpr = jax.make_jaxpr(lambda x: etp.lora_matmul(
        x, self.b, self.a, alpha=np.float32(2)))(jnp.ones(4))
    assert type(jaxpr.jaxpr.eqns[0].params['alpha']) is float

  def test_not_floating(self):
    with pytest.raises(TypeError, match='`lora_b` must be floating point'):
      etp.lora_matmul(jnp.ones(4), jnp.ones((4, 2), jnp.int32), self.a)

  def test_units(self):
    y = etp.lora_matmul(jnp.ones(4) * u.mV, jnp.ones((4, 2)) * u.siemens,
                        jnp.ones((2, 3)), jnp.ones(3) * u.uA)
    assert u.get_unit(y) == u.mA
    np.testing.assert_allclose(u.get_mantissa(y), [8.001] * 3, rtol=1e-6)
    y = etp.lora_matmul(jnp.ones(4) * u.volt, jnp.ones((4, 2)),
                        jnp.ones((2, 3)) * u.siemens, alpha=0.5)
    assert u.get_unit(y) == u.amp
    with pytest.raises(u.UnitMismatchError, match='`bias` has unit'):
      etp.lora_matmul(jnp.ones(4) * u.mV, self.b, self.a, jnp.ones(3) * u.mA)


def test_module_documents_memory_price():
  assert 'Memory price' in lora_mod.__doc__
  assert "``out`` times ``B``'s size" in lora_mod.__doc__
