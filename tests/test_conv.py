"""Convolution: per-position traces, exact D-RTRL, layouts, errors and units."""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u

import etp
from etp._src import conv as conv_mod
from etp_testing._src import executor

TOL = {jnp.float32: 2e-5, jnp.float64: 1e-10}
f32, f64 = jnp.float32, jnp.float64


def rules():
  return etp.rules_of(etp.etp_conv_p)


def _params(x, kernel, **kwargs):
  """The bind params ``etp.conv`` normalises ``kwargs`` to."""
  eqns = jax.make_jaxpr(lambda a, b: etp.conv(a, b, **kwargs))(x, kernel)
  return dict(next(e for e in eqns.jaxpr.eqns
                   if e.primitive is etp.etp_conv_p).params)


def _n_out(kernel_shape, dimension_numbers=None):
  dn = jax.lax.conv_dimension_numbers((1,) * len(kernel_shape), kernel_shape,
                                      dimension_numbers)
  return kernel_shape[dn.rhs_spec[0]]


def _normal(rng, shape, dtype):
  # numpy draws: jax.random would compile a kernel for every new shape.
  return jnp.asarray(rng.standard_normal(shape), dtype)


def _rel_err(got, want):
  return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


class TestHandComputed:
  """1-D, one channel in and out: ``y[p] = 10 x[p] + x[p + 1]`` (VALID)."""
  x = jnp.array([[[1., 2., 3.]]])          # (N=1, C=1, W=3)
  k = jnp.array([[[10., 1.]]])             # (O=1, I=1, W=2)
  b = jnp.array([0.5])

  def params(self, has_bias=False):
    return dict(_params(self.x, self.k, padding='VALID'), has_bias=has_bias)

  def test_forward(self):
    np.testing.assert_allclose(etp.conv(self.x, self.k, padding='VALID'),
                               [[[12., 23.]]])
    np.testing.assert_allclose(
        etp.conv(self.x, self.k, self.b, padding='VALID'), [[[12.5, 23.5]]])

  @pytest.mark.parametrize('x_dtype,k_dtype', [
      (jnp.bfloat16, jnp.float32), (jnp.float32, jnp.bfloat16)])
  def test_mixed_precision_computes_in_the_common_dtype(self, x_dtype,
                                                        k_dtype):
    # lax.conv takes one dtype; the primitive, like ``@``, promotes.
    y = etp.etp_conv_p.bind(self.x.astype(x_dtype), self.k.astype(k_dtype),
                            **self.params())
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, [[[12., 23.]]])

  def test_xy_to_dw(self):
    g = jnp.array([[[1., -1.]]])
    dw = rules().xy_to_dw(self.x, g, {'weight': self.k, 'bias': self.b},
                          **self.params(True))
    # dk0 = x0 g0 + x1 g1 = 1 - 2, dk1 = x1 g0 + x2 g1 = 2 - 3, db = g0 + g1
    np.testing.assert_allclose(dw['weight'], [[[-1., -1.]]])
    np.testing.assert_allclose(dw['bias'], [0.])

  def test_instant_keeps_positions(self):
    g = jnp.array([[[1., 2.]]])
    inst = rules().instant_drtrl(self.x, g, {'weight': self.k, 'bias': self.b},
                                 **self.params(True))
    # (*y_shape, I, W) = (1, 1, 2, 1, 2): g[p] * (x[p], x[p + 1])
    assert inst['weight'].shape == (1, 1, 2, 1, 2)
    np.testing.assert_allclose(inst['weight'][0, 0, :, 0],
                               [[1., 2.], [4., 6.]])
    np.testing.assert_allclose(inst['bias'], g)

  def test_yw_to_w_picks_g_at_each_entry_position(self):
    trace = {'weight': jnp.ones((1, 1, 2, 1, 2)), 'bias': jnp.ones((1, 1, 2))}
    g = jnp.array([[[2., 3.]]])
    out = rules().yw_to_w(g, trace, **self.params(True))
    np.testing.assert_allclose(out['weight'][0, 0, :, 0], [[2., 2.], [3., 3.]])
    np.testing.assert_allclose(out['bias'], [[[2., 3.]]])
    # Extra leading axes broadcast: each slice on its own gives the same.
    g2 = jnp.stack([g, -g])
    t2 = jax.tree.map(lambda t: jnp.stack([t, 2 * t]), trace)
    out2 = rules().yw_to_w(g2, t2, **self.params(True))
    np.testing.assert_allclose(out2['weight'][1], -2 * out['weight'])

  def test_solve_sums_positions_into_kernel_shape(self):
    trace = {'weight': jnp.ones((1, 1, 2, 1, 2)), 'bias': jnp.ones((1, 1, 2))}
    c = jnp.array([[[1., 3.]]])
    solved = rules().solve_drtrl(c, trace, **self.params(True))
    np.testing.assert_allclose(solved['weight'], [[[4., 4.]]])
    np.testing.assert_allclose(solved['bias'], [4.])
    # An extra leading axis is summed too.
    solved2 = rules().solve_drtrl(jnp.stack([c, c]),
                                  jax.tree.map(lambda t: jnp.stack([t, t]),
                                               trace), **self.params(True))
    np.testing.assert_allclose(solved2['weight'], [[[8., 8.]]])
    np.testing.assert_allclose(solved2['bias'], [8.])

  def test_init_rules(self):
    x_var, y_var, w_vars = executor.jaxpr_vars(
        etp.etp_conv_p, [self.x, self.k, self.b], self.params(True))
    init = rules().init_drtrl(x_var, y_var, w_vars, 3, **self.params(True))
    assert init['weight'].shape == (1, 1, 2, 1, 2, 3)
    assert init['bias'].shape == (1, 1, 2, 3)
    assert all(v.dtype == jnp.float32 and not v.any() for v in init.values())
    pp = rules().init_pp(x_var, y_var, w_vars, 2)
    assert pp.shape == (1, 1, 2, 2) and pp.dtype == jnp.float32


