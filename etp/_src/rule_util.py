"""Small pieces the built-in rules share.

Rules receive jaxpr variables in ``init_drtrl``/``init_pp``; anything with
``.aval`` (a ``jax.core.Var``), or with ``.shape``/``.dtype`` (an array, a
``jax.ShapeDtypeStruct``), is accepted here.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
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


# Leading entries up to which sum_leading adds slices (see there).
SLICES_SUMMED = 64


def sum_leading(value, ndim: int):
  """Sums ``value`` over all but its last ``ndim`` axes.

  By adding slices, not with a reduce: XLA:CPU fuses the product that made
  ``value`` (a rule's ``c[..., None, :] * trace``) into a reduce over the
  batch axis and runs it about 40x slower (a batch of 8 on 1024 x 1024:
  1.2 s against 0.03 s).  Beyond ``SLICES_SUMMED`` entries, a loop over them
  (the program's size stays fixed).  Half-precision values are added in
  float32, as ``jnp.sum`` does.
  """
  lead = value.ndim - ndim
  if lead <= 0:
    return value
  tail = value.shape[lead:]
  value = value.reshape((-1,) + tail)
  if value.shape[0] == 0:
    return jnp.zeros(tail, value.dtype)
  dtype = value.dtype
  if dtype in (jnp.float16, jnp.bfloat16):
    value = value.astype(jnp.float32)
  if value.shape[0] <= SLICES_SUMMED:
    total = functools.reduce(jnp.add, [value[i] for i in range(len(value))])
  else:
    total = jax.lax.fori_loop(1, value.shape[0],
                              lambda i, acc: acc + value[i], value[0])
  return total.astype(dtype)
