"""Small pieces the built-in rules share.

Rules receive jaxpr variables in ``init_drtrl``/``init_pp``; anything with
``.aval`` (a ``jax.core.Var``), or with ``.shape``/``.dtype`` (an array, a
``jax.ShapeDtypeStruct``), is accepted here.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp


def aval(var):
  """The abstract value of a jaxpr variable, or the thing itself."""
  return getattr(var, 'aval', var)


def trace_dtype(x_var, y_var, weight_vars: Mapping):
  """``result_type`` of the participating avals (never the global default)."""
  dtypes = [aval(v).dtype for v in (x_var, y_var, *weight_vars.values())
            if v is not None]
  return jnp.result_type(*dtypes)


def batch_lead(y_var, batched: bool) -> tuple:
  """``(B,)`` for a batched primitive (read off ``y``), else ``()``."""
  return tuple(aval(y_var).shape[:1]) if batched else ()


def weight_shaped_traces(x_var, y_var, weight_vars: Mapping, n_state: int,
                         batched: bool) -> dict:
  """Zeros ``(*lead, *weight_shape, n_state)`` per key: an anchored trace."""
  dtype = trace_dtype(x_var, y_var, weight_vars)
  lead = batch_lead(y_var, batched)
  return {k: jnp.zeros(lead + tuple(aval(v).shape) + (n_state,), dtype)
          for k, v in weight_vars.items()}


def pp_trace(x_var, y_var, weight_vars: Mapping, n_state: int):
  """Zeros ``(*y_shape, n_state)`` in ``y``'s dtype: the pp-prop ``df`` trace."""
  del x_var, weight_vars
  y = aval(y_var)
  return jnp.zeros(tuple(y.shape) + (n_state,), y.dtype)


def sum_leading(value, ndim: int):
  """Sums ``value`` over all but its last ``ndim`` axes."""
  lead = value.ndim - ndim
  return value.sum(axis=tuple(range(lead))) if lead > 0 else value
