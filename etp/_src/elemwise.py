r"""The element-wise marker: ``etp_elemwise_p`` and ``element_wise``.

``element_wise(w, fn)`` computes ``fn(w)`` in plain JAX, then binds
``etp_elemwise_p`` on the result.  The primitive is the identity
(``gradient_enabled=True``, no input ``x``): it only marks where a weight enters
the model, so a compiler can descend through it and compose JAX's own VJP of
``fn``:

.. math::  y = \mathrm{id}(u), \quad u = fn(w), \qquad
           \frac{\partial L}{\partial w} = fn'(w)^\top \frac{\partial L}{\partial u}.

The rules see the primitive's operand ``u`` (key ``'weight'``); every element
``u[k]`` reaches ``y[k]`` only, so

* ``xy_to_dw(None, g, weights) = {'weight': g}``;
* ``yw_to_w(g, T) = {'weight': g * T}``;
* ``init_drtrl``/``init_pp``: zeros ``(*y_shape, n_state)``.
"""

from __future__ import annotations

import jax.numpy as jnp

from etp._src import rule_util
from etp._src import units
from etp._src import validation
from etp._src.primitive import register_primitive

__all__ = ['etp_elemwise_p', 'element_wise']


def _impl(weight):
  return weight


def _xy_to_dw(x, g, weights):
  del x
  return {'weight': jnp.asarray(g).astype(weights['weight'].dtype)}


def _yw_to_w(g, trace):
  return {'weight': g * trace['weight']}


def _init_drtrl(x_var, y_var, weight_vars, n_state):
  y = rule_util.aval(y_var)
  dtype = rule_util.trace_dtype(x_var, y_var, weight_vars)
  return {'weight': jnp.zeros(tuple(y.shape) + (n_state,), dtype)}


def _batch_identity(args, dims):
  # The identity is shape-agnostic: bind on the batched operand as it is, so
  # the marker stays visible in the jaxpr under vmap.
  return etp_elemwise_p.bind(*args), dims[0]


etp_elemwise_p = register_primitive(
    'etp_elemwise', _impl, batched=False, gradient_enabled=True,
    trainable_invars_fn=lambda params: {'weight': 0}, x_invar_index=None)
etp_elemwise_p.def_batching_rule(_batch_identity)
etp_elemwise_p.register_etp_rules(yw_to_w=_yw_to_w, xy_to_dw=_xy_to_dw,
                                  init_drtrl=_init_drtrl,
                                  init_pp=rule_util.pp_trace)


def element_wise(weight, fn=lambda w: w):
  """``fn(weight)``, marked as an ETP weight.

  Args:
    weight: an array or ``saiunit`` quantity of any shape.
    fn: applied to ``weight`` before the primitive binds (it may change the
      unit, e.g. ``lambda w: w ** 2``); its derivative comes from JAX.

  Returns:
    ``fn(weight)``, with ``fn(weight)``'s unit.
  """
  if not callable(fn):
    validation.fail('element_wise', f'`fn` must be callable, got '
                    f'{type(fn).__name__}.', TypeError)
  mantissa, unit = units.split(fn(weight))
  validation.check_floating('element_wise', 'fn(weight)', mantissa)
  return units.combine(etp_elemwise_p.bind(jnp.asarray(mantissa)), unit)
