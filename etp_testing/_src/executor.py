r"""The reference D-RTRL and pp-prop executors: what "exact" means.

One primitive ``P`` sits inside a diagonal recurrence with ``S`` hidden states
per output element:

.. math::

   y_t = P(x_t, w), \qquad
   h_t[\dots, a] = \sum_b A_t[\dots, a, b]\, h_{t-1}[\dots, b] + B_t[\dots, a]\, y_t,
   \qquad L = \sum_t \langle c_t, h_t \rangle .

:func:`unrolled_loss` writes that loop in plain JAX (``jax.grad`` of it is the
truth); :func:`drtrl_gradient` computes the same gradient from the rules alone:

.. math::

   \varepsilon_t[\dots, a] = \sum_b \mathrm{yw\_to\_w}(A_t[\dots, a, b],
       \varepsilon_{t-1}[\dots, b]) + \mathrm{instant}(x_t, B_t[\dots, a], w),
   \qquad
   \nabla_w L = \sum_t \sum_a \mathrm{solve}(c_t[\dots, a], \varepsilon_t[\dots, a]).

The ``S`` axis is the trace's last axis; the executor ``vmap``\ s ``yw_to_w``
over it.  For a batched primitive the instantaneous term is taken per example
(each as a batch of one) unless the primitive provides ``instant_drtrl``, which
then returns per-example traces for the whole batch itself.

Both sides loop over ``t`` with ``lax.scan``: one traced step, so the
compiled program (and its compile time) does not grow with ``T``.  The
carries keep their initial dtypes (the trace's are ``init_drtrl``'s, which
``init.drtrl`` judges).

Where a weight reaches the primitive through ``fn`` (``element_wise(w, fn)``),
``transforms={key: fn}`` applies ``fn`` to the raw weight, and the raw gradient
is JAX's VJP of ``fn`` at the solved gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp

import etp
from etp._src import registry, rule_util
from etp._src.registry import call_init_rule

RULE_NAMES = registry.SEED_RULES + registry.OPTIONAL_RULES
# The rules that receive jaxpr variables (shapes and dtypes), not arrays.
INIT_RULES = ('init_drtrl', 'init_pp')


def registered_rules(rules) -> tuple:
  """The names of ``RULE_NAMES`` that the rules record has (the optional
  ones only where registered)."""
  return tuple(n for n in RULE_NAMES if getattr(rules, n) is not None)


def map_rules(rules, wrap):
  """The rules record with each registered rule ``r`` (of ``RULE_NAMES``)
  replaced by ``wrap(name, r)``; rules not registered stay ``None``."""
  return dataclasses.replace(rules, **{
      n: wrap(n, getattr(rules, n)) for n in registered_rules(rules)})


def jaxpr_vars(primitive, operands, params):
  """The real jaxpr variables ``(x_var, y_var, weight_vars)`` of one bind."""
  closed = jax.make_jaxpr(lambda *ops: primitive.bind(*ops, **params))(*operands)
  eqns = [e for e in closed.jaxpr.eqns if e.primitive is primitive]
  if len(eqns) != 1:
    raise AssertionError(
        f'tracing {primitive.name} gave {len(eqns)} equations of it, not 1')
  eqn = eqns[0]
  x_var = (None if primitive.x_invar_index is None
           else eqn.invars[primitive.x_invar_index])
  y_var = eqn.outvars[primitive.y_outvar_index]
  weight_vars = {k: eqn.invars[i]
                 for k, i in primitive.trainable_invars(params).items()}
  return x_var, y_var, weight_vars


def all_eqns(jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs in its equations' params
  (``jit``, ``cond``, ``scan``, ``custom_jvp_call``, ...), depth first."""
  for eqn, _ in eqns_with_name_stacks(jaxpr):
    yield eqn


def eqns_with_name_stacks(jaxpr, outer: str = ''):
  """``(eqn, name_stack)`` for :func:`all_eqns`' equations, each with its
  full ``jax.named_scope`` path: inside a nested jaxpr (a ``jax.jit``
  called in a scope) an equation's own name stack starts afresh, so the
  enclosing equation's is put in front."""
  for eqn in jaxpr.eqns:
    own = str(eqn.source_info.name_stack)
    stack = '/'.join(s for s in (outer, own) if s)
    yield eqn, stack
    for item in param_items(eqn):
      inner = getattr(item, 'jaxpr', item)
      if hasattr(inner, 'eqns'):
        yield from eqns_with_name_stacks(inner, stack)


