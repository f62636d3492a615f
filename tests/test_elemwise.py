"""Element-wise weights: hand-computed rules, D-RTRL through fn, JAX, units."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u

import etp
from etp_testing._src import executor

TOL = {jnp.float32: 2e-5, jnp.float64: 1e-10}

FNS = {
    'tanh': jnp.tanh,
    'square': lambda w: w ** 2,
    'sin_times_w': lambda w: jnp.sin(w) * w,
}


def rules():
  return etp.rules_of(etp.etp_elemwise_p)


def test_registration():
  p = etp.etp_elemwise_p
  assert p.name == 'etp_elemwise'
  assert p.gradient_enabled and not p.batched and p.x_invar_index is None
  assert p.trainable_invars({}) == {'weight': 0}
  assert rules().has_rules


class TestHandComputedRules:
  g = jnp.array([[1., -2., 3.], [0.5, 0., -1.]])   # y of shape (2, 3)

  def test_xy_to_dw_is_g(self):
    dw = rules().xy_to_dw(None, self.g, {'weight': jnp.zeros((2, 3))})
    assert set(dw) == {'weight'}
    np.testing.assert_allclose(dw['weight'], self.g)

  def test_xy_to_dw_casts_to_weight_dtype(self, x64):
    g = jnp.asarray(self.g, jnp.float64)
    dw = rules().xy_to_dw(None, g, {'weight': jnp.zeros((2, 3), jnp.float32)})
    assert dw['weight'].dtype == jnp.float32

  def test_xy_to_dw_sums_extra_leading_axes(self):
    # A leading axis beyond the weight's rank is summed: [1.5, -2, 2].
    dw = rules().xy_to_dw(None, self.g, {'weight': jnp.zeros(3)})
    np.testing.assert_allclose(dw['weight'], [1.5, -2., 2.])

  def test_yw_to_w_is_elementwise(self):
    trace = {'weight': jnp.array([[2., 2., 2.], [1., -1., 4.]])}
    out = rules().yw_to_w(self.g, trace)
    np.testing.assert_allclose(out['weight'], [[2., -4., 6.], [.5, 0., -4.]])

  def test_yw_to_w_with_extra_leading_axes(self):
    # g (3,) broadcasts against a trace with an extra leading axis (2, 3).
    trace = {'weight': jnp.array([[1., 1., 1.], [2., 0., -1.]])}
    out = rules().yw_to_w(self.g[0], trace)
    np.testing.assert_allclose(out['weight'], [[1., -2., 3.], [2., 0., -3.]])

  @pytest.mark.parametrize('n_state', [1, 3])
  def test_init_shapes_and_dtype(self, x64, n_state):
    w = jnp.ones((2, 3), jnp.float32)
    x_var, y_var, w_vars = executor.jaxpr_vars(etp.etp_elemwise_p, (w,), {})
    assert x_var is None
    tr = rules().init_drtrl(x_var, y_var, w_vars, n_state)
    assert set(tr) == {'weight'}
    assert tr['weight'].shape == (2, 3, n_state)
    # float32 operands give float32 traces even with x64 on.
    assert tr['weight'].dtype == jnp.float32
    assert not jnp.any(tr['weight'])
    pp = rules().init_pp(x_var, y_var, w_vars, n_state)
    assert pp.shape == (2, 3, n_state) and pp.dtype == jnp.float32
    assert not jnp.any(pp)


def _case(shape, steps, n_state, dtype, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  w = jax.random.normal(keys[0], shape, dtype)
  A = 0.5 * jax.random.normal(keys[1], (steps,) + shape + (n_state, n_state),
                              dtype)
  Bf = jax.random.normal(keys[2], (steps,) + shape + (n_state,), dtype)
  C = jax.random.normal(keys[3], (steps,) + shape + (n_state,), dtype)
  return [w], A, Bf, C


# Every fn in both dtypes; the number of states and the shape rotate with
# the fn, so that every pair of dtype, states and shape occurs (all 40
# combinations took about 3 % of the suite on 2 cores).
_STATES_AND_SHAPES = [((1, (5,)), (2, (2, 3))), ((2, (2, 3)), (1, (5,))),
                      ((2, (5,)), (1, (2, 3))), ((1, (2, 3)), (2, (5,)))]


@pytest.mark.parametrize('fn,dtype,n_state,shape', [
    (fn, dtype, *states_and_shape)
    for i, fn in enumerate(['identity'] + list(FNS))
    for dtype, states_and_shape in zip((jnp.float32, jnp.float64),
                                       _STATES_AND_SHAPES[i % 4])])
def test_drtrl_matches_autodiff_through_fn(x64, dtype, fn, n_state, shape):
  ops, A, Bf, C = _case(shape, 4, n_state, dtype)
  transforms = {} if fn == 'identity' else {'weight': FNS[fn]}
  prim = etp.etp_elemwise_p
  want = executor.autodiff_gradient(prim, ops, {}, None, A, Bf, C, transforms)
  got = executor.drtrl_gradient(prim, ops, {}, None, A, Bf, C, transforms)
  assert set(got) == set(want) == {'weight'}
  assert got['weight'].dtype == dtype
  err = jnp.max(jnp.abs(got['weight'] - want['weight'])) / jnp.max(
      jnp.abs(want['weight']))
  assert err < TOL[dtype], float(err)


class TestTransformations:
  rng = np.random.RandomState(0)
  w = jnp.asarray(rng.randn(4, 3), jnp.float32)

  @staticmethod
  def ours(w):
    return etp.element_wise(w, jnp.tanh)

  def test_identity_default(self):
    np.testing.assert_array_equal(etp.element_wise(self.w), self.w)

  def test_jit(self):
    np.testing.assert_allclose(jax.jit(self.ours)(self.w), jnp.tanh(self.w),
                               rtol=1e-6)

  @pytest.mark.parametrize('in_axis', [0, 1, -1])
  def test_vmap(self, in_axis):
    w = jnp.moveaxis(jnp.stack([self.w, 2 * self.w, -self.w]), 0, in_axis)
    for out_axis in (0, 1):
      np.testing.assert_allclose(
          jax.vmap(self.ours, in_axes=in_axis, out_axes=out_axis)(w),
          jax.vmap(jnp.tanh, in_axes=in_axis, out_axes=out_axis)(w),
          rtol=1e-6)

  def test_nested_vmap(self):
    nest = lambda f: jax.vmap(jax.vmap(f, in_axes=1), in_axes=0)
    w = jnp.stack([self.w, -self.w])
    got = nest(self.ours)(w)
    assert got.shape == (2, 3, 4)
    np.testing.assert_allclose(got, nest(jnp.tanh)(w), rtol=1e-6)
    np.testing.assert_allclose(got[1], -jnp.tanh(self.w).T, rtol=1e-6)

  def test_vmap_with_unmapped_closure(self):
    # The mapped operand mixes with an unmapped constant inside fn.
    f = lambda a: etp.element_wise(a, lambda v: v * self.w[0])
    a = jnp.arange(6., dtype=jnp.float32).reshape(2, 3)
    np.testing.assert_allclose(jax.vmap(f)(a), a * self.w[0], rtol=1e-6)

  @pytest.mark.parametrize('fn', list(FNS))
  def test_grad(self, fn):
    f = FNS[fn]
    loss = lambda g: lambda w: jnp.sum(jnp.cos(g(w)) * jnp.arange(3.))
    got = jax.grad(loss(lambda w: etp.element_wise(w, f)))(self.w)
    want = jax.grad(loss(f))(self.w)
    np.testing.assert_allclose(got, want, rtol=1e-5)

  def test_jvp(self):
    t = jnp.ones_like(self.w)
    y, got = jax.jvp(self.ours, (self.w,), (t,))
    want_y, want = jax.jvp(jnp.tanh, (self.w,), (t,))
    np.testing.assert_allclose(y, want_y, rtol=1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-6)

  def test_linear_transpose(self):
    ct = jnp.arange(12., dtype=jnp.float32).reshape(4, 3)
    (got,) = jax.linear_transpose(etp.element_wise, self.w)(ct)
    np.testing.assert_array_equal(got, ct)

  def test_primitive_stays_in_jaxpr(self):
    def names(f, *args):
      jaxpr = jax.make_jaxpr(f)(*args)
      return [str(e.primitive) for e in jaxpr.jaxpr.eqns]
    assert 'etp_elemwise' in names(self.ours, self.w)
    assert 'etp_elemwise' in names(jax.jit(self.ours), self.w) or any(
        'etp_elemwise' in str(e.params.get('jaxpr', ''))
        for e in jax.make_jaxpr(jax.jit(self.ours))(self.w).jaxpr.eqns)
    stacked = jnp.stack([self.w, self.w])
    for axis in (0, 1):
      vmapped = names(jax.vmap(self.ours, in_axes=axis),
                      jnp.moveaxis(stacked, 0, axis))
      assert 'etp_elemwise' in vmapped, vmapped
      assert 'tanh' in vmapped
    jaxpr = jax.make_jaxpr(jax.vmap(self.ours, in_axes=1))(
        jnp.moveaxis(stacked, 0, 1))
    eqn = [e for e in jaxpr.jaxpr.eqns if e.primitive is etp.etp_elemwise_p][0]
    # The batch axis stays where vmap put it: the operand is bound unchanged.
    assert eqn.invars[0].aval.shape == eqn.outvars[0].aval.shape
    assert 'etp_elemwise' in names(jax.grad(lambda w: self.ours(w).sum()),
                                   self.w)

  def test_lowers_to_the_same_operations(self):
    def ops(f):
      text = jax.jit(f).lower(self.w).as_text()
      return collections.Counter(
          tok.split('(')[0] for tok in text.split() if tok.startswith('stablehlo.'))
    ours, plain = ops(self.ours), ops(jnp.tanh)
    assert ours == plain, (ours, plain)


class TestErrors:

  def test_fn_not_callable(self):
    with pytest.raises(TypeError, match=r'element_wise: `fn` must be callable'):
      etp.element_wise(jnp.ones(3), 2.0)

  def test_fn_returns_none(self):
    with pytest.raises(TypeError, match=r'`fn` returned None'):
      etp.element_wise(jnp.ones(3), lambda w: None)

  def test_integer_result(self):
    with pytest.raises(TypeError, match=r'`fn\(weight\)` must be floating point'):
      etp.element_wise(jnp.ones(3, jnp.int32))

  def test_error_prefix(self):
    with pytest.raises(TypeError, match=r'^\[etp\] element_wise: '):
      etp.element_wise(jnp.ones(3), 'tanh')


class TestUnits:

  def test_unit_preserved(self):
    y = etp.element_wise(jnp.arange(3.) * u.mV)
    assert u.get_unit(y) == u.mV
    np.testing.assert_allclose(u.get_mantissa(y), [0., 1., 2.])

  def test_fn_sees_the_quantity(self):
    y = etp.element_wise(jnp.arange(3.) * u.mV, lambda w: w ** 2)
    assert u.get_unit(y) == u.mV ** 2
    np.testing.assert_allclose(u.get_mantissa(y), [0., 1., 4.])

  def test_fn_changes_unit(self):
    y = etp.element_wise(jnp.ones(2) * u.mV, lambda w: w * (2. * u.siemens))
    assert u.get_unit(y).has_same_dim(u.mA)
    np.testing.assert_allclose(u.Quantity(y).to_decimal(u.mA), [2., 2.])

  def test_unit_aware_fn_to_unitless(self):
    y = etp.element_wise(jnp.array([0., 1.]) * u.mV,
                         lambda w: u.math.tanh(w / u.mV))
    assert isinstance(y, jax.Array)
    np.testing.assert_allclose(y, jnp.tanh(jnp.array([0., 1.])), rtol=1e-6)

  def test_grad_through_units(self):
    f = lambda m: u.get_mantissa(etp.element_wise(m * u.mV, lambda w: w ** 2))
    got = jax.grad(lambda m: f(m).sum())(jnp.array([1., 3.]))
    np.testing.assert_allclose(got, [2., 6.])

  def test_unitless_returns_array(self):
    assert isinstance(etp.element_wise(jnp.ones(2)), jax.Array)
