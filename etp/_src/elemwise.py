r"""Element-wise weights: ``etp_elemwise_p``, the identity on ``fn(weight)``.

``element_wise(w, fn)`` computes :math:`v = fn(w)` in plain JAX and binds
``etp_elemwise_p`` on :math:`v`; the primitive's impl is the identity, so

.. math::

   y_k = v_k, \qquad v = fn(w), \qquad
   \frac{\partial L}{\partial w} = fn'(w)^\top \frac{\partial L}{\partial v}.

The primitive has no input ``x`` (``x_invar_index=None``) and one trainable
operand, ``'weight'`` (operand 0), which is :math:`v`, not the raw :math:`w`.
It is registered with ``gradient_enabled=True``: a compiler may descend through
it and compose JAX's own VJP of whatever produced the operand, so
:math:`\partial v / \partial w = fn'(w)` comes from JAX, never from these rules.
The rules see the primitive's operand :math:`v` only, and every element is
anchored at its own position (``v[k]`` reaches ``y[k]`` only):

* ``xy_to_dw``: :math:`\partial v = g` (``x`` is ``None``), in ``v``'s dtype;
* ``yw_to_w``: :math:`T[\dots, k] \mapsto g[\dots, k]\, T[\dots, k]`, leading
  axes broadcast;
* ``init_drtrl``: zeros ``(*y_shape, n_state)`` (``y`` has ``v``'s shape) in
  the operand's dtype;
* ``init_pp``: zeros ``(*y_shape, n_state)`` in ``y``'s dtype.

Under ``jax.vmap`` the derived batching rule would inline the identity and the
primitive would vanish from the jaxpr; a custom rule binds ``etp_elemwise_p``
on the batched operand instead (the output keeps the operand's batch axis).

Units: ``fn`` receives ``weight`` as given (a ``saiunit`` quantity stays a
quantity, so ``fn`` must then be unit-aware, e.g. ``saiunit.math``); its
result is split into mantissa and unit, the primitive binds on the mantissa,
and ``y`` gets ``fn(weight)``'s unit back.
"""

from __future__ import annotations

import jax.numpy as jnp

from etp._src.arrays import to_jax
from etp._src import rule_util
from etp._src import units
from etp._src import validation
from etp._src.primitive import register_primitive

__all__ = ['etp_elemwise_p', 'element_wise']


def _impl(weight):
  return weight


def _trainable(params) -> dict:
  del params
  return {'weight': 0}


def _xy_to_dw(x, g, weights):
  del x  # the primitive has no input
  w = weights['weight']
  # g has y's (= the weight's) shape; any extra leading axes are summed.
  return {'weight': rule_util.sum_leading(g, w.ndim).astype(w.dtype)}


def _yw_to_w(g, trace):
  return {'weight': g * trace['weight']}


def _init_drtrl(x_var, y_var, weight_vars, n_state):
  y = rule_util.aval(y_var)
  dtype = rule_util.trace_dtype(x_var, y_var, weight_vars)
  return {'weight': jnp.zeros(tuple(y.shape) + (n_state,), dtype)}


def _batch(args, dims):
  # The identity is shape-agnostic: bind on the batched operand as it is, so
  # the primitive stays visible in the jaxpr under vmap.
  (v,), (dim,) = args, dims
  return etp_elemwise_p.bind(v), dim


etp_elemwise_p = register_primitive(
    'etp_elemwise', _impl, batched=False, gradient_enabled=True,
    trainable_invars_fn=_trainable, x_invar_index=None)
etp_elemwise_p.register_etp_rules(
    yw_to_w=_yw_to_w, xy_to_dw=_xy_to_dw, init_drtrl=_init_drtrl,
    init_pp=rule_util.pp_trace)
etp_elemwise_p.def_batching_rule(_batch)


def element_wise(weight, fn=lambda w: w):
  """``fn(weight)`` through ``etp_elemwise_p``, marked as a trainable weight.

  Args:
    weight: array or ``saiunit`` quantity, any shape; the raw parameter.
    fn: applied to ``weight`` before the primitive binds (JAX differentiates
      it; it may change the shape or the unit, e.g. ``lambda w: w ** 2``).
      It gets the quantity itself when ``weight`` carries a unit.

  Returns:
    ``fn(weight)``, with ``fn(weight)``'s unit.

  Raises:
    TypeError: ``fn`` is not callable, returns ``None``, or returns a value
      that is not floating point.
  """
  name = 'element_wise'
  if not callable(fn):
    validation.fail(name, f'`fn` must be callable, got '
                    f'{type(fn).__name__}: {fn!r}.', TypeError)
  value = fn(weight)
  if value is None:
    validation.fail(name, '`fn` returned None; it must return the transformed '
                    'weight (an array or a quantity).', TypeError)
  mantissa, unit = units.split(value)
  mantissa = to_jax(mantissa)
  validation.check_floating(name, 'fn(weight)', mantissa)
  return units.combine(etp_elemwise_p.bind(mantissa), unit)