def param_items(eqn):
  """An equation's param values, the items of tuple/list ones one by one
  (where nested jaxprs sit: ``cond``'s branches are a tuple)."""
  for v in eqn.params.values():
    yield from (v if isinstance(v, (tuple, list)) else (v,))


def bind_y(primitive, operands, params):
  """The ``y`` output of one bind."""
  return y_of_outputs(primitive, primitive.bind(*operands, **params))


def y_of_outputs(primitive, out):
  """The ``y`` output among a bind's outputs ``out``."""
  return out[primitive.y_outvar_index] if primitive.multiple_results else out


def with_x(primitive, operands, x):
  """The operands with ``x`` replaced."""
  ops = list(operands)
  if primitive.x_invar_index is not None:
    ops[primitive.x_invar_index] = x
  return ops


def with_weights(primitive, operands, params, weights: Mapping):
  """The operands with the trainable ones replaced by ``weights[key]``."""
  ops = list(operands)
  for k, i in primitive.trainable_invars(params).items():
    ops[i] = weights[k]
  return ops


def _apply_transforms(weights, transforms):
  return {k: transforms[k](w) if k in transforms else w
          for k, w in weights.items()}


def unrolled_loss(primitive, operands, params, raw_weights: Mapping, xs, A, Bf,
                  C, transforms: Optional[Mapping[str, Callable]] = None):
  """``L = sum_t <c_t, h_t>`` of the recurrence, in plain JAX (the loop over
  ``t`` is a ``lax.scan``: the same loss, one traced step)."""
  transforms = transforms or {}
  weights = _apply_transforms(raw_weights, transforms)
  ops = with_weights(primitive, operands, params, weights)
  h0 = jnp.zeros(Bf.shape[1:], jnp.result_type(Bf, *weights.values()))

  def step(carry, inputs):
    h, loss = carry
    x_t, a_t, bf_t, c_t = inputs
    y = bind_y(primitive, with_x(primitive, ops, x_t), params)
    h = (jnp.einsum('...ab,...b->...a', a_t, h) + bf_t * y[..., None]
         ).astype(h.dtype)
    return (h, loss + jnp.sum(c_t * h).astype(loss.dtype)), None

  (_, loss), _ = jax.lax.scan(step, (h0, jnp.zeros((), h0.dtype)),
                              (xs, A, Bf, C))
  return loss


def autodiff_gradient(primitive, operands, params, xs, A, Bf, C,
                      transforms=None) -> dict:
  """``jax.grad`` of :func:`unrolled_loss` w.r.t. every raw weight."""
  _, weights, _ = primitive.split_operands(operands, params)
  return jax.grad(lambda w: unrolled_loss(primitive, operands, params, w, xs,
                                          A, Bf, C, transforms))(weights)


def instant_term(primitive, rules, x, g, weights, rule_params):
  """The trace increment of one step (per example for batched primitives)."""
  if rules.instant_drtrl is not None:
    return rules.instant_drtrl(x, g, weights, **rule_params)
  if primitive.batched:
    one = lambda xi, gi: rules.xy_to_dw(xi[None], gi[None], weights,
                                        **rule_params)
    return jax.vmap(one)(x, g)
  return rules.xy_to_dw(x, g, weights, **rule_params)


def solve_term(rules, c, trace, weights, rule_params):
  """A weight-shaped gradient from a learning signal and a trace."""
  if rules.solve_drtrl is not None:
    return rules.solve_drtrl(c, trace, **rule_params)
  linked = rules.yw_to_w(c, trace, **rule_params)
  return {k: rule_util.sum_leading(v, weights[k].ndim)
          for k, v in linked.items()}


