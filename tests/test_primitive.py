"""The primitive machinery: registration, registry queries, derived JAX rules."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import etp
from etp._src import dense, registry

from _cases import first_case

_counter = itertools.count()


def _name(base):
  return f'test_primitive_{base}_{next(_counter)}'


def _scaled_impl(x, w, idx, *, scale):
  # An integer operand (like sparse indices) that only selects columns.
  return scale * (x @ w)[..., idx]


def _make_with_int_operand(batched=False):
  return etp.register_primitive(
      _name('int'), _scaled_impl, batched=batched,
      trainable_invars_fn=lambda p: {'weight': 1},
      aux_invars_fn=lambda p: {'idx': 2})


def _rules_kwargs():
  r = etp.rules_of(etp.etp_mv_p)
  return dict(yw_to_w=r.yw_to_w, xy_to_dw=r.xy_to_dw,
              init_drtrl=r.init_drtrl, init_pp=r.init_pp)


class TestRegistration:

  def test_registered_primitive_is_listed_and_queryable(self):
    p = etp.register_primitive(_name('listed'), dense._impl,
                               trainable_invars_fn=dense._trainable)
    assert p in etp.primitives()
    assert etp.is_etp_primitive(p)
    rules = etp.rules_of(p)
    assert not rules.has_rules
    p.register_etp_rules(**_rules_kwargs())
    rules = etp.rules_of(p)
    assert rules.has_rules and rules.x_invar_index == 0
    assert rules.y_outvar_index == 0 and not rules.batched
    with pytest.raises(dataclasses_frozen_error()):
      rules.batched = True  # the record is immutable

  def test_builtins_are_registered(self):
    names = {p.name for p in etp.primitives()}
    assert {'etp_mv', 'etp_mm'} <= names
    assert not etp.is_etp_primitive(jax.lax.add_p)
    with pytest.raises(KeyError, match='not a registered ETP primitive'):
      etp.rules_of(jax.lax.add_p)

  def test_name_twice_is_rejected(self):
    name = _name('twice')
    etp.register_primitive(name, dense._impl)
    with pytest.raises(ValueError, match=f'{name}.*already registered'):
      etp.register_primitive(name, dense._impl)

  @pytest.mark.parametrize('bad', ['odd::name', 'one:colon', 'br[0]',
                                   'two words', 'tab\tname'])
  def test_a_name_that_splits_a_test_id_is_rejected(self, bad):
    # etp::<name>::<check>: --lf lost the failures of 'odd::name' and
    # 'br[0]', and their printed ids selected nothing.
    with pytest.raises(ValueError, match='not allowed in a name'):
      etp.register_primitive(bad + _name('x'), dense._impl)
    etp.register_primitive(_name('fine.name-1'), dense._impl)

  def test_rules_twice_need_replace(self):
    p = etp.register_primitive(_name('rules_twice'), dense._impl,
                               trainable_invars_fn=dense._trainable)
    p.register_etp_rules(**_rules_kwargs())
    with pytest.raises(ValueError, match=f"{p.name}.*already has ETP rules"):
      p.register_etp_rules(**_rules_kwargs())
    p.register_etp_rules(**_rules_kwargs(), replace=True)

  def test_rule_not_callable(self):
    p = etp.register_primitive(_name('notcallable'), dense._impl)
    kwargs = _rules_kwargs()
    kwargs['yw_to_w'] = 3
    with pytest.raises(TypeError, match=f"'yw_to_w' of primitive '{p.name}'"):
      p.register_etp_rules(**kwargs)

  def test_missing_seed_rule(self):
    p = etp.register_primitive(_name('missing'), dense._impl)
    kwargs = _rules_kwargs()
    kwargs['init_pp'] = None
    with pytest.raises(TypeError, match="seed rule 'init_pp' is required"):
      p.register_etp_rules(**kwargs)

  def test_optional_rules_come_in_pairs(self):
    p = etp.register_primitive(_name('pair'), dense._impl)
    with pytest.raises(TypeError, match='come as a pair'):
      p.register_etp_rules(**_rules_kwargs(), instant_drtrl=lambda *a: a)

  def test_impl_not_callable(self):
    with pytest.raises(TypeError, match='impl_fn must be callable'):
      etp.register_primitive(_name('impl'), 'not a function')

  def test_trainable_index_out_of_range_names_primitive(self):
    p = etp.register_primitive(_name('range'), dense._impl,
                               trainable_invars_fn=lambda p: {'weight': 5})
    with pytest.raises(ValueError, match=f"{p.name}.*'weight' is operand 5"):
      p.bind(jnp.ones(2), jnp.ones((2, 3)), has_bias=False)

  def test_trainable_cannot_be_x(self):
    p = etp.register_primitive(_name('isx'), dense._impl,
                               trainable_invars_fn=lambda p: {'weight': 0})
    with pytest.raises(ValueError, match='also the input x'):
      p.bind(jnp.ones(2), jnp.ones((2, 3)), has_bias=False)

  def test_bad_x_index(self):
    with pytest.raises(ValueError, match='x_invar_index'):
      etp.register_primitive(_name('xi'), dense._impl, x_invar_index=-1)


def dataclasses_frozen_error():
  import dataclasses
  return dataclasses.FrozenInstanceError


class TestDerivedRules:

  def setup_method(self):
    self.x = jnp.asarray(np.random.RandomState(0).randn(3), jnp.float32)
    self.w = jnp.asarray(np.random.RandomState(1).randn(3, 4), jnp.float32)
    self.idx = jnp.asarray([3, 0, 2], jnp.int32)

  def test_eager_jit_and_abstract_eval(self):
    p = _make_with_int_operand()
    f = lambda x, w, i: p.bind(x, w, i, scale=2.0)
    expected = 2.0 * (self.x @ self.w)[self.idx]
    np.testing.assert_allclose(f(self.x, self.w, self.idx), expected, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(f)(self.x, self.w, self.idx), expected,
                               rtol=1e-6)
    shape = jax.eval_shape(f, self.x, self.w, self.idx)
    assert shape.shape == (3,) and shape.dtype == jnp.float32

  def test_jvp_with_integer_operand_has_float0_tangent(self):
    p = _make_with_int_operand()
    f = lambda x, w, i: p.bind(x, w, i, scale=2.0)
    tangent_i = np.zeros(self.idx.shape, jax.dtypes.float0)
    y, ty = jax.jvp(f, (self.x, self.w, self.idx),
                    (self.x, jnp.ones_like(self.w), tangent_i))
    plain = lambda x, w: 2.0 * (x @ w)[self.idx]
    y2, ty2 = jax.jvp(plain, (self.x, self.w), (self.x, jnp.ones_like(self.w)))
    np.testing.assert_allclose(y, y2, rtol=1e-6)
    np.testing.assert_allclose(ty, ty2, rtol=1e-6)

  def test_grad_and_second_order(self):
    p = _make_with_int_operand()
    loss = lambda w: jnp.sum(jnp.sin(p.bind(self.x, w, self.idx, scale=2.0)))
    plain = lambda w: jnp.sum(jnp.sin(2.0 * (self.x @ w)[self.idx]))
    np.testing.assert_allclose(jax.grad(loss)(self.w), jax.grad(plain)(self.w),
                               rtol=1e-5)
    np.testing.assert_allclose(jax.hessian(loss)(self.w),
                               jax.hessian(plain)(self.w), rtol=1e-4, atol=1e-6)

  def test_linear_transpose(self):
    p = _make_with_int_operand()
    f = lambda w: p.bind(self.x, w, self.idx, scale=2.0)
    plain = lambda w: 2.0 * (self.x @ w)[self.idx]
    ct = jnp.arange(3.0)
    np.testing.assert_allclose(jax.linear_transpose(f, self.w)(ct)[0],
                               jax.linear_transpose(plain, self.w)(ct)[0])

  def test_transpose_of_nonlinear_impl_is_a_clear_error(self):
    p = etp.register_primitive(_name('nonlin'), lambda x, w: jnp.tanh(x @ w),
                               trainable_invars_fn=lambda p: {'weight': 1})
    with pytest.raises(TypeError, match=r"\[etp\] primitive '.*nonlin.*' "
                       r'cannot be transposed in operands \[1\]: its impl is '
                       'not linear in them'):
      jax.linear_transpose(lambda w: p.bind(self.x, w), self.w)(jnp.ones(4))

  @pytest.mark.parametrize('axes', [(0, None, None), (1, None, None),
                                    (-1, None, None), (None, 0, None),
                                    (0, 2, None), (None, None, 0),
                                    (0, 1, 0), (-1, -1, None)])
  def test_vmap_any_axes(self, axes):
    p = _make_with_int_operand()
    f = lambda x, w, i: p.bind(x, w, i, scale=2.0)
    plain = lambda x, w, i: 2.0 * (x @ w)[i]
    rng = np.random.RandomState(2)
    args = [self.x, self.w, self.idx]
    batched = []
    for a, ax in zip(args, axes):
      if ax is None:
        batched.append(a)
      else:
        stack = jnp.stack([a] * 2 if a.dtype == jnp.int32 else
                          [a, jnp.asarray(rng.randn(*a.shape), a.dtype)])
        batched.append(jnp.moveaxis(stack, 0, ax))
    np.testing.assert_allclose(jax.vmap(f, in_axes=axes)(*batched),
                               jax.vmap(plain, in_axes=axes)(*batched),
                               rtol=1e-5)

  def test_vmap_over_x_binds_batched_counterpart(self):
    xs = jnp.ones((5, 3))
    jaxpr = jax.make_jaxpr(jax.vmap(etp.matmul, in_axes=(0, None)))(xs, self.w)
    prims = [e.primitive for e in jaxpr.jaxpr.eqns]
    assert etp.etp_mm_p in prims

  def test_vmap_of_batched_primitive_folds_into_batch(self):
    xs = jnp.ones((2, 5, 3))
    jaxpr = jax.make_jaxpr(jax.vmap(etp.matmul, in_axes=(0, None)))(xs, self.w)
    assert etp.etp_mm_p in [e.primitive for e in jaxpr.jaxpr.eqns]
    np.testing.assert_allclose(jax.vmap(etp.matmul, in_axes=(0, None))(
        xs, self.w), xs @ self.w, rtol=1e-6)

  def test_set_batched_counterpart_validates(self):
    with pytest.raises(ValueError, match='counterpart'):
      etp.etp_mm_p.set_batched_counterpart(etp.etp_mv_p)


def test_split_operands_gives_aux_operands_to_rules():
  p = _make_with_int_operand()
  ops = (jnp.ones(3), jnp.ones((3, 4)), jnp.asarray([0, 1]))
  x, weights, rule_params = p.split_operands(ops, {'scale': 2.0})
  assert x is ops[0]
  assert set(weights) == {'weight'} and weights['weight'] is ops[1]
  assert rule_params['scale'] == 2.0 and rule_params['idx'] is ops[2]


def test_registry_forget_is_private_helper():
  p = etp.register_primitive(_name('forget'), dense._impl)
  registry._forget(p)
  assert not etp.is_etp_primitive(p)


@pytest.mark.parametrize('prim', [p for p in etp.primitives()
                                  if p.name.startswith('etp_')],
                         ids=lambda p: p.name)
def test_eager_bind_and_xy_to_dw_run_where_their_operands_are(prim):
  # The harness compares devices under jit (where JAX moves a pinned value
  # silently) and finds pins by reading jaxprs; this is the eager path, as a
  # user calls it, off the default device, once per built-in.
  cpus = jax.devices('cpu')
  if len(cpus) < 2:
    pytest.skip('needs 2 CPU devices (conftest.py sets 4)')
  ops, params = first_case(prim)
  ops = jax.device_put(list(ops), cpus[-1])
  y = prim.bind(*ops, **params)
  for leaf in jax.tree.leaves(y):
    assert leaf.devices() == {cpus[-1]}
  y = y[prim.y_outvar_index] if prim.multiple_results else y
  x, weights, rule_params = prim.split_operands(ops, params)
  grads = etp.rules_of(prim).xy_to_dw(x, jnp.ones_like(y), weights,
                                      **rule_params)
  for leaf in jax.tree.leaves(grads):
    assert leaf.devices() == {cpus[-1]}