class TestHandComputedChannelsLast:
  """NWC/WIO, two output channels: ``O`` is the kernel's last axis."""
  x = jnp.array([[[1.], [2.], [3.]]])                  # (N=1, W=3, C=1)
  k = jnp.array([[[10., 0.]], [[1., 1.]]])             # (W=2, I=1, O=2)
  dn = ('NWC', 'WIO', 'NWC')

  def params(self):
    return dict(_params(self.x, self.k, padding='VALID',
                        dimension_numbers=self.dn), has_bias=False)

  def test_forward(self):
    # y[p, 0] = 10 x[p] + x[p + 1], y[p, 1] = x[p + 1]
    np.testing.assert_allclose(
        etp.conv(self.x, self.k, padding='VALID', dimension_numbers=self.dn),
        [[[12., 2.], [23., 3.]]])

  def test_rules(self):
    g = jnp.array([[[1., 0.], [0., 1.]]])               # (N, W_out, O)
    w = {'weight': self.k}
    # dK[w, 0, o] = sum_p g[p, o] x[p + w]
    np.testing.assert_allclose(
        rules().xy_to_dw(self.x, g, w, **self.params())['weight'][:, 0],
        [[1., 2.], [2., 3.]])
    inst = rules().instant_drtrl(self.x, g, w, **self.params())
    # (*y_shape, W, I): y's layout first, then the kernel without O.
    assert inst['weight'].shape == (1, 2, 2, 2, 1)
    np.testing.assert_allclose(inst['weight'][0, :, :, :, 0],
                               [[[1., 2.], [0., 0.]], [[0., 0.], [2., 3.]]])
    solved = rules().solve_drtrl(jnp.ones_like(g), inst, **self.params())
    assert solved['weight'].shape == self.k.shape
    np.testing.assert_allclose(solved['weight'][:, 0], [[1., 2.], [2., 3.]])
    x_var, y_var, w_vars = executor.jaxpr_vars(
        etp.etp_conv_p, [self.x, self.k], self.params())
    init = rules().init_drtrl(x_var, y_var, w_vars, 2, **self.params())
    assert init['weight'].shape == (1, 2, 2, 2, 1, 2)


