"""Host arrays to JAX arrays without compiling anything.

``jnp.asarray`` on a NumPy array, called eagerly, binds ``lax.stage`` and
compiles a small program for every new shape and dtype (about 14 ms each on
a CPU with jax 0.10). The harness draws inputs for every check of every
generated shape, so that added up to seconds per battery. ``jax.device_put``
transfers the buffer instead and canonicalises the dtype the same way
(float64 becomes float32 unless x64 is on).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def to_jax(value, dtype=None):
  """``jnp.asarray(value, dtype)``, by a transfer where ``value`` is a NumPy
  array or scalar (anything else, a JAX array or a tracer, goes through
  ``jnp.asarray``)."""
  if isinstance(value, (np.ndarray, np.generic)):
    if dtype is not None:
      value = np.asarray(value, jnp.dtype(dtype))
    return jax.device_put(value)
  return jnp.asarray(value, dtype)
