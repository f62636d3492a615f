"""Convolution: per-position traces, exact D-RTRL, layouts, errors and units."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u

import etp
from etp._src import conv as conv_mod
from etp_testing._src import executor

TOL = {jnp.float32: 2e-5, jnp.float64: 1e-10}


@pytest.fixture
def x64():
  old = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  yield
  jax.config.update('jax_enable_x64', old)


def _params(x, kernel, **kwargs):
  eqns = jax.make_jaxpr(lambda a, b: etp.conv(a, b, **kwargs))(x, kernel)
  return dict(next(e for e in eqns.jaxpr.eqns
                   if e.primitive is etp.etp_conv_p).params)


class TestHandComputed:
  # 1-D, one channel in and out: y[p] = k0 x[p] + k1 x[p + 1] (VALID).
  x = jnp.array([[[1., 2., 3.]]])          # (N=1, C=1, W=3)
  k = jnp.array([[[10., 1.]]])             # (O=1, I=1, W=2)

  def params(self):
    return _params(self.x, self.k, padding='VALID')

  def test_forward(self):
    np.testing.assert_allclose(etp.conv(self.x, self.k, padding='VALID'),
                               [[[12., 23.]]])

  def test_xy_to_dw(self):
    g = jnp.array([[[1., -1.]]])
    dw = etp.rules_of(etp.etp_conv_p).xy_to_dw(
        self.x, g, {'weight': self.k}, **self.params())
    # dk0 = x0 g0 + x1 g1 = 1 - 2, dk1 = x1 g0 + x2 g1 = 2 - 3
    np.testing.assert_allclose(dw['weight'], [[[-1., -1.]]])

  def test_instant_keeps_positions(self):
    g = jnp.array([[[1., 2.]]])
    inst = etp.rules_of(etp.etp_conv_p).instant_drtrl(
        self.x, g, {'weight': self.k}, **self.params())
    # (*y_shape, I, W) = (1, 1, 2, 1, 2): g[p] * (x[p], x[p + 1])
    assert inst['weight'].shape == (1, 1, 2, 1, 2)
    np.testing.assert_allclose(inst['weight'][0, 0, :, 0],
                               [[1., 2.], [4., 6.]])

  def test_solve_sums_positions_into_kernel_shape(self):
    trace = {'weight': jnp.ones((1, 1, 2, 1, 2))}
    c = jnp.array([[[1., 3.]]])
    solved = etp.rules_of(etp.etp_conv_p).solve_drtrl(c, trace,
                                                      **self.params())
    np.testing.assert_allclose(solved['weight'], [[[4., 4.]]])


CASES = [
    dict(x=(2, 2, 5), k=(3, 2, 2), kw=dict(strides=1, padding='SAME')),
    dict(x=(1, 1, 5), k=(2, 1, 3), kw=dict(strides=2, padding='VALID',
                                          rhs_dilation=2)),
    dict(x=(2, 4, 4, 2), k=(2, 2, 2, 3),
         kw=dict(padding='SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))),
    dict(x=(1, 2, 4, 5), k=(2, 2, 3, 2),
         kw=dict(strides=(2, 1), padding=((1, 0), (0, 1)))),
    dict(x=(1, 1, 3, 3, 3), k=(2, 1, 2, 2, 2), kw=dict(padding='SAME')),
]


@pytest.mark.parametrize('case', CASES, ids=lambda c: f"x{c['x']}")
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.float64])
@pytest.mark.parametrize('n_state', [1, 2])
@pytest.mark.parametrize('bias', [False, True])
def test_drtrl_exact(x64, case, dtype, n_state, bias):
  keys = jax.random.split(jax.random.PRNGKey(1), 6)
  steps = 3
  xs = jax.random.normal(keys[0], (steps,) + case['x'], dtype)
  kernel = jax.random.normal(keys[1], case['k'], dtype)
  params = _params(xs[0], kernel, **case['kw'])
  params['has_bias'] = bias
  y = jax.eval_shape(lambda: etp.etp_conv_p.bind(
      xs[0], kernel, *([jnp.zeros(case['k'][0] if case['kw'].get(
          'dimension_numbers') is None else case['k'][-1], dtype)]
                       if bias else []), **params))
  ops = [xs[0], kernel]
  if bias:
    n_out = case['k'][-1] if case['kw'].get('dimension_numbers') else \
        case['k'][0]
    ops.append(jax.random.normal(keys[2], (n_out,), dtype))
  shape = (steps,) + y.shape
  A = 0.5 * jax.random.normal(keys[3], shape + (n_state, n_state), dtype)
  Bf = jax.random.normal(keys[4], shape + (n_state,), dtype)
  C = jax.random.normal(keys[5], shape + (n_state,), dtype)
  run = jax.jit(lambda ops, xs, A, Bf, C: (
      executor.drtrl_gradient(etp.etp_conv_p, ops, params, xs, A, Bf, C),
      executor.autodiff_gradient(etp.etp_conv_p, ops, params, xs, A, Bf, C)))
  got, want = run(ops, xs, A, Bf, C)
  for k in want:
    err = jnp.max(jnp.abs(got[k] - want[k])) / jnp.max(jnp.abs(want[k]))
    assert err < TOL[dtype], (k, float(err))


def test_kernel_shaped_trace_is_wrong(x64):
  """Why instant/solve exist: the default weight-shaped trace is far off."""
  import dataclasses
  keys = jax.random.split(jax.random.PRNGKey(2), 6)
  xs = jax.random.normal(keys[0], (3, 1, 1, 5), jnp.float64)
  kernel = jax.random.normal(keys[1], (2, 1, 2), jnp.float64)
  params = _params(xs[0], kernel, padding='SAME')
  params['has_bias'] = False
  y = (1, 2, 5)
  A = 0.5 * jax.random.normal(keys[3], (3,) + y + (1, 1))
  Bf = jax.random.normal(keys[4], (3,) + y + (1,))
  C = jax.random.normal(keys[5], (3,) + y + (1,))
  rules = etp.rules_of(etp.etp_conv_p)

  def weight_init(x, y, w, n, **unused):
    return {'weight': jnp.zeros((1,) + kernel.shape + (n,))}

  def weight_link(g, trace, **unused):  # pretends each entry has one output
    return {'weight': trace['weight'] * g.sum(axis=(-1, -2))[..., None, None,
                                                              None]}

  naive = dataclasses.replace(rules, instant_drtrl=None, solve_drtrl=None,
                              init_drtrl=weight_init, yw_to_w=weight_link)
  got = executor.drtrl_gradient(etp.etp_conv_p, [xs[0], kernel], params, xs,
                                A, Bf, C, rules=naive)
  want = executor.autodiff_gradient(etp.etp_conv_p, [xs[0], kernel], params,
                                    xs, A, Bf, C)
  err = jnp.max(jnp.abs(got['weight'] - want['weight'])) / jnp.max(
      jnp.abs(want['weight']))
  assert err > 0.1


class TestTransformations:
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(2, 3, 6, 5), jnp.float32)
  k = jnp.asarray(rng.randn(4, 3, 3, 2), jnp.float32)
  b = jnp.asarray(rng.randn(4), jnp.float32)

  @staticmethod
  def plain(x, k, b):
    y = jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME')
    return y + b.reshape(1, -1, 1, 1)

  def test_jit_grad_jvp(self):
    ours = lambda x, k, b: etp.conv(x, k, b)
    np.testing.assert_allclose(jax.jit(ours)(self.x, self.k, self.b),
                               self.plain(self.x, self.k, self.b), rtol=1e-5,
                               atol=1e-5)
    loss = lambda f: lambda k, b: jnp.sum(jnp.sin(f(self.x, k, b)))
    for got, want in zip(jax.grad(loss(ours), (0, 1))(self.k, self.b),
                         jax.grad(loss(self.plain), (0, 1))(self.k, self.b)):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    t = (self.x, self.k, self.b)
    np.testing.assert_allclose(jax.jvp(ours, t, t)[1],
                               jax.jvp(self.plain, t, t)[1], rtol=1e-4,
                               atol=1e-4)

  @pytest.mark.parametrize('in_axes', [(0, None, None), (1, None, None),
                                       (None, 0, None), (0, 0, 0)])
  def test_vmap(self, in_axes):
    ours = lambda x, k, b: etp.conv(x, k, b)
    args = [self.x, self.k, self.b]
    batched = [a if ax is None else jnp.moveaxis(jnp.stack([a, -a]), 0, ax)
               for a, ax in zip(args, in_axes)]
    np.testing.assert_allclose(jax.vmap(ours, in_axes)(*batched),
                               jax.vmap(self.plain, in_axes)(*batched),
                               rtol=1e-4, atol=1e-4)

  def test_lowers_to_the_same_operations(self):
    def ops(f):
      text = jax.jit(f).lower(self.x, self.k, self.b).as_text()
      return collections.Counter(t.split('(')[0] for t in text.split()
                                 if t.startswith('stablehlo.'))
    assert ops(lambda x, k, b: etp.conv(x, k, b)) == ops(self.plain)


class TestErrorsAndUnits:

  def test_rank(self):
    with pytest.raises(ValueError, match=r'conv: `x` must have shape'):
      etp.conv(jnp.ones((2, 3)), jnp.ones((2, 3)))

  def test_kernel_rank(self):
    with pytest.raises(ValueError, match=r'`kernel` must have shape rank 4'):
      etp.conv(jnp.ones((1, 2, 4, 4)), jnp.ones((2, 2, 3)))

  def test_channels(self):
    with pytest.raises(ValueError, match=r'`kernel` has 3 input channels'):
      etp.conv(jnp.ones((1, 2, 4)), jnp.ones((2, 3, 3)))

  def test_bias_shape(self):
    with pytest.raises(ValueError, match=r'`bias` must have shape \(2,\)'):
      etp.conv(jnp.ones((1, 2, 4)), jnp.ones((2, 2, 3)), jnp.ones(3))

  def test_batch_not_leading(self):
    with pytest.raises(ValueError, match='batch axis must come first'):
      etp.conv(jnp.ones((4, 1, 2)), jnp.ones((2, 2, 3)),
               dimension_numbers=('WNC', 'OIW', 'NCW'))

  def test_units(self):
    y = etp.conv(jnp.ones((1, 1, 4)) * u.mV, jnp.ones((1, 1, 2)) * u.siemens,
                 jnp.ones(1) * u.mA)
    assert u.get_unit(y) == u.mA
    with pytest.raises(u.UnitMismatchError, match='`bias` has unit'):
      etp.conv(jnp.ones((1, 1, 4)) * u.mV, jnp.ones((1, 1, 2)) * u.siemens,
               jnp.ones(1) * u.mV)


def test_module_documents_memory_price():
  assert 'Memory price' in conv_mod.__doc__