# (id, x shape, kernel shape, conv kwargs, n_state, bias), each run in float32
# and float64.  Together: 1-D/2-D/3-D, strides 1 and 2, SAME/VALID/explicit
# padding, dilation 1 and 2, channels-first, channels-last and mixed layouts,
# batch 1 and 2, n_state 1 and 2, with and without bias.
CASES = [
    ('1d-same', (2, 2, 5), (3, 2, 2), dict(), 2, True),
    ('1d-valid-s2-d2', (1, 1, 5), (2, 1, 3),
     dict(strides=2, padding='VALID', rhs_dilation=2), 1, False),
    ('1d-nwc-s2-d2', (2, 5, 2), (2, 2, 3),
     dict(strides=2, rhs_dilation=2, dimension_numbers=('NWC', 'WIO', 'NWC')),
     1, True),
    ('2d-nhwc-same', (2, 4, 4, 2), (2, 2, 2, 3),
     dict(dimension_numbers=('NHWC', 'HWIO', 'NHWC')), 2, True),
    ('2d-s21-pairs', (1, 2, 4, 5), (2, 2, 3, 2),
     dict(strides=(2, 1), padding=((1, 0), (0, 1))), 2, False),
    ('2d-valid-d21', (2, 1, 5, 4), (2, 1, 2, 2),
     dict(padding='VALID', rhs_dilation=(2, 1)), 1, True),
    ('2d-mixed-layouts-s2', (2, 2, 4, 4), (2, 2, 2, 3),
     dict(strides=2, dimension_numbers=('NCHW', 'HWIO', 'NHWC')), 2, True),
    ('2d-same-s2', (1, 3, 5, 4), (1, 3, 3, 2), dict(strides=2), 2, False),
    ('3d-same', (1, 1, 3, 3, 3), (2, 1, 2, 2, 2), dict(), 2, True),
    ('3d-ndhwc-valid-s2', (2, 3, 3, 4, 1), (2, 2, 2, 1, 2),
     dict(strides=2, padding='VALID',
          dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC')), 1, False),
]


def _operands(case, dtype, seed=0):
  _, x_shape, k_shape, kw, _, bias = case
  rng = np.random.RandomState(seed)
  ops = [_normal(rng, x_shape, dtype), _normal(rng, k_shape, dtype)]
  if bias:
    ops.append(_normal(
        rng, (_n_out(k_shape, kw.get('dimension_numbers')),), dtype))
  params = dict(_params(ops[0], ops[1], **kw), has_bias=bias)
  return ops, params


# Each geometry once, in float32 and float64 by turns (both dtypes of every
# geometry took about 3 % of the suite on 2 cores; the harness's drtrl.exact
# runs generated cases in both).
@pytest.mark.parametrize('case,dtype', [
    (case, (f32, f64)[i % 2]) for i, case in enumerate(CASES)],
    ids=[f'{c[0]}-{("f32", "f64")[i % 2]}' for i, c in enumerate(CASES)])
def test_drtrl_exact(x64, case, dtype):
  n_state = case[4]
  ops, params = _operands(case, dtype)
  steps = 3
  rng = np.random.RandomState(1)
  xs = _normal(rng, (steps,) + ops[0].shape, dtype)
  y_shape = jax.eval_shape(lambda: etp.etp_conv_p.bind(*ops, **params)).shape
  shape = (steps,) + y_shape
  A = 0.5 * _normal(rng, shape + (n_state, n_state), dtype)
  Bf = _normal(rng, shape + (n_state,), dtype)
  C = _normal(rng, shape + (n_state,), dtype)
  run = jax.jit(lambda ops, xs, A, Bf, C: (
      executor.drtrl_gradient(etp.etp_conv_p, ops, params, xs, A, Bf, C),
      executor.autodiff_gradient(etp.etp_conv_p, ops, params, xs, A, Bf, C)))
  got, want = run(ops, xs, A, Bf, C)
  assert set(got) == set(want) == ({'weight', 'bias'} if case[5]
                                   else {'weight'})
  for k in want:
    assert got[k].shape == want[k].shape and got[k].dtype == dtype
    assert _rel_err(got[k], want[k]) < TOL[dtype], k


@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_instant_solve_consistent_with_xy_to_dw(x64, case):
  """``solve(c, instant(x, g, w)) == xy_to_dw(x, c*g, w) == VJP``; shapes agree
  with ``init_drtrl``."""
  ops, params = _operands(case, f64, seed=3)
  x, weights, rule_params = etp.etp_conv_p.split_operands(ops, params)
  y = etp.etp_conv_p.bind(*ops, **params)
  g, c = _normal(np.random.RandomState(4), (2,) + y.shape, f64)
  r = rules()
  inst = r.instant_drtrl(x, g, weights, **rule_params)
  solved = r.solve_drtrl(c, inst, **rule_params)
  dw = r.xy_to_dw(x, c * g, weights, **rule_params)
  impl = lambda w: etp.etp_conv_p.impl_fn(
      *executor.with_weights(etp.etp_conv_p, ops, params, w), **params)
  vjp = jax.vjp(impl, weights)[1](c * g)[0]
  init = r.init_drtrl(*executor.jaxpr_vars(etp.etp_conv_p, ops, params), 2,
                      **rule_params)
  for k in weights:
    assert inst[k].shape == init[k].shape[:-1]
    assert solved[k].shape == dw[k].shape == weights[k].shape
    np.testing.assert_allclose(solved[k], dw[k], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw[k], vjp[k], rtol=1e-12, atol=1e-12)


def test_kernel_shaped_trace_is_wrong(x64):
  """Why instant/solve exist: a kernel-shaped trace is far off.

  The defaults (``instant = xy_to_dw`` per example, ``solve = yw_to_w`` then a
  sum) with a kernel-shaped trace must pick ONE ``g`` per kernel element, but
  the element reaches every position; here it takes the positions' mean.
  """
  steps = 3
  rng = np.random.RandomState(2)
  xs = _normal(rng, (steps, 1, 1, 5), f64)
  kernel = _normal(rng, (2, 1, 2), f64)
  params = dict(_params(xs[0], kernel), has_bias=False)
  y = (1, 2, 5)
  A = 0.5 * _normal(rng, (steps,) + y + (1, 1), f64)
  Bf = _normal(rng, (steps,) + y + (1,), f64)
  C = _normal(rng, (steps,) + y + (1,), f64)

  def kernel_shaped_init(x, y, w, n, **unused):
    return {'weight': jnp.zeros((1,) + kernel.shape + (n,), f64)}

  def position_mean_link(g, trace, **unused):   # g (..., O, W) -> (..., O, 1, 1)
    return {'weight': g.mean(-1)[..., None, None] * trace['weight']}

  naive = dataclasses.replace(rules(), instant_drtrl=None, solve_drtrl=None,
                              init_drtrl=kernel_shaped_init,
                              yw_to_w=position_mean_link)
  ops = [xs[0], kernel]
  got = executor.drtrl_gradient(etp.etp_conv_p, ops, params, xs, A, Bf, C,
                                rules=naive)
  want = executor.autodiff_gradient(etp.etp_conv_p, ops, params, xs, A, Bf, C)
  exact = executor.drtrl_gradient(etp.etp_conv_p, ops, params, xs, A, Bf, C)
  assert _rel_err(got['weight'], want['weight']) > 0.1
  assert _rel_err(exact['weight'], want['weight']) < 1e-10


class TestTransformations:
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, 3, 6, 5), jnp.float32)
  k = jnp.asarray(rng.randn(4, 3, 3, 2), jnp.float32)
  b = jnp.asarray(rng.randn(4), jnp.float32)

  @staticmethod
  def plain(x, k, b):
    y = jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME')
    return y + b.reshape(1, -1, 1, 1)

  @staticmethod
  def ours(x, k, b):
    return etp.conv(x, k, b)

  def test_jit_grad_jvp(self):
    np.testing.assert_allclose(jax.jit(self.ours)(self.x, self.k, self.b),
                               self.plain(self.x, self.k, self.b), rtol=1e-5,
                               atol=1e-5)
    loss = lambda f: lambda x, k, b: jnp.sum(jnp.sin(f(x, k, b)))
    for got, want in zip(
        jax.grad(loss(self.ours), (0, 1, 2))(self.x, self.k, self.b),
        jax.grad(loss(self.plain), (0, 1, 2))(self.x, self.k, self.b)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    t = (self.x, self.k, self.b)
    np.testing.assert_allclose(jax.jvp(self.ours, t, t)[1],
                               jax.jvp(self.plain, t, t)[1], rtol=1e-4,
                               atol=1e-4)

  @pytest.mark.parametrize('in_axes', [(0, None, None), (1, None, None),
                                       (-1, None, None), (None, 0, None),
                                       (None, -1, 0), (0, 0, 0),
                                       (2, None, -1)])
  def test_vmap(self, in_axes):
    args = [self.x, self.k, self.b]
    batched = [a if ax is None else jnp.moveaxis(jnp.stack([a, -a]), 0, ax)
               for a, ax in zip(args, in_axes)]
    np.testing.assert_allclose(jax.vmap(self.ours, in_axes)(*batched),
                               jax.vmap(self.plain, in_axes)(*batched),
                               rtol=1e-4, atol=1e-4)

  def test_vmap_over_x_folds_into_the_batch(self):
    xs = jnp.stack([self.x, -self.x])
    jaxpr = jax.make_jaxpr(jax.vmap(lambda x: self.ours(x, self.k, self.b)))(xs)
    assert etp.etp_conv_p in [e.primitive for e in jaxpr.jaxpr.eqns]

  @staticmethod
  def _op_counts(f, *args):
    text = jax.jit(f).lower(*args).as_text()
    return collections.Counter(t.split('(')[0] for t in text.split()
                               if t.startswith('stablehlo.'))

  def test_lowers_to_the_same_operations(self):
    assert (self._op_counts(self.ours, self.x, self.k, self.b) ==
            self._op_counts(self.plain, self.x, self.k, self.b))

  def test_lowers_to_the_same_operations_channels_last(self):
    dn = ('NHWC', 'HWIO', 'NHWC')
    x, k = jnp.moveaxis(self.x, 1, -1), jnp.moveaxis(self.k, (0, 1), (3, 2))
    ours = lambda x, k: etp.conv(x, k, strides=2, padding='VALID',
                                 dimension_numbers=dn)
    plain = lambda x, k: jax.lax.conv_general_dilated(
        x, k, (2, 2), 'VALID', dimension_numbers=dn)
    np.testing.assert_allclose(ours(x, k), plain(x, k), rtol=1e-5, atol=1e-5)
    assert self._op_counts(ours, x, k) == self._op_counts(plain, x, k)


class TestParams:

  def test_normalised_and_hashable(self):
    params = _params(jnp.ones((1, 2, 5)), jnp.ones((3, 2, 2)), strides=2,
                     padding=[[1, 0]], rhs_dilation=[2],
                     dimension_numbers=['NCW', 'OIW', 'NCW'])
    assert params == dict(window_strides=(2,), padding=((1, 0),),
                          rhs_dilation=(2,),
                          dimension_numbers=('NCW', 'OIW', 'NCW'),
                          has_bias=False)
    hash(tuple(sorted(params.items())))
    assert _params(jnp.ones((1, 2, 5, 5)), jnp.ones((3, 2, 2, 2)),
                   padding='same')['padding'] == 'SAME'

  def test_mixed_dtypes_promote(self, x64):
    y = etp.conv(jnp.ones((1, 2, 4), f32), jnp.ones((3, 2, 2), f64))
    assert y.dtype == f64


class TestErrorsAndUnits:

  def test_rank(self):
    with pytest.raises(ValueError, match=r'conv: `x` must have shape'):
      etp.conv(jnp.ones((2, 3)), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r'conv: `x` must have shape'):
      etp.conv(jnp.ones((1, 1, 2, 2, 2, 2)), jnp.ones((1, 1, 2, 2, 2, 2)))

  def test_kernel_rank(self):
    with pytest.raises(ValueError, match=r'`kernel` must have shape rank 4'):
      etp.conv(jnp.ones((1, 2, 4, 4)), jnp.ones((2, 2, 3)))

  def test_channels(self):
    with pytest.raises(ValueError, match=r'`kernel` has 3 input channels'):
      etp.conv(jnp.ones((1, 2, 4)), jnp.ones((2, 3, 3)))
    with pytest.raises(ValueError, match=r'`kernel` has 3 input channels'):
      etp.conv(jnp.ones((1, 4, 2)), jnp.ones((3, 3, 2)),
               dimension_numbers=('NWC', 'WIO', 'NWC'))

  def test_bias_shape(self):
    with pytest.raises(ValueError, match=r'`bias` must have shape \(2,\)'):
      etp.conv(jnp.ones((1, 2, 4)), jnp.ones((2, 2, 3)), jnp.ones(3))
    with pytest.raises(ValueError, match=r'`bias` must have shape \(2,\)'):
      etp.conv(jnp.ones((1, 2, 4)), jnp.ones((2, 2, 3)), jnp.ones((1, 2)))

  def test_batch_not_leading(self):
    with pytest.raises(ValueError, match='batch axis must come first'):
      etp.conv(jnp.ones((4, 1, 2)), jnp.ones((2, 2, 3)),
               dimension_numbers=('WNC', 'OIW', 'NCW'))

  def test_dimension_numbers(self):
    with pytest.raises(TypeError, match='three layout strings'):
      etp.conv(jnp.ones((1, 2, 4)), jnp.ones((2, 2, 3)),
               dimension_numbers='NCW')
    with pytest.raises(ValueError, match='do not fit x of rank 3'):
      etp.conv(jnp.ones((1, 2, 4)), jnp.ones((2, 2, 3)),
               dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def test_strides_padding_dilation(self):
    x, k = jnp.ones((1, 2, 4, 4)), jnp.ones((2, 2, 3, 3))
    with pytest.raises(ValueError, match=r'`strides` must be .* 2 positive'):
      etp.conv(x, k, strides=(1, 1, 1))
    with pytest.raises(ValueError, match='`strides` must be'):
      etp.conv(x, k, strides=0)
    with pytest.raises(TypeError, match='`rhs_dilation` must be'):
      etp.conv(x, k, rhs_dilation=1.5)
    with pytest.raises(ValueError, match=r"`padding` must be 'SAME'"):
      etp.conv(x, k, padding='FULL')
    with pytest.raises(ValueError, match=r'2 \(low, high\) int pairs'):
      etp.conv(x, k, padding=((1, 1),))
    with pytest.raises(TypeError, match=r'`padding` must be'):
      etp.conv(x, k, padding=((1,), (1,)))

  def test_not_floating(self):
    with pytest.raises(TypeError, match='`x` must be floating point'):
      etp.conv(jnp.ones((1, 2, 4), jnp.int32), jnp.ones((2, 2, 3)))

  def test_units(self):
    y = etp.conv(jnp.ones((1, 1, 4)) * u.mV, jnp.ones((1, 1, 2)) * u.siemens,
                 jnp.ones(1) * u.uA)
    assert u.get_unit(y) == u.mA
    # SAME with a window of 2 pads one zero on the right: x[p] + x[p + 1].
    np.testing.assert_allclose(u.get_mantissa(y),
                               [[[2.001, 2.001, 2.001, 1.001]]], rtol=1e-6)
    with pytest.raises(u.UnitMismatchError, match='`bias` has unit'):
      etp.conv(jnp.ones((1, 1, 4)) * u.mV, jnp.ones((1, 1, 2)) * u.siemens,
               jnp.ones(1) * u.mV)


def test_module_documents_memory_price():
  assert 'Memory price' in conv_mod.__doc__
  assert 'B * prod(spatial_out) * S' in conv_mod.__doc__