def drtrl_gradient(primitive, operands, params, xs, A, Bf, C, transforms=None,
                   rules=None) -> dict:
  """The gradient of :func:`unrolled_loss` from the ETP rules alone."""
  rules = rules or etp.rules_of(primitive)
  transforms = transforms or {}
  _, raw_weights, rule_params = primitive.split_operands(operands, params)
  weights = _apply_transforms(raw_weights, transforms)
  ops = with_weights(primitive, operands, params, weights)
  n_state = A.shape[-1]
  x0 = None if xs is None else xs[0]
  x_var, y_var, weight_vars = jaxpr_vars(
      primitive, with_x(primitive, ops, x0), params)
  trace = call_init_rule(rules.init_drtrl, x_var, y_var, weight_vars, n_state,
                         rule_params)

  link = lambda g, tr: rules.yw_to_w(g, tr, **rule_params)
  # yw_to_w vmapped over the trace's state axis b, as the contract's executor
  # does; sum_b then adds the S slices.  Not .sum() over that axis: XLA:CPU
  # ran that reduce over a small minor axis 300x slower on a 2048 x 2048
  # dense layer (and drtrl.exact timed out on 4096 x 4096 with n_state=2).
  link_states = jax.vmap(link, in_axes=(-1, -1), out_axes=-1)
  state = lambda tree, b: jax.tree.map(lambda v: v[..., b], tree)
  add = lambda p, q: jax.tree.map(jnp.add, p, q)

  def step(carry, inputs):
    trace, grads = carry
    x_t, a_t, bf_t, c_t = inputs
    new_trace = []
    for a in range(n_state):
      # sum_b yw_to_w(A[..., a, b], eps[..., b])
      linked = link_states(a_t[..., a, :], trace)
      carried = functools.reduce(add, (state(linked, b)
                                       for b in range(n_state)))
      inst = instant_term(primitive, rules, x_t, bf_t[..., a], weights,
                          rule_params)
      new_trace.append(add(carried, inst))
    new_trace = jax.tree.map(lambda *vs: jnp.stack(vs, axis=-1), *new_trace)
    for a in range(n_state):
      solved = solve_term(rules, c_t[..., a], state(new_trace, a), weights,
                          rule_params)
      grads = {k: grads[k] + solved[k].astype(grads[k].dtype) for k in grads}
    # The carry keeps init_drtrl's dtypes (init.drtrl judges those), so a
    # trace whose update promotes it still composes.
    new_trace = jax.tree.map(lambda v, v0: v.astype(v0.dtype), new_trace,
                             trace)
    return (new_trace, grads), None

  grads = {k: jnp.zeros_like(w) for k, w in weights.items()}
  # One traced step for all T (lax.scan): the program, and its compile time,
  # does not grow with the number of steps.
  (_, grads), _ = jax.lax.scan(step, (trace, grads), (xs, A, Bf, C))
  # Through element_wise(w, fn): chain JAX's VJP of fn onto the solved grad.
  return {k: jax.vjp(transforms[k], raw_weights[k])[1](g)[0]
          if k in transforms else g for k, g in grads.items()}


def pp_loss(primitive, operands, params, weights, xs, C, alpha):
  """``L = sum_t <c_t, h_t>`` with ``h_t = alpha h_{t-1} + P(x_t, w)``."""
  ops = with_weights(primitive, operands, params, weights)
  h, loss = 0., 0.
  for t in range(xs.shape[0]):
    h = alpha * h + bind_y(primitive, with_x(primitive, ops, xs[t]), params)
    loss = loss + jnp.sum(C[t] * h)
  return loss


def pp_gradient(primitive, operands, params, xs, C, alpha, rules=None) -> dict:
  r"""pp-prop's factorised gradient :math:`\sum_t \mathrm{xy\_to\_dw}(\varepsilon^x_t, c_t \odot \varepsilon^f)`.

  With one state and a uniform scalar decay, the ``df`` trace is 1 (its shape
  comes from ``init_pp``) and the input trace is
  :math:`\varepsilon^x_t = \alpha \varepsilon^x_{t-1} + x_t`.
  """
  rules = rules or etp.rules_of(primitive)
  _, weights, rule_params = primitive.split_operands(operands, params)
  x_var, y_var, weight_vars = jaxpr_vars(primitive, operands, params)
  eps_f = jnp.ones_like(call_init_rule(rules.init_pp, x_var, y_var,
                                      weight_vars, 1, rule_params)[..., 0])
  return pp_factorised(
      lambda eps_x, g: rules.xy_to_dw(eps_x, g, weights, **rule_params),
      weights, xs, C, eps_f, alpha)


def pp_factorised(xy_to_dw, weights, xs, C, eps_f, alpha) -> dict:
  r""":math:`\sum_t \mathrm{xy\_to\_dw}(\varepsilon^x_t, c_t \odot \varepsilon^f)`
  with :math:`\varepsilon^x_t = \alpha \varepsilon^x_{t-1} + x_t`, for any
  ``xy_to_dw(eps_x, g) -> {key: gradient}`` (a rule, or ``jax.vjp``)."""
  eps_x = jnp.zeros_like(xs[0])
  grads = {k: jnp.zeros_like(w) for k, w in weights.items()}
  for t in range(xs.shape[0]):
    eps_x = alpha * eps_x + xs[t]
    dw = xy_to_dw(eps_x, C[t] * eps_f)
    grads = {k: grads[k] + dw[k] for k in grads}
  return grads
