"""Sparse matmul: hand-computed rules, exact D-RTRL, JAX, errors, units."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import saiunit as u
from jax.experimental import sparse as jsparse

import etp
from etp_testing._src import executor
from etp_testing._src.context import x64_enabled

TOL = {jnp.float32: 2e-5, jnp.float64: 1e-10}

# (shape, indices): each pattern has an empty row and an empty column.
PATTERNS = {
    # in=3, out=5: row 1 and column 2 hold nothing.
    'wide': ((3, 5), [[0, 0], [0, 3], [2, 1], [2, 4], [0, 4], [2, 0]]),
    # in=5, out=3: row 2 and column 2 hold nothing; unsorted entries.
    'tall': ((5, 3), [[4, 1], [0, 1], [3, 0], [1, 0], [1, 1]]),
}


def rules(prim=None):
  return etp.rules_of(prim or etp.etp_sp_mm_p)


def dense_of(data, indices, shape):
  """The dense matrix the pattern stands for (plain JAX, no sparse module)."""
  indices = jnp.asarray(indices)
  return jnp.zeros(shape, data.dtype).at[indices[:, 0], indices[:, 1]].set(data)


def random_pattern(rng, shape, nnz):
  flat = rng.choice(shape[0] * shape[1], size=nnz, replace=False)
  return np.stack([flat // shape[1], flat % shape[1]], axis=1).astype(np.int32)


def test_registration():
  for prim, batched in ((etp.etp_sp_mv_p, False), (etp.etp_sp_mm_p, True)):
    assert prim.batched is batched and prim.x_invar_index == 0
    assert prim.trainable_invars({'has_bias': True}) == {'weight': 1, 'bias': 3}
    assert prim.trainable_invars({'has_bias': False}) == {'weight': 1}
    assert dict(prim.aux_invars_fn({'has_bias': True})) == {'indices': 2}
    assert rules(prim).has_rules
  assert etp.etp_sp_mv_p.batched_counterpart is etp.etp_sp_mm_p


class TestHandComputedRules:
  # shape (3, 4): row 1 and column 2 are empty.
  indices = jnp.array([[0, 1], [2, 0], [0, 3]])
  params = dict(indices=indices, shape=(3, 4))
  x = jnp.array([[1., 2., 3.], [-1., 0., 2.]])           # (B=2, in=3)
  g = jnp.array([[1., 2., 3., 4.], [0., -1., 1., 2.]])   # (B=2, out=4)
  w = {'weight': jnp.zeros(3), 'bias': jnp.zeros(4)}

  def test_xy_to_dw_sums_batch(self):
    dw = rules().xy_to_dw(self.x, self.g, self.w, has_bias=True,
                          **self.params)
    # e0 (0,1): 1*2 + -1*-1 = 3;  e1 (2,0): 3*1 + 2*0 = 3;  e2 (0,3): 1*4 - 2 = 2
    np.testing.assert_allclose(dw['weight'], [3., 3., 2.])
    np.testing.assert_allclose(dw['bias'], [1., 1., 4., 6.])

  def test_xy_to_dw_unbatched(self):
    dw = rules(etp.etp_sp_mv_p).xy_to_dw(self.x[0], self.g[0], self.w,
                                         has_bias=False, **self.params)
    assert set(dw) == {'weight'}
    np.testing.assert_allclose(dw['weight'], [2., 3., 4.])

  def test_xy_to_dw_is_the_vjp(self):
    data = jnp.array([.5, -1., 2.])
    f = lambda d, b: etp.etp_sp_mm_p.bind(self.x, d, self.indices, b,
                                           shape=(3, 4), has_bias=True)
    _, vjp = jax.vjp(f, data, self.w['bias'])
    want_w, want_b = vjp(self.g)
    got = rules().xy_to_dw(self.x, self.g, {'weight': data,
                                             'bias': self.w['bias']},
                           has_bias=True, **self.params)
    np.testing.assert_allclose(got['weight'], want_w, rtol=1e-6)
    np.testing.assert_allclose(got['bias'], want_b, rtol=1e-6)

  def test_xy_to_dw_casts_to_weight_dtype(self, x64):
    dw = rules().xy_to_dw(jnp.asarray(self.x, jnp.float64),
                          jnp.asarray(self.g, jnp.float64),
                          {'weight': jnp.zeros(3, jnp.float32)},
                          has_bias=False, **self.params)
    assert dw['weight'].dtype == jnp.float32

  def test_yw_to_w_picks_g_at_the_column(self):
    trace = {'weight': jnp.array([[1., 2., 3.], [4., 5., 6.]]),
             'bias': jnp.full((2, 4), 2.)}
    out = rules().yw_to_w(self.g, trace, has_bias=True, **self.params)
    # g at columns (1, 0, 3): example 0 -> (2, 1, 4), example 1 -> (-1, 0, 2).
    np.testing.assert_allclose(out['weight'], [[2., 2., 12.], [-4., 0., 12.]])
    np.testing.assert_allclose(out['bias'], 2. * self.g)

  def test_yw_to_w_extra_leading_axes(self):
    # Unbatched g (out,) against a trace with an extra leading axis.
    trace = {'weight': jnp.array([[1., 1., 1.], [0., 2., -1.]])}
    out = rules(etp.etp_sp_mv_p).yw_to_w(self.g[0], trace, has_bias=False,
                                         **self.params)
    np.testing.assert_allclose(out['weight'], [[2., 1., 4.], [0., 2., -4.]])
    # The batched rule under vmap (batch stripped) equals the rule with it.
    tr = {'weight': jnp.arange(6.).reshape(2, 3)}
    kept = rules().yw_to_w(self.g, tr, has_bias=False, **self.params)
    stripped = jax.vmap(lambda g, t: rules().yw_to_w(
        g, t, has_bias=False, **self.params))(self.g, tr)
    np.testing.assert_allclose(kept['weight'], stripped['weight'])

  @pytest.mark.parametrize('prim,lead', [(etp.etp_sp_mv_p, ()),
                                         (etp.etp_sp_mm_p, (4,))])
  def test_init_shapes_and_dtype(self, x64, prim, lead):
    x = jnp.ones(lead + (3,), jnp.float32)
    data = jnp.ones(3, jnp.float32)
    b = jnp.ones(4, jnp.float32)
    idx = jnp.asarray(self.indices, jnp.int64)   # must not promote the traces
    x_var, y_var, w_vars = executor.jaxpr_vars(
        prim, (x, data, idx, b), {'has_bias': True, 'shape': (3, 4)})
    tr = rules(prim).init_drtrl(x_var, y_var, w_vars, 2)
    assert set(tr) == {'weight', 'bias'}
    assert tr['weight'].shape == lead + (3, 2)
    assert tr['bias'].shape == lead + (4, 2)
    assert tr['weight'].dtype == tr['bias'].dtype == jnp.float32
    assert not jnp.any(tr['weight'])
    pp = rules(prim).init_pp(x_var, y_var, w_vars, 1)
    assert pp.shape == lead + (4, 1) and pp.dtype == jnp.float32


def _case(prim, batch, pattern, steps, n_state, dtype, bias, seed=0):
  shape, indices = pattern
  (n_in, n_out), nnz = shape, len(indices)
  keys = jax.random.split(jax.random.PRNGKey(seed), 6)
  lead = (batch,) if prim.batched else ()
  y = lead + (n_out,)
  xs = jax.random.normal(keys[0], (steps,) + lead + (n_in,), dtype)
  ops = [xs[0], jax.random.normal(keys[1], (nnz,), dtype),
         jnp.asarray(indices, jnp.int32).reshape(nnz, 2)]
  if bias:
    ops.append(jax.random.normal(keys[2], (n_out,), dtype))
  A = 0.5 * jax.random.normal(keys[3], (steps,) + y + (n_state, n_state), dtype)
  Bf = jax.random.normal(keys[4], (steps,) + y + (n_state,), dtype)
  C = jax.random.normal(keys[5], (steps,) + y + (n_state,), dtype)
  return ops, {'has_bias': bias, 'shape': shape}, xs, A, Bf, C


def _both_gradients(prim, ops, params, xs, A, Bf, C):
  """``(drtrl, autodiff)`` gradients; jitted, as eager dispatch is slow here."""
  both = lambda *a: tuple(fn(prim, a[0], params, *a[1:]) for fn in (
      executor.drtrl_gradient, executor.autodiff_gradient))
  return jax.jit(both)(ops, xs, A, Bf, C)


def _assert_close(got, want, tol):
  assert set(got) == set(want)
  for k in want:
    assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype
    if want[k].size == 0:
      continue
    err = jnp.max(jnp.abs(got[k] - want[k])) / jnp.max(jnp.abs(want[k]))
    assert err < tol, (k, float(err))


# Each layout, dtype, number of states and pattern, and most pairs of them
# (every pair would be 20 cases of 4-5 s each, a tenth of the suite; the
# harness's drtrl.exact covers the rest on generated cases).
@pytest.mark.parametrize('prim,batch,dtype,n_state,pattern,bias', [
    (etp.etp_sp_mv_p, None, jnp.float32, 1, 'wide', False),
    (etp.etp_sp_mv_p, None, jnp.float64, 2, 'tall', True),
    (etp.etp_sp_mm_p, 1, jnp.float64, 1, 'tall', True),
    (etp.etp_sp_mm_p, 1, jnp.float64, 2, 'wide', False),
    (etp.etp_sp_mm_p, 3, jnp.float32, 2, 'tall', True),
    (etp.etp_sp_mm_p, 3, jnp.float32, 1, 'wide', False),
    (etp.etp_sp_mm_p, 3, jnp.float64, 1, 'tall', True),
    (etp.etp_sp_mm_p, 3, jnp.float64, 2, 'wide', False)])
def test_drtrl_matches_autodiff(x64, dtype, prim, batch, n_state, pattern,
                                bias):
  ops, params, xs, A, Bf, C = _case(prim, batch, PATTERNS[pattern], 3,
                                    n_state, dtype, bias)
  got, want = _both_gradients(prim, ops, params, xs, A, Bf, C)
  _assert_close(got, want, TOL[dtype])


@pytest.mark.parametrize('density', [0.25, 1.0])
def test_drtrl_any_density(x64, density):
  rng = np.random.default_rng(1)
  shape = (6, 4)
  nnz = max(1, int(round(density * 24)))
  pattern = (shape, random_pattern(rng, shape, nnz))
  ops, params, xs, A, Bf, C = _case(etp.etp_sp_mm_p, 2, pattern, 4, 2,
                                    jnp.float64, True)
  got, want = _both_gradients(etp.etp_sp_mm_p, ops, params, xs, A, Bf, C)
  _assert_close(got, want, 1e-10)


def test_rules_with_an_empty_pattern(x64):
  # nnz = 0: every rule returns (lead, 0)-shaped leaves and the bias is intact.
  # (The reference executor cannot run this case: it reshapes the solved
  # leaves with a -1 axis, which is undefined for a zero-size weight.)
  ops, params, xs, A, Bf, C = _case(etp.etp_sp_mm_p, 2, ((3, 4), []), 1, 2,
                                    jnp.float64, True)
  r = rules()
  _, weights, rule_params = etp.etp_sp_mm_p.split_operands(ops, params)
  x_var, y_var, w_vars = executor.jaxpr_vars(etp.etp_sp_mm_p, ops, params)
  tr = r.init_drtrl(x_var, y_var, w_vars, 2)
  assert tr['weight'].shape == (2, 0, 2) and tr['bias'].shape == (2, 4, 2)
  dw = r.xy_to_dw(xs[0], Bf[0][..., 0], weights, **rule_params)
  assert dw['weight'].shape == (0,)
  np.testing.assert_allclose(dw['bias'], Bf[0][..., 0].sum(0))
  linked = r.yw_to_w(C[0][..., 0], jax.tree.map(lambda v: v[..., 0], tr),
                     **rule_params)
  assert linked['weight'].shape == (2, 0) and linked['bias'].shape == (2, 4)
  want = jax.grad(lambda b: jnp.sum(C[0][..., 0] * etp.etp_sp_mm_p.bind(
      xs[0], ops[1], ops[2], b, **params)))(ops[3])
  np.testing.assert_allclose(r.xy_to_dw(xs[0], C[0][..., 0], weights,
                                        **rule_params)['bias'], want)


@pytest.mark.parametrize('prim,batch', [(etp.etp_sp_mv_p, None),
                                        (etp.etp_sp_mm_p, 2)])
def test_pp_prop_exact_for_weight(x64, prim, batch):
  ops, params, xs, _, _, C = _case(prim, batch, PATTERNS['tall'], 3, 1,
                                   jnp.float64, True)
  C = C[..., 0]
  weights = {'weight': ops[1], 'bias': ops[3]}
  want = jax.grad(lambda w: executor.pp_loss(prim, ops, params, w, xs, C,
                                             0.7))(weights)
  got = executor.pp_gradient(prim, ops, params, xs, C, 0.7)
  np.testing.assert_allclose(got['weight'], want['weight'], rtol=1e-10)


class TestTransformations:
  shape, _idx = PATTERNS['wide']
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(4, 3), jnp.float32)
  data = jnp.asarray(rng.randn(6), jnp.float32)
  indices = jnp.asarray(_idx, jnp.int32)
  b = jnp.asarray(rng.randn(5), jnp.float32)

  @classmethod
  def ours(cls, x, data, indices, b):
    return etp.sparse_matmul(x, data, indices, cls.shape, b)

  @classmethod
  def plain(cls, x, data, indices, b):
    return x @ dense_of(data, indices, cls.shape) + b

  @classmethod
  def plain_bcoo(cls, x, data, indices, b):
    return x @ jsparse.BCOO((data, indices), shape=cls.shape) + b

  @property
  def args(self):
    return (self.x, self.data, self.indices, self.b)

  def test_eager_and_jit(self):
    want = self.plain(*self.args)
    np.testing.assert_allclose(self.ours(*self.args), want, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(self.ours)(*self.args), want, rtol=1e-6)
    np.testing.assert_allclose(self.ours(self.x[0], *self.args[1:]), want[0],
                               rtol=1e-6)

  def test_full_density_equals_dense_matmul(self):
    rows, cols = np.meshgrid(np.arange(3), np.arange(5), indexing='ij')
    idx = jnp.asarray(np.stack([rows.ravel(), cols.ravel()], 1))
    data = jnp.arange(15., dtype=jnp.float32) / 7.
    got = etp.sparse_matmul(self.x, data, idx, (3, 5))
    np.testing.assert_allclose(got, etp.matmul(self.x, data.reshape(3, 5)),
                               rtol=1e-6)

  def _stacked(self, i):
    a = self.args[i]
    if i == 2:   # the same pattern in other orders, and another pattern
      other = jnp.asarray([[1, 2], [0, 3], [2, 1], [1, 4], [0, 4], [2, 0]],
                          jnp.int32)
      return jnp.stack([a, a[::-1], other])
    return jnp.stack([a, 2 * a, -a])

  @pytest.mark.parametrize('in_axes', [
      (0, None, None, None), (1, None, None, None), (-1, None, None, None),
      (None, 0, None, None), (None, None, 0, None), (None, None, None, 0),
      (0, 0, None, None), (1, None, 0, 0), (0, 0, 0, 0)])
  def test_vmap(self, in_axes):
    batched = [a if ax is None else jnp.moveaxis(self._stacked(i), 0, ax)
               for i, (a, ax) in enumerate(zip(self.args, in_axes))]
    np.testing.assert_allclose(
        jax.vmap(self.ours, in_axes=in_axes)(*batched),
        jax.vmap(self.plain, in_axes=in_axes)(*batched), rtol=1e-5, atol=1e-6)

  def test_vmap_keeps_the_primitive(self):
    def names(f, *args):
      return [str(e.primitive) for e in jax.make_jaxpr(f)(*args).jaxpr.eqns]
    # mv mapped over x alone binds its batched counterpart mm.
    mv = lambda x: etp.sparse_matmul(x, self.data, self.indices, self.shape)
    assert 'etp_sp_mm' in names(jax.vmap(mv), self.x)
    np.testing.assert_allclose(jax.vmap(mv)(self.x),
                               self.plain(self.x, self.data, self.indices, 0.),
                               rtol=1e-6)
    # mm mapped over x alone folds the new axis into its batch axis.
    mm = lambda x: etp.sparse_matmul(x, self.data, self.indices, self.shape)
    xs = jnp.stack([self.x, -self.x])
    assert 'etp_sp_mm' in names(jax.vmap(mm), xs)
    np.testing.assert_allclose(jax.vmap(mm)(xs)[1], -mm(self.x), rtol=1e-6)

  def test_grad(self):
    loss = lambda f: lambda x, d, b: jnp.sum(jnp.tanh(f(x, d, self.indices, b)))
    got = jax.grad(loss(self.ours), (0, 1, 2))(self.x, self.data, self.b)
    want = jax.grad(loss(self.plain), (0, 1, 2))(self.x, self.data, self.b)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)

  def test_grad_with_traced_indices(self):
    # Under jit the indices are tracers: integer operands are closed over.
    loss = lambda f: jax.jit(lambda d, i: jnp.sum(jnp.sin(f(self.x, d, i,
                                                               self.b))))
    got = jax.grad(loss(self.ours))(self.data, self.indices)
    want = jax.grad(loss(self.plain))(self.data, self.indices)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # ... and mapped indices under vmap of grad.
    idx = self._stacked(2)
    got = jax.vmap(jax.grad(loss(self.ours)), (None, 0))(self.data, idx)
    want = jax.vmap(jax.grad(loss(self.plain)), (None, 0))(self.data, idx)
    np.testing.assert_allclose(got, want, rtol=1e-5)

  def test_jvp(self):
    t = (jnp.ones_like(self.x), jnp.arange(6., dtype=jnp.float32),
         jnp.ones_like(self.b))
    f = lambda g: lambda x, d, b: g(x, d, self.indices, b)
    y, got = jax.jvp(f(self.ours), (self.x, self.data, self.b), t)
    want_y, want = jax.jvp(f(self.plain), (self.x, self.data, self.b), t)
    np.testing.assert_allclose(y, want_y, rtol=1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-5)

  def test_linear_transpose_in_data(self):
    ct = jnp.arange(20., dtype=jnp.float32).reshape(4, 5)
    f = lambda d: etp.sparse_matmul(self.x, d, self.indices, self.shape)
    (got,) = jax.linear_transpose(f, self.data)(ct)
    rows, cols = self.indices[:, 0], self.indices[:, 1]
    want = jnp.einsum('bk,bk->k', self.x[:, rows], ct[:, cols])
    np.testing.assert_allclose(got, want, rtol=1e-6)

  def test_linear_transpose_in_x(self):
    ct = jnp.arange(5., dtype=jnp.float32)
    f = lambda x: etp.sparse_matmul(x, self.data, self.indices, self.shape)
    (got,) = jax.linear_transpose(f, self.x[0])(ct)
    np.testing.assert_allclose(
        got, dense_of(self.data, self.indices, self.shape) @ ct, rtol=1e-6)

  @pytest.mark.parametrize('x_dtype,data_dtype', [
      (jnp.float32, jnp.bfloat16), (jnp.float64, jnp.float32)])
  def test_cotangent_has_the_dtype_of_mixed_precision_data(self, x_dtype,
                                                           data_dtype):
    # BCOO's own transpose gives bfloat16 data next to a float32 x a float32
    # cotangent; the impl computes in the common dtype, so it comes back cast.
    with x64_enabled(x_dtype == jnp.float64):
      x = self.x.astype(x_dtype)
      data = self.data.astype(data_dtype)
      f = lambda d: etp.sparse_matmul(x, d, self.indices, self.shape)
      y, vjp = jax.vjp(f, data)
      assert y.dtype == jnp.result_type(x_dtype, data_dtype)
      (ct,) = vjp(jnp.ones_like(y))
      assert ct.dtype == data.dtype

  def test_empty_pattern(self):
    e_data, e_idx = jnp.zeros(0), jnp.zeros((0, 2), jnp.int32)
    y = etp.sparse_matmul(self.x, e_data, e_idx, self.shape, self.b)
    np.testing.assert_allclose(y, jnp.broadcast_to(self.b, (4, 5)))
    g = jax.grad(lambda d: etp.sparse_matmul(self.x, d, e_idx, self.shape,
                                             self.b).sum())(e_data)
    assert g.shape == (0,)

  @pytest.mark.parametrize('batched', [False, True])
  def test_lowers_to_the_same_operations(self, batched):
    args = self.args if batched else (self.x[0],) + self.args[1:]

    def ops(f):
      text = jax.jit(f).lower(*args).as_text()
      return collections.Counter(
          tok.split('(')[0] for tok in text.split() if tok.startswith('stablehlo.'))
    ours, plain = ops(self.ours), ops(self.plain_bcoo)
    assert ours == plain, (ours, plain)


class TestErrors:
  shape = (3, 4)
  idx = jnp.array([[0, 1], [2, 0], [0, 3]])
  data = jnp.ones(3)

  def test_x_rank(self):
    with pytest.raises(ValueError, match=r'sparse_matmul: `x` must have shape '
                       r'\(in,\) or \(batch, in\).*reshape'):
      etp.sparse_matmul(jnp.ones((2, 2, 3)), self.data, self.idx, self.shape)

  def test_inner_mismatch(self):
    with pytest.raises(ValueError, match=r'`x` must have shape.*in=3.*shape '
                       r'\(3, 4\), got shape \(2, 4\)'):
      etp.sparse_matmul(jnp.ones((2, 4)), self.data, self.idx, self.shape)

  def test_data_rank(self):
    with pytest.raises(ValueError, match=r'`data` must have shape \(nnz,\)'):
      etp.sparse_matmul(jnp.ones(3), jnp.ones((3, 1)), self.idx, self.shape)

  def test_data_length(self):
    with pytest.raises(ValueError, match=r'`data` must have shape \(3,\) to '
                       r'match indices of shape \(3, 2\), got shape \(4,\)'):
      etp.sparse_matmul(jnp.ones(3), jnp.ones(4), self.idx, self.shape)

  @pytest.mark.parametrize('bad', [jnp.zeros(3, jnp.int32),
                                   jnp.zeros((3, 3), jnp.int32)])
  def test_indices_shape(self, bad):
    with pytest.raises(ValueError, match=r'`indices` must have shape '
                       r'\(nnz, 2\)'):
      etp.sparse_matmul(jnp.ones(3), self.data, bad, self.shape)

  def test_indices_not_integer(self):
    with pytest.raises(TypeError, match=r'`indices` must be an integer array'):
      etp.sparse_matmul(jnp.ones(3), self.data, self.idx.astype(jnp.float32),
                        self.shape)

  def test_indices_quantity(self):
    with pytest.raises(TypeError, match=r'`indices` must be a plain integer'):
      etp.sparse_matmul(jnp.ones(3), self.data, self.idx * u.mV, self.shape)

  @pytest.mark.parametrize('entry', [[3, 0], [0, 4], [-1, 1], [1, -2]])
  def test_indices_out_of_range(self, entry):
    idx = jnp.array([[0, 1], entry, [0, 3]])
    with pytest.raises(ValueError, match=r'`indices` must hold \(row, col\) '
                       r'pairs.*`shape` \(3, 4\).*entry 1'):
      etp.sparse_matmul(jnp.ones(3), self.data, idx, self.shape)

  def test_duplicate_indices(self):
    idx = jnp.array([[0, 1], [2, 0], [0, 1]])
    with pytest.raises(ValueError, match=r'`indices` must not repeat.*\(0, 1\) '
                       r'\(entry 0\) appears 2 times'):
      etp.sparse_matmul(jnp.ones(3), self.data, idx, self.shape)

  @pytest.mark.parametrize('shape', [(3,), (3, 4, 1), (3., 4), (0, 4), 3])
  def test_bad_shape(self, shape):
    with pytest.raises(TypeError, match=r'`shape` must be a pair of positive'):
      etp.sparse_matmul(jnp.ones(3), self.data, self.idx, shape)

  def test_bias_shape(self):
    with pytest.raises(ValueError, match=r'`bias` must have shape \(4,\)'):
      etp.sparse_matmul(jnp.ones(3), self.data, self.idx, self.shape,
                        jnp.ones(3))

  def test_bias_unit_mismatch(self):
    with pytest.raises(u.UnitMismatchError, match='`bias` has unit'):
      etp.sparse_matmul(jnp.ones(3) * u.mV, self.data * u.siemens, self.idx,
                        self.shape, jnp.ones(4) * u.mV)

  def test_integer_x(self):
    with pytest.raises(TypeError, match='`x` must be floating point'):
      etp.sparse_matmul(jnp.ones(3, jnp.int32), self.data, self.idx,
                        self.shape)

  def test_integer_data(self):
    with pytest.raises(TypeError, match='`data` must be floating point'):
      etp.sparse_matmul(jnp.ones(3), jnp.ones(3, jnp.int32), self.idx,
                        self.shape)

  def test_error_prefix(self):
    with pytest.raises(ValueError, match=r'^\[etp\] sparse_matmul: '):
      etp.sparse_matmul(jnp.ones(2), self.data, self.idx, self.shape)


class TestUnits:
  idx = jnp.array([[0, 1], [2, 0], [0, 3]])

  def test_units_multiply(self):
    y = etp.sparse_matmul(jnp.ones((2, 3)) * u.mV, jnp.ones(3) * u.siemens,
                          self.idx, (3, 4), jnp.ones(4) * u.uA)
    assert u.get_unit(y) == u.mA
    np.testing.assert_allclose(u.get_mantissa(y)[0], [1.001, 1.001, 0.001,
                                                      1.001], rtol=1e-6)

  def test_unitless_returns_array(self):
    y = etp.sparse_matmul(jnp.ones(3), jnp.ones(3), self.idx, (3, 4))
    assert isinstance(y, jax.Array)

  def test_grad_through_units(self):
    f = lambda d: u.get_mantissa(etp.sparse_matmul(
        jnp.array([1., 2., 3.]) * u.mV, d * u.siemens, self.idx, (3, 4))).sum()
    np.testing.assert_allclose(jax.grad(f)(jnp.ones(3)), [1., 3., 1.])


def test_eager_bind_takes_numpy_operands():
  """An eager bind with NumPy operands gives a JAX array, not the object array
  NumPy's ``@`` would build from the impl's BCOO matrix."""
  x = np.ones((2, 3), np.float32)
  data = np.array([1., 2.], np.float32)
  indices = np.array([[0, 1], [2, 3]], np.int32)
  out = etp.etp_sp_mm_p.bind(x, data, indices, shape=(3, 4), has_bias=False)
  want = etp.etp_sp_mm_p.bind(*map(jnp.asarray, (x, data, indices)),
                              shape=(3, 4), has_bias=False)
  assert isinstance(out, jax.Array) and out.dtype == np.float32
  np.testing.assert_array_equal(out, want)


def test_traced_bind_with_numpy_constant_x():
  """A NumPy ``x`` closed over by a jitted, differentiated function is a
  constant of the trace; the product must stay one ``bcoo_dot_general``
  (NumPy's ``@`` iterated the BCOO matrix row by row: a slice per row, minutes
  at 4096 rows)."""
  rng = np.random.default_rng(0)
  n, nnz = 64, 200
  flat = rng.choice(n * n, size=nnz, replace=False)
  indices = np.stack([flat // n, flat % n], axis=1).astype(np.int32)
  x = rng.standard_normal(n, dtype=np.float32)
  data = rng.standard_normal(nnz, dtype=np.float32)

  def y_of(d):
    return etp.etp_sp_mv_p.bind(x, d, indices, shape=(n, n), has_bias=False)

  def forward_vjp(d, g):
    y, vjp = jax.vjp(y_of, d)
    return y, vjp(g)

  g = np.ones(n, np.float32)
  jaxpr = str(jax.make_jaxpr(forward_vjp)(data, g))
  assert jaxpr.count('slice') < n // 2, 'the product iterated over rows'
  dense = np.zeros((n, n), np.float32)
  dense[indices[:, 0], indices[:, 1]] = data
  y, (dd,) = jax.jit(forward_vjp)(data, g)
  np.testing.assert_allclose(y, x @ dense, rtol=2e-5, atol=1e-5)
  np.testing.assert_allclose(dd, x[indices[:, 0]], rtol=1e-6)
